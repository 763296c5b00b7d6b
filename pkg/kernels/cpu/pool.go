package cpu

import "sync"

// pool runs a range of work split into one contiguous chunk per thread. The
// caller's goroutine computes chunk 0; threads-1 long-lived goroutines
// compute the others. A pool is used by one caller at a time.
type pool struct {
	threads int
	jobs    []chan job
	wg      sync.WaitGroup // running calls' chunks
	done    sync.WaitGroup // worker goroutines
}

type job struct {
	fn       func(tid, lo, hi int)
	tid      int
	lo, hi   int
	finished *sync.WaitGroup
}

func newPool(threads int) *pool {
	p := &pool{threads: threads}
	for i := 1; i < threads; i++ {
		ch := make(chan job, 1)
		p.jobs = append(p.jobs, ch)
		p.done.Add(1)
		go func() {
			defer p.done.Done()
			for j := range ch {
				j.fn(j.tid, j.lo, j.hi)
				j.finished.Done()
			}
		}()
	}
	return p
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
	bound := func(i int) int { return min(n, (units*i/parts)*grain) }
	p.wg.Add(parts - 1)
	for i := 1; i < parts; i++ {
		p.jobs[i-1] <- job{fn: fn, tid: i, lo: bound(i), hi: bound(i + 1), finished: &p.wg}
	}
	fn(0, 0, bound(1))
	p.wg.Wait()
}

// close stops the worker goroutines and waits for them.
func (p *pool) close() {
	for _, ch := range p.jobs {
		close(ch)
	}
	p.jobs = nil
	p.done.Wait()
}
