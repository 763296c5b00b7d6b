package placement

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// maxTP bounds the degrees ValidTP reports.
const maxTP = 64

// kvBytesPerElem: the KV cache is bf16 whatever the weights are, unless
// Options.KVBytesPerValue says otherwise.
const kvBytesPerElem = 2

// actBytesPerElem: activations are float32 (model's arithmetic).
const actBytesPerElem = 4

// ValidTP lists the tensor-parallel degrees t ≤ 64 the model can be split
// into (qwen2.md section 5.2), ascending. See checkTP for the rule.
func ValidTP(cfg *model.Config) []int {
	var out []int
	for t := 1; t <= maxTP; t++ {
		if checkTP(cfg, t) == nil {
			out = append(out, t)
		}
	}
	return out
}

// checkTP says why t is not a valid degree (nil when it is): the model's
// own rule (model.CheckTP: t divides the query heads and every MLP width a
// rank splits, t and the KV heads divide one another, every rank gets
// vocabulary rows), stated plainly where t is simply too large, plus
// vLLM's t ≤ num_experts for MoE.
func checkTP(cfg *model.Config, t int) error {
	switch {
	case t < 1:
		return invalidf("tp=%d: must be >= 1", t)
	case t > cfg.NumAttentionHeads:
		return invalidf("tp=%d exceeds the %d query heads", t, cfg.NumAttentionHeads)
	case cfg.IsMoE() && t > cfg.NumExperts:
		return invalidf("tp=%d exceeds the %d experts", t, cfg.NumExperts)
	}
	if err := model.CheckTP(cfg, t); err != nil {
		return invalidf("%s", err)
	}
	return nil
}

// kvHeadsPerRank is kv/t, or 1 when t > kv (each rank holds one replicated
// KV head).
func kvHeadsPerRank(cfg *model.Config, t int) int { return max(cfg.NumKeyValueHeads/t, 1) }

// shape is how one pipeline stage is split: attention over groups of t
// ranks and, with expert parallelism (ep > 1, qwen2_moe only), everything
// else over the stage's ep ranks. ep = 1: no expert parallelism, the stage
// is one TP group of t ranks.
type shape struct{ t, ep int }

// w is the stage's width: its number of ranks.
func (sh shape) w() int {
	if sh.ep > 1 {
		return sh.ep
	}
	return sh.t
}

func (sh shape) name() string {
	if sh.ep > 1 {
		return fmt.Sprintf("ep=%d tp=%d", sh.ep, sh.t)
	}
	return fmt.Sprintf("tp=%d", sh.t)
}

// checkEP says why a stage of ep ranks with attention tp=t cannot be
// planned (nil when it can): the model's rule (model.CheckEP: ep a
// multiple of t, t valid for the attention heads, ep at most the experts
// and splitting the vocabulary, the shared expert and any dense MLP), and
// the routed-expert slots per rank (⌈E/ep⌉ + redundant) must not exceed
// the experts. ep = 1 (no expert parallelism) is always valid.
func checkEP(cfg *model.Config, ep, t, redundant int) error {
	switch {
	case ep < 1:
		return invalidf("ep=%d: must be >= 1", ep)
	case ep == 1:
		return nil
	case !cfg.IsMoE():
		return invalidf("ep=%d: expert parallelism needs a MoE model (qwen2_moe with experts), and this %s model has none", ep, cfg.ModelType)
	}
	if err := model.CheckEP(cfg, ep, t); err != nil {
		return invalidf("%v", err)
	}
	if slots := expertSlots(cfg, ep, redundant); slots > cfg.NumExperts {
		return invalidf("ep=%d with %d redundant experts gives %d expert slots per rank, more than the %d experts",
			ep, redundant, slots, cfg.NumExperts)
	}
	return nil
}

// expertSlots is the routed experts one rank of an ep-rank stage holds per
// MoE layer: ⌈E/ep⌉ (the largest rank's share) plus the redundant slots.
func expertSlots(cfg *model.Config, ep, redundant int) int {
	return (cfg.NumExperts+ep-1)/ep + redundant
}

// attentionTP is the tensor-parallel degree the planner gives the
// attention of an ep-rank stage when only ep is chosen: the largest t
// dividing ep that passes checkTP (1 always does).
func attentionTP(cfg *model.Config, ep int) int {
	for t := ep; t > 1; t-- {
		if ep%t == 0 && model.CheckEP(cfg, ep, t) == nil {
			return t
		}
	}
	return 1
}

