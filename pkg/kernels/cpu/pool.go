package cpu

import (
	"runtime"
	"sync"
	"sync/atomic"
)

// pool runs a range of work split into one contiguous chunk per thread. The
// caller's goroutine computes chunk 0; threads-1 long-lived goroutines
// compute the others. A pool is used by one caller at a time.
//
// No channel or WaitGroup is on the hot path: an op publishes its job (a
// new immutable value with the next generation number); workers spin on it
// for a while
// (ops follow each other within microseconds during a step) and only then
// park on a condition variable; the caller spins until the pending count
// drops to zero.
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
// or parking (a few tens of microseconds).
const spinLimit = 20000

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
	for {
		j := p.job.Load()
		for spins := 0; j == nil || j.gen == last; spins++ {
			if p.stop.Load() {
				return
			}
			if spins < spinLimit {
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
