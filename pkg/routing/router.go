package routing

import (
	"errors"
	"fmt"
	"maps"
	"sort"
	"sync"
	"time"
)

// ErrNoReplica is matched (errors.Is) by the final error of a request that
// waited the queue timeout with no replica able to take it.
var ErrNoReplica = errors.New("routing: no replica is ready")

// Defaults of SetQueueTimeout.
const (
	DefaultQueueTimeout = 60 * time.Second
	DefaultMaxOrphans   = 1024
)

// Router spreads requests over the replicas' engines and moves a lost
// replica's requests to the others. With the prefix policy (the default)
// a request goes to the replica whose prefix cache holds the longest
// prefix of its tokens, unless that replica is busier than the least
// loaded one by more than the load margin; with no cached prefix within
// the margin, to the replica within the margin that caches the fewest
// blocks (SGLang's cache-aware policy does the same), so that distinct
// prefixes spread over the replicas' caches. With the least-loaded policy
// a request goes to the least loaded replica (see SetRouting). A request no replica
// can take (there is none, or every one is cordoned) waits in the router,
// an orphan, until a replica is added or the queue timeout passes (see
// SetQueueTimeout). Request ids are unique across replicas and orphans
// while running. Safe for concurrent use. Lock order: Router, then Engine.
type Router struct {
	mu       sync.Mutex
	replicas map[string]*Engine
	cordoned map[string]bool // take no new request (draining)
	orphans  []orphan        // requests waiting for a replica, oldest first
	// The queue timeout, the cap on orphans Submit makes, and why no
	// replica serves (may be nil): see SetQueueTimeout.
	queueTimeout time.Duration
	maxOrphans   int
	why          func() string
	expiry       *time.Timer // runs expire at the earliest orphan's deadline
	refuse       string      // why requests with no replica are refused (FailOrphans), or ""
	// maxWait is the longest a new request may wait in a replica's queue
	// before its first step (0: no limit): see SetMaxQueueWait.
	maxWait time.Duration
	// policy and margin: see SetRouting. routed counts decisions by
	// policy.
	policy string
	margin int
	routed map[string]int64
}

// Routing policies (SetRouting).
const (
	// RoutePrefix sends a request to the replica holding the longest
	// cached prefix of it, within the load margin of the least loaded.
	RoutePrefix = "prefix"
	// RouteLeastLoaded sends a request to the replica with the fewest
	// sequences (running and queued).
	RouteLeastLoaded = "least-loaded"
	// DefaultLoadMargin is how many more sequences than the least loaded
	// replica a replica may hold and keep a request whose prefix it caches.
	DefaultLoadMargin = 4
)

// Route is how the router chose a request's replica: the Policy that
// decided ("prefix": the longest cached prefix; "room": no replica within
// the margin caches a prefix of it, so the one caching the fewest blocks;
// "load": the least loaded, the least-loaded policy; "wait": the shortest
// estimated queue wait, see SetMaxQueueWait), and how many leading tokens
// of the request the chosen replica's cache held then.
type Route struct {
	Replica      string
	Policy       string
	PrefixTokens int
}

// orphan is a request waiting for a replica since a time.
type orphan struct {
	q     *Seq
	since time.Time
}

// NewRouter makes an empty router.
func NewRouter() *Router {
	return &Router{replicas: map[string]*Engine{}, cordoned: map[string]bool{},
		queueTimeout: DefaultQueueTimeout, maxOrphans: DefaultMaxOrphans,
		policy: RoutePrefix, margin: DefaultLoadMargin, routed: map[string]int64{}}
}

// SetRouting sets the policy (RoutePrefix or RouteLeastLoaded) and, for
// RoutePrefix, the load margin (≥ 0, in sequences). Requests moved from a
// lost replica, and requests that waited for one, are placed the same way.
func (r *Router) SetRouting(policy string, margin int) error {
	if policy != RoutePrefix && policy != RouteLeastLoaded {
		return fmt.Errorf("routing: policy %q is not %q or %q", policy, RoutePrefix, RouteLeastLoaded)
	}
	if margin < 0 {
		return fmt.Errorf("routing: load margin %d < 0", margin)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.policy, r.margin = policy, margin
	return nil
}

// Routed counts the requests routed so far by the policy that decided
// (Route.Policy).
func (r *Router) Routed() map[string]int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	return maps.Clone(r.routed)
}

