package model_test

import (
	"slices"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// moeCases are the reference cases of Qwen2-MoE models.
func moeCases(t *testing.T) []*refCase {
	var out []*refCase
	for _, c := range refCases(t) {
		cfg, err := model.LoadConfig(c.dir + "/config.json")
		if err != nil {
			t.Fatal(err)
		}
		if cfg.IsMoE() {
			out = append(out, c)
		}
	}
	if len(out) == 0 {
		t.Fatal("no MoE reference cases")
	}
	return out
}

// epLayouts are the expert-parallel layouts cfg allows among ep 2, 4, 8 ×
// attention tp 1, 2, 4 × pp 1, 2.
func epLayouts(t *testing.T, c *refCase) []layout {
	cfg, err := model.LoadConfig(c.dir + "/config.json")
	if err != nil {
		t.Fatal(err)
	}
	var out []layout
	for _, ep := range []int{2, 4, 8} {
		for _, tp := range []int{1, 2, 4} {
			for _, pp := range []int{1, 2} {
				if model.CheckEP(cfg, ep, tp) == nil && pp <= cfg.NumHiddenLayers {
					out = append(out, layout{tp: tp, ep: ep, pp: pp})
				}
			}
		}
	}
	return out
}

// TestExpertParallelLayouts splits every MoE reference case's experts over
// 2, 4 and 8 ranks, with attention replicated or tensor-parallel and with
// pipeline stages, and checks logits and greedy ids against the reference.
func TestExpertParallelLayouts(t *testing.T) {
	for _, c := range moeCases(t) {
		for _, l := range epLayouts(t, c) {
			t.Run(c.name+"/"+l.String(), func(t *testing.T) {
				g, _ := newLayout(t, c, l, 64, nil)
				checkGroup(t, c, g, nil)
			})
		}
	}
}

// ringMap holds expert e of layer l on ranks (e+l)%G and (e+l+1)%G: every
// expert twice, on a different pair in each layer. Replicas split their
// tokens by row.
type ringMap struct{ ranks int }

func (m ringMap) owners(l, e int) []int {
	a, b := (e+l)%m.ranks, (e+l+1)%m.ranks
	return []int{min(a, b), max(a, b)}
}

func (m ringMap) Holds(l, e, r int) bool { return slices.Contains(m.owners(l, e), r) }

func (m ringMap) Owner(l, e, row int) int { o := m.owners(l, e); return o[row%2] }

// TestExpertParallelReplicated places every expert on two ranks, so each
// expert's tokens are split between its replicas: the numbers stay those
// of one process.
func TestExpertParallelReplicated(t *testing.T) {
	for _, c := range moeCases(t) {
		for _, l := range []layout{{tp: 1, ep: 4, pp: 1}, {tp: 2, ep: 4, pp: 2}} {
			t.Run(c.name+"/"+l.String(), func(t *testing.T) {
				g, _ := newLayout(t, c, l, 64, ringMap{l.ep})
				checkGroup(t, c, g, nil)
			})
		}
	}
}

// TestExpertReplacement moves every expert in the middle of decoding (the
// ranks load their new experts, a step runs with the new placement, then
// the old experts are dropped): the tokens do not change.
func TestExpertReplacement(t *testing.T) {
	c := moeCases(t)[0]
	l := layout{tp: 1, ep: 4, pp: 1}
	g, _ := newLayout(t, c, l, 64, nil)
	ck, err := safetensors.Open(c.dir, safetensors.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	src := model.Checkpoint{Checkpoint: ck}
	before := g.models[0][0].WeightBytes()
	next := ringMap{l.ep}
	checkGroup(t, c, g, func(step int) {
		switch step {
		case 2:
			for _, m := range g.models[0] {
				if n, err := m.LoadExperts(src, next); err != nil || n == 0 {
					t.Fatalf("loaded %d experts: %v", n, err)
				}
			}
			g.experts = next
		case 3:
			for _, m := range g.models[0] {
				if m.DropExperts(next) == 0 {
					t.Error("no expert dropped")
				}
			}
			g.experts = nil // the shards' placement is now next
		}
	})
	if after := g.models[0][0].WeightBytes(); after <= before {
		t.Errorf("rank 0 holds %d weight bytes after taking twice the experts, %d before", after, before)
	}
	// A step may not use a placement whose experts are not loaded.
	m := g.models[0][0]
	_, err = m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: []int32{1}, Blocks: []int32{40}}}, Comm: g.comms[0][0],
		Experts: model.Contiguous{Experts: m.Config().NumExperts, Ranks: 1}}, g.caches[0][0])
	if err == nil || !strings.Contains(err.Error(), "has not loaded it") {
		t.Fatalf("a step with unloaded experts: %v", err)
	}
}

// TestExpertShardBytes counts what the ranks of an ep=4 stage read: each
// exactly its own weights (checked in newLayout), together each routed
// expert, the shared expert and the vocabulary once, and attention,
// norms and routers once per rank.
func TestExpertShardBytes(t *testing.T) {
	for _, c := range moeCases(t) {
		t.Run(c.name, func(t *testing.T) {
			const G = 4
			_, read := newLayout(t, c, layout{tp: 1, ep: G, pp: 1}, 4, nil)
			ck, err := safetensors.Open(c.dir, safetensors.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer ck.Close()
			var want int64
			for _, n := range ck.Names() {
				info, _ := ck.Info(n)
				switch {
				case strings.Contains(n, ".experts."), strings.Contains(n, ".shared_expert."),
					n == model.EmbedName, n == model.LMHead:
					want += info.Size // split over the ranks
				default:
					want += G * info.Size // attention, norms, routers: on every rank
				}
			}
			if read != want {
				t.Fatalf("the stage read %d bytes, want %d", read, want)
			}
		})
	}
}

func TestCheckEP(t *testing.T) {
	c := moeCases(t)[0]
	cfg, err := model.LoadConfig(c.dir + "/config.json")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ep, tp int
		want   string
	}{
		{3, 2, "not a multiple"},
		{2 * cfg.NumExperts, 1, "exceeds the"},
		{0, 1, "not positive"},
	} {
		err := model.CheckEP(cfg, tc.ep, tc.tp)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("CheckEP(ep=%d, tp=%d) = %v, want %q", tc.ep, tc.tp, err, tc.want)
		}
	}
	dense, err := model.LoadConfig(refDir + "/dense-gqa-f32/config.json")
	if err != nil {
		t.Fatal(err)
	}
	if err := model.CheckEP(dense, 2, 1); err == nil {
		t.Error("a dense model accepted ep=2")
	}
	for _, sh := range []model.Shard{
		{TPRank: 1, TPSize: 2, EPRank: 2, EPSize: 4}, // tp rank must be 0
		{EPRank: 4, EPSize: 4},
		{EPRank: 1}, // an ep rank without ep
	} {
		if _, err := sh.Normalize(cfg); err == nil {
			t.Errorf("%+v accepted", sh)
		}
	}
}
