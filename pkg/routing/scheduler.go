package routing

import (
	"errors"
	"fmt"
	"slices"

	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
)

// ErrQueueFull is returned by Add when the waiting queue is at its limit.
var ErrQueueFull = errors.New("routing: queue full")

// ErrTooLong is matched (errors.Is) by the *TooLongError of Add for a
// sequence that cannot fit the KV pool even alone.
var ErrTooLong = errors.New("routing: sequence does not fit the KV cache")

// TooLongError is Add's error for a sequence whose length limit (prompt and
// output) cannot fit the KV pool even alone. Add is the one place a
// request's length is checked against the KV cache (for Submit and for
// sequences moved by Adopt alike); the API layer turns this error into one
// on the request's prompt or max_tokens.
type TooLongError struct {
	Prompt   int // the sequence's prompt tokens
	MaxLen   int // its length limit: prompt + output tokens
	Capacity int // the tokens the whole pool holds
}

func (e *TooLongError) Error() string {
	return fmt.Sprintf("%v: %d tokens (%d of them prompt), the pool holds %d", ErrTooLong, e.MaxLen, e.Prompt, e.Capacity)
}

// Is makes errors.Is(err, ErrTooLong) hold.
func (e *TooLongError) Is(target error) bool { return target == ErrTooLong }

// SchedulerConfig bounds one step and the queue.
type SchedulerConfig struct {
	MaxBatchTokens int // tokens computed per step (prefill chunks + decodes)
	MaxRunning     int // sequences in the running set
	MaxWaiting     int // queued sequences before Add refuses
}

// DefaultSchedulerConfig suits a CPU worker.
func DefaultSchedulerConfig() SchedulerConfig {
	return SchedulerConfig{MaxBatchTokens: 512, MaxRunning: 64, MaxWaiting: 1024}
}

// Seq is one sequence's scheduling state.
type Seq struct {
	ID        kvcache.SeqID
	Tokens    []int32 // prompt followed by the generated tokens
	NumPrompt int
	// MaxLen is the length (prompt + output) at which the sequence stops
	// for length; Add checks it fits the pool.
	MaxLen int
	// Computed counts the tokens whose KV is in the cache.
	Computed    int
	Preemptions int
	// Payload is the caller's; the scheduler never reads it.
	Payload any

	running  bool
	inflight bool // in a step that has not returned (pipelined engines)
}

// Generated is the number of tokens generated so far.
func (s *Seq) Generated() int { return len(s.Tokens) - s.NumPrompt }

// Item is one sequence's share of a step.
type Item struct {
	Seq    *Seq
	Start  int     // = Seq.Computed when planned
	Tokens []int32 // Seq.Tokens[Start:Start+n]
	Blocks []int32 // covers Start+n positions
	// Sample is set when the chunk reaches the end of Seq.Tokens: the step's
	// output for the last token decides the next token.
	Sample bool
}

// Plan is one step.
type Plan struct {
	Items     []Item
	Preempted []*Seq // sequences preempted while planning
	// Admitted is how many of the items came from the waiting queue.
	Admitted int
}

// Scheduler decides which sequences run in each step.
type Scheduler struct {
	cfg     SchedulerConfig
	bm      *kvcache.BlockManager
	waiting []*Seq
	running []*Seq
	preempt int64
}

// NewScheduler schedules over bm.
func NewScheduler(cfg SchedulerConfig, bm *kvcache.BlockManager) *Scheduler {
	if cfg.MaxBatchTokens <= 0 || cfg.MaxRunning <= 0 || cfg.MaxWaiting < 0 {
		panic(fmt.Sprintf("routing: bad SchedulerConfig %+v", cfg))
	}
	return &Scheduler{cfg: cfg, bm: bm}
}

// Blocks is the block manager (read its counters; do not reserve).
func (s *Scheduler) Blocks() *kvcache.BlockManager { return s.bm }

// Len is the number of running and waiting sequences.
func (s *Scheduler) Len() (running, waiting int) { return len(s.running), len(s.waiting) }

// Preemptions counts preemptions since the start.
func (s *Scheduler) Preemptions() int64 { return s.preempt }

// Add queues a sequence (Computed must be 0 and Tokens non-empty). A
// sequence whose MaxLen cannot fit the pool alone is refused with a
// *TooLongError.
func (s *Scheduler) Add(q *Seq) error {
	if err := checkSeq(q); err != nil {
		return err
	}
	if total := s.bm.NumFree() + s.bm.NumUsed(); s.bm.BlocksFor(q.MaxLen) > total {
		return &TooLongError{Prompt: q.NumPrompt, MaxLen: q.MaxLen, Capacity: total * s.bm.BlockSize()}
	}
	if len(s.waiting) >= s.cfg.MaxWaiting {
		return fmt.Errorf("%w: %d requests waiting", ErrQueueFull, len(s.waiting))
	}
	q.Computed, q.running = 0, false
	s.waiting = append(s.waiting, q)
	return nil
}

// checkSeq refuses a sequence no scheduler could take, whatever its pool.
func checkSeq(q *Seq) error {
	if len(q.Tokens) == 0 || q.NumPrompt <= 0 || q.MaxLen < len(q.Tokens) {
		return fmt.Errorf("routing: bad sequence (tokens %d, prompt %d, max %d)", len(q.Tokens), q.NumPrompt, q.MaxLen)
	}
	return nil
}

