package routing

import (
	"context"
	"errors"
	"fmt"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// Executor runs steps: a worker group behind gRPC, or a model in-process.
type Executor interface {
	Step(ctx context.Context, b *steps.Batch) (*steps.Result, error)
}

// Releaser is an Executor that keeps per-sequence state: the engine tells
// it which sequences ended (after the step that ended them).
type Releaser interface {
	Release(ctx context.Context, ids []uint64) error
}

// Request is a validated generation request.
type Request struct {
	ID        string
	Prompt    []int32
	Sampling  sampling.Params // normalized and validated
	MaxTokens int             // ≥ 1
	MinTokens int
	// StopIDs end the request when generated (EOS unless ignore_eos, and
	// stop_token_ids); they are suppressed before MinTokens.
	StopIDs        []int32
	Logprobs       int // -1: none; 0: the chosen token's; N: and the top N
	PromptLogprobs bool
	// Resume are tokens already generated for this request (by an earlier
	// run whose stream broke): they count as generated (toward MaxTokens,
	// MinTokens and the penalties), are not sent again, and the sampler
	// goes on from their position. The engine recomputes their KV.
	Resume []int32
	// FitMaxTokens: MaxTokens was not asked for. The engine that takes
	// the request lowers it to what its KV cache holds, so that a request
	// that waited for a replica, moved, or was resumed elsewhere gets the
	// bound its first run had.
	FitMaxTokens bool
}

// TokenLogprob is the logprob of a generated token and its top alternatives.
type TokenLogprob struct {
	ID      int32
	Logprob float32
	Top     []sampling.Candidate
}

// Event is what a Stream delivers: new tokens, then a final event.
type Event struct {
	Tokens   []int32
	Logprobs []TokenLogprob
	Done     bool
	Finish   string // stop, length, abort or error (with Err)
	// MatchedStop is the stop token that ended the request, or -1.
	MatchedStop int32
	// PromptLogprobs (final event, when asked): one per prompt position,
	// NaN for position 0.
	PromptLogprobs []float32
	Preemptions    int
	Err            error
	// Scheduled (final event) is when the request first ran in a step;
	// zero if it never did.
	Scheduled time.Time
	// CachedTokens (final event) is how many prompt tokens the request's
	// last admission found in the prefix cache.
	CachedTokens int
	// Route (final event) is how the router chose the request's replica
	// (see Router.Submit), empty for an engine used alone.
	Route Route
}

// Stream delivers one request's events; events not yet received are
// merged, so a slow reader never stalls the engine. Safe for concurrent use.
type Stream struct {
	mu      sync.Mutex
	pending Event
	has     bool
	closed  bool
	notify  chan struct{}
}

func newStream() *Stream {
	return &Stream{notify: make(chan struct{}, 1), pending: Event{MatchedStop: -1}}
}

func (s *Stream) push(tokens []int32, lps []TokenLogprob) {
	s.mu.Lock()
	s.pending.Tokens = append(s.pending.Tokens, tokens...)
	s.pending.Logprobs = append(s.pending.Logprobs, lps...)
	s.has = true
	s.mu.Unlock()
	s.wake()
}

func (s *Stream) finish(e Event) {
	s.mu.Lock()
	if !s.closed {
		s.pending.Done, s.pending.Finish, s.pending.MatchedStop = true, e.Finish, e.MatchedStop
		s.pending.PromptLogprobs, s.pending.Preemptions, s.pending.Err = e.PromptLogprobs, e.Preemptions, e.Err
		s.pending.Scheduled, s.pending.CachedTokens, s.pending.Route = e.Scheduled, e.CachedTokens, e.Route
		s.closed, s.has = true, true
	}
	s.mu.Unlock()
	s.wake()
}

func (s *Stream) wake() {
	select {
	case s.notify <- struct{}{}:
	default:
	}
}

// Recv waits for the next events (merged). After the Done event it returns
// io.EOF-like ErrStreamDone.
func (s *Stream) Recv(ctx context.Context) (Event, error) {
	for {
		s.mu.Lock()
		if s.has {
			e := s.pending
			s.pending, s.has = Event{MatchedStop: -1}, false
			s.mu.Unlock()
			return e, nil
		}
		if s.closed { // the final event was delivered
			s.mu.Unlock()
			return Event{}, ErrStreamDone
		}
		s.mu.Unlock()
		select {
		case <-s.notify:
		case <-ctx.Done():
			return Event{}, ctx.Err()
		}
	}
}

// ErrStreamDone is returned by Recv after the final event.
var ErrStreamDone = errors.New("routing: stream done")

// ErrDuplicate is returned by Submit for a request id already running.
var ErrDuplicate = errors.New("routing: duplicate request id")

// ErrClosed is returned by Submit after Close.
var ErrClosed = errors.New("routing: engine closed")

var seqIDs atomic.Uint64

// reqState is a sequence's request-side state (the Seq's Payload).
type reqState struct {
	req     *Request
	stream  *Stream
	sampler *sampling.Sampler
	plp     []float32 // prompt logprobs gathered so far
	stop    map[int32]bool
	// failures counts consecutive failed steps this request was in; after
	// MaxStepFailures it ends with an error instead of retrying forever.
	failures int
	// scheduled is when the request first ran in a step.
	scheduled time.Time
	// queued is when the sequence last entered an engine's queue.
	queued time.Time
	// route is the router's choice of replica for the request.
	route Route
}

// MaxStepFailures is how many consecutive failed steps a request survives.
const MaxStepFailures = 3

// Stats are an engine's counters.
type Stats struct {
	Running, Waiting        int
	BlocksTotal, BlocksFree int
	BlockSize               int
	Preemptions             int64
	Steps, Tokens           int64
	StepErrors              int64
	LastStep                time.Duration
	// Comm is the total time steps spent in worker-to-worker
	// communication (all-reduces, stage transfers).
	Comm time.Duration
	// StepTime is the total wall time of steps.
	StepTime time.Duration
	// SentBytes is the total the workers sent each other; StepTokens the
	// tokens steps computed (prompt chunks and decodes).
	SentBytes, StepTokens int64
	// StepTimeout is how long a typical step (of the median token count
	// of the recent successful steps) may take now before it is given up:
	// see StepTimeout (the type). A Router's Stats has the largest of its
	// replicas'.
	StepTimeout time.Duration
	// Cache counts prefix-cache lookups (see CacheStats).
	Cache CacheStats
}

// Engine runs the continuous-batching loop of one replica. Safe for
// concurrent use.
type Engine struct {
	exec     Executor
	mu       sync.Mutex
	timer    stepTimer // guarded by mu
	sched    *Scheduler
	byID     map[string]*Seq
	ended    []uint64 // sequences to release on the executor
	wake     chan struct{}
	closed   bool
	steps    atomic.Int64
	tokens   atomic.Int64
	errs     atomic.Int64
	lastStep atomic.Int64
	commNs   atomic.Int64
	stepNs   atomic.Int64
	sent     atomic.Int64
	stepToks atomic.Int64
	depth    int
	nextID   uint64
	adm      admission     // guarded by mu
	maxWait  time.Duration // guarded by mu; 0: no max queue wait
	// OnStepError, when set, is called (outside the lock) after a failed
	// step; the engine has already sent its running sequences back to the
	// queue.
	OnStepError func(error)
	// OnStep, when set, is called (outside the lock) after every step
	// that succeeded.
	OnStep func(StepInfo)
}

// NewEngine makes an engine over a pool of numBlocks KV blocks.
func NewEngine(exec Executor, cfg SchedulerConfig, numBlocks, blockSize int) *Engine {
	return &Engine{exec: exec, timer: stepTimer{cfg: DefaultStepTimeout()},
		sched: NewScheduler(cfg, kvcache.NewBlockManager(numBlocks, blockSize)),
		byID:  map[string]*Seq{}, wake: make(chan struct{}, 1)}
}

// SetStepTimeouts sets how each executor call's timeout derives from the
// replica's recent steps (see StepTimeout); zero fields take the defaults
// of DefaultStepTimeout. The window of recent steps is kept.
func (e *Engine) SetStepTimeouts(t StepTimeout) {
	d := DefaultStepTimeout()
	if t.Min > 0 {
		d.Min = t.Min
	}
	if t.Factor > 0 {
		d.Factor = t.Factor
	}
	if t.Initial > 0 {
		d.Initial = t.Initial
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.timer.cfg = d
}

// SetStepTimeout gives every executor call the fixed timeout d, whatever
// the recent steps took (d ≤ 0: the adaptive defaults, as
// SetStepTimeouts(StepTimeout{})), for tests and callers that know their
// steps.
func (e *Engine) SetStepTimeout(d time.Duration) {
	if d <= 0 {
		e.SetStepTimeouts(StepTimeout{})
		return
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	e.timer.cfg = StepTimeout{Min: d, Initial: d} // Factor 0: always Min
}

// newSeq makes the sequence of a request, with its request-side state and
// a fresh stream, ready for Engine.adopt (now, or later from the Router's
// queue of requests waiting for a replica).
func newSeq(r *Request) *Seq {
	st := &reqState{req: r, stream: newStream(), sampler: sampling.New(r.Sampling), stop: map[int32]bool{}}
	st.sampler.Skip(len(r.Resume))
	for _, id := range r.StopIDs {
		st.stop[id] = true
	}
	if r.PromptLogprobs {
		st.plp = make([]float32, len(r.Prompt))
		for i := range st.plp {
			st.plp[i] = float32(math.NaN())
		}
	}
	return &Seq{ID: kvcache.SeqID(seqIDs.Add(1)), Tokens: slices.Concat(r.Prompt, r.Resume), NumPrompt: len(r.Prompt),
		MaxLen: len(r.Prompt) + r.MaxTokens, Payload: st, NoCacheLookup: r.PromptLogprobs}
}

// Submit queues a request and returns its stream.
func (e *Engine) Submit(r *Request) (*Stream, error) {
	q := newSeq(r)
	if err := e.adopt(q); err != nil {
		return nil, err
	}
	return q.Payload.(*reqState).stream, nil
}

func (e *Engine) adopt(q *Seq) error {
	st := q.Payload.(*reqState)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.closed {
		return ErrClosed
	}
	if _, dup := e.byID[st.req.ID]; dup {
		return fmt.Errorf("%w: %q", ErrDuplicate, st.req.ID)
	}
	if st.req.FitMaxTokens {
		bm := e.sched.Blocks()
		q.MaxLen = min(q.MaxLen, (bm.NumFree()+bm.NumUsed())*bm.BlockSize())
	}
	if err := e.sched.Add(q); err != nil {
		return err
	}
	st.queued = time.Now()
	e.byID[st.req.ID] = q
	e.poke()
	return nil
}

// Adopt takes over sequences drained from another engine (their KV is
// recomputed here). It returns those it refused because it is closed (to
// be placed elsewhere); others that cannot be queued end with an error.
func (e *Engine) Adopt(seqs []*Seq) (closed []*Seq) {
	for _, q := range seqs {
		err := e.adopt(q)
		switch {
		case errors.Is(err, ErrClosed):
			closed = append(closed, q)
		case err != nil:
			q.Payload.(*reqState).stream.finish(Event{Finish: "error", Err: err, MatchedStop: -1})
		}
	}
	return closed
}

// Has reports whether a request id is queued or running here.
func (e *Engine) Has(id string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, ok := e.byID[id]
	return ok
}

// Abort ends a request with finish reason "abort" and frees its blocks at
// once. It reports whether the request was here.
func (e *Engine) Abort(id string) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	q, ok := e.byID[id]
	if !ok {
		return false
	}
	e.end(q, Event{Finish: "abort", MatchedStop: -1})
	return true
}

// AbortStream is Abort for the request whose stream s is (a request id may
// be reused once its first owner is done).
func (e *Engine) AbortStream(s *Stream) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for _, q := range e.byID {
		if q.Payload.(*reqState).stream == s {
			e.end(q, Event{Finish: "abort", MatchedStop: -1})
			return true
		}
	}
	return false
}

// end removes q and sends its final event; e.mu is held.
func (e *Engine) end(q *Seq, ev Event) {
	st := q.Payload.(*reqState)
	e.sched.Remove(q)
	delete(e.byID, st.req.ID)
	e.ended = append(e.ended, uint64(q.ID))
	ev.PromptLogprobs = st.plp
	ev.Preemptions = q.Preemptions
	ev.Scheduled = st.scheduled
	ev.CachedTokens, ev.Route = min(q.Cached, q.NumPrompt), st.route
	st.stream.finish(ev)
}

// Close stops the engine and returns its sequences (for Adopt elsewhere).
func (e *Engine) Close() []*Seq {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.closed = true
	seqs := e.sched.Drain()
	clear(e.byID)
	e.poke()
	return seqs
}

func (e *Engine) poke() {
	select {
	case e.wake <- struct{}{}:
	default:
	}
}

// Stats reads the counters.
func (e *Engine) Stats() Stats {
	e.mu.Lock()
	defer e.mu.Unlock()
	bm := e.sched.Blocks()
	r, w := e.sched.Len()
	return Stats{Running: r, Waiting: w, BlocksTotal: bm.NumFree() + bm.NumUsed(), BlocksFree: bm.NumFree(),
		BlockSize: bm.BlockSize(), Preemptions: e.sched.Preemptions(), Steps: e.steps.Load(), Tokens: e.tokens.Load(),
		StepErrors: e.errs.Load(), LastStep: time.Duration(e.lastStep.Load()), Comm: time.Duration(e.commNs.Load()),
		StepTime: time.Duration(e.stepNs.Load()), SentBytes: e.sent.Load(), StepTokens: e.stepToks.Load(),
		StepTimeout: e.timer.typical(), Cache: e.sched.CacheStats()}
}

// CachedPrefix is how many leading tokens of q this replica's prefix cache
// holds now.
func (e *Engine) CachedPrefix(q *Seq) int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sched.CachedPrefix(q)
}

