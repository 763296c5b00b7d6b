package routing

import (
	"slices"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
)

func seqOf(id int, toks []int32, maxLen int) *Seq {
	return &Seq{ID: kvcache.SeqID(id), Tokens: slices.Clone(toks), NumPrompt: len(toks), MaxLen: maxLen}
}

func ramp(n, base int) []int32 {
	t := make([]int32, n)
	for i := range t {
		t[i] = int32(base + i)
	}
	return t
}

// run schedules and advances until q has computed all its tokens,
// returning the items it had.
func runUntilComputed(t *testing.T, s *Scheduler, q *Seq) []Item {
	t.Helper()
	var items []Item
	for i := 0; q.Computed < len(q.Tokens); i++ {
		if i > 100 {
			t.Fatal("no progress")
		}
		p := s.Schedule()
		for _, it := range p.Items {
			if it.Seq == q {
				items = append(items, it)
			}
		}
		s.Advance(p)
	}
	return items
}

func TestPrefixCacheSkipsCachedBlocks(t *testing.T) {
	bm := kvcache.NewBlockManager(40, 4)
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 4, MaxWaiting: 4}, bm)
	shared := ramp(10, 100) // 2 full blocks + 2
	a := seqOf(1, append(slices.Clone(shared), 1, 2, 3), 20)
	s.Add(a)
	runUntilComputed(t, s, a)
	s.Remove(a)
	b := seqOf(2, append(slices.Clone(shared), 7, 8), 20)
	s.Add(b)
	items := runUntilComputed(t, s, b)
	if items[0].Start != 8 || b.Cached != 8 {
		t.Fatalf("second prompt started at %d (cached %d), want 8", items[0].Start, b.Cached)
	}
	st := s.CacheStats()
	if st.Queries != 13+12 || st.Hits != 8 || st.QuerySeqs != 2 || st.HitSeqs != 1 {
		t.Fatalf("stats %+v", st)
	}
	if err := bm.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}

func TestPrefixCacheWholePromptCopiesLastBlock(t *testing.T) {
	bm := kvcache.NewBlockManager(40, 4)
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 4, MaxWaiting: 4}, bm)
	p := ramp(8, 5) // exactly 2 blocks
	a := seqOf(1, p, 20)
	s.Add(a)
	runUntilComputed(t, s, a) // a keeps running: its blocks stay shared
	b := seqOf(2, p, 20)
	s.Add(b)
	plan := s.Schedule()
	var it *Item
	for i := range plan.Items {
		if plan.Items[i].Seq == b {
			it = &plan.Items[i]
		}
	}
	if it == nil || it.Start != 7 || len(it.Tokens) != 1 || !it.Sample {
		t.Fatalf("whole prompt cached: item %+v", it)
	}
	if len(plan.Copies) != 1 || plan.Copies[0].Src != bm.Table(a.ID)[1] || plan.Copies[0].Dst != it.Blocks[1] || it.Blocks[0] != bm.Table(a.ID)[0] {
		t.Fatalf("copies %v, blocks a %v b %v", plan.Copies, bm.Table(a.ID), it.Blocks)
	}
	s.Advance(plan)
	if err := bm.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}

func TestPrefixCacheLookupSkippedForPromptLogprobs(t *testing.T) {
	bm := kvcache.NewBlockManager(40, 4)
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 4, MaxWaiting: 4}, bm)
	p := ramp(12, 0)
	a := seqOf(1, p, 20)
	s.Add(a)
	runUntilComputed(t, s, a)
	b := seqOf(2, p, 20)
	b.NoCacheLookup = true
	s.Add(b)
	if items := runUntilComputed(t, s, b); items[0].Start != 0 {
		t.Fatalf("a sequence that needs every position's output started at %d", items[0].Start)
	}
	if s.CachedPrefix(seqOf(3, p, 20)) != 12 {
		t.Fatal("the prompt is not cached")
	}
}

// A preempted sequence finds its blocks again when it comes back, its
// generated tokens included.
func TestPrefixCachePreemptedResumesFromCache(t *testing.T) {
	bm := kvcache.NewBlockManager(5, 4) // 20 slots
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 4, MaxWaiting: 4}, bm)
	a, b := seqOf(1, ramp(6, 0), 16), seqOf(2, ramp(6, 50), 16)
	s.Add(a)
	s.Add(b)
	s.Advance(s.Schedule())
	for _, q := range []*Seq{a, b} {
		q.Tokens = append(q.Tokens, 1, 2, 3) // 9 tokens: a third block each
	}
	p := s.Schedule()
	if len(p.Preempted) != 1 || p.Preempted[0] != b {
		t.Fatalf("preempted %v", p.Preempted)
	}
	s.Advance(p)
	a.Tokens = append(a.Tokens, 9, 9, 9, 9) // a grows into b's freed blocks? no: 13 tokens, 4 blocks
	s.Advance(s.Schedule())
	s.Remove(a)
	p = s.Schedule()
	if len(p.Items) != 1 || p.Items[0].Seq != b || p.Items[0].Start != 4 {
		t.Fatalf("b back from preemption: %+v (cached %d)", p.Items, b.Cached)
	}
	if err := bm.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}