// Remove drops a sequence wherever it is and frees its blocks. It reports
// whether the sequence was known.
func (s *Scheduler) Remove(q *Seq) bool {
	s.bm.Free(q.ID)
	if i := indexOf(s.running, q); i >= 0 {
		s.running = append(s.running[:i], s.running[i+1:]...)
		q.running = false
		return true
	}
	if i := indexOf(s.waiting, q); i >= 0 {
		s.waiting = append(s.waiting[:i], s.waiting[i+1:]...)
		return true
	}
	return false
}

// Drain removes every sequence (running first, then waiting, each in
// order), freeing their blocks and resetting Computed, and returns them: the
// caller resubmits them elsewhere, where they are recomputed.
func (s *Scheduler) Drain() []*Seq {
	out := append(append([]*Seq(nil), s.running...), s.waiting...)
	for _, q := range out {
		s.bm.Free(q.ID)
		q.Computed, q.running, q.inflight = 0, false, false
	}
	s.running, s.waiting = nil, nil
	return out
}

// PreemptAll sends every running sequence back to the queue (front, in
// order) for recompute: the executor lost its KV.
func (s *Scheduler) PreemptAll() {
	for _, q := range s.running {
		s.bm.Free(q.ID)
		q.Computed, q.running = 0, false
		q.Preemptions++
		s.preempt++
	}
	s.waiting = append(s.running, s.waiting...)
	s.running = nil
}

// Schedule plans the next step; an empty plan means nothing to do.
func (s *Scheduler) Schedule() *Plan { return s.ScheduleAtMost(0) }

// ScheduleAtMost plans a step of at most maxSeqs sequences (0: no limit)
// among those not in a step already (see Engine.SetDepth).
func (s *Scheduler) ScheduleAtMost(maxSeqs int) *Plan {
	p := &Plan{}
	budget := s.cfg.MaxBatchTokens
	full := func() bool { return maxSeqs > 0 && len(p.Items) >= maxSeqs }
	for i := 0; i < len(s.running) && budget > 0 && !full(); i++ {
		q := s.running[i]
		n := min(len(q.Tokens)-q.Computed, budget)
		if n <= 0 || q.inflight {
			continue
		}
		for s.bm.Reserve(q.ID, q.Computed+n) != nil {
			// Preempt the newest running sequence not in a step; if that
			// is q itself, q waits and the step goes on without it.
			victim := s.newestIdle()
			s.preemptSeq(victim)
			p.Preempted = append(p.Preempted, victim)
			if victim == q {
				n = 0
				break
			}
			if indexOf(s.running, q) < i { // q moved down
				i--
			}
		}
		if n == 0 {
			break
		}
		p.Items = append(p.Items, s.item(q, n))
		budget -= n
	}
	// Admit waiting sequences while budget, room and blocks remain; none
	// are admitted in a step that had to preempt.
	for len(p.Preempted) == 0 && budget > 0 && len(s.waiting) > 0 && len(s.running) < s.cfg.MaxRunning && !full() {
		q := s.waiting[0]
		if q.inflight { // preempted during a step still out: wait for it
			break
		}
		n := min(len(q.Tokens)-q.Computed, budget)
		if s.bm.Reserve(q.ID, q.Computed+n) != nil {
			s.bm.Free(q.ID)
			break
		}
		s.waiting = s.waiting[1:]
		q.running = true
		s.running = append(s.running, q)
		p.Items = append(p.Items, s.item(q, n))
		p.Admitted++
		budget -= n
	}
	return p
}

func (s *Scheduler) item(q *Seq, n int) Item {
	return Item{Seq: q, Start: q.Computed, Tokens: q.Tokens[q.Computed : q.Computed+n],
		Blocks: append([]int32(nil), s.bm.Table(q.ID)...), Sample: q.Computed+n == len(q.Tokens)}
}

// newestIdle is the newest running sequence not in a step.
func (s *Scheduler) newestIdle() *Seq {
	for i := len(s.running) - 1; i >= 0; i-- {
		if !s.running[i].inflight {
			return s.running[i]
		}
	}
	return nil
}

func (s *Scheduler) preemptSeq(q *Seq) {
	s.running = slices.Delete(s.running, indexOf(s.running, q), indexOf(s.running, q)+1)
	s.bm.Free(q.ID)
	q.Computed, q.running = 0, false
	q.Preemptions++
	s.preempt++
	s.waiting = append([]*Seq{q}, s.waiting...)
}

// Advance records that a plan ran: every item's tokens are now computed.
// Items whose sequence was removed meanwhile are skipped.
func (s *Scheduler) Advance(p *Plan) {
	for _, it := range p.Items {
		if s.Owns(it.Seq) && it.Seq.Computed == it.Start {
			it.Seq.Computed = it.Start + len(it.Tokens)
		}
	}
}

// Owns reports whether q is in this scheduler's running set (a sequence
// removed, preempted or moved to another scheduler during a step is not).
func (s *Scheduler) Owns(q *Seq) bool { return q.running && indexOf(s.running, q) >= 0 }

func indexOf(v []*Seq, q *Seq) int {
	for i, x := range v {
		if x == q {
			return i
		}
	}
	return -1
}