// prefixAndCached is CachedPrefix and the number of blocks in the cache.
func (e *Engine) prefixAndCached(q *Seq) (hits, cached int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.sched.CachedPrefix(q), e.sched.bm.NumCached()
}

// SetMaxQueueWait sets how long a new request may wait in this engine's
// queue before its first step (0: no limit; see Router.SetMaxQueueWait).
func (e *Engine) SetMaxQueueWait(d time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.maxWait = max(d, 0)
	e.poke()
}

// QueueWait estimates how long a request submitted now would wait in the
// queue before its first step, from the queue's length and the rate the
// engine recently took sequences from it (ok is false when it has too
// little history to tell; see admission).
func (e *Engine) QueueWait() (d time.Duration, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	_, w := e.sched.Len()
	return e.adm.wait(w)
}

// expireLocked ends the sequences that have waited longer than the max
// queue wait without ever being scheduled, and returns when the next one
// would (zero: none can); e.mu is held. Exempt: resumed requests (their
// first tokens were computed by an earlier run) and sequences already
// scheduled (preempted, or moved here from another replica).
func (e *Engine) expireLocked(now time.Time) (next time.Time) {
	if e.maxWait <= 0 {
		return time.Time{}
	}
	var late []*Seq
	for _, q := range e.sched.waiting {
		st := q.Payload.(*reqState)
		if !st.scheduled.IsZero() || len(st.req.Resume) > 0 {
			continue
		}
		deadline := st.queued.Add(e.maxWait)
		switch {
		case !now.Before(deadline):
			late = append(late, q)
		case next.IsZero() || deadline.Before(next):
			next = deadline
		}
	}
	for _, q := range late {
		waited := now.Sub(q.Payload.(*reqState).queued)
		e.end(q, Event{Finish: "error", MatchedStop: -1, Err: fmt.Errorf("%w: waited %v in the queue without being scheduled, more than the max queue wait of %v",
			ErrOverloaded, roundWait(waited), e.maxWait)})
	}
	return next
}

