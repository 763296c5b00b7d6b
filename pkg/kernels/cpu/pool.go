package cpu

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// pool runs a range of work split into one contiguous chunk per thread. The
// caller's goroutine computes chunk 0; threads-1 long-lived goroutines
// compute the others. A pool is used by one caller at a time.
//
// No channel or WaitGroup is on the hot path: an op publishes its job (a
// new immutable value with the next generation number); workers spin on it
// for a few tens of microseconds, then keep checking between
// runtime.Gosched calls, and park on a condition variable only when no op
// has come for parkAfter; the caller spins until the pending count drops
// to zero.
//
// Workers must not park within a forward pass. Waking a parked goroutine
// goes through the Go scheduler (an idle thread is woken and steals the
// goroutine from the caller's P, sleeping a few microseconds first, which
// the kernel's timer slack makes tens), and the caller waits that long at
// the op's end. Parking after the spin alone, a worker parked about 20
// times per one-token decode step in a test process and twice as often in
// a worker process, where the coordinator, its clients and the runtime's
// own threads take a CPU now and then and stretch the gaps between ops;
// that made the served step 10–20% slower than the same step in process.
type pool struct {
	threads int

	job      atomic.Pointer[job] // the current job; a new one per op
	gen      uint64              // the caller's count of jobs
	pending  atomic.Int32
	stop     atomic.Bool
	sleepers atomic.Int32
	mu       sync.Mutex
	cond     *sync.Cond
	done     sync.WaitGroup // worker goroutines
}

// job is one op's split, immutable once published.
type job struct {
	gen         uint64
	fn          func(tid, lo, hi int)
	n, grain    int
	units, part int
}

func (j *job) bound(i int) int { return min(j.n, (j.units*i/j.part)*j.grain) }

// spinLimit is how many checks a waiting goroutine makes before yielding
// (a few tens of microseconds).
const spinLimit = 20000

// parkAfter is how long a worker with no new op keeps yielding (so the
// process's other goroutines get its P) before it parks: longer than any
// gap within a forward pass, short enough that it stops taking a CPU soon
// after one.
const parkAfter = time.Millisecond

func newPool(threads int) *pool {
	p := &pool{threads: threads}
	p.cond = sync.NewCond(&p.mu)
	for i := 1; i < threads; i++ {
		p.done.Add(1)
		go p.worker(i)
	}
	return p
}

func (p *pool) worker(tid int) {
	defer p.done.Done()
	var last uint64
	var yielding time.Time // since when this wait has been yielding
	for {
		j := p.job.Load()
		for spins := 0; j == nil || j.gen == last; spins++ {
			if p.stop.Load() {
				return
			}
			switch {
			case spins < spinLimit:
				j = p.job.Load()
				continue
			case spins == spinLimit:
				yielding = time.Now()
				fallthrough
			case spins%64 != 0 || time.Since(yielding) < parkAfter:
				runtime.Gosched()
				j = p.job.Load()
				continue
			}
			p.mu.Lock()
			p.sleepers.Add(1)
			for j = p.job.Load(); (j == nil || j.gen == last) && !p.stop.Load(); j = p.job.Load() {
				p.cond.Wait()
			}
			p.sleepers.Add(-1)
			p.mu.Unlock()
		}
		if p.stop.Load() {
			return
		}
		last = j.gen
		if tid < j.part {
			j.fn(tid, j.bound(tid), j.bound(tid+1))
			p.pending.Add(-1)
		}
	}
}

// run splits [0, n) into at most p.threads chunks whose boundaries are
// multiples of grain (except the end), and calls fn(tid, lo, hi) for each,
// concurrently; it returns when all are done. Small ranges run inline.
func (p *pool) run(n, grain int, fn func(tid, lo, hi int)) {
	if n <= 0 {
		return
	}
	if grain < 1 {
		grain = 1
	}
	units := (n + grain - 1) / grain
	parts := min(p.threads, units)
	if parts <= 1 {
		fn(0, 0, n)
		return
	}
	p.gen++
	j := &job{gen: p.gen, fn: fn, n: n, grain: grain, units: units, part: parts}
	p.pending.Store(int32(parts - 1))
	p.job.Store(j)
	if p.sleepers.Load() > 0 {
		p.mu.Lock()
		p.cond.Broadcast()
		p.mu.Unlock()
	}
	fn(0, 0, j.bound(1))
	for spins := 0; p.pending.Load() != 0; spins++ {
		if spins >= spinLimit {
			runtime.Gosched() // more threads than cores: let the others run
		}
	}
}

// close stops the worker goroutines and waits for them.
func (p *pool) close() {
	p.stop.Store(true)
	p.mu.Lock()
	p.cond.Broadcast()
	p.mu.Unlock()
	p.done.Wait()
}