// sizer holds the per-rank arithmetic of one (model, shape) pair. All
// byte counts are per rank; the largest rank is counted where slices
// differ (the vocabulary's first slice, the ranks with ⌈E/ep⌉ experts).
type sizer struct {
	cfg  *model.Config
	opts Options
	t    int // attention TP degree
	ep   int // expert-parallel ranks (1: none)
	w    int // ranks of the stage: ep when ep > 1, else t

	layer      []int64 // weight bytes of each layer
	embed      int64   // embedding slice
	head       int64   // final norm + LM head slice (a tied model's copy of the embedding included)
	headShared int64   // final norm only: a tied model whose embedding sits on the same stage
	kvToken    int64   // KV bytes of one token in one layer
	actBase    int64   // activation bytes per batch token, without the FFN term
}

// newSizer is the arithmetic of plain tensor parallelism over t ranks.
func newSizer(cfg *model.Config, opts Options, t int) *sizer {
	return newShapeSizer(cfg, opts, shape{t: t, ep: 1})
}

func newShapeSizer(cfg *model.Config, opts Options, sh shape) *sizer {
	H, hd := int64(cfg.HiddenSize), int64(cfg.HeadDimension())
	t, w := sh.t, sh.w()
	nhL, kvL := int64(cfg.NumAttentionHeads/t), int64(kvHeadsPerRank(cfg, t))
	bpp := int64(opts.WeightBytesPerParam)
	s := &sizer{cfg: cfg, opts: opts, t: t, ep: max(sh.ep, 1), w: w}
	vocabRows := int64((cfg.VocabSize + w - 1) / w)
	s.embed = vocabRows * H * bpp
	s.headShared = H * bpp
	s.head = s.headShared + vocabRows*H*bpp
	s.layer = make([]int64, cfg.NumHiddenLayers)
	for l := range s.layer {
		s.layer[l] = layerParams(cfg, l, t, s.ep, opts.RedundantExperts) * bpp
	}
	s.kvToken = 2 * kvL * hd * int64(opts.KVBytesPerValue)
	s.actBase = 4*H + (nhL+2*kvL)*hd
	return s
}

// layerParams is the parameters rank-local in layer l of a stage with
// attention tp=t and ep expert-parallel ranks (1: none): q/k/v
// column-split over t with their biases, o row-split, k/v at one head when
// replicated; norms, router and shared-expert gate replicated. Without
// expert parallelism the MLP (or every expert and the shared expert) is
// split by t; with it a MoE layer holds ⌈E/ep⌉ + redundant whole experts
// and 1/ep of the shared expert, a dense layer 1/ep of its MLP.
func layerParams(cfg *model.Config, l, t, ep, redundant int) int64 {
	H, hd := int64(cfg.HiddenSize), int64(cfg.HeadDimension())
	q := int64(cfg.NumAttentionHeads/t) * hd
	kv := int64(kvHeadsPerRank(cfg, t)) * hd
	n := 2*H + // input and post-attention norms
		q*H + q + 2*(kv*H+kv) + H*q // q, k, v with biases; o
	mlp := t // the ranks the MLP widths are split over
	if ep > 1 {
		mlp = ep
	}
	if !cfg.IsMoELayer(l) {
		return n + 3*H*int64(cfg.IntermediateSize/mlp)
	}
	n += int64(cfg.NumExperts)*H + routedParams(cfg, t, ep, redundant) // router, experts
	if is := cfg.SharedExpertIntermediateSize; is > 0 {
		n += 3*H*int64(is/mlp) + H // shared expert and its gate
	}
	return n
}

// routedParams is the routed-expert parameters one rank holds in a MoE
// layer: ⌈E/ep⌉ + redundant whole experts with expert parallelism, else
// every expert sliced t ways.
func routedParams(cfg *model.Config, t, ep, redundant int) int64 {
	H, Im := int64(cfg.HiddenSize), int64(cfg.MoeIntermediateSize)
	if ep > 1 {
		return int64(expertSlots(cfg, ep, redundant)) * 3 * H * Im
	}
	return int64(cfg.NumExperts) * 3 * H * (Im / int64(t))
}

// ffnWidth is the widest MLP intermediate a token of layer l produces
// before the split: I for a dense layer, top-k expert widths plus the
// shared expert for MoE.
func ffnWidth(cfg *model.Config, l int) int64 {
	if !cfg.IsMoELayer(l) {
		return int64(cfg.IntermediateSize)
	}
	return int64(cfg.NumExpertsPerTok*cfg.MoeIntermediateSize + cfg.SharedExpertIntermediateSize)
}

