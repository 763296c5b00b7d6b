package server

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
)

// workerRegistration is what a stateWriter writes to: a worker's entry in
// etcd (*cluster.Registration).
type workerRegistration interface {
	Update(ctx context.Context, info cluster.WorkerInfo) error
}

// stateWriter carries a worker's state changes (idle, loading, loaded,
// ready, failed) to its etcd registration. The worker service reports a
// change with set, under its own lock and from whichever RPC made it: set
// only records the state and wakes the writer. One goroutine, run, owns the
// registration's updates and writes the latest recorded state each time it
// wakes. So the writes land in the order the states were set, the last
// state set is the last written, and states that a newer one replaced
// before the writer got to them are skipped.
type stateWriter struct {
	mu    sync.Mutex
	state string
	wake  chan struct{} // 1-buffered: a state was set since the writer last looked

	timeout time.Duration // of one write
	retry   time.Duration // the wait before writing again after a failed write
}

func newStateWriter() *stateWriter {
	return &stateWriter{wake: make(chan struct{}, 1), timeout: 5 * time.Second, retry: time.Second}
}

// set records the worker's latest state; it never blocks.
func (s *stateWriter) set(state string) {
	s.mu.Lock()
	s.state = state
	s.mu.Unlock()
	select {
	case s.wake <- struct{}{}:
	default: // the writer is already due to look
	}
}

func (s *stateWriter) latest() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.state
}

// run writes info, with the latest state, to reg whenever a state is set,
// until ctx ends. info.State is what reg holds already; a state set before
// run starts is written when it starts. A failed write is tried again after
// s.retry (with the latest state then).
func (s *stateWriter) run(ctx context.Context, reg workerRegistration, info cluster.WorkerInfo, log *slog.Logger) {
	written := info.State
	var retry *time.Timer
	defer func() {
		if retry != nil {
			retry.Stop()
		}
	}()
	for {
		var again <-chan time.Time
		if retry != nil {
			again = retry.C
		}
		select {
		case <-ctx.Done():
			return
		case <-s.wake:
		case <-again:
		}
		if retry != nil {
			retry.Stop()
			retry = nil
		}
		state := s.latest()
		if state == written {
			continue
		}
		info.State = state
		wctx, cancel := context.WithTimeout(ctx, s.timeout)
		err := reg.Update(wctx, info)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil:
			log.Warn("worker state not written to etcd; trying again", "state", state, "err", err, "retry", s.retry)
			retry = time.NewTimer(s.retry)
		default:
			written = state
		}
	}
}
