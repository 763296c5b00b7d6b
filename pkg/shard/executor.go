package shard

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// MaxTopN bounds the candidates a step may ask for.
const MaxTopN = 1024

// ErrNotReady is returned by Step before Warmup.
var ErrNotReady = errors.New("shard: KV cache not allocated (call Warmup)")

// ErrMissingKV is returned by Step for a sequence that starts past the
// positions whose KV its blocks hold here (the KV was lost: the pool was
// re-allocated by a Warmup, or the worker restarted): the coordinator must
// recompute it from position 0.
var ErrMissingKV = errors.New("shard: sequence's KV cache is not here")

// Executor runs steps of one model on one worker. Safe for concurrent use
// (steps are serialized).
type Executor struct {
	mu    sync.Mutex
	m     *model.Model
	cache *kvcache.Storage
	// filled is, per block, how many leading slots hold KV written since
	// the pool was allocated (by a step or a copy). A step that starts a
	// sequence at position p needs the blocks before p filled: the
	// coordinator may start a sequence past 0 on blocks other sequences
	// computed (prefix caching), and this catches KV the worker lost.
	filled []int32

	// turn is the highest step id run since Warmup; turnC is closed and
	// replaced whenever it moves.
	turnMu sync.Mutex
	turn   uint64
	turnC  chan struct{}
}

// NewExecutor wraps a loaded model (whole, or a shard of it).
func NewExecutor(m *model.Model) *Executor {
	return &Executor{m: m, turnC: make(chan struct{})}
}

// Release is told of sequences that finished or moved. The executor keeps
// no per-sequence state (KV validity is per block), so it does nothing.
func (x *Executor) Release(ids []uint64) {}

// Model is the executor's model.
func (x *Executor) Model() *model.Model { return x.m }

// BytesPerBlock is the KV storage of one block of blockSize tokens.
func (x *Executor) BytesPerBlock(blockSize int) int64 {
	return int64(kvcache.BytesPerToken(x.m.NumLayers(), x.m.KVDim())) * int64(blockSize)
}

// Warmup (re)allocates the KV pool and runs one step of warmTokens tokens
// through it. Old KV contents are dropped.
func (x *Executor) Warmup(numBlocks, blockSize, warmTokens int) error {
	if numBlocks <= 0 || blockSize <= 0 || blockSize > 1024 {
		return fmt.Errorf("shard: warmup with %d blocks of %d", numBlocks, blockSize)
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.cache != nil {
		x.cache.Free() // steps hold x.mu: none is using it
	}
	x.cache, x.filled = nil, nil
	x.turnMu.Lock()
	x.turn = 0
	x.turnMu.Unlock()
	x.cache = kvcache.NewStorage(x.m.Backend(), x.m.NumLayers(), numBlocks, blockSize, x.m.KVDim())
	x.filled = make([]int32, numBlocks)
	n := min(warmTokens, numBlocks*blockSize, x.m.Config().MaxContext())
	if n <= 0 || !x.m.Whole() {
		// A shard cannot step alone: its first step warms it.
		return nil
	}
	// The warm-up's KV is garbage to every sequence: filled stays 0.
	toks := make([]int32, n)
	blocks := make([]int32, (n+blockSize-1)/blockSize)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	_, err := x.m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: toks, Blocks: blocks}}, NoStats: true}, x.cache)
	return err
}

// NumBlocks is the KV pool size (0 before Warmup).
func (x *Executor) NumBlocks() int {
	x.mu.Lock()
	defer x.mu.Unlock()
	if x.cache == nil {
		return 0
	}
	return x.cache.NumBlocks()
}

// Link connects a sharded executor's step to the rest of its replica.
type Link interface {
	model.Comm // the tensor-parallel group (an expert-parallel stage's is a model.StageComm)
	// RecvHidden returns the previous stage's hidden states for this step.
	RecvHidden() ([]float32, error)
	// SendHidden hands this stage's output to the next stage.
	SendHidden(h []float32) error
}

