package model

import (
	"errors"
	"fmt"
	"math"
	"strings"
	"sync/atomic"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// Cache is the paged K/V storage a forward step reads and writes
// (kvcache.Storage implements it). Tensors are [NumBlocks·BlockSize,
// KVDim].
type Cache interface {
	BlockSize() int
	NumBlocks() int
	KV(layer int) (k, v kernels.Tensor)
}

// Model is a loaded Qwen2 or Qwen2-MoE model on one backend. Forward must not
// be called concurrently (a backend runs one op at a time).
type Model struct {
	cfg    *Config
	b      kernels.Backend
	embed  kernels.Tensor
	norm   kernels.Tensor
	lmHead kernels.Tensor // the embedding when tied
	layers []*layer       // the shard's layers, from sh.LayersBegin
	sh     Shard
	g      geometry
	rope   kernels.Rope
	bytes  atomic.Int64 // weight bytes (read while experts load)
	closer func() error
	// expertTokens counts, per layer of the shard and expert, the token
	// rows routed to it since the model was built.
	expertTokens [][]atomic.Int64
	experts      ExpertMap // with expert parallelism: the loaded placement
	src          WeightSource
}

type layer struct {
	inNorm, postNorm kernels.Tensor
	q, k, v, o       kernels.Tensor
	qb, kb, vb       kernels.Tensor
	mlp              *mlp // dense layers
	moe              *moe // MoE layers
}

type mlp struct{ gate, up, down kernels.Tensor }

type moe struct {
	router     kernels.Tensor // [E, H]
	experts    []*mlp         // nil where another rank holds the expert
	shared     *mlp           // nil when shared_expert_intermediate_size is 0
	sharedGate kernels.Tensor // [1, H]
}

// New builds a whole model from weights in src, checking every tensor's
// shape against cfg.
func New(cfg *Config, b kernels.Backend, src WeightSource) (*Model, error) {
	return NewShard(cfg, b, src, Shard{})
}

// NewShard builds the part sh of a model, reading from src only the bytes
// of its slices (when src can read slices; see SliceSource).
func NewShard(cfg *Config, b kernels.Backend, src WeightSource, sh Shard) (*Model, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	sh, err := sh.Normalize(cfg)
	if err != nil {
		return nil, err
	}
	g := sh.geometry(cfg)
	ld := &loader{src: src, b: b}
	m := &Model{cfg: cfg, b: b, sh: sh, g: g}
	shapes := shapeMap(cfg)
	// get loads a tensor whole (dim < 0) or the span sp of its rows (dim 0)
	// or columns (dim 1).
	get := func(name string, dim int, sp span) kernels.Tensor {
		if err != nil {
			return nil
		}
		var t kernels.Tensor
		// MoE routing weights stay exact: quantising them can flip an
		// expert choice (llama.cpp keeps them unquantised too).
		precise := strings.HasSuffix(name, "mlp.gate.weight") || strings.HasSuffix(name, "shared_expert_gate.weight")
		t, err = ld.load(name, shapes[name], dim, sp, precise)
		if t != nil {
			m.bytes.Add(tensorBytes(t))
		}
		return t
	}
	whole := func(name string) kernels.Tensor { return get(name, -1, span{}) }
	rows := func(name string, sp span) kernels.Tensor { return get(name, 0, sp) }
	cols := func(name string, sp span) kernels.Tensor { return get(name, 1, sp) }
	mlpOf := func(gate, up, down string, width int) mlp {
		sp := sh.rowsOf(width)
		return mlp{rows(gate, sp), rows(up, sp), cols(down, sp)}
	}
	if g.first {
		m.embed = rows(EmbedName, g.vocab)
	}
	for l := sh.LayersBegin; l < sh.LayersEnd; l++ {
		n := func(s string) string { return LayerName(l, s) }
		ly := &layer{
			inNorm:   whole(n("input_layernorm.weight")),
			q:        rows(n("self_attn.q_proj.weight"), g.q),
			qb:       rows(n("self_attn.q_proj.bias"), g.q),
			k:        rows(n("self_attn.k_proj.weight"), g.kv),
			kb:       rows(n("self_attn.k_proj.bias"), g.kv),
			v:        rows(n("self_attn.v_proj.weight"), g.kv),
			vb:       rows(n("self_attn.v_proj.bias"), g.kv),
			o:        cols(n("self_attn.o_proj.weight"), g.q),
			postNorm: whole(n("post_attention_layernorm.weight")),
		}
		if !cfg.IsMoELayer(l) {
			p := mlpOf(n("mlp.gate_proj.weight"), n("mlp.up_proj.weight"), n("mlp.down_proj.weight"), cfg.IntermediateSize)
			ly.mlp = &p
		} else {
			e := &moe{router: whole(n("mlp.gate.weight")), experts: make([]*mlp, cfg.NumExperts)}
			for x := range e.experts {
				if sh.EPSize > 1 {
					if err == nil && sh.Experts.Holds(l, x, sh.EPRank) {
						e.experts[x], err = m.loadExpert(ld, shapes, l, x)
					}
					continue
				}
				p := mlpOf(ExpertName(l, x, "gate_proj"), ExpertName(l, x, "up_proj"),
					ExpertName(l, x, "down_proj"), cfg.MoeIntermediateSize)
				e.experts[x] = &p
			}
			if Is := cfg.SharedExpertIntermediateSize; Is > 0 {
				p := mlpOf(n("mlp.shared_expert.gate_proj.weight"), n("mlp.shared_expert.up_proj.weight"),
					n("mlp.shared_expert.down_proj.weight"), Is)
				e.shared = &p
				e.sharedGate = whole(n("mlp.shared_expert_gate.weight"))
			}
			ly.moe = e
		}
		m.layers = append(m.layers, ly)
	}
	if g.last {
		m.norm = whole(NormName)
		switch {
		case !cfg.TieWordEmbeddings:
			m.lmHead = rows(LMHead, g.vocab)
		case g.first:
			m.lmHead = m.embed
		default: // a later stage of a tied model holds the embedding as its head
			m.lmHead = rows(EmbedName, g.vocab)
		}
	}
	if err != nil {
		return nil, err
	}
	m.rope.InvFreq, m.rope.Scale = cfg.Rope()
	if cfg.IsMoE() {
		m.expertTokens = make([][]atomic.Int64, len(m.layers))
		for i := range m.expertTokens {
			m.expertTokens[i] = make([]atomic.Int64, cfg.NumExperts)
		}
	}
	m.experts = sh.Experts
	return m, nil
}

// loadExpert reads routed expert x of layer l whole (an expert-parallel
// rank holds whole experts).
func (m *Model) loadExpert(ld *loader, shapes map[string][]int, l, x int) (*mlp, error) {
	var p mlp
	for _, w := range []struct {
		t    *kernels.Tensor
		name string
	}{{&p.gate, "gate_proj"}, {&p.up, "up_proj"}, {&p.down, "down_proj"}} {
		name := ExpertName(l, x, w.name)
		t, err := ld.load(name, shapes[name], -1, span{}, false)
		if err != nil {
			for _, u := range []kernels.Tensor{p.gate, p.up} {
				if u != nil {
					m.bytes.Add(-tensorBytes(u))
					m.b.Free(u)
				}
			}
			return nil, err
		}
		*w.t = t
		m.bytes.Add(tensorBytes(t))
	}
	return &p, nil
}

// shapeMap is Shapes(cfg) by tensor name.
func shapeMap(cfg *Config) map[string][]int {
	out := map[string][]int{}
	for _, s := range Shapes(cfg) {
		out[s.Name] = s.Shape
	}
	return out
}

func tensorBytes(t kernels.Tensor) int64 {
	return int64(kernels.NumElements(t.Shape()) * t.DType().Size())
}

// ExpertLoad returns, per layer of the shard (from Shard().LayersBegin)
// and expert, how many token rows this model routed to it so far. Only
// the stage's rank 0 counts (every rank routes the same rows); nil for a
// dense model.
func (m *Model) ExpertLoad() [][]int64 {
	if m.expertTokens == nil {
		return nil
	}
	out := make([][]int64, len(m.expertTokens))
	for l, row := range m.expertTokens {
		out[l] = make([]int64, len(row))
		for e := range row {
			out[l][e] = row[e].Load()
		}
	}
	return out
}

// LoadExperts reads, from src, the routed experts em places on this rank
// that it does not hold yet (only their bytes), so that steps may use em,
// and returns how many it read. Experts it no longer needs stay until
// DropExperts. Like Forward, it must not run concurrently with another
// call on m.
func (m *Model) LoadExperts(src WeightSource, em ExpertMap) (int, error) {
	if m.sh.EPSize <= 1 {
		return 0, fmt.Errorf("%w: not an expert-parallel shard", ErrBadShard)
	}
	n := 0
	ld := &loader{src: src, b: m.b}
	shapes := shapeMap(m.cfg)
	err := m.eachExpert(func(l, x int, slot **mlp) error {
		if *slot != nil || !em.Holds(l, x, m.sh.EPRank) {
			return nil
		}
		p, err := m.loadExpert(ld, shapes, l, x)
		if err == nil {
			*slot = p
			n++
		}
		return err
	})
	return n, err
}

// DropExperts makes em the shard's placement (nil: keeps the current one)
// and frees the routed experts that neither it nor any of keep
// (placements still to come) places on this rank. It returns how many it
// freed.
func (m *Model) DropExperts(em ExpertMap, keep ...ExpertMap) int {
	if m.sh.EPSize <= 1 {
		return 0
	}
	if em == nil {
		em = m.experts
	}
	n := 0
	held := func(l, x int) bool {
		for _, k := range append([]ExpertMap{em}, keep...) {
			if k.Holds(l, x, m.sh.EPRank) {
				return true
			}
		}
		return false
	}
	m.eachExpert(func(l, x int, slot **mlp) error {
		if p := *slot; p != nil && !held(l, x) {
			for _, t := range []kernels.Tensor{p.gate, p.up, p.down} {
				m.bytes.Add(-tensorBytes(t))
				m.b.Free(t)
			}
			*slot = nil
			n++
		}
		return nil
	})
	m.experts = em
	return n
}

// checkExperts says which expert em places on this rank that it does not
// hold (loaded by LoadExperts first), or nil.
func (m *Model) checkExperts(em ExpertMap) error {
	return m.eachExpert(func(l, x int, slot **mlp) error {
		if *slot == nil && em.Holds(l, x, m.sh.EPRank) {
			return fmt.Errorf("%w: the expert map places expert %d of layer %d on rank %d, which has not loaded it", ErrBadBatch, x, l, m.sh.EPRank)
		}
		return nil
	})
}

// eachExpert calls f with every routed expert slot of the shard's MoE
// layers (l is the model's layer index) until f fails.
func (m *Model) eachExpert(f func(l, x int, slot **mlp) error) error {
	for i, ly := range m.layers {
		if ly.moe == nil {
			continue
		}
		for x := range ly.moe.experts {
			if err := f(m.sh.LayersBegin+i, x, &ly.moe.experts[x]); err != nil {
				return err
			}
		}
	}
	return nil
}

// ExpertTokens returns, per expert, how many token rows this model routed
// to it so far, summed over its layers (nil for a dense model).
func (m *Model) ExpertTokens() []int64 {
	if m.expertTokens == nil {
		return nil
	}
	out := make([]int64, m.cfg.NumExperts)
	for _, row := range m.ExpertLoad() {
		for e, n := range row {
			out[e] += n
		}
	}
	return out
}

// Config is the model's configuration.
func (m *Model) Config() *Config { return m.cfg }

// Backend is the backend the model runs on.
func (m *Model) Backend() kernels.Backend { return m.b }

// WeightBytes is the size of the loaded weights in their stored dtypes.
func (m *Model) WeightBytes() int64 { return m.bytes.Load() }

// KVDim is the width of one layer's K (or V) row: the shard's KV heads ×
// head dim.
func (m *Model) KVDim() int { return m.g.kvHeads * m.cfg.headDim() }

// NumLayers is the number of decoder layers this shard holds (the layers
// of its KV cache).
func (m *Model) NumLayers() int { return len(m.layers) }

// Experts is the expert placement of an expert-parallel shard (the one a
// step without Batch.Experts uses), nil otherwise.
func (m *Model) Experts() ExpertMap { return m.experts }

// Shard is the part of the model this is.
func (m *Model) Shard() Shard { return m.sh }

// Vocab is the vocabulary slice [begin, end) whose logits this shard
// returns (the whole vocabulary without tensor parallelism).
func (m *Model) Vocab() (begin, end int) { return m.g.vocab.begin, m.g.vocab.end }

// IsFirst and IsLast say whether the shard is the first (embedding) and
// last (LM head) pipeline stage.
func (m *Model) IsFirst() bool { return m.g.first }

// IsLast: see IsFirst.
func (m *Model) IsLast() bool { return m.g.last }

// Close releases what the weights depend on (a file mapping).
func (m *Model) Close() error {
	if m.closer != nil {
		c := m.closer
		m.closer = nil
		return c()
	}
	return nil
}

// Seq is one sequence's part of a step.
type Seq struct {
	Tokens []int32 // new tokens, at positions Pos, Pos+1, ...
	Pos    int     // tokens of this sequence already in the cache
	// Blocks is the sequence's block table; it must cover Pos+len(Tokens)
	// positions.
	Blocks []int32
	// AllLogits asks for the logits of every new token (for prompt
	// logprobs); otherwise only the last token's are returned.
	AllLogits bool
}

// Batch is one forward step over several sequences.
type Batch struct {
	Seqs []Seq
	// Hidden is the input of a shard that is not the first pipeline stage:
	// the previous stage's Output.Hidden, [T, H] over the batch's new tokens.
	Hidden []float32
	// Comm connects a tensor-parallel shard to its group for this step; an
	// expert-parallel shard's is a StageComm.
	Comm Comm
	// Experts is the expert placement this step uses (nil: the shard's);
	// the rank must hold every expert it places on it (LoadExperts).
	Experts ExpertMap
	// NoStats leaves the model's counters (ExpertTokens) alone: a warm-up.
	NoStats bool
	// Trace, when not nil, is filled with intermediate values (tests and
	// debugging; it costs host copies). Only the whole model traces.
	Trace *Trace
}

// Trace records intermediate values of a step, in the layout of HF's
// output_hidden_states and router outputs.
type Trace struct {
	// Hidden[0] is the embedding output, Hidden[i] (1 ≤ i < L) the output of
	// layer i-1, Hidden[L] the final norm's output; each is [T, H] over the
	// batch's new tokens.
	Hidden [][]float32
	// RouterLogits[l] is [T, E] for MoE layers (nil for dense ones).
	RouterLogits [][]float32
	// Experts[l] holds, per token, the chosen experts in descending
	// probability ([T, k]); Weights[l] their routing weights as applied.
	Experts [][]int32
	Weights [][]float32
}

// Output is the result of a step.
type Output struct {
	// Logits[i] are sequence i's logits, rows × (VocabEnd-VocabBegin)
	// float32 values, with one row per new token when AllLogits was set,
	// else one row. Only the last pipeline stage returns logits; a
	// tensor-parallel one returns its vocabulary slice.
	Logits               [][]float32
	VocabBegin, VocabEnd int
	// Hidden is a non-last stage's output, [T, H] over the new tokens: the
	// next stage's Batch.Hidden.
	Hidden []float32
}

// ErrBadBatch is wrapped by Forward errors about its input.
var ErrBadBatch = errors.New("model: bad batch")

// Forward runs one step. It validates the batch first (token ids, positions
// against the context limit, block tables against the cache) and returns an
// error wrapping ErrBadBatch without computing anything when it is bad.
func (m *Model) Forward(batch *Batch, cache Cache) (*Output, error) {
	st, err := m.plan(batch, cache)
	if err != nil {
		return nil, err
	}
	b, cfg := m.b, m.cfg
	tr := batch.Trace
	if !m.Whole() {
		tr = nil
	}
	em := m.experts
	if m.sh.EPSize > 1 {
		if _, ok := batch.Comm.(StageComm); !ok {
			return nil, fmt.Errorf("%w: an expert-parallel shard needs a StageComm", ErrBadBatch)
		}
		if batch.Experts != nil {
			em = batch.Experts
			if err := m.checkExperts(em); err != nil {
				return nil, err
			}
		}
	} else if batch.Experts != nil {
		return nil, fmt.Errorf("%w: an expert map for a shard without expert parallelism", ErrBadBatch)
	}
	if m.sh.TPSize > 1 && batch.Comm == nil {
		return nil, fmt.Errorf("%w: a tensor-parallel shard needs a Comm", ErrBadBatch)
	}
	T, H := len(st.ids), cfg.HiddenSize
	var x kernels.Tensor
	if m.g.first {
		x, err = m.embedTokens(st.ids, batch.Comm)
		if err != nil {
			return nil, err
		}
	} else {
		if len(batch.Hidden) != T*H {
			return nil, fmt.Errorf("%w: %d hidden values for %d tokens of width %d", ErrBadBatch, len(batch.Hidden), T, H)
		}
		x = b.FromFloat32([]int{T, H}, batch.Hidden)
	}
	if tr != nil {
		tr.Hidden = append(tr.Hidden[:0], b.ToFloat32(x))
		tr.RouterLogits = make([][]float32, len(m.layers))
		tr.Experts = make([][]int32, len(m.layers))
		tr.Weights = make([][]float32, len(m.layers))
	}
	eps := float32(cfg.RMSNormEps)
	for l, ly := range m.layers {
		a := b.RMSNorm(x, ly.inNorm, eps)
		att := m.attention(l, ly, a, st, cache)
		b.Free(a)
		if att, err = m.reduce(att, batch.Comm); err != nil {
			b.Free(x)
			return nil, err
		}
		b.Add(x, att)
		b.Free(att)
		h := b.RMSNorm(x, ly.postNorm, eps)
		var f kernels.Tensor
		var touched []bool // rows of f with a part of the sum (nil: all)
		if ly.mlp != nil {
			f = m.mlpForward(ly.mlp, h)
		} else {
			rank, _ := m.sh.stage()
			f, touched = m.moeForward(l, ly.moe, h, tr, em, !batch.NoStats && rank == 0)
		}
		b.Free(h)
		if f, err = m.reduceStage(f, touched, batch.Comm); err != nil {
			b.Free(x)
			return nil, err
		}
		b.Add(x, f)
		b.Free(f)
		if tr != nil && l < len(m.layers)-1 {
			tr.Hidden = append(tr.Hidden, b.ToFloat32(x))
		}
	}
	if !m.g.last {
		out := &Output{Hidden: b.ToFloat32(x)}
		b.Free(x)
		return out, nil
	}
	if tr != nil {
		n := b.RMSNorm(x, m.norm, eps)
		tr.Hidden = append(tr.Hidden, b.ToFloat32(n))
		b.Free(n)
	}
	sel := b.Gather(x, st.outRows)
	b.Free(x)
	hn := b.RMSNorm(sel, m.norm, eps)
	b.Free(sel)
	lt := b.MatMul(hn, m.lmHead, nil)
	b.Free(hn)
	flat := b.ToFloat32(lt)
	b.Free(lt)
	V := m.g.vocab.end - m.g.vocab.begin
	out := &Output{Logits: make([][]float32, len(batch.Seqs)), VocabBegin: m.g.vocab.begin, VocabEnd: m.g.vocab.end}
	r := 0
	for i, n := range st.outCount {
		out.Logits[i] = flat[r*V : (r+n)*V : (r+n)*V]
		r += n
	}
	return out, nil
}

// Whole reports whether this is the whole model, not a shard of it (a
// shard steps only together with its peers).
func (m *Model) Whole() bool {
	_, n := m.sh.stage()
	return n == 1 && m.g.first && m.g.last
}

// embedTokens looks ids up in the (vocabulary slice of the) embedding;
// with tensor parallelism, rows of ids outside the slice are zero and the
// group's lookups are all-reduced (one rank contributes each row, so the
// sum is exact).
func (m *Model) embedTokens(ids []int32, c Comm) (kernels.Tensor, error) {
	if _, n := m.sh.stage(); n == 1 {
		return m.b.Embed(m.embed, ids), nil
	}
	local := make([]int32, len(ids))
	keep := make([]float32, len(ids))
	for i, id := range ids {
		if int(id) >= m.g.vocab.begin && int(id) < m.g.vocab.end {
			local[i], keep[i] = id-int32(m.g.vocab.begin), 1
		}
	}
	x := m.b.Embed(m.embed, local)
	m.b.ScaleRows(x, keep)
	return m.reduceStage(x, nil, c)
}

// reduce all-reduces a row-parallel partial sum across the tensor-parallel
// group (a no-op without one). x is consumed.
func (m *Model) reduce(x kernels.Tensor, c Comm) (kernels.Tensor, error) {
	if m.sh.TPSize == 1 {
		return x, nil
	}
	shape := x.Shape()
	f := m.b.ToFloat32(x)
	m.b.Free(x)
	if err := c.AllReduce(f); err != nil {
		return nil, fmt.Errorf("all-reduce: %w", err)
	}
	return m.b.FromFloat32(shape, f), nil
}

// reduceStage all-reduces a partial sum sliced over the whole stage: the
// tensor-parallel group, or an expert-parallel stage's ranks, where rows
// not marked in touched (nil: all) are zero on this rank. x is consumed.
func (m *Model) reduceStage(x kernels.Tensor, touched []bool, c Comm) (kernels.Tensor, error) {
	if m.sh.EPSize <= 1 {
		return m.reduce(x, c)
	}
	shape := x.Shape()
	f := m.b.ToFloat32(x)
	m.b.Free(x)
	if err := c.(StageComm).ReduceStage(f, shape[1], touched); err != nil {
		return nil, fmt.Errorf("expert-parallel all-reduce: %w", err)
	}
	return m.b.FromFloat32(shape, f), nil
}

// step is a validated batch flattened for the kernels.
type step struct {
	ids, pos, slots []int32
	// With DCA: kpos are the keys' RoPE positions (p mod c), qpos the
	// queries' three (intra, succ, inter) per token.
	kpos, qpos []int32
	attn       kernels.AttnBatch
	outRows    []int32 // rows of x whose logits are returned
	outCount   []int   // rows per sequence
}

func (m *Model) plan(batch *Batch, cache Cache) (*step, error) {
	cfg := m.cfg
	if len(batch.Seqs) == 0 {
		return nil, fmt.Errorf("%w: no sequences", ErrBadBatch)
	}
	bs, nb := cache.BlockSize(), cache.NumBlocks()
	maxCtx := cfg.MaxContext()
	st := &step{attn: kernels.AttnBatch{
		Heads: m.g.heads, KVHeads: m.g.kvHeads, HeadDim: cfg.headDim(),
		BlockSize: bs, Scale: float32(1 / math.Sqrt(float64(cfg.headDim()))),
	}}
	dca := cfg.DualChunkAttention
	if dca != nil {
		st.attn.DCAChunk, st.attn.DCAOrigLen = dca.ChunkLen(), dca.OriginalMaxPositionEmbeddings
	}
	for i, s := range batch.Seqs {
		if len(s.Tokens) == 0 {
			return nil, fmt.Errorf("%w: sequence %d has no tokens", ErrBadBatch, i)
		}
		if s.Pos < 0 {
			return nil, fmt.Errorf("%w: sequence %d: position %d < 0", ErrBadBatch, i, s.Pos)
		}
		end := s.Pos + len(s.Tokens)
		if end > maxCtx {
			return nil, fmt.Errorf("%w: sequence %d: %d tokens exceed the context of %d", ErrBadBatch, i, end, maxCtx)
		}
		if len(s.Blocks)*bs < end {
			return nil, fmt.Errorf("%w: sequence %d: %d blocks of %d cannot hold %d tokens", ErrBadBatch, i, len(s.Blocks), bs, end)
		}
		for _, blk := range s.Blocks[:(end+bs-1)/bs] {
			if blk < 0 || int(blk) >= nb {
				return nil, fmt.Errorf("%w: sequence %d: block %d outside the cache's %d", ErrBadBatch, i, blk, nb)
			}
		}
		row := len(st.ids)
		for j, id := range s.Tokens {
			if id < 0 || int(id) >= cfg.VocabSize {
				return nil, fmt.Errorf("%w: sequence %d: token id %d outside the vocabulary [0, %d)", ErrBadBatch, i, id, cfg.VocabSize)
			}
			p := s.Pos + j
			st.ids = append(st.ids, id)
			st.pos = append(st.pos, int32(p))
			if dca != nil {
				k, succ, inter := dca.Positions(p)
				st.kpos = append(st.kpos, int32(k))
				st.qpos = append(st.qpos, int32(k), int32(succ), int32(inter))
			}
			st.slots = append(st.slots, s.Blocks[p/bs]*int32(bs)+int32(p%bs))
		}
		st.attn.Seqs = append(st.attn.Seqs, kernels.AttnSeq{Row: row, N: len(s.Tokens), Start: s.Pos, Blocks: s.Blocks})
		if s.AllLogits {
			for j := range s.Tokens {
				st.outRows = append(st.outRows, int32(row+j))
			}
			st.outCount = append(st.outCount, len(s.Tokens))
		} else {
			st.outRows = append(st.outRows, int32(row+len(s.Tokens)-1))
			st.outCount = append(st.outCount, 1)
		}
	}
	return st, nil
}

func (m *Model) attention(l int, ly *layer, a kernels.Tensor, st *step, cache Cache) kernels.Tensor {
	b, hd := m.b, m.cfg.headDim()
	q := b.MatMul(a, ly.q, ly.qb)
	k := b.MatMul(a, ly.k, ly.kb)
	v := b.MatMul(a, ly.v, ly.vb)
	if st.attn.DCAChunk > 0 {
		// Dual Chunk Attention: keys at p mod c, queries rotated three
		// ways side by side (kernels.AttnBatch.DCAChunk).
		q3 := b.RoPEMulti(q, hd, st.qpos, &m.rope)
		b.Free(q)
		q = q3
		b.RoPE(k, hd, st.kpos, &m.rope)
	} else {
		b.RoPE(q, hd, st.pos, &m.rope)
		b.RoPE(k, hd, st.pos, &m.rope)
	}
	kc, vc := cache.KV(l)
	b.WriteKV(kc, k, st.slots)
	b.WriteKV(vc, v, st.slots)
	b.Free(k)
	b.Free(v)
	o := b.Attention(q, kc, vc, &st.attn)
	b.Free(q)
	out := b.MatMul(o, ly.o, nil)
	b.Free(o)
	return out
}

func (m *Model) mlpForward(p *mlp, x kernels.Tensor) kernels.Tensor {
	b := m.b
	g := b.MatMul(x, p.gate, nil)
	u := b.MatMul(x, p.up, nil)
	h := b.SwiGLU(g, u)
	b.Free(g)
	b.Free(u)
	out := b.MatMul(h, p.down, nil)
	b.Free(h)
	return out
}

// moeForward runs an MoE block on this rank: every routed expert without
// expert parallelism (sliced, like a dense MLP), else the experts em has
// this rank compute. It returns the (partial) output and, with expert
// parallelism, the rows it holds a part of. count adds the routing to the
// expert statistics on the stage's rank 0 (every rank routes the same).
func (m *Model) moeForward(l int, e *moe, x kernels.Tensor, tr *Trace, em ExpertMap, count bool) (kernels.Tensor, []bool) {
	b, cfg := m.b, m.cfg
	T, E, k := kernels.Rows(x), cfg.NumExperts, cfg.NumExpertsPerTok
	rl := b.MatMul(x, e.router, nil)
	logits := b.ToFloat32(rl)
	b.Free(rl)
	experts, weights := Route(logits, E, k, cfg.NormTopkProb)
	if tr != nil {
		tr.RouterLogits[l], tr.Experts[l], tr.Weights[l] = logits, experts, weights
	}
	gl := m.sh.LayersBegin + l // the model's layer index
	ep := m.sh.EPSize > 1
	var touched []bool
	if ep && e.shared == nil {
		touched = make([]bool, T)
	}
	rows := make([][]int32, E)
	scale := make([][]float32, E)
	routed := make([]int64, E)
	for t := 0; t < T; t++ {
		for j := 0; j < k; j++ {
			ex := experts[t*k+j]
			routed[ex]++
			if ep && em.Owner(gl, int(ex), t) != m.sh.EPRank {
				continue
			}
			rows[ex] = append(rows[ex], int32(t))
			scale[ex] = append(scale[ex], weights[t*k+j])
			if touched != nil {
				touched[t] = true
			}
		}
	}
	if count {
		for ex, n := range routed {
			if n > 0 {
				m.expertTokens[l][ex].Add(n)
			}
		}
	}
	out := b.Zeros(T, cfg.HiddenSize)
	for ex, p := range e.experts {
		if len(rows[ex]) == 0 {
			continue
		}
		xe := b.Gather(x, rows[ex])
		y := m.mlpForward(p, xe)
		b.Free(xe)
		b.ScatterAdd(out, y, rows[ex], scale[ex])
		b.Free(y)
	}
	if e.shared != nil {
		gt := b.MatMul(x, e.sharedGate, nil)
		g := b.ToFloat32(gt)
		b.Free(gt)
		for i, v := range g {
			g[i] = float32(1 / (1 + math.Exp(-float64(v))))
		}
		y := m.mlpForward(e.shared, x)
		b.ScaleRows(y, g)
		b.Add(out, y)
		b.Free(y)
	}
	return out, touched
}

// Route picks each token's experts from router logits [T, E]: a float32
// softmax over all E experts, the k most probable in descending order (ties
// to the lower index), their probabilities as weights, renormalised to sum
// to 1 only when norm is set. It returns [T, k] expert ids and weights.
func Route(logits []float32, E, k int, norm bool) (experts []int32, weights []float32) {
	T := len(logits) / E
	experts = make([]int32, 0, T*k)
	weights = make([]float32, 0, T*k)
	p := make([]float64, E)
	for t := 0; t < T; t++ {
		row := logits[t*E : (t+1)*E]
		mx := math.Inf(-1)
		for _, v := range row {
			mx = math.Max(mx, float64(v))
		}
		var sum float64
		for i, v := range row {
			p[i] = math.Exp(float64(v) - mx)
			sum += p[i]
		}
		var picked [64]bool
		used := picked[:0]
		if E > len(picked) {
			used = make([]bool, E)
		} else {
			used = picked[:E]
		}
		var ws float64
		start := len(weights)
		for j := 0; j < k; j++ {
			best := -1
			for i := 0; i < E; i++ {
				if !used[i] && (best < 0 || p[i] > p[best]) {
					best = i
				}
			}
			used[best] = true
			w := float32(p[best] / sum)
			experts = append(experts, int32(best))
			weights = append(weights, w)
			ws += float64(w)
		}
		if norm {
			for j := start; j < len(weights); j++ {
				weights[j] = float32(float64(weights[j]) / ws)
			}
		}
	}
	return experts, weights
}
