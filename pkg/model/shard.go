package model

import (
	"errors"
	"fmt"
	"sync"
)

// Shard names the part of a model one worker holds (qwen2.md section 5):
// a contiguous range of decoder layers (a pipeline stage) and, within it,
// one rank of a tensor-parallel group.
//
//   - q/k/v, gate/up (and their biases) are column-parallel: rank r of t
//     owns query heads [r·nh/t, (r+1)·nh/t), the matching KV heads (one
//     replicated head ⌊r·kv/t⌋ when t > kv) and rows [r·I/t, (r+1)·I/t).
//   - o and down are row-parallel: each rank's product is a partial sum,
//     added across the group by Comm.AllReduce (twice per layer).
//   - The embedding and the LM head are vocabulary-parallel: rank r owns
//     vocabulary rows [r·⌈V/t⌉, min(V, (r+1)·⌈V/t⌉)); a lookup writes zeros
//     for ids it does not own and is all-reduced; the LM head yields logits
//     for the rank's slice only (Output.VocabBegin), merged by the caller.
//
// The first stage holds the embedding, the last the final norm and the LM
// head (the embedding again when tied). The zero Shard is the whole model.
type Shard struct {
	LayersBegin, LayersEnd int // [begin, end) of decoder layers; 0, 0: all
	TPRank, TPSize         int // TPSize 0 or 1: no tensor parallelism
}

// Comm is what a tensor-parallel shard needs from the other ranks of its
// group. One Comm serves one step; the model calls it in the same order on
// every rank.
type Comm interface {
	// AllReduce replaces x by the element-wise sum of every rank's x, added
	// in rank order, so that every rank holds the same bits.
	AllReduce(x []float32) error
}

// ErrBadShard is wrapped by errors about a Shard that does not fit a config.
var ErrBadShard = errors.New("model: bad shard")

// Normalize fills the zero fields of s for cfg and checks that cfg can be
// split that way.
func (s Shard) Normalize(cfg *Config) (Shard, error) {
	L := cfg.NumHiddenLayers
	if s.LayersBegin == 0 && s.LayersEnd == 0 {
		s.LayersEnd = L
	}
	if s.TPSize == 0 {
		s.TPSize = 1
	}
	if s.LayersBegin < 0 || s.LayersEnd > L || s.LayersBegin >= s.LayersEnd {
		return s, fmt.Errorf("%w: layers [%d, %d) outside the model's %d", ErrBadShard, s.LayersBegin, s.LayersEnd, L)
	}
	t := s.TPSize
	if s.TPRank < 0 || s.TPRank >= t {
		return s, fmt.Errorf("%w: tp rank %d outside [0, %d)", ErrBadShard, s.TPRank, t)
	}
	if t == 1 {
		return s, nil
	}
	if err := CheckTP(cfg, t); err != nil {
		return s, fmt.Errorf("%w: %v", ErrBadShard, err)
	}
	return s, nil
}

// CheckTP says why cfg cannot be split over t tensor-parallel ranks, or nil
// (qwen2.md 5.1-5.2: t divides the query heads, t and the KV heads divide
// one another, t divides the MLP widths).
func CheckTP(cfg *Config, t int) error {
	nh, kv := cfg.NumAttentionHeads, cfg.NumKeyValueHeads
	switch {
	case t < 1:
		return fmt.Errorf("tp=%d is not positive", t)
	case nh%t != 0:
		return fmt.Errorf("tp=%d does not divide the %d query heads", t, nh)
	case kv%t != 0 && t%kv != 0:
		return fmt.Errorf("tp=%d and the %d KV heads do not divide one another", t, kv)
	case (cfg.VocabSize+t-1)/t*(t-1) >= cfg.VocabSize:
		return fmt.Errorf("tp=%d leaves a rank no rows of the %d-token vocabulary", t, cfg.VocabSize)
	}
	for l := 0; l < cfg.NumHiddenLayers; l++ {
		if !cfg.IsMoELayer(l) && cfg.IntermediateSize%t != 0 {
			return fmt.Errorf("tp=%d does not divide intermediate_size %d", t, cfg.IntermediateSize)
		}
	}
	if cfg.IsMoE() {
		if cfg.MoeIntermediateSize%t != 0 {
			return fmt.Errorf("tp=%d does not divide moe_intermediate_size %d", t, cfg.MoeIntermediateSize)
		}
		if cfg.SharedExpertIntermediateSize%t != 0 {
			return fmt.Errorf("tp=%d does not divide shared_expert_intermediate_size %d", t, cfg.SharedExpertIntermediateSize)
		}
	}
	return nil
}