// Load is the number of sequences here (for routing).
func (e *Engine) Load() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	r, w := e.sched.Len()
	return r + w
}

// SetDepth sets how many steps may be in flight at once (default 1). A
// pipeline of n stages keeps every stage busy with n micro-batches: the
// running sequences are split into n groups that step in turn. Steps are
// numbered (steps.Batch.ID) in the order they are issued.
func (e *Engine) SetDepth(n int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	e.depth = max(n, 1)
}

// StepInfo describes a finished step (for metrics).
type StepInfo struct {
	Took, Comm time.Duration
	Seqs       int // sequences in the step
	Tokens     int // tokens computed
	Preempted  int // sequences preempted to make room for it
}

// stepDone is a finished step.
type stepDone struct {
	plan  *Plan
	batch *steps.Batch
	res   *steps.Result
	err   error
	took  time.Duration
}

// Run drives steps until ctx ends or the engine is closed.
func (e *Engine) Run(ctx context.Context) {
	backoff := 50 * time.Millisecond
	inflight := 0
	done := make(chan stepDone, 64)
	expiry := time.NewTimer(time.Hour)
	expiry.Stop()
	defer expiry.Stop()
	for {
		e.mu.Lock()
		if e.closed {
			e.mu.Unlock()
			return
		}
		// Before anything is scheduled: requests that waited too long
		// end, so none is served after waiting more than the limit.
		var expiryC <-chan time.Time
		if next := e.expireLocked(time.Now()); !next.IsZero() {
			expiry.Reset(time.Until(next))
			expiryC = expiry.C
		}
		depth := max(e.depth, 1)
		for inflight < depth {
			maxSeqs := 0
			if depth > 1 { // an equal share of what can run at once
				r, w := e.sched.Len()
				n := min(r+w, e.sched.cfg.MaxRunning)
				maxSeqs = max((n+depth-1)/depth, 1)
			}
			plan := e.sched.ScheduleAtMost(maxSeqs)
			_, waiting := e.sched.Len()
			e.adm.observe(time.Now(), plan.Admitted, waiting)
			if len(plan.Items) == 0 {
				break
			}
			for _, it := range plan.Items {
				it.Seq.inflight = true
			}
			e.nextID++
			batch := e.batch(plan)
			batch.ID = e.nextID
			timeout := e.timer.timeout(batchTokens(batch))
			inflight++
			go func() {
				sctx, cancel := context.WithTimeout(ctx, timeout)
				defer cancel()
				t0 := time.Now()
				res, err := e.exec.Step(sctx, batch)
				done <- stepDone{plan: plan, batch: batch, res: res, err: err, took: time.Since(t0)}
			}()
		}
		e.mu.Unlock()
		var d stepDone
		select {
		case <-ctx.Done():
			return
		case <-e.wake:
			continue
		case <-expiryC:
			continue
		case d = <-done:
			inflight--
		}
		if d.err == nil && len(d.res.Seqs) != len(d.batch.Seqs) {
			d.err = fmt.Errorf("routing: executor returned %d results for %d sequences", len(d.res.Seqs), len(d.batch.Seqs))
		}
		e.mu.Lock()
		if e.closed { // the replica was removed during the step (Drain reset its sequences)
			e.mu.Unlock()
			return
		}
		for _, it := range d.plan.Items {
			it.Seq.inflight = false
		}
		if d.err != nil {
			e.errs.Add(1)
			for _, it := range d.plan.Items {
				q := it.Seq
				if !e.sched.Owns(q) {
					continue
				}
				st := q.Payload.(*reqState)
				if st.failures++; st.failures >= MaxStepFailures {
					e.end(q, Event{Finish: "error", MatchedStop: -1,
						Err: fmt.Errorf("routing: %d consecutive steps failed, the last with: %w", st.failures, d.err)})
				}
			}
			e.sched.PreemptAll()
			// The workers may have lost their KV (restarted): cached
			// prefixes are recomputed rather than trusted.
			e.sched.ResetCache()
			e.mu.Unlock()
			if e.OnStepError != nil {
				e.OnStepError(d.err)
			}
			select {
			case <-ctx.Done():
				return
			case <-time.After(backoff):
			}
			backoff = min(2*backoff, 2*time.Second)
			continue
		}
		backoff = 50 * time.Millisecond
		e.lastStep.Store(int64(d.took))
		e.steps.Add(1)
		e.commNs.Add(int64(d.res.Comm))
		e.stepNs.Add(int64(d.took))
		e.sent.Add(d.res.SentBytes)
		toks := batchTokens(d.batch)
		e.stepToks.Add(int64(toks))
		e.timer.record(d.took, toks)
		e.apply(d.plan, d.res)
		ended := e.ended
		e.ended = nil
		e.mu.Unlock()
		if e.OnStep != nil {
			e.OnStep(StepInfo{Took: d.took, Comm: d.res.Comm, Seqs: len(d.batch.Seqs), Tokens: toks, Preempted: len(d.plan.Preempted)})
		}
		if r, ok := e.exec.(Releaser); ok && len(ended) > 0 {
			// Best effort, and not in the way of the next step (a worker
			// answers it after the step it is running).
			go func() {
				rctx, cancel := context.WithTimeout(ctx, 5*time.Second)
				defer cancel()
				r.Release(rctx, ended)
			}()
		}
	}
}

