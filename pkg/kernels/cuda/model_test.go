package cuda_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cuda"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

func gpu(t testing.TB) *cuda.Backend {
	t.Helper()
	b, err := cuda.New(cuda.Config{})
	if errors.Is(err, cuda.ErrNoDriver) {
		t.Skipf("no GPU here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// TestReferenceCases runs every HuggingFace reference case on GPU 0: the
// prompt logits within 1e-2·max(1, max|logit|) (bf16 weights, float32
// math) and the greedy ids identical.
func TestReferenceCases(t *testing.T) {
	b := gpu(t)
	dirs, _ := filepath.Glob(filepath.Join("..", "..", "..", "testdata", "qwen2-ref", "*", "reference.json"))
	if len(dirs) == 0 {
		t.Fatal("no reference cases")
	}
	for _, p := range dirs {
		dir := filepath.Dir(p)
		t.Run(filepath.Base(dir), func(t *testing.T) {
			var ref struct {
				PromptIDs   []int32 `json:"prompt_ids"`
				GreedyIDs   []int32 `json:"greedy_ids"`
				MaxAbsLogit float64 `json:"max_abs_logit"`
			}
			raw, err := os.ReadFile(p)
			if err != nil {
				t.Fatal(err)
			}
			if err := json.Unmarshal(raw, &ref); err != nil {
				t.Fatal(err)
			}
			m, err := model.Load(dir, b, model.LoadOptions{})
			if err != nil {
				t.Fatal(err)
			}
			defer m.Close()
			ck, err := safetensors.Open(filepath.Join(dir, "reference.safetensors"), safetensors.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer ck.Close()
			want, err := ck.ReadFloat32("logits")
			if err != nil {
				t.Fatal(err)
			}
			cfg := m.Config()
			bm, st := m.NewCache(len(ref.PromptIDs), model.DefaultBlockSize)
			if err := bm.Reserve(1, len(ref.PromptIDs)); err != nil {
				t.Fatal(err)
			}
			out, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: ref.PromptIDs, Blocks: bm.Table(1), AllLogits: true}}}, st)
			if err != nil {
				t.Fatal(err)
			}
			worst := 0.0
			for i, v := range out.Logits[0] {
				worst = math.Max(worst, math.Abs(float64(v)-float64(want[i])))
			}
			tol := 1e-2 * math.Max(1, ref.MaxAbsLogit)
			t.Logf("max |Δlogit| %.3g (tolerance %.3g), vocab %d", worst, tol, cfg.VocabSize)
			if worst > tol {
				t.Errorf("logits differ from the reference by %g", worst)
			}
			ids, err := m.Greedy(ref.PromptIDs, len(ref.GreedyIDs), nil)
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(ids, ref.GreedyIDs) {
				t.Errorf("greedy ids %v, want %v", ids, ref.GreedyIDs)
			}
		})
	}
}

// memSource serves random weights generated once.
type memSource struct {
	rw   *model.RandomWeights
	data map[string][]byte
}

func (m memSource) Lookup(name string) (kernels.DType, []int, bool) { return m.rw.Lookup(name) }
func (m memSource) Read(name string) ([]byte, error)                { return m.data[name], nil }

// BenchmarkDecode runs 2-layer versions of qwen2-7b and qwen2-72b (the
// real widths and vocabulary; random bf16 weights) on GPU 0: decode
// tokens/s at batch 1 after a 128-token prompt, the share of the HBM
// bandwidth bound (weight bytes per token over the device's theoretical
// bandwidth), and prefill tokens/s of the 128-token prompt.
//
//	go test ./pkg/kernels/cuda -run '^$' -bench Decode -benchtime 64x
func BenchmarkDecode(b *testing.B) {
	be := gpu(b)
	for _, preset := range []string{"qwen2-7b", "qwen2-72b"} {
		cfg, err := model.Preset(preset)
		if err != nil {
			b.Fatal(err)
		}
		cfg.NumHiddenLayers, cfg.MaxWindowLayers = 2, 2
		rw := model.NewRandomWeights(cfg, kernels.BF16, 1)
		src := memSource{rw, map[string][]byte{}}
		for _, t := range rw.Tensors() {
			if src.data[t.Name], err = rw.Read(t.Name); err != nil {
				b.Fatal(err)
			}
		}
		m, err := model.New(cfg, be, src)
		if err != nil {
			b.Fatal(err)
		}
		b.Run(preset+"-2layers", func(b *testing.B) {
			const promptLen = 128
			bm, st := m.NewCache(promptLen+b.N+1, model.DefaultBlockSize)
			p := make([]int32, promptLen)
			for i := range p {
				p[i] = int32((i*7919 + 13) % 151000)
			}
			if err := bm.Reserve(1, promptLen+b.N+1); err != nil {
				b.Fatal(err)
			}
			t0 := time.Now()
			out, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: p, Blocks: bm.Table(1)}}}, st)
			if err != nil {
				b.Fatal(err)
			}
			prefill := time.Since(t0)
			next := int32(model.Argmax(out.Logits[0]))
			b.ResetTimer()
			t1 := time.Now()
			for i := 0; i < b.N; i++ {
				out, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: []int32{next}, Pos: promptLen + i, Blocks: bm.Table(1)}}}, st)
				if err != nil {
					b.Fatal(err)
				}
				next = int32(model.Argmax(out.Logits[0]))
			}
			per := time.Since(t1).Seconds() / float64(b.N)
			bound := float64(m.WeightBytes()) / be.Info().BandwidthBytesPS
			b.ReportMetric(1/per, "tok/s")
			b.ReportMetric(100*bound/per, "%HBM")
			b.ReportMetric(promptLen/prefill.Seconds(), "prefill-tok/s")
			b.ReportMetric(0, "ns/op")
			fmt.Fprintf(os.Stderr, "%s 2 layers: %.2f GB of weights, bound %.3f ms/token on %s (%.0f GB/s)\n",
				preset, float64(m.WeightBytes())/1e9, 1e3*bound, be.Info().Name, be.Info().BandwidthBytesPS/1e9)
		})
		m.Close()
	}
}