// Step runs one batch. link connects a shard to the rest of its replica
// (nil for a whole model, which needs none); em is the expert placement
// the step uses (nil: the model's; see LoadExperts). Errors about the
// batch wrap model.ErrBadBatch. Steps with ids (b.ID > 0) run strictly in
// id order: a step waits for every lower id to have run or failed here (or
// for ctx to end), so the ranks of a tensor-parallel group never run
// different steps at once. The coordinator gives up on a sharded replica
// whose step failed (see pkg/server), so a missing id never stalls a live
// replica. A stage that is not the last returns no per-sequence results.
func (x *Executor) Step(ctx context.Context, b *steps.Batch, link Link, em model.ExpertMap) (*steps.Result, error) {
	defer x.doneTurn(b.ID) // failed or not, later steps may go
	m := x.m
	V := m.Config().VocabSize
	if !m.Whole() && link == nil {
		return nil, fmt.Errorf("%w: a sharded step needs a link to its peers", model.ErrBadBatch)
	}
	mb := &model.Batch{Seqs: make([]model.Seq, len(b.Seqs)), Experts: em}
	if link != nil {
		mb.Comm = link
	}
	for i, s := range b.Seqs {
		if s.Sample && (s.TopN < 1 || s.TopN > MaxTopN) {
			return nil, fmt.Errorf("%w: sequence %d asks for %d candidates (1..%d)", model.ErrBadBatch, s.ID, s.TopN, MaxTopN)
		}
		if s.PromptTargets != nil {
			if len(s.PromptTargets) != len(s.Tokens) {
				return nil, fmt.Errorf("%w: sequence %d has %d prompt targets for %d tokens", model.ErrBadBatch, s.ID, len(s.PromptTargets), len(s.Tokens))
			}
			for _, t := range s.PromptTargets {
				if t < -1 || int(t) >= V {
					return nil, fmt.Errorf("%w: sequence %d: prompt target %d outside the vocabulary of %d", model.ErrBadBatch, s.ID, t, V)
				}
			}
		}
		if s.Start < 0 {
			return nil, fmt.Errorf("%w: sequence %d starts at %d", model.ErrBadBatch, s.ID, s.Start)
		}
		mb.Seqs[i] = model.Seq{Tokens: s.Tokens, Pos: s.Start, Blocks: s.Blocks, AllLogits: s.PromptTargets != nil}
	}
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	if err := x.waitTurn(ctx, b.ID); err != nil {
		return nil, err
	}
	if !m.IsFirst() {
		h, err := link.RecvHidden()
		if err != nil {
			return nil, fmt.Errorf("hidden states from the previous stage: %w", err)
		}
		mb.Hidden = h
	}
	x.mu.Lock()
	if x.cache == nil {
		x.mu.Unlock()
		return nil, ErrNotReady
	}
	if err := x.copyBlocks(b.Copies); err != nil {
		x.mu.Unlock()
		return nil, err
	}
	for _, s := range b.Seqs {
		if err := x.checkFilled(s); err != nil {
			x.mu.Unlock()
			return nil, err
		}
	}
	t0 := time.Now()
	out, err := m.Forward(mb, x.cache)
	fwd := time.Since(t0)
	if err == nil {
		x.markFilled(b.Seqs)
	}
	x.mu.Unlock()
	if err != nil {
		return nil, err
	}
	res := &steps.Result{Forward: fwd}
	if !m.IsLast() {
		if err := link.SendHidden(out.Hidden); err != nil {
			return nil, fmt.Errorf("hidden states to the next stage: %w", err)
		}
		return res, nil
	}
	res.Seqs = make([]steps.SeqResult, len(b.Seqs))
	vb, ve := out.VocabBegin, out.VocabEnd
	part := vb != 0 || ve != V // a slice of the vocabulary
	W := ve - vb
	for i, s := range b.Seqs {
		rows := out.Logits[i]
		r := &res.Seqs[i]
		if part {
			r.VocabBegin, r.VocabEnd = vb, ve
		}
		if s.PromptTargets != nil {
			r.PromptLogprobs = make([]float32, len(s.PromptTargets))
			if part {
				r.PromptLSE = make([]float64, len(s.PromptTargets))
			}
			for j, t := range s.PromptTargets {
				row := rows[j*W : (j+1)*W]
				r.PromptLogprobs[j] = float32(math.NaN())
				switch {
				case part:
					r.PromptLSE[j] = sampling.LogSumExp(row)
					if int(t) >= vb && int(t) < ve {
						r.PromptLogprobs[j] = row[int(t)-vb]
					}
				case t >= 0:
					r.PromptLogprobs[j] = float32(float64(row[t]) - sampling.LogSumExp(row))
				}
			}
		}
		if !s.Sample {
			continue
		}
		last := rows[len(rows)-W:]
		if s.WantLogSumExp || part {
			r.LogSumExp = sampling.LogSumExp(last)
		}
		for _, c := range sampling.TopN(last, s.TopN, r.LogSumExp) {
			r.Candidates = append(r.Candidates, steps.Candidate{ID: c.ID + int32(vb), Logit: c.Logit})
		}
		if s.FullRow {
			r.Row = last
		}
	}
	return res, nil
}

