package routing

import (
	"errors"
	"sort"
	"sync"
)

// ErrNoReplica is returned when no replica can take a request.
var ErrNoReplica = errors.New("routing: no replica is ready")

// Router spreads requests over the replicas' engines (least loaded first)
// and moves a lost replica's requests to the others. Safe for concurrent use.
type Router struct {
	mu       sync.Mutex
	replicas map[string]*Engine
	orphans  []*Seq // requests of lost replicas waiting for one
}

// NewRouter makes an empty router.
func NewRouter() *Router { return &Router{replicas: map[string]*Engine{}} }

// AddReplica makes an engine available; orphaned requests move to it.
func (r *Router) AddReplica(name string, e *Engine) {
	r.mu.Lock()
	r.replicas[name] = e
	orphans := r.orphans
	r.orphans = nil
	r.mu.Unlock()
	e.Adopt(orphans)
}

// RemoveReplica closes a replica's engine; its requests move to the least
// loaded other replica (recomputed there), or wait for the next one added.
func (r *Router) RemoveReplica(name string) {
	r.mu.Lock()
	e, ok := r.replicas[name]
	delete(r.replicas, name)
	r.mu.Unlock()
	if !ok {
		return
	}
	seqs := e.Close()
	if len(seqs) == 0 {
		return
	}
	if next := r.pick(); next != nil {
		next.Adopt(seqs)
		return
	}
	r.mu.Lock()
	r.orphans = append(r.orphans, seqs...)
	r.mu.Unlock()
}

// Replicas lists the replica names, sorted.
func (r *Router) Replicas() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	names := make([]string, 0, len(r.replicas))
	for n := range r.replicas {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Engine returns a replica's engine.
func (r *Router) Engine(name string) *Engine {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.replicas[name]
}

func (r *Router) pick() *Engine {
	r.mu.Lock()
	defer r.mu.Unlock()
	var best *Engine
	bestLoad := 0
	names := make([]string, 0, len(r.replicas))
	for n := range r.replicas {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		e := r.replicas[n]
		if l := e.Load(); best == nil || l < bestLoad {
			best, bestLoad = e, l
		}
	}
	return best
}

// Fits checks a request length against a replica's pool.
func (r *Router) Fits(maxLen int) error {
	e := r.pick()
	if e == nil {
		return ErrNoReplica
	}
	return e.Fits(maxLen)
}

// Submit sends a request to the least loaded replica.
func (r *Router) Submit(req *Request) (*Stream, error) {
	e := r.pick()
	if e == nil {
		return nil, ErrNoReplica
	}
	return e.Submit(req)
}

// Abort ends a request wherever it runs.
func (r *Router) Abort(id string) bool {
	r.mu.Lock()
	es := make([]*Engine, 0, len(r.replicas))
	for _, e := range r.replicas {
		es = append(es, e)
	}
	for i, q := range r.orphans {
		if q.Payload.(*reqState).req.ID == id {
			r.orphans = append(r.orphans[:i], r.orphans[i+1:]...)
			r.mu.Unlock()
			q.Payload.(*reqState).stream.finish(Event{Finish: "abort", MatchedStop: -1})
			return true
		}
	}
	r.mu.Unlock()
	for _, e := range es {
		if e.Abort(id) {
			return true
		}
	}
	return false
}

// Stats sums the replicas' counters.
func (r *Router) Stats() Stats {
	r.mu.Lock()
	es := make([]*Engine, 0, len(r.replicas))
	for _, e := range r.replicas {
		es = append(es, e)
	}
	waiting := len(r.orphans)
	r.mu.Unlock()
	var s Stats
	for _, e := range es {
		x := e.Stats()
		s.Running += x.Running
		s.Waiting += x.Waiting
		s.BlocksTotal += x.BlocksTotal
		s.BlocksFree += x.BlocksFree
		s.BlockSize = x.BlockSize
		s.Preemptions += x.Preemptions
		s.Steps += x.Steps
		s.Tokens += x.Tokens
		s.StepErrors += x.StepErrors
	}
	s.Waiting += waiting
	return s
}
