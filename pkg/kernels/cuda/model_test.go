package cuda_test

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cuda"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/kernelstest"
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
func TestReferenceCases(t *testing.T) { referenceCases(t, gpu(t), nil) }

// referenceCases checks the reference cases on b (only those named in
// only, when not nil).
func referenceCases(t *testing.T, b *cuda.Backend, only []string) {
	dirs, _ := filepath.Glob(filepath.Join("..", "..", "..", "testdata", "qwen2-ref", "*", "reference.json"))
	if len(dirs) == 0 {
		t.Fatal("no reference cases")
	}
	for _, p := range dirs {
		dir := filepath.Dir(p)
		if only != nil && !slices.Contains(only, filepath.Base(dir)) {
			continue
		}
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

// emuSlowOps are the ops of the kernels conformance suite that
// TestEmulatedDevice leaves out unless QWENFLEET_EMU_FULL is set: on the
// emulator (a thread per CUDA thread) MatMul's 1848 shapes take about 8
// minutes and Attention's long sequences about 20 on 2 cores (AttentionDCA's
// as long), the other ops under a second together. compareWithCPU runs
// these ops on the emulated device at small shapes (GEMV and GEMM, bf16
// and f32 weights; paged GQA attention, plain and DCA).
const emuSlowOps = "MatMul|Attention|AttentionDCA"

// TestEmulatedDevice runs the whole backend — allocation, copies, argument
// packing, launch shapes and the kernels — with no GPU: emu/fake_driver.cc
// implements the driver and NVRTC calls the backend makes on the CPU
// emulator, built by g++ as a libcuda.so.1 that a child test process loads
// through QWENFLEET_CUDA_LIBS. The child checks every op against the CPU
// backend at small shapes (compareWithCPU) and runs the kernels conformance
// suite (pkg/kernels/kernelstest, subtest "conformance") without its
// MatMul and Attention ops (emuSlowOps): a few seconds in all.
//
// With QWENFLEET_EMU_FULL=1 the child runs the whole conformance suite
// and two reference cases through the model (moe-f32, dense-tied-bf16)
// besides: about 30 minutes for the suite and 5 a case on 2 cores, so give
// go test a -timeout of 60m or more (the child's own is 90m):
//
//	QWENFLEET_EMU_FULL=1 go test -timeout 90m -run '^TestEmulatedDevice$' ./pkg/kernels/cuda
//
// Skipped under -short and where there is no g++.
func TestEmulatedDevice(t *testing.T) {
	if os.Getenv("QWENFLEET_EMU_CHILD") != "" {
		b, err := cuda.New(cuda.Config{})
		if err != nil {
			t.Fatal(err)
		}
		defer b.Close()
		if !strings.HasPrefix(b.Name(), "cuda/Emulated") {
			t.Fatalf("backend %s is not the emulated device", b.Name())
		}
		t0 := time.Now()
		compareWithCPU(t, b)
		t.Logf("ops against the CPU backend: %v", time.Since(t0))
		t0 = time.Now()
		t.Run("conformance", func(t *testing.T) { kernelstest.Run(t, b) }) // the parent's -test.skip leaves out emuSlowOps
		t.Logf("conformance suite: %v", time.Since(t0))
		if os.Getenv("QWENFLEET_EMU_FULL") == "" {
			t.Logf("conformance suite without %s (QWENFLEET_EMU_FULL=1 runs them)", emuSlowOps)
		}
		if os.Getenv("QWENFLEET_EMU_FULL") != "" { // about 5 minutes a case on 2 cores
			t0 = time.Now()
			referenceCases(t, b, []string{"moe-f32", "dense-tied-bf16"})
			t.Logf("reference cases: %v", time.Since(t0))
		}
		return
	}
	if testing.Short() {
		t.Skip("-short")
	}
	gxx, err := exec.LookPath("g++")
	if err != nil {
		t.Skip("no g++")
	}
	dir := t.TempDir()
	lib := filepath.Join(dir, "libcuda.so.1")
	out, err := exec.Command(gxx, "-std=c++17", "-O1", "-pthread", "-shared", "-fPIC", "emu/fake_driver.cc", "-o", lib).CombinedOutput()
	if err != nil {
		t.Fatalf("g++: %v\n%s", err, out)
	}
	if err := os.Symlink(lib, filepath.Join(dir, "libnvrtc.so.13")); err != nil {
		t.Fatal(err)
	}
	args := []string{"-test.run", "^TestEmulatedDevice$", "-test.v", "-test.timeout", "10m",
		"-test.skip", "^TestEmulatedDevice$/^conformance$/^(" + emuSlowOps + ")$"}
	if os.Getenv("QWENFLEET_EMU_FULL") != "" {
		args = []string{"-test.run", "^TestEmulatedDevice$", "-test.v", "-test.timeout", "90m"}
	}
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "QWENFLEET_EMU_CHILD=1", cuda.LibPathEnv+"="+dir)
	out, err = cmd.CombinedOutput()
	t.Logf("child:\n%s", lastLines(string(out), 40))
	if err != nil {
		t.Fatalf("emulated device: %v", err)
	}
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// compareWithCPU runs one small case of every op on b and on the CPU
// backend and compares them (relative 1e-4 of the values' scale).
func compareWithCPU(t *testing.T, b *cuda.Backend) {
	c, err := cpu.New(cpu.Config{Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	rng := uint64(1)
	rnd := func(n int) []float32 {
		v := make([]float32, n)
		for i := range v {
			rng = rng*6364136223846793005 + 1442695040888963407
			v[i] = float32(int64(rng>>33)%2000-1000) / 1000
		}
		return v
	}
	bf16 := func(v []float32) []byte {
		out := make([]byte, 2*len(v))
		for i, x := range v {
			h := safetensors.Float32ToBF16(x)
			out[2*i], out[2*i+1] = byte(h), byte(h>>8)
		}
		return out
	}
	f32 := func(v []float32) []byte {
		out := make([]byte, 4*len(v))
		for i, x := range v {
			u := math.Float32bits(x)
			out[4*i], out[4*i+1], out[4*i+2], out[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
		}
		return out
	}
	both := func(f func(be kernels.Backend) kernels.Tensor) ([]float32, []float32) {
		return b.ToFloat32(f(b)), c.ToFloat32(f(c))
	}
	cmp := func(what string, got, want []float32) {
		t.Helper()
		if len(got) != len(want) {
			t.Fatalf("%s: %d values, the CPU %d", what, len(got), len(want))
		}
		scale := 0.0
		for _, v := range want {
			scale = math.Max(scale, math.Abs(float64(v)))
		}
		for i := range got {
			if d := math.Abs(float64(got[i] - want[i])); d > 1e-4*math.Max(1, scale) || math.IsNaN(float64(got[i])) {
				t.Fatalf("%s[%d] = %v, the CPU %v", what, i, got[i], want[i])
			}
		}
	}
	weight := func(be kernels.Backend, dt kernels.DType, raw []byte, shape ...int) kernels.Tensor {
		w, err := be.Weight(dt, shape, raw)
		if err != nil {
			t.Fatal(err)
		}
		return w
	}
	// MatMul: decode rows (GEMV) and a prefill chunk (GEMM), bf16 and f32
	// weights, with a bias.
	for _, T := range []int{3, 13} {
		for _, dt := range []kernels.DType{kernels.BF16, kernels.F32} {
			xv, wv, bv := rnd(T*37), rnd(5*37), rnd(5)
			raw := f32(wv)
			if dt == kernels.BF16 {
				raw = bf16(wv)
			}
			got, want := both(func(be kernels.Backend) kernels.Tensor {
				return be.MatMul(be.FromFloat32([]int{T, 37}, xv), weight(be, dt, raw, 5, 37), weight(be, kernels.F32, f32(bv), 5))
			})
			cmp(fmt.Sprintf("MatMul T=%d %v", T, dt), got, want)
		}
	}
	table := rnd(11 * 16)
	ids := []int32{3, 0, 10, 3}
	got, want := both(func(be kernels.Backend) kernels.Tensor {
		return be.Embed(weight(be, kernels.BF16, bf16(table), 11, 16), ids)
	})
	cmp("Embed", got, want)
	xv, nv := rnd(4*16), rnd(16)
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		return be.RMSNorm(be.FromFloat32([]int{4, 16}, xv), weight(be, kernels.BF16, bf16(nv), 16), 1e-6)
	})
	cmp("RMSNorm", got, want)
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		x := be.FromFloat32([]int{4, 16}, xv)
		be.RoPE(x, 8, []int32{0, 5, 6, 100}, &kernels.Rope{InvFreq: []float32{1, 0.1, 0.01, 0.001}, Scale: 1.1})
		return x
	})
	cmp("RoPE", got, want)
	addend := rnd(64)
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		x := be.FromFloat32([]int{4, 16}, xv)
		be.Add(x, be.FromFloat32([]int{4, 16}, addend))
		return be.SwiGLU(x, be.FromFloat32([]int{4, 16}, xv))
	})
	cmp("Add+SwiGLU", got, want)
	// Attention over a paged cache: two sequences, GQA 4 heads / 2 KV
	// heads of 8, blocks of 4, written by WriteKV.
	kv := rnd(9 * 16)
	q := rnd(4 * 32)
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		kc, vc := be.Zeros(40, 16), be.Zeros(40, 16)
		slots := []int32{20, 21, 22, 23, 8, 9, 10, 11, 12}
		be.WriteKV(kc, be.FromFloat32([]int{9, 16}, kv), slots)
		be.WriteKV(vc, be.FromFloat32([]int{9, 16}, kv[len(kv)-9*16:]), slots)
		ab := &kernels.AttnBatch{Heads: 4, KVHeads: 2, HeadDim: 8, BlockSize: 4, Scale: 0.35, Seqs: []kernels.AttnSeq{
			{Row: 0, N: 2, Start: 2, Blocks: []int32{5}},    // positions 2, 3 of keys 0..3 (slots 20..23)
			{Row: 2, N: 2, Start: 3, Blocks: []int32{2, 3}}, // positions 3, 4 (slots 8..12)
		}}
		return be.Attention(be.FromFloat32([]int{4, 32}, q), kc, vc, ab)
	})
	cmp("WriteKV+Attention", got, want)
	// Dual Chunk Attention as the model runs it: keys rotated at p mod c,
	// queries three ways by RoPEMulti, chunks of c = 5 positions (C = 7),
	// the length temperature past 12 positions; a prefill chunk of 6 rows
	// at positions 20..25 and a decode row at 33, so rows see one, two and
	// many chunks back. GQA 4 heads / 2 KV heads of 8, blocks of 4.
	dcaRope := &kernels.Rope{InvFreq: []float32{1, 0.1, 0.01, 0.001}, Scale: 1}
	dk, dv, dq := rnd(34*16), rnd(34*16), rnd(7*32)
	kpos, qpos := make([]int32, 34), make([]int32, 0, 21)
	for p := range kpos {
		kpos[p] = int32(p % 5)
	}
	for _, p := range []int{20, 21, 22, 23, 24, 25, 33} {
		qpos = append(qpos, int32(p%5), int32(min(p%5+5, 7)), int32(min(2*5-1, 7)))
	}
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		return be.RoPEMulti(be.FromFloat32([]int{7, 32}, dq), 8, qpos, dcaRope)
	})
	cmp("RoPEMulti", got, want)
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		kc, vc := be.Zeros(48, 16), be.Zeros(48, 16)
		blocks := []int32{11, 3, 7, 0, 9, 2, 5, 10, 1}
		slots := make([]int32, 34)
		for p := range slots {
			slots[p] = blocks[p/4]*4 + int32(p%4)
		}
		k := be.FromFloat32([]int{34, 16}, dk)
		be.RoPE(k, 8, kpos, dcaRope)
		be.WriteKV(kc, k, slots)
		be.WriteKV(vc, be.FromFloat32([]int{34, 16}, dv), slots)
		q3 := be.RoPEMulti(be.FromFloat32([]int{7, 32}, dq), 8, qpos, dcaRope)
		ab := &kernels.AttnBatch{Heads: 4, KVHeads: 2, HeadDim: 8, BlockSize: 4, Scale: 0.35, DCAChunk: 5, DCAOrigLen: 12,
			Seqs: []kernels.AttnSeq{{Row: 0, N: 6, Start: 20, Blocks: blocks}, {Row: 6, N: 1, Start: 33, Blocks: blocks}}}
		return be.Attention(q3, kc, vc, ab)
	})
	cmp("DCA RoPE+RoPEMulti+Attention", got, want)
	got, want = both(func(be kernels.Backend) kernels.Tensor {
		x := be.FromFloat32([]int{4, 16}, xv)
		g := be.Gather(x, []int32{3, 1, 3})
		be.ScaleRows(g, []float32{0.5, 2, -1})
		be.ScatterAdd(x, g, []int32{0, 0, 2}, []float32{1, 0.25, 3})
		return x
	})
	cmp("Gather+ScaleRows+ScatterAdd", got, want)
	got, want = both(func(be kernels.Backend) kernels.Tensor { return weight(be, kernels.BF16, bf16(table), 11, 16) })
	cmp("bf16 weight round trip", got, want)
}