// copyBlocks makes each copy's Dst block hold its Src block's KV, in
// order; x.mu is held.
func (x *Executor) copyBlocks(cs []steps.BlockCopy) error {
	if len(cs) == 0 {
		return nil
	}
	nb, bs := int32(x.cache.NumBlocks()), x.cache.BlockSize()
	for _, c := range cs {
		if c.Src < 0 || c.Src >= nb || c.Dst < 0 || c.Dst >= nb || c.Src == c.Dst {
			return fmt.Errorf("%w: block copy %d -> %d (the cache has %d blocks)", model.ErrBadBatch, c.Src, c.Dst, nb)
		}
	}
	b := x.m.Backend()
	src, dst := make([]int32, bs), make([]int32, bs)
	for _, c := range cs {
		for i := range bs {
			src[i], dst[i] = c.Src*int32(bs)+int32(i), c.Dst*int32(bs)+int32(i)
		}
		for l := range x.m.NumLayers() {
			k, v := x.cache.KV(l)
			for _, t := range []kernels.Tensor{k, v} {
				rows := b.Gather(t, src)
				b.WriteKV(t, rows, dst)
				b.Free(rows)
			}
		}
		x.filled[c.Dst] = x.filled[c.Src]
	}
	return nil
}

// checkFilled refuses a sequence whose blocks do not hold the KV of the
// positions before its start; x.mu is held.
func (x *Executor) checkFilled(s steps.Seq) error {
	bs := x.cache.BlockSize()
	for i := 0; i*bs < s.Start; i++ {
		if i >= len(s.Blocks) {
			return nil // the model refuses the batch with a clearer message
		}
		b := s.Blocks[i]
		if b < 0 || int(b) >= len(x.filled) {
			return nil // likewise
		}
		if need := min(bs, s.Start-i*bs); int(x.filled[b]) < need {
			return fmt.Errorf("%w: sequence %d starts at %d, but its block %d (table index %d) holds %d positions, not %d",
				ErrMissingKV, s.ID, s.Start, b, i, x.filled[b], need)
		}
	}
	return nil
}

// markFilled records the slots a step wrote: a block written up to slot
// j holds j+1 positions of its sequence (positions are written in order,
// and a block a sequence starts anew holds nothing of it beyond them).
func (x *Executor) markFilled(ss []steps.Seq) {
	bs := x.cache.BlockSize()
	for _, s := range ss {
		for p := s.Start; p < s.Start+len(s.Tokens); {
			i := p / bs
			end := min((i+1)*bs, s.Start+len(s.Tokens))
			x.filled[s.Blocks[i]] = int32(end - i*bs)
			p = end
		}
	}
}

// LoadExperts has an expert-parallel model read the experts em places on
// it (between steps); see model.LoadExperts.
func (x *Executor) LoadExperts(src model.WeightSource, em model.ExpertMap) (int, error) {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.m.LoadExperts(src, em)
}

// DropExperts makes em the model's placement and frees the experts
// neither it nor keep places on this rank (between steps); see
// model.DropExperts.
func (x *Executor) DropExperts(em model.ExpertMap, keep ...model.ExpertMap) int {
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.m.DropExperts(em, keep...)
}

// waitTurn blocks until the steps numbered before id have run here or ctx
// ends. Steps without an id do not wait.
func (x *Executor) waitTurn(ctx context.Context, id uint64) error {
	if id == 0 {
		return nil
	}
	x.turnMu.Lock()
	defer x.turnMu.Unlock()
	for x.turn+1 < id {
		moved := x.turnC
		x.turnMu.Unlock()
		select {
		case <-moved:
		case <-ctx.Done():
			x.turnMu.Lock()
			return fmt.Errorf("waiting for step %d to run first: %w", x.turn+1, ctx.Err())
		}
		x.turnMu.Lock()
	}
	return nil
}

func (x *Executor) doneTurn(id uint64) {
	if id == 0 {
		return
	}
	x.turnMu.Lock()
	x.turn = max(x.turn, id)
	close(x.turnC)
	x.turnC = make(chan struct{})
	x.turnMu.Unlock()
}