// SetQueueTimeout sets how long a request may wait with no replica able
// to take it, d (0: DefaultQueueTimeout), and how many such requests
// Submit keeps waiting, maxOrphans (0: DefaultMaxOrphans; beyond it Submit
// returns ErrQueueFull; requests of a removed replica are kept beyond it).
// why, when not nil, gives the control plane's reason that no replica
// serves (e.g. "all replicas down"); it is called, without the router's
// lock, for the message of a request that timed out. A request's wait
// starts each time it becomes an orphan; when it has waited d, it ends
// with finish reason "error" and an error that matches ErrNoReplica, says
// how long it waited and why().
func (r *Router) SetQueueTimeout(d time.Duration, maxOrphans int, why func() string) {
	if d <= 0 {
		d = DefaultQueueTimeout
	}
	if maxOrphans <= 0 {
		maxOrphans = DefaultMaxOrphans
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.queueTimeout, r.maxOrphans, r.why = d, maxOrphans, why
	r.armLocked(time.Now())
}

// SetMaxQueueWait sets how long a new request may wait in a replica's
// queue before its first step is computed (0: no limit, the default). It
// is enforced twice:
//
//   - Submit refuses a request at once, with an error matching
//     ErrOverloaded that gives the estimated wait and the limit, when even
//     the replica with the shortest estimated wait (Engine.QueueWait: its
//     queue over the rate it recently took sequences from it) would keep
//     it longer than d. A replica without enough history to estimate
//     takes the request unless its queue is full (ErrQueueFull).
//   - An engine ends a sequence that has waited longer than d in its queue
//     without ever being scheduled with an error matching ErrOverloaded,
//     before any token, so no request served waits longer than d for its
//     first step. Its wait starts when it enters an engine's queue (again
//     when it moves to another replica).
//
// Exempt from both: resumed requests (Request.Resume, which continue one
// admitted before) and sequences that were scheduled already (preempted,
// or moved from a lost replica). Requests no replica can take (orphans)
// have their own limit, the queue timeout (SetQueueTimeout).
func (r *Router) SetMaxQueueWait(d time.Duration) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.maxWait = max(d, 0)
	for _, e := range r.replicas {
		e.SetMaxQueueWait(r.maxWait)
	}
}

// orphanLocked adds sequences to the orphans, waiting from now; r.mu is
// held.
func (r *Router) orphanLocked(seqs ...*Seq) {
	now := time.Now()
	for _, q := range seqs {
		r.orphans = append(r.orphans, orphan{q: q, since: now})
	}
	r.armLocked(now)
}

// armLocked sets the timer to the earliest orphan's deadline (stops it
// when there is none); r.mu is held.
func (r *Router) armLocked(now time.Time) {
	if len(r.orphans) == 0 {
		if r.expiry != nil {
			r.expiry.Stop()
		}
		return
	}
	first := r.orphans[0].since
	for _, o := range r.orphans[1:] {
		if o.since.Before(first) {
			first = o.since
		}
	}
	wait := max(first.Add(r.queueTimeout).Sub(now), 0)
	if r.expiry == nil {
		r.expiry = time.AfterFunc(wait, r.expire)
	} else {
		r.expiry.Reset(wait)
	}
}

// expire ends the orphans that have waited the queue timeout.
func (r *Router) expire() {
	r.mu.Lock()
	now := time.Now()
	var late []orphan
	kept := r.orphans[:0]
	for _, o := range r.orphans {
		if now.Sub(o.since) >= r.queueTimeout {
			late = append(late, o)
		} else {
			kept = append(kept, o)
		}
	}
	clear(r.orphans[len(kept):])
	r.orphans = kept
	r.armLocked(now)
	why := r.why
	r.mu.Unlock()
	if len(late) == 0 {
		return
	}
	reason := ""
	if why != nil {
		reason = why()
	}
	for _, o := range late {
		err := fmt.Errorf("%w: waited %v for a replica", ErrNoReplica, roundWait(now.Sub(o.since)))
		if reason != "" {
			err = fmt.Errorf("%w: %s", err, reason)
		}
		finishOrphan(o.q, Event{Finish: "error", Err: err, MatchedStop: -1})
	}
}

