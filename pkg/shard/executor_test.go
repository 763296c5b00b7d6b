package shard_test

import (
	"context"
	"errors"
	"math"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/shard"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

func newExec(t *testing.T) *shard.Executor {
	t.Helper()
	cfg, err := model.Preset("qwen2-0.5b")
	if err != nil {
		t.Fatal(err)
	}
	cfg.NumHiddenLayers, cfg.MaxWindowLayers = 2, 2
	b, err := cpu.New(cpu.Config{Threads: 2, BatchInvariant: true})
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.New(cfg, b, model.NewRandomWeights(cfg, kernels.BF16, 3))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { m.Close(); b.Close() })
	x := shard.NewExecutor(m)
	if err := x.Warmup(64, 16, 4); err != nil {
		t.Fatal(err)
	}
	return x
}

func step(t *testing.T, x *shard.Executor, seqs ...steps.Seq) *steps.Result {
	t.Helper()
	r, err := x.Step(context.Background(), &steps.Batch{Seqs: seqs}, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// TestStepIsBatchInvariant: on the qwen2-0.5b shape, a sequence's row is
// bit-identical whether it decodes alone or beside others, and whether its
// prompt was prefilled in one chunk or two.
func TestStepIsBatchInvariant(t *testing.T) {
	x := newExec(t)
	prompts := [][]int32{{100, 200, 300, 400, 500}, {7, 8, 9}, {1000, 2000, 3000, 4000, 5000, 6000, 7000}}
	tables := [][]int32{{0}, {1}, {2}}
	// Prefill all three together, the first one in two chunks.
	step(t, x, steps.Seq{ID: 1, Tokens: prompts[0][:2], Blocks: tables[0]})
	step(t, x,
		steps.Seq{ID: 1, Tokens: prompts[0][2:], Start: 2, Blocks: tables[0]},
		steps.Seq{ID: 2, Tokens: prompts[1], Blocks: tables[1]},
		steps.Seq{ID: 3, Tokens: prompts[2], Blocks: tables[2]})
	dec := func(i int) steps.Seq {
		return steps.Seq{ID: uint64(i + 1), Tokens: []int32{42}, Start: len(prompts[i]), Blocks: tables[i], Sample: true, TopN: 1, FullRow: true}
	}
	batched := step(t, x, dec(0), dec(1), dec(2))
	// The first one again, alone, from a fresh one-chunk prefill in other blocks.
	step(t, x, steps.Seq{ID: 9, Tokens: prompts[0], Blocks: []int32{5}})
	s := dec(0)
	s.ID, s.Blocks = 9, []int32{5}
	alone := step(t, x, s)
	if !slices.Equal(alone.Seqs[0].Row, batched.Seqs[0].Row) {
		d := 0
		for i := range alone.Seqs[0].Row {
			if alone.Seqs[0].Row[i] != batched.Seqs[0].Row[i] {
				d++
			}
		}
		t.Fatalf("%d of %d logits differ alone and batched", d, len(alone.Seqs[0].Row))
	}
	c := alone.Seqs[0].Candidates
	if len(c) != 1 || c[0].ID != int32(model.Argmax(alone.Seqs[0].Row)) {
		t.Fatalf("candidate %v", c)
	}
}

func TestStepPromptLogprobsAndErrors(t *testing.T) {
	x := newExec(t)
	p := []int32{11, 22, 33, 44}
	r := step(t, x, steps.Seq{ID: 1, Tokens: p, Blocks: []int32{0}, Sample: true, TopN: 3, WantLogSumExp: true,
		PromptTargets: []int32{22, 33, 44, -1}})
	lp := r.Seqs[0].PromptLogprobs
	// Position 1's row, computed as a sampled row of a two-token prompt.
	row := step(t, x, steps.Seq{ID: 2, Tokens: p[:2], Blocks: []int32{1}, Sample: true, TopN: 1, FullRow: true}).Seqs[0].Row
	if want := float64(row[33]) - sampling.LogSumExp(row); math.Abs(float64(lp[1])-want) > 1e-4 {
		t.Fatalf("prompt logprob %v, want %v", lp[1], want)
	}
	if len(lp) != 4 || !math.IsNaN(float64(lp[3])) {
		t.Fatalf("prompt logprobs %v", lp)
	}
	for _, v := range lp[:3] {
		if !(v < 0) {
			t.Fatalf("prompt logprob %v", v)
		}
	}
	cs := r.Seqs[0].Candidates
	if len(cs) != 3 || cs[0].Logit < cs[1].Logit || cs[1].Logit < cs[2].Logit || r.Seqs[0].LogSumExp < float64(cs[0].Logit) {
		t.Fatalf("candidates %v lse %v", cs, r.Seqs[0].LogSumExp)
	}
	if lse := sampling.LogSumExp(nil); !math.IsInf(lse, -1) {
		t.Fatal(lse)
	}
	bad := []steps.Seq{
		{ID: 1, Tokens: []int32{1}, Blocks: []int32{0}, Sample: true, TopN: 0},
		{ID: 1, Tokens: []int32{1}, Blocks: []int32{0}, Sample: true, TopN: 5000},
		{ID: 1, Tokens: []int32{1, 2}, Blocks: []int32{0}, PromptTargets: []int32{1}},
		{ID: 1, Tokens: []int32{1}, Blocks: []int32{0}, PromptTargets: []int32{1 << 20}},
		{ID: 1, Tokens: []int32{1 << 20}, Blocks: []int32{0}},
		{ID: 1, Tokens: []int32{1}, Blocks: []int32{999}},
		{ID: 1, Tokens: []int32{1}, Start: -1, Blocks: []int32{0}},
	}
	// A sequence whose KV is not here (never computed, or released) must
	// start at 0.
	if _, err := x.Step(context.Background(), &steps.Batch{Seqs: []steps.Seq{{ID: 77, Tokens: []int32{1}, Start: 3, Blocks: []int32{2}}}}, nil, nil); !errors.Is(err, shard.ErrMissingKV) {
		t.Fatalf("unknown sequence at position 3: %v", err)
	}
	// Another sequence may start on blocks a finished one computed (the
	// prefix cache), and on a copy of them; not once the pool is
	// re-allocated.
	x.Release([]uint64{1})
	onCached, err := x.Step(context.Background(), &steps.Batch{Seqs: []steps.Seq{{ID: 2, Tokens: []int32{1}, Start: 4, Blocks: []int32{0}, Sample: true, TopN: 3}}}, nil, nil)
	if err != nil {
		t.Fatalf("a sequence on cached blocks: %v", err)
	}
	onCopy, err := x.Step(context.Background(), &steps.Batch{Copies: []steps.BlockCopy{{Src: 0, Dst: 5}},
		Seqs: []steps.Seq{{ID: 3, Tokens: []int32{1}, Start: 4, Blocks: []int32{5}, Sample: true, TopN: 3}}}, nil, nil)
	if err != nil {
		t.Fatalf("a sequence on a copied block: %v", err)
	}
	if !slices.Equal(onCached.Seqs[0].Candidates, onCopy.Seqs[0].Candidates) {
		t.Fatalf("a copied block gives %v, the original %v", onCopy.Seqs[0].Candidates, onCached.Seqs[0].Candidates)
	}
	if _, err := x.Step(context.Background(), &steps.Batch{Copies: []steps.BlockCopy{{Src: 0, Dst: 64}},
		Seqs: []steps.Seq{{ID: 3, Tokens: []int32{1}, Blocks: []int32{5}}}}, nil, nil); !errors.Is(err, model.ErrBadBatch) {
		t.Fatalf("copy to a block outside the pool: %v", err)
	}
	if err := x.Warmup(64, 16, 4); err != nil {
		t.Fatal(err)
	}
	if _, err := x.Step(context.Background(), &steps.Batch{Seqs: []steps.Seq{{ID: 2, Tokens: []int32{1}, Start: 4, Blocks: []int32{0}}}}, nil, nil); !errors.Is(err, shard.ErrMissingKV) {
		t.Fatalf("a sequence on blocks of the pool before Warmup: %v", err)
	}
	for i, s := range bad {
		if _, err := x.Step(context.Background(), &steps.Batch{Seqs: []steps.Seq{s}}, nil, nil); !errors.Is(err, model.ErrBadBatch) {
			t.Errorf("bad step %d: %v", i, err)
		}
	}
}

// commLink is a shard.Link for one tensor-parallel stage in process.
type commLink struct{ model.Comm }

func (commLink) RecvHidden() ([]float32, error) { return nil, errors.New("no previous stage") }
func (commLink) SendHidden([]float32) error     { return errors.New("no next stage") }

// arrivalCtx calls arrived when a step starts to wait on it (Done): the
// step is waiting for its turn.
type arrivalCtx struct {
	context.Context
	arrived func()
}

func (c arrivalCtx) Done() <-chan struct{} {
	c.arrived()
	return c.Context.Done()
}

// arrivalLink calls arrived when a step reaches its first all-reduce: it
// is running.
type arrivalLink struct {
	commLink
	arrived func()
}

func (l arrivalLink) AllReduce(x []float32) error {
	l.arrived()
	return l.commLink.AllReduce(x)
}

// TestStepsRunInIDOrder: two tensor-parallel ranks receive numbered steps
// in opposite orders; each runs them in id order, so their all-reduces
// pair up and every step completes with the same answer on both. A step
// waiting for a lower id that never comes fails when its context ends.
func TestStepsRunInIDOrder(t *testing.T) {
	cfg, err := model.Preset("tiny")
	if err != nil {
		t.Fatal(err)
	}
	src := model.NewRandomWeights(cfg, kernels.BF16, 5)
	comms := model.LocalComms(2)
	var xs []*shard.Executor
	for r := range 2 {
		b, err := cpu.New(cpu.Config{Threads: 1, BatchInvariant: true})
		if err != nil {
			t.Fatal(err)
		}
		m, err := model.NewShard(cfg, b, src, model.Shard{TPRank: r, TPSize: 2})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { m.Close(); b.Close() })
		x := shard.NewExecutor(m)
		if err := x.Warmup(16, 16, 0); err != nil {
			t.Fatal(err)
		}
		xs = append(xs, x)
	}
	batch := func(id uint64) *steps.Batch {
		return &steps.Batch{ID: id, Seqs: []steps.Seq{{ID: id, Tokens: []int32{int32(id), 7, 9}, Blocks: []int32{int32(id)},
			Sample: true, TopN: 3}}}
	}
	type out struct {
		rank int
		id   uint64
		res  *steps.Result
		err  error
	}
	results := make(chan out, 6)
	orders := [][]uint64{{1, 2, 3}, {3, 2, 1}}
	for r, order := range orders {
		for _, id := range order {
			// The next step is sent only once this one has arrived: it
			// waits for its turn (watching its context) or runs (it reached
			// its first all-reduce, where it waits for the other rank).
			arrived := make(chan struct{})
			var once sync.Once
			signal := func() { once.Do(func() { close(arrived) }) }
			ctx := arrivalCtx{context.Background(), signal}
			go func() {
				res, err := xs[r].Step(ctx, batch(id), arrivalLink{commLink{comms[r]}, signal}, nil)
				results <- out{r, id, res, err}
			}()
			select {
			case <-arrived:
			case o := <-results:
				t.Fatalf("rank %d step %d returned before the other steps were sent: %v", o.rank, o.id, o.err)
			case <-time.After(60 * time.Second):
				t.Fatalf("rank %d step %d neither waits for its turn nor runs", r, id)
			}
		}
	}
	got := map[uint64][]*steps.Result{}
	for range 6 {
		select {
		case o := <-results:
			if o.err != nil {
				t.Fatalf("rank %d step %d: %v", o.rank, o.id, o.err)
			}
			got[o.id] = append(got[o.id], o.res)
		case <-time.After(60 * time.Second):
			t.Fatal("ranks deadlocked")
		}
	}
	b, err := cpu.New(cpu.Config{Threads: 1, BatchInvariant: true})
	if err != nil {
		t.Fatal(err)
	}
	whole, err := model.New(cfg, b, src)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { whole.Close(); b.Close() })
	wx := shard.NewExecutor(whole)
	if err := wx.Warmup(16, 16, 0); err != nil {
		t.Fatal(err)
	}
	for id, rs := range got {
		a, b := rs[0].Seqs[0], rs[1].Seqs[0]
		m, err := shard.Merge([]steps.SeqResult{a, b}, 3, false)
		if err != nil {
			t.Fatalf("step %d: %v", id, err)
		}
		want := step(t, wx, batch(id).Seqs...).Seqs[0].Candidates
		for i := range want {
			if m.Candidates[i].ID != want[i].ID || math.Abs(float64(m.Candidates[i].Logit-want[i].Logit)) > 1e-4 {
				t.Fatalf("step %d: candidates %v, one process %v", id, m.Candidates, want)
			}
		}
	}
	// Step 5 without step 4: it waits, and fails when its context ends.
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := xs[0].Step(ctx, batch(5), commLink{comms[0]}, nil); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a step past a missing one: %v", err)
	}
}
