package routing

import (
	"errors"
	"fmt"
	"sort"
	"sync"
)

// ErrNoReplica is returned when no replica can take a request.
var ErrNoReplica = errors.New("routing: no replica is ready")

// Router spreads requests over the replicas' engines (least loaded first)
// and moves a lost replica's requests to the others, or keeps them until a
// replica comes. Request ids are unique across replicas while running.
// Safe for concurrent use. Lock order: Router, then Engine.
type Router struct {
	mu       sync.Mutex
	replicas map[string]*Engine
	cordoned map[string]bool // take no new request (draining)
	orphans  []*Seq          // requests of lost replicas waiting for one
}

// NewRouter makes an empty router.
func NewRouter() *Router { return &Router{replicas: map[string]*Engine{}, cordoned: map[string]bool{}} }

// AddReplica makes an engine available (replacing, and draining, one of
// the same name); waiting requests move to it.
func (r *Router) AddReplica(name string, e *Engine) {
	r.mu.Lock()
	old := r.replicas[name]
	r.replicas[name] = e
	delete(r.cordoned, name)
	seqs := r.orphans
	r.orphans = nil
	r.mu.Unlock()
	if old != nil && old != e {
		seqs = append(old.Close(), seqs...)
	}
	r.place(seqs)
}

// Cordon has the router send a replica no new request (nor requests moved
// from lost replicas); it keeps running those it has until RemoveReplica.
func (r *Router) Cordon(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if _, ok := r.replicas[name]; ok {
		r.cordoned[name] = true
	}
}

// RemoveReplica closes a replica's engine; its requests move to the least
// loaded other replica (recomputed there), or wait for the next one added.
func (r *Router) RemoveReplica(name string) {
	r.mu.Lock()
	e, ok := r.replicas[name]
	delete(r.replicas, name)
	delete(r.cordoned, name)
	r.mu.Unlock()
	if ok {
		r.place(e.Close())
	}
}

// place hands sequences to the least loaded replica, or keeps them as
// orphans when there is none (decided under the lock, so AddReplica cannot
// miss them).
func (r *Router) place(seqs []*Seq) {
	for len(seqs) > 0 {
		r.mu.Lock()
		e := r.pickLocked()
		if e == nil {
			r.orphans = append(r.orphans, seqs...)
			r.mu.Unlock()
			return
		}
		r.mu.Unlock()
		seqs = e.Adopt(seqs) // those refused because e closed meanwhile
	}
}

// Replicas lists the replica names, sorted.
func (r *Router) Replicas() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.namesLocked()
}

func (r *Router) namesLocked() []string {
	names := make([]string, 0, len(r.replicas))
	for n := range r.replicas {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

func (r *Router) pickLocked() *Engine {
	var best *Engine
	bestLoad := 0
	for _, n := range r.namesLocked() {
		if r.cordoned[n] {
			continue
		}
		e := r.replicas[n]
		if l := e.Load(); best == nil || l < bestLoad {
			best, bestLoad = e, l
		}
	}
	return best
}

// Capacity is the longest sequence (prompt + output tokens) every replica
// could hold alone, or 0 when there is no replica.
func (r *Router) Capacity() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	c := 0
	for _, e := range r.replicas {
		st := e.Stats()
		if n := st.BlocksTotal * st.BlockSize; c == 0 || n < c {
			c = n
		}
	}
	return c
}

// Submit sends a request to the least loaded replica.
func (r *Router) Submit(req *Request) (*Stream, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.replicas {
		if e.Has(req.ID) {
			return nil, fmt.Errorf("%w: %q", ErrDuplicate, req.ID)
		}
	}
	for _, q := range r.orphans {
		if q.Payload.(*reqState).req.ID == req.ID {
			return nil, fmt.Errorf("%w: %q", ErrDuplicate, req.ID)
		}
	}
	e := r.pickLocked()
	if e == nil {
		return nil, ErrNoReplica
	}
	return e.Submit(req)
}

// Abort ends a request by id wherever it runs.
func (r *Router) Abort(id string) bool {
	return r.abort(func(st *reqState) bool { return st.req.ID == id }, func(e *Engine) bool { return e.Abort(id) })
}

// AbortStream ends the request whose stream s is.
func (r *Router) AbortStream(s *Stream) bool {
	return r.abort(func(st *reqState) bool { return st.stream == s }, func(e *Engine) bool { return e.AbortStream(s) })
}

func (r *Router) abort(match func(*reqState) bool, inEngine func(*Engine) bool) bool {
	r.mu.Lock()
	for i, q := range r.orphans {
		if st := q.Payload.(*reqState); match(st) {
			r.orphans = append(r.orphans[:i], r.orphans[i+1:]...)
			r.mu.Unlock()
			st.stream.finish(Event{Finish: "abort", MatchedStop: -1, PromptLogprobs: st.plp, Preemptions: q.Preemptions})
			return true
		}
	}
	es := make([]*Engine, 0, len(r.replicas))
	for _, e := range r.replicas {
		es = append(es, e)
	}
	r.mu.Unlock()
	for _, e := range es {
		if inEngine(e) {
			return true
		}
	}
	return false
}

// Stats sums the replicas' counters; requests waiting for a replica count
// as waiting.
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
		s.Comm += x.Comm
		s.StepTime += x.StepTime
		s.SentBytes += x.SentBytes
		s.StepTokens += x.StepTokens
	}
	s.Waiting += waiting
	return s
}