// FailOrphans ends every request waiting for a replica now, with an error
// that matches ErrNoReplica and says why (e.g. this coordinator stopped
// leading: its clients should go to the new leader at once rather than
// wait the queue timeout). It returns how many it ended.
//
// Until AcceptOrphans, a request that finds no replica is refused at once
// (Submit returns an error matching ErrNoReplica, saying why) instead of
// waiting.
func (r *Router) FailOrphans(why string) int {
	r.mu.Lock()
	now := time.Now()
	late := r.orphans
	r.orphans = nil
	r.refuse = why
	r.armLocked(now)
	r.mu.Unlock()
	for _, o := range late {
		finishOrphan(o.q, Event{Finish: "error", Err: fmt.Errorf("%w: %s", ErrNoReplica, why), MatchedStop: -1})
	}
	return len(late)
}

// AcceptOrphans has requests that find no replica wait for one again
// (undoes FailOrphans' refusal).
func (r *Router) AcceptOrphans() {
	r.mu.Lock()
	r.refuse = ""
	r.mu.Unlock()
}

// roundWait rounds a wait for a message (1m0s, not 1m0.000183s).
func roundWait(d time.Duration) time.Duration {
	if d >= 10*time.Second {
		return d.Round(time.Second)
	}
	return d.Round(time.Millisecond)
}

// finishOrphan sends the final event of a request that is in no engine.
func finishOrphan(q *Seq, ev Event) {
	st := q.Payload.(*reqState)
	ev.PromptLogprobs, ev.Preemptions, ev.Scheduled = st.plp, q.Preemptions, st.scheduled
	st.stream.finish(ev)
}