// batchTokens is the number of tokens a step computes.
func batchTokens(b *steps.Batch) int {
	n := 0
	for _, s := range b.Seqs {
		n += len(s.Tokens)
	}
	return n
}

func (e *Engine) batch(p *Plan) *steps.Batch {
	b := &steps.Batch{Seqs: make([]steps.Seq, len(p.Items))}
	for _, c := range p.Copies {
		b.Copies = append(b.Copies, steps.BlockCopy{Src: c.Src, Dst: c.Dst})
	}
	for i, it := range p.Items {
		st := it.Seq.Payload.(*reqState)
		s := steps.Seq{ID: uint64(it.Seq.ID), Tokens: it.Tokens, Start: it.Start, Blocks: it.Blocks, Sample: it.Sample, RequestID: st.req.ID}
		if st.scheduled.IsZero() {
			st.scheduled = time.Now()
		}
		if it.Sample {
			s.TopN = max(1, st.req.Logprobs)
			s.FullRow = !st.plainGreedy(it.Seq)
			s.WantLogSumExp = st.req.Logprobs >= 0
		}
		if st.req.PromptLogprobs && it.Start < it.Seq.NumPrompt {
			s.PromptTargets = make([]int32, len(it.Tokens))
			for j := range s.PromptTargets {
				pos := it.Start + j
				s.PromptTargets[j] = -1
				if pos+1 < it.Seq.NumPrompt && math.IsNaN(float64(st.plp[pos+1])) {
					s.PromptTargets[j] = it.Seq.Tokens[pos+1]
				}
			}
		}
		b.Seqs[i] = s
	}
	return b
}

