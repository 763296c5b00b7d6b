package model

import (
	"errors"
	"fmt"
	"slices"
	"sync"
)

// Shard names the part of a model one worker holds (qwen2.md section 5):
// a contiguous range of decoder layers (a pipeline stage) and, within it,
// one rank of the stage's group.
//
// Without expert parallelism the group is one tensor-parallel group:
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
//   - A Qwen2-MoE's routed experts are sliced like dense MLPs.
//
// With expert parallelism (EPSize > 1, qwen2_moe only) the stage has
// EPSize ranks. Attention is sliced as above over groups of TPSize
// consecutive ranks (TPSize divides EPSize; with TPSize 1 every rank runs
// the whole attention), so after it every rank holds every token's hidden
// state. Everything else is split over all EPSize ranks: each rank holds
// whole routed experts (Experts says which, contiguous blocks by default),
// the shared expert, dense MLPs and the vocabulary are sliced EPSize ways,
// and their partial sums are added over the stage by StageComm.ReduceStage
// (pkg/expertparallel: a reduce-scatter to each row's home rank, then an
// all-gather, as two all-to-alls).
//
// The first stage holds the embedding, the last the final norm and the LM
// head (the embedding again when tied). The zero Shard is the whole model.
type Shard struct {
	LayersBegin, LayersEnd int // [begin, end) of decoder layers; 0, 0: all
	TPRank, TPSize         int // TPSize 0 or 1: no tensor parallelism
	// EPRank is the rank in the stage's expert-parallel group of EPSize (0
	// or 1: none); TPRank must be EPRank % TPSize.
	EPRank, EPSize int
	// Experts is which rank holds and computes each routed expert (nil:
	// contiguous blocks, rank r of G holding experts [r·E/G, (r+1)·E/G)).
	Experts ExpertMap
}

// ExpertMap places the routed experts of an expert-parallel stage on its
// ranks (pkg/expertparallel's Table is one). Layers are the model's.
type ExpertMap interface {
	// Holds says whether rank holds expert's weights in layer.
	Holds(layer, expert, rank int) bool
	// Owner is the rank that computes token row's use of expert in layer;
	// it holds the expert.
	Owner(layer, expert, row int) int
}

// Comm is what a tensor-parallel shard needs from the other ranks of its
// group. One Comm serves one step; the model calls it in the same order on
// every rank.
type Comm interface {
	// AllReduce replaces x by the element-wise sum of every rank's x, added
	// in rank order, so that every rank holds the same bits. With expert
	// parallelism the sum is over the rank's attention (TP) group.
	AllReduce(x []float32) error
}

// StageComm is the Comm of an expert-parallel shard: it also adds partial
// sums over every rank of the stage (pkg/expertparallel's Stage is one).
type StageComm interface {
	Comm
	// ReduceStage replaces x, [T, width] partial sums held by every rank
	// of the stage, by their sum, the same bits on every rank. Rows not
	// marked in touched (nil: all) are zero on this rank and need not
	// travel from it.
	ReduceStage(x []float32, width int, touched []bool) error
}

// Exchanger is an in-process transport of LocalExchangers: an all-reduce
// over the rank's attention group and an all-to-all over the stage.
type Exchanger interface {
	Comm
	// AllToAll sends send[j] to stage rank j and returns recv, recv[j]
	// being what rank j sent to this one (recv[own] is send[own]).
	AllToAll(send [][]float32) ([][]float32, error)
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
	if s.EPSize == 0 {
		s.EPSize = 1
	}
	if s.LayersBegin < 0 || s.LayersEnd > L || s.LayersBegin >= s.LayersEnd {
		return s, fmt.Errorf("%w: layers [%d, %d) outside the model's %d", ErrBadShard, s.LayersBegin, s.LayersEnd, L)
	}
	t, ep := s.TPSize, s.EPSize
	if s.TPRank < 0 || s.TPRank >= t {
		return s, fmt.Errorf("%w: tp rank %d outside [0, %d)", ErrBadShard, s.TPRank, t)
	}
	if ep > 1 {
		if s.EPRank < 0 || s.EPRank >= ep {
			return s, fmt.Errorf("%w: ep rank %d outside [0, %d)", ErrBadShard, s.EPRank, ep)
		}
		if err := CheckEP(cfg, ep, t); err != nil {
			return s, fmt.Errorf("%w: %v", ErrBadShard, err)
		}
		if s.TPRank != s.EPRank%t {
			return s, fmt.Errorf("%w: ep rank %d has tp rank %d, not %d", ErrBadShard, s.EPRank, s.TPRank, s.EPRank%t)
		}
		if s.Experts == nil {
			s.Experts = Contiguous{Experts: cfg.NumExperts, Ranks: ep}
		}
		return s, nil
	}
	if s.EPRank != 0 || s.Experts != nil {
		return s, fmt.Errorf("%w: an expert rank or map without expert parallelism", ErrBadShard)
	}
	if t == 1 {
		return s, nil
	}
	if err := CheckTP(cfg, t); err != nil {
		return s, fmt.Errorf("%w: %v", ErrBadShard, err)
	}
	return s, nil
}

