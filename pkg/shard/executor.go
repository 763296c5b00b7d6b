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
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
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
}

// NewExecutor wraps a loaded model.
func NewExecutor(m *model.Model) *Executor { return &Executor{m: m, known: map[uint64]int{}} }

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
	x.cache = kvcache.NewStorage(x.m.Backend(), x.m.NumLayers(), numBlocks, blockSize, x.m.KVDim())
	n := min(warmTokens, numBlocks*blockSize, x.m.Config().MaxContext())
	if n <= 0 {
		return nil
	}
	toks := make([]int32, n)
	blocks := make([]int32, (n+blockSize-1)/blockSize)
	for i := range blocks {
		blocks[i] = int32(i)
	}
	_, err := x.m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: toks, Blocks: blocks}}}, x.cache)
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

// Step runs one batch. Errors about the batch wrap model.ErrBadBatch.
func (x *Executor) Step(ctx context.Context, b *routing.StepBatch) (*routing.StepResult, error) {
	V := x.m.Config().VocabSize
	mb := &model.Batch{Seqs: make([]model.Seq, len(b.Seqs))}
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
	out, err := x.m.Forward(mb, x.cache)
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
	res := &routing.StepResult{Seqs: make([]routing.SeqResult, len(b.Seqs)), Forward: fwd}
	for i, s := range b.Seqs {
		rows := out.Logits[i]
		r := &res.Seqs[i]
		if s.PromptTargets != nil {
			r.PromptLogprobs = make([]float32, len(s.PromptTargets))
			for j, t := range s.PromptTargets {
				r.PromptLogprobs[j] = float32(math.NaN())
				if t >= 0 {
					row := rows[j*V : (j+1)*V]
					r.PromptLogprobs[j] = float32(float64(row[t]) - sampling.LogSumExp(row))
				}
			}
		}
		if !s.Sample {
			continue
		}
		last := rows[len(rows)-V:]
		if s.WantLogSumExp {
			r.LogSumExp = sampling.LogSumExp(last)
		}
		for _, c := range sampling.TopN(last, s.TopN, r.LogSumExp) {
			r.Candidates = append(r.Candidates, routing.Candidate{ID: c.ID, Logit: c.Logit})
		}
		if s.FullRow {
			r.Row = last
		}
	}
	return res, nil
}
