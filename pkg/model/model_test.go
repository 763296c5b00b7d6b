package model_test

import (
	"errors"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// incTol bounds the difference between two float32 evaluations of the same
// logits in a different order (the reference measured 3e-6 – 1.2e-5).
const incTol = 1e-4

// TestIncrementalEqualsFull runs prompt+greedy tokens as one pass, token by
// token through the cache, and in chunks (1, 2, rest), and compares every
// position's logits.
func TestIncrementalEqualsFull(t *testing.T) {
	for _, c := range refCases(t) {
		t.Run(c.name, func(t *testing.T) {
			m := loadCase(t, c, newBackend(t, 2), false)
			seq := append(append([]int32{}, c.json.PromptIDs...), c.json.GreedyIDs...)
			full := fullForward(t, m, seq, nil)
			V := m.Config().VocabSize
			for _, chunks := range [][]int{ones(len(seq)), {1, 2, len(seq) - 3}, {5, len(seq) - 5}} {
				bm, st := m.NewCache(len(seq), 4)
				pos := 0
				for _, n := range chunks {
					if err := bm.Reserve(1, pos+n); err != nil {
						t.Fatal(err)
					}
					out, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: seq[pos : pos+n], Pos: pos, Blocks: bm.Table(1), AllLogits: true}}}, st)
					if err != nil {
						t.Fatal(err)
					}
					if d := maxDiff(out.Logits[0], full[pos*V:(pos+n)*V]); d > incTol*math.Max(1, c.json.MaxAbsLogit) {
						t.Fatalf("chunks %v: positions [%d, %d) differ from the full pass by %.3g", chunks[:min(len(chunks), 4)], pos, pos+n, d)
					}
					pos += n
				}
			}
		})
	}
}

func ones(n int) []int {
	s := make([]int, n)
	for i := range s {
		s[i] = 1
	}
	return s
}

// TestMixedBatch runs three sequences of different lengths in one step (a
// whole prompt, a decode step on a cached prefix, a chunk continuing a cached
// prefix) and checks each against the same sequence run alone.
func TestMixedBatch(t *testing.T) {
	for _, c := range refCases(t) {
		t.Run(c.name, func(t *testing.T) {
			m := loadCase(t, c, newBackend(t, 2), false)
			V := m.Config().VocabSize
			p := append(append([]int32{}, c.json.PromptIDs...), c.json.GreedyIDs...)
			type part struct {
				seq       []int32
				cached, n int // positions cached before the step, new positions
			}
			parts := []part{
				{p[:9], 0, 9},                                // a prompt
				{p[2:15], 12, 1},                             // a decode step
				{p[len(p)-11:], 6, 5},                        // a chunk after a prefix
				{p[len(p)-1:], 0, 1},                         // a one-token prompt
				{p[3 : len(p)-2], 4, 7},                      // another chunk
				{c.json.PromptIDs, 0, len(c.json.PromptIDs)}, // the reference prompt
			}
			// Alone: each in its own cache, prefix first, then the part.
			alone := make([][]float32, len(parts))
			for i, pt := range parts {
				bm, st := m.NewCache(len(pt.seq), 4)
				if pt.cached > 0 {
					bm.Reserve(1, pt.cached)
					if _, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: pt.seq[:pt.cached], Blocks: bm.Table(1)}}}, st); err != nil {
						t.Fatal(err)
					}
				}
				bm.Reserve(1, pt.cached+pt.n)
				out, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: pt.seq[pt.cached : pt.cached+pt.n], Pos: pt.cached, Blocks: bm.Table(1), AllLogits: true}}}, st)
				if err != nil {
					t.Fatal(err)
				}
				alone[i] = out.Logits[0]
			}
			// Together: one shared cache; prefixes first (one batch), then all parts in one step.
			bm, st := m.NewCache(200+len(p)*len(parts), 4)
			var pre, step []model.Seq
			for i, pt := range parts {
				id := kvcache.SeqID(i)
				if pt.cached > 0 {
					bm.Reserve(id, pt.cached)
					pre = append(pre, model.Seq{Tokens: pt.seq[:pt.cached], Blocks: bm.Table(id)})
				}
			}
			if _, err := m.Forward(&model.Batch{Seqs: pre}, st); err != nil {
				t.Fatal(err)
			}
			for i, pt := range parts {
				id := kvcache.SeqID(i)
				bm.Reserve(id, pt.cached+pt.n)
				step = append(step, model.Seq{Tokens: pt.seq[pt.cached : pt.cached+pt.n], Pos: pt.cached, Blocks: bm.Table(id), AllLogits: true})
			}
			out, err := m.Forward(&model.Batch{Seqs: step}, st)
			if err != nil {
				t.Fatal(err)
			}
			for i := range parts {
				if len(out.Logits[i]) != parts[i].n*V {
					t.Fatalf("part %d: %d logits, want %d", i, len(out.Logits[i]), parts[i].n*V)
				}
				if d := maxDiff(out.Logits[i], alone[i]); d > incTol*math.Max(1, c.json.MaxAbsLogit) {
					t.Errorf("part %d differs from running alone by %.3g", i, d)
				}
			}
		})
	}
}

