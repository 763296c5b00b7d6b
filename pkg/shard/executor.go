package shard

import (
	"context"
	"errors"
	"fmt"
	"math"
	"sync"
	"time"

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
// positions this executor computed for it (its KV was lost, e.g. the pool
// was re-allocated by a Warmup, or it ran elsewhere): the coordinator must
// recompute it from position 0.
var ErrMissingKV = errors.New("shard: sequence's KV cache is not here")

// Executor runs steps of one model on one worker. Safe for concurrent use
// (steps are serialized).
type Executor struct {
	mu    sync.Mutex
	m     *model.Model
	cache *kvcache.Storage
	// known is, per sequence, how many positions of KV this executor has
	// computed since the pool was allocated (until Release).
	known map[uint64]int

	// turn is the highest step id run since Warmup; turnC is closed and
	// replaced whenever it moves.
	turnMu sync.Mutex
	turn   uint64
	turnC  chan struct{}
}

// NewExecutor wraps a loaded model (whole, or a shard of it).
func NewExecutor(m *model.Model) *Executor {
	return &Executor{m: m, known: map[uint64]int{}, turnC: make(chan struct{})}
}

// Release forgets sequences (they finished, or moved).
func (x *Executor) Release(ids []uint64) {
	x.mu.Lock()
	defer x.mu.Unlock()
	for _, id := range ids {
		delete(x.known, id)
	}
}

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
	x.cache = nil
	clear(x.known)
	x.turnMu.Lock()
	x.turn = 0
	x.turnMu.Unlock()
	x.cache = kvcache.NewStorage(x.m.Backend(), x.m.NumLayers(), numBlocks, blockSize, x.m.KVDim())
	n := min(warmTokens, numBlocks*blockSize, x.m.Config().MaxContext())
	if n <= 0 || !x.m.Whole() {
		// A shard cannot step alone: its first step warms it.
		return nil
	}
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
	for _, s := range b.Seqs {
		if s.Start > x.known[s.ID] {
			n := x.known[s.ID]
			x.mu.Unlock()
			return nil, fmt.Errorf("%w: sequence %d starts at %d, %d positions are cached", ErrMissingKV, s.ID, s.Start, n)
		}
	}
	t0 := time.Now()
	out, err := m.Forward(mb, x.cache)
	fwd := time.Since(t0)
	if err == nil {
		for _, s := range b.Seqs {
			x.known[s.ID] = s.Start + len(s.Tokens)
		}
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