// plainGreedy: the arg-max of the raw row decides (no penalties, nothing
// suppressed), so the top candidate is enough.
func (st *reqState) plainGreedy(q *Seq) bool {
	return st.req.Sampling.Greedy() && !st.req.Sampling.Penalized() && (q.Generated() >= st.req.MinTokens || len(st.stop) == 0)
}

func (e *Engine) apply(p *Plan, res *steps.Result) {
	e.sched.Advance(p)
	for i, it := range p.Items {
		q := it.Seq
		if !e.sched.Owns(q) {
			continue // aborted (or moved) during the step
		}
		st := q.Payload.(*reqState)
		st.failures = 0
		r := res.Seqs[i]
		for j, lp := range r.PromptLogprobs {
			if pos := it.Start + j + 1; pos < len(st.plp) && j < len(it.Tokens) && !math.IsNaN(float64(lp)) {
				st.plp[pos] = lp
			}
		}
		if !it.Sample {
			continue
		}
		tok, lp, err := st.choose(q, &r)
		if err != nil {
			e.end(q, Event{Finish: "error", Err: err, MatchedStop: -1})
			continue
		}
		e.tokens.Add(1)
		q.Tokens = append(q.Tokens, tok)
		var lps []TokenLogprob
		if lp != nil {
			lps = []TokenLogprob{*lp}
		}
		st.stream.push([]int32{tok}, lps)
		switch {
		case st.stop[tok]:
			e.end(q, Event{Finish: "stop", MatchedStop: tok})
		case q.Generated() >= st.req.MaxTokens || len(q.Tokens) >= q.MaxLen:
			e.end(q, Event{Finish: "length", MatchedStop: -1})
		}
	}
}

