package routing

import (
	"errors"
	"math"
	"time"
)

// ErrOverloaded is matched (errors.Is) by the error of a request refused
// because it would wait longer than the max queue wait (Router.Submit),
// and by the final error of a request that did wait that long in an
// engine's queue without being scheduled (see Router.SetMaxQueueWait).
var ErrOverloaded = errors.New("routing: overloaded")

// AdmissionDecay is the time constant of an engine's admission rate: the
// rate is the sequences it took from its waiting queue per second of
// backlog, each second of backlog weighing e^(-age/AdmissionDecay).
const AdmissionDecay = 10 * time.Second

// MinAdmissionHistory is the (decayed) backlog time an engine needs behind
// its admission rate before it estimates waits; with less, a request is
// admitted unless the queue is full.
const MinAdmissionHistory = 500 * time.Millisecond

// admission estimates how long a new request waits in an engine's queue
// before its first step, from the rate at which the engine admits
// sequences while some wait. The rate is measured only over backlog time
// (the waiting queue not empty): with no backlog, admissions follow the
// arrivals, not the capacity, and idle time says nothing about how fast
// the queue drains. Time is an input (observe's now). Not safe for
// concurrent use.
type admission struct {
	admitted float64   // sequences admitted during backlog, decayed
	busy     float64   // seconds of backlog, decayed
	last     time.Time // the last observation (zero: none yet)
	backlog  bool      // sequences waited after the last observation
}

// observe records a scheduling decision at now: admitted sequences left
// the waiting queue, and waiting still wait. The interval since the last
// observation counts when sequences waited through it.
func (a *admission) observe(now time.Time, admitted, waiting int) {
	if !a.last.IsZero() && a.backlog {
		dt := now.Sub(a.last).Seconds()
		if dt > 0 {
			f := math.Exp(-dt / AdmissionDecay.Seconds())
			a.admitted = a.admitted*f + float64(admitted)
			a.busy = a.busy*f + dt
		} else {
			a.admitted += float64(admitted)
		}
	}
	a.last, a.backlog = now, waiting > 0
}

// rate is the admissions per second of backlog; ok is false without
// MinAdmissionHistory of backlog behind it.
func (a *admission) rate() (perSec float64, ok bool) {
	if a.busy < MinAdmissionHistory.Seconds() {
		return 0, false
	}
	return a.admitted / a.busy, true
}

// wait estimates how long a request queued now behind waiting others
// waits for its first step: none with an empty queue (it joins the next
// step if there is room), waiting+1 admissions at the measured rate
// otherwise. ok is false when there is no estimate (no history); the
// estimate is "forever" (math.MaxInt64) when the engine admitted nothing
// through its recent backlog.
func (a *admission) wait(waiting int) (time.Duration, bool) {
	if waiting == 0 {
		return 0, true
	}
	r, ok := a.rate()
	if !ok {
		return 0, false
	}
	s := float64(waiting+1) / r
	if r <= 0 || s >= math.MaxInt64/float64(time.Second) {
		return math.MaxInt64, true
	}
	return time.Duration(s * float64(time.Second)), true
}
