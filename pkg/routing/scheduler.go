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
	// NoPrefixCache turns prefix caching off (it is on by default): see
	// Scheduler.
	NoPrefixCache bool
	// CacheIdentity names what the KV of a token prefix depends on besides
	// the tokens (the model and adapter): cached blocks are keyed by it.
	CacheIdentity string
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
	// NoCacheLookup: the sequence computes its prompt from position 0
	// even where it is cached (a request for prompt logprobs needs every
	// position's); what it computes is cached for others all the same.
	NoCacheLookup bool
	// Cached is how many tokens of the sequence its last admission found
	// in the prefix cache (0 when it looked up none).
	Cached int

	running  bool
	inflight bool // in a step that has not returned (pipelined engines)
	// hashes name the full blocks of Tokens (see kvcache.PrefixHashes)
	// under hashRoot; registered is how many of the blocks of the table
	// are in the cache (or were found there).
	hashes     []kvcache.BlockHash
	hashRoot   kvcache.BlockHash
	hashBS     int
	registered int
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
	// Copies are the blocks the executor copies before the step
	// (copy-on-write of shared blocks the step writes).
	Copies []kvcache.Copy
}

// CacheStats count prefix-cache lookups: one per admission of a sequence
// that looks up its tokens (Queries, in tokens: the sequence's length;
// Hits, in tokens: those found cached), and the same counted in sequences
// (QuerySeqs; HitSeqs: those that found at least one block).
type CacheStats struct {
	Queries, Hits      int64
	QuerySeqs, HitSeqs int64
	CachedBlocks       int
	Evictions          int64
}

// Scheduler decides which sequences run in each step.
//
// With prefix caching on (SchedulerConfig.NoPrefixCache unset), a sequence
// admitted from the queue first takes the longest run of cached full
// blocks of its tokens (kvcache.BlockManager.Share) and starts computing
// after them; when every token is cached it still computes the last one
// (the step's output for it picks the next token), in a copy of the last
// block if another sequence shares it. After each step, the blocks a
// sequence filled are cached under the hash of their prefix
// (kvcache.PrefixHashes), generated tokens included, so a preempted
// sequence, a request resumed with its earlier output, or the next turn
// of a chat finds its prefix again while the blocks are not needed
// elsewhere.
type Scheduler struct {
	cfg     SchedulerConfig
	bm      *kvcache.BlockManager
	root    kvcache.BlockHash
	waiting []*Seq
	running []*Seq
	preempt int64
	stats   CacheStats
}

// NewScheduler schedules over bm.
func NewScheduler(cfg SchedulerConfig, bm *kvcache.BlockManager) *Scheduler {
	if cfg.MaxBatchTokens <= 0 || cfg.MaxRunning <= 0 || cfg.MaxWaiting < 0 {
		panic(fmt.Sprintf("routing: bad SchedulerConfig %+v", cfg))
	}
	bm.SetPrefixCaching(!cfg.NoPrefixCache)
	return &Scheduler{cfg: cfg, bm: bm, root: kvcache.RootHash(cfg.CacheIdentity)}
}

// CacheStats reads the prefix cache's counters.
func (s *Scheduler) CacheStats() CacheStats {
	c := s.stats
	c.CachedBlocks, c.Evictions = s.bm.NumCached(), s.bm.Evictions()
	return c
}

// hashesFor has q.hashes name every full block of q.Tokens[:n].
func (s *Scheduler) hashesFor(q *Seq, n int) []kvcache.BlockHash {
	bs := s.bm.BlockSize()
	if q.hashRoot != s.root || q.hashBS != bs {
		q.hashes, q.hashRoot, q.hashBS = nil, s.root, bs
	}
	if len(q.hashes) < n/bs {
		q.hashes = kvcache.PrefixHashes(s.root, q.hashes, q.Tokens[:n], bs)
	}
	return q.hashes[:n/bs]
}

// CachedPrefix is how many leading tokens of q's this scheduler's cache
// holds now (0 with caching off): what admitting it would skip.
func (s *Scheduler) CachedPrefix(q *Seq) int {
	if !s.bm.PrefixCaching() || q.NoCacheLookup {
		return 0
	}
	return s.bm.Match(s.hashesFor(q, len(q.Tokens))) * s.bm.BlockSize()
}

// share starts a sequence being admitted with its cached prefix: it sets
// Computed past the cached tokens (all but the last token at most) and
// returns how many tokens were cached.
func (s *Scheduler) share(q *Seq) int {
	q.registered = 0
	if !s.bm.PrefixCaching() || q.NoCacheLookup {
		return 0
	}
	hs := s.hashesFor(q, len(q.Tokens))
	n := s.bm.Share(q.ID, hs, len(hs))
	q.Computed = min(n*s.bm.BlockSize(), len(q.Tokens)-1)
	q.registered = q.Computed / s.bm.BlockSize()
	return n * s.bm.BlockSize()
}

// grow gives q's table the blocks for positions up to end, writable from
// q.Computed on; copies are added to p.
func (s *Scheduler) grow(p *Plan, q *Seq, end int) error {
	if err := s.bm.Reserve(q.ID, end); err != nil {
		return err
	}
	cp, err := s.bm.PrepareWrite(q.ID, q.Computed, end)
	if err != nil {
		return err
	}
	p.Copies = append(p.Copies, cp...)
	return nil
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
		for s.grow(p, q, q.Computed+n) != nil {
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
		hit := s.share(q)
		n := min(len(q.Tokens)-q.Computed, budget)
		if s.grow(p, q, q.Computed+n) != nil {
			s.bm.Free(q.ID)
			q.Computed, q.registered = 0, 0
			break
		}
		if s.bm.PrefixCaching() && !q.NoCacheLookup {
			s.stats.Queries += int64(len(q.Tokens))
			s.stats.Hits += int64(hit)
			s.stats.QuerySeqs++
			if hit > 0 {
				s.stats.HitSeqs++
			}
		}
		q.Cached = hit
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
// With prefix caching, the blocks the plan filled are cached.
func (s *Scheduler) Advance(p *Plan) {
	for _, it := range p.Items {
		q := it.Seq
		if s.Owns(q) && q.Computed == it.Start {
			q.Computed = it.Start + len(it.Tokens)
			if s.bm.PrefixCaching() {
				hs := s.hashesFor(q, q.Computed)
				s.bm.Register(q.ID, q.registered, hs)
				q.registered = len(hs)
			}
		}
	}
}

// ResetCache forgets every cached prefix: the executor's KV cannot be
// trusted (a step failed; its workers may have restarted).
func (s *Scheduler) ResetCache() { s.bm.ResetCache() }

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