// stage is the shard's rank and size in its stage's group.
func (s Shard) stage() (rank, size int) {
	if s.EPSize > 1 {
		return s.EPRank, s.EPSize
	}
	return s.TPRank, s.TPSize
}

// Contiguous is the default ExpertMap: rank r of Ranks holds experts
// [r·E/Ranks, (r+1)·E/Ranks) of every layer. It is the one formula of this
// layout: pkg/expertparallel's Contiguous writes it out as a Table.
type Contiguous struct{ Experts, Ranks int }

// Holds implements ExpertMap.
func (c Contiguous) Holds(layer, expert, rank int) bool { return c.Owner(layer, expert, 0) == rank }

// Owner implements ExpertMap.
func (c Contiguous) Owner(layer, expert, row int) int {
	// the r with r·E/G ≤ expert < (r+1)·E/G
	return ((expert+1)*c.Ranks - 1) / c.Experts
}

// CheckTP says why cfg cannot be split over t tensor-parallel ranks, or nil
// (qwen2.md 5.1-5.2: t divides the query heads, t and the KV heads divide
// one another, t divides the MLP widths).
func CheckTP(cfg *Config, t int) error {
	if err := checkAttention(cfg, t); err != nil {
		return err
	}
	return checkStage(cfg, t, "tp", true)
}

// CheckEP says why cfg cannot be split over an expert-parallel stage of ep
// ranks whose attention is split over groups of tp, or nil.
func CheckEP(cfg *Config, ep, tp int) error {
	switch {
	case !cfg.IsMoE():
		return fmt.Errorf("ep=%d: a %s model has no experts", ep, cfg.ModelType)
	case ep < 1:
		return fmt.Errorf("ep=%d is not positive", ep)
	case ep > cfg.NumExperts:
		return fmt.Errorf("ep=%d exceeds the %d experts", ep, cfg.NumExperts)
	case tp < 1 || ep%tp != 0:
		return fmt.Errorf("ep=%d is not a multiple of tp=%d", ep, tp)
	}
	if err := checkAttention(cfg, tp); err != nil {
		return err
	}
	return checkStage(cfg, ep, "ep", false)
}

func checkAttention(cfg *Config, t int) error {
	nh, kv := cfg.NumAttentionHeads, cfg.NumKeyValueHeads
	switch {
	case t < 1:
		return fmt.Errorf("tp=%d is not positive", t)
	case nh%t != 0:
		return fmt.Errorf("tp=%d does not divide the %d query heads", t, nh)
	case kv%t != 0 && t%kv != 0:
		return fmt.Errorf("tp=%d and the %d KV heads do not divide one another", t, kv)
	}
	return nil
}