// AddReplica makes an engine available (replacing, and draining, one of
// the same name; lifting a cordon of the name); orphans move to it.
func (r *Router) AddReplica(name string, e *Engine) {
	r.mu.Lock()
	old := r.replicas[name]
	r.replicas[name] = e
	e.SetMaxQueueWait(r.maxWait)
	delete(r.cordoned, name)
	seqs := make([]*Seq, len(r.orphans))
	for i, o := range r.orphans {
		seqs[i] = o.q
	}
	r.orphans = nil
	r.armLocked(time.Now())
	if old != nil && old != e {
		seqs = append(old.Close(), seqs...)
	}
	r.placeLocked(seqs)
	r.mu.Unlock()
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
// loaded other replica (recomputed there), or become orphans.
func (r *Router) RemoveReplica(name string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	e, ok := r.replicas[name]
	delete(r.replicas, name)
	delete(r.cordoned, name)
	if ok {
		r.placeLocked(e.Close())
	}
}

// placeLocked hands sequences to the least loaded replica, or keeps them
// as orphans when there is none; r.mu is held throughout, so a sequence
// moving between replicas is always findable (Abort) and AddReplica cannot
// miss an orphan.
func (r *Router) placeLocked(seqs []*Seq) {
	for i, q := range seqs {
		e, route := r.pickLocked(q)
		if e == nil {
			r.orphanLocked(seqs[i:]...)
			return
		}
		q.Payload.(*reqState).route = route
		if left := e.Adopt([]*Seq{q}); len(left) > 0 {
			// Only the router closes engines, removing them in the same
			// critical section, so this does not happen; were it to, the
			// sequence waits rather than the loop spin.
			r.orphanLocked(left...)
			continue
		}
		r.routed[route.Policy]++
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

// pickLocked chooses q's replica by the routing policy (nil when no
// replica takes requests); r.mu is held.
func (r *Router) pickLocked(q *Seq) (*Engine, Route) {
	type cand struct {
		name               string
		e                  *Engine
		load, hits, cached int
	}
	var cs []cand
	least := 0
	for _, n := range r.namesLocked() {
		if r.cordoned[n] {
			continue
		}
		cs = append(cs, cand{name: n, e: r.replicas[n], load: r.replicas[n].Load()})
		if c := cs[len(cs)-1]; c.load < cs[least].load {
			least = len(cs) - 1
		}
	}
	if len(cs) == 0 {
		return nil, Route{}
	}
	if r.policy == RoutePrefix {
		minLoad := cs[least].load
		best, room := -1, -1
		for i := range cs {
			c := &cs[i]
			if c.load > minLoad+r.margin {
				continue
			}
			c.hits, c.cached = c.e.prefixAndCached(q)
			if c.hits > 0 && (best < 0 || c.hits > cs[best].hits || c.hits == cs[best].hits && c.load < cs[best].load) {
				best = i
			}
			if room < 0 || c.cached < cs[room].cached || c.cached == cs[room].cached && c.load < cs[room].load {
				room = i
			}
		}
		if best >= 0 {
			return cs[best].e, Route{Replica: cs[best].name, Policy: "prefix", PrefixTokens: cs[best].hits}
		}
		// Cached nowhere within the margin: the replica that caches the
		// least takes the new prefix, so prefixes spread over the
		// replicas' caches instead of piling on whichever was idle.
		return cs[room].e, Route{Replica: cs[room].name, Policy: "room"}
	}
	return cs[least].e, Route{Replica: cs[least].name, Policy: "load"}
}

// shortestWaitLocked is the replica (not cordoned) whose estimated queue
// wait is the shortest, its name, and that wait; a replica with no
// estimate yet counts as no wait. r.mu is held.
func (r *Router) shortestWaitLocked() (*Engine, string, time.Duration) {
	var best *Engine
	var bestName string
	var bestWait time.Duration
	for _, n := range r.namesLocked() {
		if r.cordoned[n] {
			continue
		}
		e := r.replicas[n]
		w, ok := e.QueueWait()
		if !ok {
			w = 0
		}
		if best == nil || w < bestWait {
			best, bestName, bestWait = e, n, w
		}
	}
	return best, bestName, bestWait
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

// Submit sends a request to the least loaded replica. When no replica can
// take it (there is none, or every one is cordoned) the request waits as
// an orphan (see SetQueueTimeout), or is refused with ErrQueueFull when
// too many wait; its stream works as that of a request queued in an
// engine.
func (r *Router) Submit(req *Request) (*Stream, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, e := range r.replicas {
		if e.Has(req.ID) {
			return nil, fmt.Errorf("%w: %q", ErrDuplicate, req.ID)
		}
	}
	for _, o := range r.orphans {
		if o.q.Payload.(*reqState).req.ID == req.ID {
			return nil, fmt.Errorf("%w: %q", ErrDuplicate, req.ID)
		}
	}
	q := newSeq(req)
	if e, route := r.pickLocked(q); e != nil {
		if r.maxWait > 0 && len(req.Resume) == 0 {
			best, name, wait := r.shortestWaitLocked()
			if wait > r.maxWait {
				return nil, fmt.Errorf("%w: a new request would wait about %v in the queue, more than the max queue wait of %v",
					ErrOverloaded, roundWait(wait), r.maxWait)
			}
			if w, ok := e.QueueWait(); ok && w > r.maxWait {
				// The chosen replica drains its queue slowly.
				e, route = best, Route{Replica: name, Policy: "wait", PrefixTokens: best.CachedPrefix(q)}
			}
		}
		q.Payload.(*reqState).route = route
		if err := e.adopt(q); err != nil {
			return nil, err
		}
		r.routed[route.Policy]++
		return q.Payload.(*reqState).stream, nil
	}
	if r.refuse != "" {
		return nil, fmt.Errorf("%w: %s", ErrNoReplica, r.refuse)
	}
	if len(r.orphans) >= r.maxOrphans {
		return nil, fmt.Errorf("%w: %d requests wait for a replica", ErrQueueFull, len(r.orphans))
	}
	if err := checkSeq(q); err != nil {
		return nil, err
	}
	r.orphanLocked(q)
	return q.Payload.(*reqState).stream, nil
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
	for i, o := range r.orphans {
		if match(o.q.Payload.(*reqState)) {
			r.orphans = append(r.orphans[:i], r.orphans[i+1:]...)
			r.armLocked(time.Now())
			r.mu.Unlock()
			finishOrphan(o.q, Event{Finish: "abort", MatchedStop: -1})
			return true
		}
	}
	// Under r.mu: no request moves between replicas while they are looked
	// through.
	defer r.mu.Unlock()
	for _, e := range r.replicas {
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
		s.StepTimeout = max(s.StepTimeout, x.StepTimeout)
		s.Cache.Queries += x.Cache.Queries
		s.Cache.Hits += x.Cache.Hits
		s.Cache.QuerySeqs += x.Cache.QuerySeqs
		s.Cache.HitSeqs += x.Cache.HitSeqs
		s.Cache.CachedBlocks += x.Cache.CachedBlocks
		s.Cache.Evictions += x.Cache.Evictions
	}
	s.Waiting += waiting
	return s
}