// VocabSlice is the vocabulary rows [begin, end) rank r of t owns.
func VocabSlice(vocab, r, t int) (begin, end int) {
	n := (vocab + t - 1) / t
	return min(r*n, vocab), min((r+1)*n, vocab)
}

// span is a half-open index range of a tensor dimension.
type span struct{ begin, end int }

// geometry is what a shard owns, in rows/columns of the checkpoint tensors.
type geometry struct {
	heads, kvHeads int  // local query and KV heads
	q, kv          span // rows of q_proj and of k/v_proj (and columns of o_proj for q)
	vocab          span
	first, last    bool
}

func (s Shard) geometry(cfg *Config) geometry {
	t, r, hd := s.TPSize, s.TPRank, cfg.headDim()
	nh, kv := cfg.NumAttentionHeads, cfg.NumKeyValueHeads
	g := geometry{heads: nh / t, kvHeads: max(kv/t, 1),
		first: s.LayersBegin == 0, last: s.LayersEnd == cfg.NumHiddenLayers}
	g.q = span{r * g.heads * hd, (r + 1) * g.heads * hd}
	kb := r * kv / t
	g.kv = span{kb * hd, (kb + g.kvHeads) * hd}
	g.vocab.begin, g.vocab.end = VocabSlice(cfg.VocabSize, r, t)
	return g
}

// rowsOf is rows [r·n/t, (r+1)·n/t) of an n-row dimension.
func (s Shard) rowsOf(n int) span {
	return span{s.TPRank * n / s.TPSize, (s.TPRank + 1) * n / s.TPSize}
}

// LocalComms returns n Comms of one in-process group (rank i uses the i-th),
// for tests and single-process tensor parallelism. They are reusable across
// steps: every rank must call AllReduce the same number of times.
func LocalComms(n int) []Comm {
	g := &localGroup{n: n, parts: make([][]float32, n)}
	g.cond = sync.NewCond(&g.mu)
	out := make([]Comm, n)
	for i := range out {
		out[i] = &localComm{g: g, rank: i}
	}
	return out
}

type localGroup struct {
	mu     sync.Mutex
	cond   *sync.Cond
	n      int
	parts  [][]float32
	in     int // ranks that deposited this round
	out    int // ranks that read this round
	round  int
	reader bool // the round is being read
	bad    error
}

type localComm struct {
	g    *localGroup
	rank int
}

func (c *localComm) AllReduce(x []float32) error {
	g := c.g
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.reader { // the previous round is still being read
		g.cond.Wait()
	}
	g.parts[c.rank] = append([]float32(nil), x...)
	g.in++
	round := g.round
	if g.in == g.n {
		g.bad = nil
		for i := 1; i < g.n; i++ {
			if len(g.parts[i]) != len(g.parts[0]) {
				g.bad = fmt.Errorf("model: all-reduce of %d and %d values", len(g.parts[0]), len(g.parts[i]))
			}
		}
		g.reader = true
		g.cond.Broadcast()
	}
	for !g.reader || g.round != round {
		g.cond.Wait()
	}
	err := g.bad
	if err == nil {
		clear(x)
		for _, p := range g.parts {
			for i, v := range p {
				x[i] += v
			}
		}
	}
	g.out++
	if g.out == g.n {
		clear(g.parts)
		g.in, g.out, g.reader = 0, 0, false
		g.round++
		g.cond.Broadcast()
	}
	return err
}