// choose picks the next token from a step's output.
func (st *reqState) choose(q *Seq, r *steps.SeqResult) (int32, *TokenLogprob, error) {
	var tok int32
	var raw float32
	if len(r.Row) > 0 {
		ctx := sampling.Context{Prompt: q.Tokens[:q.NumPrompt], Output: q.Tokens[q.NumPrompt:]}
		if q.Generated() < st.req.MinTokens {
			ctx.Suppress = st.req.StopIDs
		}
		var keep []float32
		if st.req.Logprobs >= 0 {
			keep = slices.Clone(r.Row)
		}
		tok = st.sampler.Sample(r.Row, ctx)
		if int(tok) < 0 || int(tok) >= len(r.Row) {
			return 0, nil, fmt.Errorf("routing: sampler chose %d of %d", tok, len(r.Row))
		}
		if keep != nil {
			raw = keep[tok]
		}
	} else {
		if len(r.Candidates) == 0 {
			return 0, nil, errors.New("routing: executor returned no candidates")
		}
		tok, raw = r.Candidates[0].ID, r.Candidates[0].Logit
	}
	if st.req.Logprobs < 0 {
		return tok, nil, nil
	}
	lp := &TokenLogprob{ID: tok, Logprob: float32(float64(raw) - r.LogSumExp)}
	for _, c := range r.Candidates[:min(st.req.Logprobs, len(r.Candidates))] {
		lp.Top = append(lp.Top, sampling.Candidate{ID: c.ID, Logit: c.Logit, Logprob: float32(float64(c.Logit) - r.LogSumExp)})
	}
	return tok, lp, nil
}