// stageMem is one stage's per-rank memory.
type stageMem struct {
	begin, end        int
	embed, head       bool
	weights, kv, acts int64
}

func (m stageMem) total() int64 { return m.weights + m.kv + m.acts }

// stage computes the memory of layers [b, e) with the embedding and/or the
// head. A tied model whose embedding is on the same stage shares it as
// the LM head; otherwise the head stage holds its own matrix.
func (s *sizer) stage(b, e int, embed, head bool) stageMem {
	m := stageMem{begin: b, end: e, embed: embed, head: head}
	var width int64
	for l := b; l < e; l++ {
		m.weights += s.layer[l]
		width = max(width, ffnWidth(s.cfg, l))
	}
	if embed {
		m.weights += s.embed
	}
	if head {
		if s.cfg.TieWordEmbeddings && embed {
			m.weights += s.headShared
		} else {
			m.weights += s.head
		}
	}
	m.kv = int64(s.opts.KVCacheTokens) * int64(e-b) * s.kvToken
	m.acts = int64(s.opts.MaxBatchTokens) * (s.actBase + 2*width/int64(s.w)) * actBytesPerElem
	if head {
		m.acts += int64(s.opts.MaxBatchSeqs) * int64(s.cfg.VocabSize) * actBytesPerElem
	}
	return m
}

// balance splits the layers into pp contiguous stages, each at least one
// layer, minimising the largest stage's weight bytes (layers, plus the
// embedding on the first stage and final norm + LM head on the last). Of
// the partitions reaching that minimum it returns the one giving earlier
// stages the most layers (greedy fill at the optimal bound). It returns
// the pp+1 stage boundaries.
func (s *sizer) balance(pp int) []int {
	L := len(s.layer)
	if pp < 1 || pp > L {
		panic(fmt.Sprintf("placement: balance %d layers over %d stages", L, pp))
	}
	extra := func(st int) int64 {
		var x int64
		if st == 0 {
			x += s.embed
		}
		if st == pp-1 {
			if pp == 1 && s.cfg.TieWordEmbeddings {
				x += s.headShared
			} else {
				x += s.head
			}
		}
		return x
	}
	// fill returns the greedy boundaries under bound c, or nil.
	fill := func(c int64) []int {
		bounds := []int{0}
		b := 0
		for st := 0; st < pp; st++ {
			sum := extra(st)
			e := b
			if st == pp-1 {
				for ; e < L; e++ {
					sum += s.layer[e]
				}
			} else {
				for e < L-(pp-1-st) && sum+s.layer[e] <= c {
					sum += s.layer[e]
					e++
				}
			}
			if e == b || sum > c {
				return nil
			}
			bounds = append(bounds, e)
			b = e
		}
		return bounds
	}
	var lo, hi int64 = 0, extra(0) + extra(pp-1)
	for _, w := range s.layer {
		hi += w
	}
	for lo < hi { // smallest feasible bound; fill(hi) always succeeds
		mid := lo + (hi-lo)/2
		if fill(mid) != nil {
			hi = mid
		} else {
			lo = mid + 1
		}
	}
	return fill(lo)
}

// layout evaluates tp=t × pp: the balanced stages and the peak per-rank
// memory.
type layout struct {
	t, ep  int // attention TP degree; expert-parallel ranks (1: none)
	pp     int
	stages []stageMem
	peak   int64 // largest stage total
	peakAt int   // its stage index
}

func (l *layout) shape() shape { return shape{l.t, l.ep} }

// w is the ranks of one stage.
func (l *layout) w() int { return l.shape().w() }

// g is the workers of one replica.
func (l *layout) g() int { return l.w() * l.pp }

func (s *sizer) layout(pp int) *layout {
	bounds := s.balance(pp)
	lo := &layout{t: s.t, ep: s.ep, pp: pp}
	for st := 0; st < pp; st++ {
		m := s.stage(bounds[st], bounds[st+1], st == 0, st == pp-1)
		lo.stages = append(lo.stages, m)
		if m.total() > lo.peak {
			lo.peak, lo.peakAt = m.total(), st
		}
	}
	return lo
}

func (l *layout) name() string {
	if l.pp == 1 {
		return l.shape().name()
	}
	return fmt.Sprintf("%s x pp=%d", l.shape().name(), l.pp)
}
