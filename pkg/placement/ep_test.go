package placement

import (
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// tinyMoE is testdata/qwen2-ref/moe-64x8: H=32, E=64, top-8, Im=16,
// Is=128, 2 layers, 2 heads (hd 16), 1 KV head, V=512, untied, bf16.
func tinyMoE(t *testing.T) *model.Config {
	t.Helper()
	cfg, err := model.LoadConfig("../../testdata/qwen2-ref/moe-64x8/config.json")
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func epOptions(t *testing.T, cfg *model.Config, redundant int) Options {
	t.Helper()
	o := defaults(t, cfg)
	o.RedundantExperts = redundant
	return o
}

// TestEPWeightsTinyMoE checks one EP rank's weight bytes against the
// tensors of config.json counted by hand.
func TestEPWeightsTinyMoE(t *testing.T) {
	cfg := tinyMoE(t)
	const (
		H, hd, Im, Is, V = 32, 16, 16, 128, 512
		norms            = 2 * H      // input + post-attention
		router, gate     = 64 * H, H  // mlp.gate [E, H]; shared_expert_gate [1, H]
		expert           = 3 * H * Im // gate/up [Im, H], down [H, Im]
	)
	// attention at tp=t: q rows (2/t heads)·hd with bias, one KV head
	// (kv=1 is replicated for t=2) with biases, o columns.
	attn := func(tp int) int64 {
		q := int64(2/tp) * hd
		return q*H + q + 2*(hd*H+hd) + H*q
	}
	// q 32×32+32, k and v 16×32+16 each, o 32×32; at tp=2 q and o halve.
	if attn(1) != 1056+1056+1024 || attn(2) != 528+1056+512 {
		t.Fatalf("attention: tp=1 %d, tp=2 %d", attn(1), attn(2))
	}
	for _, tc := range []struct {
		ep, tp, redundant int
		want              int64 // params per rank, whole model on one stage
	}{
		// ep=4 tp=2: 2 layers × (norms 64 + q 528 + k,v 1056 + o 512 + router 2048
		// + 16 experts × 1536 + shared 3·32·32 + gate 32) + embed 128 rows
		// + final norm + head 128 rows.
		{4, 2, 0, 2*(64+528+1056+512+2048+16*1536+3072+32) + 128*32 + 32 + 128*32},
		// ep=4 tp=1: attention whole (q 1056, k,v 1056, o 1024).
		{4, 1, 0, 2*(64+1056+1056+1024+2048+16*1536+3072+32) + 128*32 + 32 + 128*32},
		// ep=2 tp=2 with one redundant slot: 33 experts, shared /2, vocab /2.
		{2, 2, 1, 2*(64+528+1056+512+2048+33*1536+6144+32) + 256*32 + 32 + 256*32},
		// ep=64: one expert (+3 redundant), shared /64, vocab 8 rows.
		{64, 2, 3, 2*(64+528+1056+512+2048+4*1536+3*32*2+32) + 8*32 + 32 + 8*32},
	} {
		t.Run(fmt.Sprintf("ep%d-tp%d-r%d", tc.ep, tc.tp, tc.redundant), func(t *testing.T) {
			if err := checkEP(cfg, tc.ep, tc.tp, tc.redundant); err != nil {
				t.Fatal(err)
			}
			// The same sum from the named tensors.
			slots := int64(64/tc.ep + tc.redundant)
			layer := norms + attn(tc.tp) + router + slots*expert + 3*H*int64(Is/tc.ep) + gate
			rows := int64(V / tc.ep)
			if formula := 2*layer + rows*H + H + rows*H; formula != tc.want {
				t.Fatalf("hand sums disagree: %d vs %d", formula, tc.want)
			}
			z := newShapeSizer(cfg, epOptions(t, cfg, tc.redundant), shape{tc.tp, tc.ep})
			if got := z.stage(0, 2, true, true).weights; got != 2*tc.want {
				t.Fatalf("weights %d bytes, want %d (bf16 × %d params)", got, 2*tc.want, tc.want)
			}
			// First and last stage apart: embedding, then norm + head.
			if a, b := z.stage(0, 1, true, false).weights, z.stage(1, 2, false, true).weights; a+b != 2*tc.want {
				t.Fatalf("pp=2 stages %d + %d bytes, want %d", a, b, 2*tc.want)
			}
		})
	}
}

// TestEPRoutedExpertsSum: without redundant slots and with G dividing E,
// the G ranks' routed experts are the checkpoint's, exactly once.
func TestEPRoutedExpertsSum(t *testing.T) {
	for _, cfg := range []*model.Config{tinyMoE(t), preset(t, "qwen2-57b-a14b")} {
		var whole int64 // params of mlp.experts.* in one layer
		for _, s := range model.Shapes(cfg) {
			if strings.HasPrefix(s.Name, "model.layers.0.mlp.experts.") {
				p := int64(1)
				for _, d := range s.Shape {
					p *= int64(d)
				}
				whole += p
			}
		}
		if whole == 0 {
			t.Fatal("no expert tensors in layer 0")
		}
		for G := 2; G <= cfg.NumExperts; G *= 2 {
			if got := int64(G) * routedParams(cfg, attentionTP(cfg, G), G, 0); got != whole {
				t.Errorf("H=%d G=%d: ranks hold %d expert params, checkpoint %d", cfg.HiddenSize, G, got, whole)
			}
		}
		// With redundancy every rank pays the extra slots.
		if got, want := routedParams(cfg, 1, 4, 2)-routedParams(cfg, 1, 4, 0), int64(2*3*cfg.HiddenSize*cfg.MoeIntermediateSize); got != want {
			t.Errorf("2 redundant slots cost %d params, want %d", got, want)
		}
	}
}

// TestEPWeightsAddUp: summed over the G ranks of a 57B stage, the weights
// are the checkpoint plus the replicated parts G−1 more times (norms,
// routers, shared-expert gates) and the attention G/t−1 more times (t ≤
// kv, so no KV head is replicated within a group).
func TestEPWeightsAddUp(t *testing.T) {
	cfg := preset(t, "qwen2-57b-a14b")
	opts := defaults(t, cfg)
	H, hd := int64(cfg.HiddenSize), int64(cfg.HeadDimension())
	L, nh, kv, E := int64(cfg.NumHiddenLayers), int64(cfg.NumAttentionHeads), int64(cfg.NumKeyValueHeads), int64(cfg.NumExperts)
	replicated := (2*L+1)*H + L*(E*H+H)
	attention := L * (H*nh*hd + nh*hd + 2*(H*kv*hd+kv*hd) + nh*hd*H)
	for _, sh := range []shape{{2, 2}, {4, 4}, {4, 8}, {2, 8}, {1, 4}, {4, 16}} {
		G, tp := int64(sh.ep), int64(sh.t)
		got := newShapeSizer(cfg, opts, sh).stage(0, cfg.NumHiddenLayers, true, true).weights * G
		want := 2 * (model.NumParams(cfg) + (G-1)*replicated + (G/tp-1)*attention)
		if got != want {
			t.Errorf("%s: ranks sum to %d bytes, want %d", sh.name(), got, want)
		}
	}
}

// TestEP1IsTP: ep=1 is plain tensor parallelism, and ep=g with tp=g
// weighs what tp=g does (the same slices, experts whole instead of cut).
func TestEP1IsTP(t *testing.T) {
	cfg := preset(t, "qwen2-57b-a14b")
	opts := defaults(t, cfg)
	for _, tp := range []int{1, 2, 4} {
		a := newSizer(cfg, opts, tp).stage(0, 28, true, true)
		if b := newShapeSizer(cfg, opts, shape{tp, 1}).stage(0, 28, true, true); a != b {
			t.Fatalf("tp=%d: %+v vs %+v", tp, a, b)
		}
		if tp > 1 {
			if b := newShapeSizer(cfg, opts, shape{tp, tp}).stage(0, 28, true, true); a.total() != b.total() {
				t.Fatalf("ep=tp=%d: %d bytes, tp alone %d", tp, b.total(), a.total())
			}
		}
	}
	// qwen2.md 5.3: 57B, ep=4 with everything else tp=4: 26.74 GiB.
	w := newShapeSizer(cfg, opts, shape{4, 4}).stage(0, 28, true, true).weights
	if got := float64(w) / float64(gib); got < 26.73 || got > 26.75 {
		t.Fatalf("ep=4 tp=4: %.3f GiB, want 26.74", got)
	}
}

func TestAttentionTP(t *testing.T) {
	cfg := preset(t, "qwen2-57b-a14b")
	for ep, want := range map[int]int{1: 1, 2: 2, 3: 1, 4: 4, 8: 4, 16: 4, 64: 4} {
		if got := attentionTP(cfg, ep); got != want {
			t.Errorf("ep=%d: tp=%d, want %d", ep, got, want)
		}
	}
	if got := attentionTP(tinyMoE(t), 8); got != 2 {
		t.Errorf("tiny moe ep=8: tp=%d, want 2", got)
	}
}

// TestEPChoice: the planner's choice for a MoE model is EP inside a host
// (the smallest group that fits), with TP the largest valid degree
// dividing it; forced degrees are kept.
func TestEPChoice(t *testing.T) {
	cfg := preset(t, "qwen2-57b-a14b")
	for _, tc := range []struct {
		name                 string
		workers              []Worker
		opts                 Options
		ep, tp, pp, replicas int
		explain              string
	}{
		{"2x80", uniform(2, 1, 80*gib, "cuda"), Options{}, 2, 2, 1, 1, "ep=2: 32 experts per rank per layer, attention tp=2"},
		{"8x80", uniform(8, 1, 80*gib, "cuda"), Options{}, 2, 2, 1, 4, "ep=2 tp=2 inside one host fits"},
		{"4x141", uniform(4, 1, 141*gib, "cuda"), Options{}, 1, 1, 1, 4, "one worker holds the whole model"},
		{"8x40 kv 128k", uniform(8, 1, 40*gib, "cuda"), Options{KVCacheTokens: 131072}, 4, 4, 1, 2, "ep=4 tp=4 inside one host fits"},
		{"8x24", uniform(8, 1, 24*gib, "cuda"), Options{}, 8, 4, 1, 1, "ep=8: 8 experts per rank per layer, attention tp=4 (2 groups of 4 consecutive ranks)"},
		{"ep forced", uniform(8, 1, 80*gib, "cuda"), Options{EP: 4}, 4, 4, 1, 2, "ep=4 as requested, attention tp=4"},
		{"ep and tp forced", uniform(8, 1, 80*gib, "cuda"), Options{EP: 8, TP: 2}, 8, 2, 1, 1, "ep=8 tp=2 as requested"},
		{"ep=8 tp=1", uniform(8, 1, 80*gib, "cuda"), Options{EP: 8, TP: 1}, 8, 1, 1, 1, "ep=8: 8 experts per rank per layer, attention whole on every rank (tp=1)"},
		{"ep forced, pp chosen", uniform(4, 1, 40*gib, "cuda"), Options{EP: 2}, 2, 2, 2, 1, "ep=2 as requested, attention tp=2 (the largest valid tp dividing it); pp=2 is the shortest pipeline"},
		{"ep and pp forced", uniform(8, 2, 40*gib, "cuda"), Options{EP: 2, PP: 2}, 2, 2, 2, 2, "ep=2 x pp=2 as requested, attention tp=2"},
		{"pp forced", uniform(8, 1, 40*gib, "cuda"), Options{PP: 2}, 2, 2, 2, 2, "pp=2 as requested; ep=2 tp=2 is the narrowest stage that fits"},
		{"ep=1 is today's", uniform(8, 1, 80*gib, "cuda"), Options{EP: 1}, 1, 2, 1, 4, "MoE: every expert is split over the 2 TP ranks (no expert parallelism)"},
		{"tp forced, no ep", uniform(8, 1, 80*gib, "cuda"), Options{TP: 4}, 1, 4, 1, 2, "MoE: every expert is split over the 4 TP ranks (no expert parallelism)"},
		{"redundant on one worker", uniform(4, 1, 141*gib, "cuda"), Options{RedundantExperts: 2}, 1, 1, 1, 4, "2 redundant expert slots unused"},
		{"redundant", uniform(8, 1, 80*gib, "cuda"), Options{RedundantExperts: 2}, 2, 2, 1, 4, "ep=2: 32 experts (+2 redundant) per rank per layer"},
		{"2 hosts of 1", uniform(2, 2, 80*gib, "cuda"), Options{}, 1, 1, 2, 1, "ep=2 tp=2 (1 replica) also fits but splits its EP groups across hosts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := New(cfg, tc.workers, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			if p.EP != tc.ep || p.TP != tc.tp || p.PP != tc.pp || len(p.Replicas) != tc.replicas {
				t.Fatalf("ep=%d tp=%d pp=%d, %d replicas; want ep=%d tp=%d pp=%d, %d replicas\n%s",
					p.EP, p.TP, p.PP, len(p.Replicas), tc.ep, tc.tp, tc.pp, tc.replicas, p)
			}
			if !slices.ContainsFunc(p.Explain, func(l string) bool { return strings.HasPrefix(l, tc.explain) }) {
				t.Fatalf("no Explain line starts with %q:\n%s", tc.explain, p)
			}
			checkRanks(t, p)
		})
	}
}