func TestForwardRejectsBadBatches(t *testing.T) {
	c := refCases(t)[0]
	m := loadCase(t, c, newBackend(t, 1), false)
	bm, st := m.NewCache(64, 4)
	bm.Reserve(1, 8)
	blocks := bm.Table(1)
	V := int32(m.Config().VocabSize)
	cases := []struct {
		name string
		seqs []model.Seq
		want string
	}{
		{"no sequences", nil, "no sequences"},
		{"no tokens", []model.Seq{{Blocks: blocks}}, "no tokens"},
		{"id too big", []model.Seq{{Tokens: []int32{1, V}, Blocks: blocks}}, "token id"},
		{"negative id", []model.Seq{{Tokens: []int32{-1}, Blocks: blocks}}, "token id"},
		{"negative pos", []model.Seq{{Tokens: []int32{1}, Pos: -1, Blocks: blocks}}, "position"},
		{"blocks too few", []model.Seq{{Tokens: make([]int32, 9), Blocks: blocks}}, "cannot hold"},
		{"block outside cache", []model.Seq{{Tokens: []int32{1}, Blocks: []int32{99}}}, "outside the cache"},
		{"beyond context", []model.Seq{{Tokens: []int32{1}, Pos: m.Config().MaxContext(), Blocks: blocks}}, "context"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			_, err := m.Forward(&model.Batch{Seqs: tc.seqs}, st)
			if !errors.Is(err, model.ErrBadBatch) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want ErrBadBatch mentioning %q", err, tc.want)
			}
		})
	}
}

// TestLoadErrors: a checkpoint that disagrees with its config is refused
// with the tensor's name.
func TestLoadErrors(t *testing.T) {
	b := newBackend(t, 1)
	cfg, err := model.LoadConfig(filepath.Join(refDir, "dense-gqa-f32", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	rw := model.NewRandomWeights(cfg, kernels.BF16, 1)
	if _, err := model.New(cfg, b, rw); err != nil {
		t.Fatalf("random weights for the config: %v", err)
	}
	wide := *cfg
	wide.IntermediateSize += 8
	_, err = model.New(&wide, b, rw)
	if err == nil || !strings.Contains(err.Error(), "mlp.gate_proj.weight") || !strings.Contains(err.Error(), "shape") {
		t.Fatalf("shape mismatch: %v", err)
	}
	untied := *cfg
	tied := *cfg
	tied.TieWordEmbeddings = true
	_, err = model.New(&untied, b, model.NewRandomWeights(&tied, kernels.BF16, 1))
	if !errors.Is(err, model.ErrMissingTensor) || !strings.Contains(err.Error(), "lm_head.weight") {
		t.Fatalf("missing lm_head: %v", err)
	}
	dir := t.TempDir()
	if _, err := model.Load(dir, b, model.LoadOptions{}); err == nil || !strings.Contains(err.Error(), "config.json") {
		t.Fatalf("empty dir: %v", err)
	}
	raw, _ := os.ReadFile(filepath.Join(refDir, "dense-gqa-f32", "config.json"))
	os.WriteFile(filepath.Join(dir, "config.json"), raw, 0o644)
	if _, err := model.Load(dir, b, model.LoadOptions{}); err == nil || !strings.Contains(err.Error(), "safetensors") {
		t.Fatalf("no weights: %v", err)
	}
}

// TestGreedyRandomDtypes: the same random model in f32, f16 and bf16 runs and
// decodes; f32 and bf16 weights from one seed give nearly the same logits.
func TestGreedyRandomDtypes(t *testing.T) {
	cfg, err := model.LoadConfig(filepath.Join(refDir, "moe-f32", "config.json"))
	if err != nil {
		t.Fatal(err)
	}
	b := newBackend(t, 2)
	var first []float32
	for _, dt := range []kernels.DType{kernels.F32, kernels.F16, kernels.BF16} {
		m, err := model.New(cfg, b, model.NewRandomWeights(cfg, dt, 7))
		if err != nil {
			t.Fatal(err)
		}
		var logits [][]float32
		ids, err := m.Greedy([]int32{1, 2, 3}, 4, func(_ int, _ int32, l []float32) { logits = append(logits, l) })
		if err != nil || len(ids) != 4 {
			t.Fatalf("%v: %v %v", dt, ids, err)
		}
		if first == nil {
			first = logits[0]
		} else if d := maxDiff(first, logits[0]); d > 0.05 {
			t.Errorf("%v logits differ from f32 by %.3g", dt, d)
		}
	}
}

// TestGreedyRefusesTooMany: a token count that would overflow is an error,
// not a panic.
func TestGreedyRefusesTooMany(t *testing.T) {
	c := refCases(t)[0]
	m := loadCase(t, c, newBackend(t, 1), false)
	for _, n := range []int{math.MaxInt, math.MaxInt - 1, m.Config().MaxContext() + 1} {
		if _, err := m.Greedy([]int32{1, 2}, n, nil); !errors.Is(err, model.ErrBadBatch) {
			t.Errorf("n=%d: %v", n, err)
		}
	}
}