// checkStage checks the widths sliced over all n ranks of a stage: the
// vocabulary, dense MLPs, the shared expert and, when routed, the experts.
func checkStage(cfg *Config, n int, what string, routed bool) error {
	if (cfg.VocabSize+n-1)/n*(n-1) >= cfg.VocabSize {
		return fmt.Errorf("%s=%d leaves a rank no rows of the %d-token vocabulary", what, n, cfg.VocabSize)
	}
	for l := 0; l < cfg.NumHiddenLayers; l++ {
		if !cfg.IsMoELayer(l) && cfg.IntermediateSize%n != 0 {
			return fmt.Errorf("%s=%d does not divide intermediate_size %d", what, n, cfg.IntermediateSize)
		}
	}
	if cfg.IsMoE() {
		if routed && cfg.MoeIntermediateSize%n != 0 {
			return fmt.Errorf("%s=%d does not divide moe_intermediate_size %d", what, n, cfg.MoeIntermediateSize)
		}
		if cfg.SharedExpertIntermediateSize%n != 0 {
			return fmt.Errorf("%s=%d does not divide shared_expert_intermediate_size %d", what, n, cfg.SharedExpertIntermediateSize)
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
	sr, sn := s.stage()
	g.vocab.begin, g.vocab.end = VocabSlice(cfg.VocabSize, sr, sn)
	return g
}

// rowsOf is the stage rank's rows [r·n/g, (r+1)·n/g) of an n-row
// dimension sliced over the stage's g ranks.
func (s Shard) rowsOf(n int) span {
	r, g := s.stage()
	return span{r * n / g, (r + 1) * n / g}
}

// LocalComms returns n Comms of one in-process tensor-parallel group (rank
// i uses the i-th), for tests and single-process tensor parallelism. They
// are reusable across steps: every rank must make the same calls.
func LocalComms(n int) []Comm {
	out := make([]Comm, n)
	for i, c := range LocalExchangers(n, n) {
		out[i] = c
	}
	return out
}

// LocalExchangers returns the transports of an in-process stage of n ranks
// whose AllReduce sums over groups of tp consecutive ranks (wrap them in
// expertparallel.Stage for an expert-parallel shard).
func LocalExchangers(n, tp int) []Exchanger {
	g := &localGroup{n: n, box: make([][][]float32, n)}
	for i := range g.box {
		g.box[i] = make([][]float32, n)
	}
	g.cond = sync.NewCond(&g.mu)
	out := make([]Exchanger, n)
	for i := range out {
		out[i] = &localComm{g: g, rank: i, tp: tp}
	}
	return out
}

// localGroup is a barrier where every rank deposits one message for each
// other rank per round.
type localGroup struct {
	mu      sync.Mutex
	cond    *sync.Cond
	n       int
	box     [][][]float32 // box[to][from]
	in, out int           // ranks that deposited, and read, this round
	round   int
	reading bool // the round is being read
}

func (g *localGroup) exchange(rank int, send [][]float32) [][]float32 {
	g.mu.Lock()
	defer g.mu.Unlock()
	for g.reading { // the previous round is still being read
		g.cond.Wait()
	}
	for to, p := range send {
		g.box[to][rank] = slices.Clone(p)
	}
	g.in++
	round := g.round
	if g.in == g.n {
		g.reading = true
		g.cond.Broadcast()
	}
	for !g.reading || g.round != round {
		g.cond.Wait()
	}
	recv := g.box[rank]
	g.box[rank] = make([][]float32, g.n)
	g.out++
	if g.out == g.n {
		g.in, g.out, g.reading = 0, 0, false
		g.round++
		g.cond.Broadcast()
	}
	return recv
}

type localComm struct {
	g        *localGroup
	rank, tp int
}

func (c *localComm) AllToAll(send [][]float32) ([][]float32, error) {
	if len(send) != c.g.n {
		return nil, fmt.Errorf("model: all-to-all of %d parts among %d ranks", len(send), c.g.n)
	}
	return c.g.exchange(c.rank, send), nil
}

func (c *localComm) AllReduce(x []float32) error {
	lo := c.rank - c.rank%c.tp
	send := make([][]float32, c.g.n)
	for r := lo; r < lo+c.tp; r++ {
		send[r] = x
	}
	parts := c.g.exchange(c.rank, send)[lo : lo+c.tp]
	for _, p := range parts {
		if len(p) != len(x) {
			return fmt.Errorf("model: all-reduce of %d and %d values", len(x), len(p))
		}
	}
	for i := range x {
		var sum float32
		for _, p := range parts {
			sum += p[i]
		}
		x[i] = sum
	}
	return nil
}