// checkRanks: every stage has EP ranks (TP without EP), EPRank is the
// index and TPRank the index modulo TP.
func checkRanks(t *testing.T, p *Plan) {
	t.Helper()
	width := p.TP
	if p.EP > 1 {
		width = p.EP
	}
	for _, r := range p.Replicas {
		for _, s := range r.Stages {
			if len(s.Ranks) != width {
				t.Fatalf("replica %d stage %d: %d ranks, want %d", r.Index, s.Index, len(s.Ranks), width)
			}
			for i, rk := range s.Ranks {
				wantEP := 0
				if p.EP > 1 {
					wantEP = i
				}
				if rk.TPRank != i%p.TP || rk.EPRank != wantEP {
					t.Fatalf("replica %d stage %d rank %d: tp %d ep %d", r.Index, s.Index, i, rk.TPRank, rk.EPRank)
				}
			}
		}
	}
}

func TestEPErrors(t *testing.T) {
	moe := preset(t, "qwen2-57b-a14b")
	tiny := tinyMoE(t)
	mixed := tinyMoE(t)
	mixed.MlpOnlyLayers = []int{0} // layer 0 dense, intermediate_size 96
	ws := uniform(4, 1, 80*gib, "cuda")
	for _, tc := range []struct {
		name string
		cfg  *model.Config
		opts Options
		kind error
		want string
	}{
		{"negative ep", moe, Options{EP: -1}, ErrInvalid, "EP must be >= 0"},
		{"negative redundant", moe, Options{RedundantExperts: -2}, ErrInvalid, "RedundantExperts must be >= 0"},
		{"ep not multiple of tp", moe, Options{EP: 3, TP: 2}, ErrInvalid, "ep=3 is not a multiple of tp=2"},
		{"ep=3 shared", moe, Options{EP: 3}, ErrInvalid, "ep=3 does not divide shared_expert_intermediate_size 20480"},
		{"tp invalid under ep", moe, Options{EP: 8, TP: 8}, ErrInvalid, "tp=8 does not divide the 28 query heads"},
		{"dense model", preset(t, "qwen2-7b"), Options{EP: 2}, ErrInvalid, "ep=2: expert parallelism needs a MoE model"},
		{"over experts", tiny, Options{EP: 128}, ErrInvalid, "ep=128 exceeds the 64 experts"},
		{"dense layer", mixed, Options{EP: 64}, ErrInvalid, "ep=64 does not divide intermediate_size 96"},
		{"slots over experts", tiny, Options{EP: 2, RedundantExperts: 33}, ErrInvalid, "ep=2 with 33 redundant experts gives 65 expert slots per rank, more than the 64 experts"},
		{"redundant on dense", preset(t, "qwen2-7b"), Options{RedundantExperts: 1}, ErrInvalid, "1 redundant expert needs a MoE model, and this qwen2 model has no experts"},
		{"redundant with ep=1", moe, Options{EP: 1, RedundantExperts: 1}, ErrInvalid, "1 redundant expert needs expert parallelism, but ep=1"},
		{"redundant with tp only", moe, Options{TP: 2, RedundantExperts: 1}, ErrInvalid, "1 redundant expert needs expert parallelism, but tp=2 is forced without ep"},
		{"ep over workers", moe, Options{EP: 8}, ErrNoFit, "ep=8 needs at least 8 workers, have 4"},
		{"ep x pp over workers", moe, Options{EP: 4, PP: 2}, ErrNoFit, "ep=4 x pp=2 needs 8 workers, have 4"},
		{"ep does not fit", moe, Options{EP: 2, PP: 1, KVCacheTokens: 1 << 20}, ErrNoFit, "(ep=2 tp=2) needs"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg, ws, tc.opts)
			if !errors.Is(err, tc.kind) || !strings.Contains(fmt.Sprint(err), tc.want) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.kind, tc.want)
			}
		})
	}
}

