package routing

import (
	"errors"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
)

func seq(id int, prompt, maxLen int) *Seq {
	t := make([]int32, prompt)
	for i := range t {
		t[i] = int32(i)
	}
	return &Seq{ID: kvcache.SeqID(id), Tokens: t, NumPrompt: prompt, MaxLen: maxLen}
}

func TestSchedulerChunksPrefillUnderBudget(t *testing.T) {
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 8, MaxRunning: 4, MaxWaiting: 4, NoPrefixCache: true}, kvcache.NewBlockManager(100, 4))
	q := seq(1, 20, 30)
	if err := s.Add(q); err != nil {
		t.Fatal(err)
	}
	var chunks []int
	for step := 0; step < 3; step++ {
		p := s.Schedule()
		if len(p.Items) != 1 {
			t.Fatalf("step %d: %d items", step, len(p.Items))
		}
		it := p.Items[0]
		chunks = append(chunks, len(it.Tokens))
		if it.Sample != (step == 2) {
			t.Fatalf("step %d: Sample %v", step, it.Sample)
		}
		if len(it.Blocks)*4 < it.Start+len(it.Tokens) {
			t.Fatalf("step %d: %d blocks for %d positions", step, len(it.Blocks), it.Start+len(it.Tokens))
		}
		s.Advance(p)
	}
	if chunks[0] != 8 || chunks[1] != 8 || chunks[2] != 4 {
		t.Fatalf("chunks %v, want [8 8 4]", chunks)
	}
	// A decode and a new prefill share the next step.
	q.Tokens = append(q.Tokens, 7)
	r := seq(2, 10, 20)
	s.Add(r)
	p := s.Schedule()
	if len(p.Items) != 2 || len(p.Items[0].Tokens) != 1 || len(p.Items[1].Tokens) != 7 {
		t.Fatalf("mixed step: %+v", p.Items)
	}
}

func TestSchedulerPreemptsNewestAndRecomputes(t *testing.T) {
	bm := kvcache.NewBlockManager(4, 4) // 16 slots
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 4, MaxWaiting: 4, NoPrefixCache: true}, bm)
	a, b := seq(1, 6, 16), seq(2, 6, 16)
	s.Add(a)
	s.Add(b)
	p := s.Schedule() // both prefill: 2 blocks each
	if len(p.Items) != 2 || bm.NumFree() != 0 {
		t.Fatalf("prefill: %d items, %d free", len(p.Items), bm.NumFree())
	}
	s.Advance(p)
	for _, q := range []*Seq{a, b} {
		q.Tokens = append(q.Tokens, 1, 2, 3) // as if decoded; now 9 tokens each
	}
	p = s.Schedule()
	// a needs a third block: b (newest) is preempted.
	if len(p.Preempted) != 1 || p.Preempted[0] != b || b.Computed != 0 || b.Preemptions != 1 {
		t.Fatalf("preempted %v, b computed %d", p.Preempted, b.Computed)
	}
	if len(p.Items) != 1 || p.Items[0].Seq != a {
		t.Fatalf("items %+v", p.Items)
	}
	s.Advance(p)
	if r, w := s.Len(); r != 1 || w != 1 {
		t.Fatalf("running %d waiting %d", r, w)
	}
	s.Remove(a)
	p = s.Schedule() // b comes back and recomputes all 9 tokens
	if len(p.Items) != 1 || p.Items[0].Seq != b || p.Items[0].Start != 0 || len(p.Items[0].Tokens) != 9 || !p.Items[0].Sample {
		t.Fatalf("recompute: %+v", p.Items)
	}
}

func TestSchedulerRefusesWhatCannotFit(t *testing.T) {
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 8, MaxRunning: 1, MaxWaiting: 1}, kvcache.NewBlockManager(2, 4))
	err := s.Add(seq(1, 4, 9))
	var tl *TooLongError
	if !errors.Is(err, ErrTooLong) || !errors.As(err, &tl) || *tl != (TooLongError{Prompt: 4, MaxLen: 9, Capacity: 8}) {
		t.Fatalf("9 tokens in 8 slots: %v", err)
	}
	if err := s.Add(seq(2, 4, 8)); err != nil {
		t.Fatal(err)
	}
	if err := s.Add(seq(3, 4, 8)); !errors.Is(err, ErrQueueFull) {
		t.Fatalf("second waiting: %v", err)
	}
	if err := s.Add(&Seq{ID: 4, MaxLen: 1}); err == nil {
		t.Fatal("empty sequence accepted")
	}
}

func TestSchedulerRemoveFreesBlocks(t *testing.T) {
	bm := kvcache.NewBlockManager(10, 4)
	s := NewScheduler(SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 4, MaxWaiting: 4}, bm)
	q := seq(1, 10, 20)
	s.Add(q)
	s.Advance(s.Schedule())
	if bm.NumFree() != 7 {
		t.Fatalf("%d free", bm.NumFree())
	}
	if !s.Remove(q) || bm.NumFree() != 10 || s.Remove(q) {
		t.Fatalf("after remove: %d free", bm.NumFree())
	}
}