// TestEPJSON: ep is always there (1 without expert parallelism), ep_rank
// only where it is not 0.
func TestEPJSON(t *testing.T) {
	p, err := New(preset(t, "qwen2-7b"), uniform(2, 1, 24*gib, "cuda"), Options{})
	if err != nil {
		t.Fatal(err)
	}
	b, _ := json.Marshal(p)
	if !strings.Contains(string(b), `"ep":1,`) || strings.Contains(string(b), "ep_rank") {
		t.Fatalf("dense plan JSON: %s", b)
	}
	p, err = New(preset(t, "qwen2-57b-a14b"), uniform(4, 1, 80*gib, "cuda"), Options{EP: 4})
	if err != nil {
		t.Fatal(err)
	}
	b, _ = json.Marshal(p)
	var back Plan
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if back.EP != 4 || back.Replicas[0].Stages[0].Ranks[3].EPRank != 3 || !strings.Contains(string(b), `"ep":4,`) {
		t.Fatalf("EP plan JSON: %s", b)
	}
	if s := p.String(); !strings.HasPrefix(s, "qwen2-57b-a14b: ep=4 tp=4 x pp=1, 1 replica") && !strings.HasPrefix(s, "model: ep=4 tp=4 x pp=1, 1 replica") ||
		!strings.Contains(s, "ep3/tp3:w3@host0") {
		t.Fatalf("String:\n%s", s)
	}
}
