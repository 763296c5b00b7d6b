package model_test

import (
	"fmt"
	"sync"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// The benchmarks run the qwen2-0.5b shape (BENCH_PRESET changes nothing:
// the figures in the README are for this shape) with random bf16 weights
// generated in memory once per process.
var (
	benchOnce    sync.Once
	benchWeights map[string][]byte
	benchCfg     *model.Config
)

// memWeights is a WeightSource over bytes generated once.
type memWeights struct {
	cfg *model.Config
	rw  *model.RandomWeights
}

func (m memWeights) Lookup(name string) (kernels.DType, []int, bool) { return m.rw.Lookup(name) }
func (m memWeights) Read(name string) ([]byte, error)                { return benchWeights[name], nil }

func benchModel(b *testing.B, threads int) *model.Model {
	return benchModelCfg(b, cpu.Config{Threads: threads})
}

func benchModelCfg(b *testing.B, cc cpu.Config) *model.Model {
	b.Helper()
	benchOnce.Do(func() {
		cfg, err := model.Preset("qwen2-0.5b")
		if err != nil {
			panic(err)
		}
		benchCfg = cfg
		rw := model.NewRandomWeights(cfg, kernels.BF16, 1)
		benchWeights = map[string][]byte{}
		for _, t := range rw.Tensors() {
			data, err := rw.Read(t.Name)
			if err != nil {
				panic(err)
			}
			benchWeights[t.Name] = data
		}
	})
	be, err := cpu.New(cc)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(be.Close)
	m, err := model.New(benchCfg, be, memWeights{benchCfg, model.NewRandomWeights(benchCfg, kernels.BF16, 1)})
	if err != nil {
		b.Fatal(err)
	}
	return m
}

func prompt(n int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32((i*7919 + 13) % 151000)
	}
	return p
}

// BenchmarkDecode measures single-sequence decode steps (after a 16-token
// prompt, context growing to 16+b.N... capped by restarting) and reports
// tokens/s and the share of weight bytes streamed per second.
func BenchmarkDecode(b *testing.B) {
	for _, threads := range []int{1, 2} {
		b.Run(fmt.Sprintf("qwen2-0.5b-bf16/threads=%d", threads), func(b *testing.B) {
			m := benchModel(b, threads)
			const ctx = 256
			bm, st := m.NewCache(ctx, model.DefaultBlockSize)
			p := prompt(16)
			bm.Reserve(1, ctx)
			if _, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: p, Blocks: bm.Table(1)}}}, st); err != nil {
				b.Fatal(err)
			}
			pos := len(p)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if pos == ctx {
					pos = len(p) // overwrite the same cache: same work per step
				}
				if _, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: []int32{int32(i % 1000)}, Pos: pos, Blocks: bm.Table(1)}}}, st); err != nil {
					b.Fatal(err)
				}
				pos++
			}
			sec := b.Elapsed().Seconds()
			b.ReportMetric(float64(b.N)/sec, "tokens/s")
			b.ReportMetric(float64(m.WeightBytes())*float64(b.N)/sec/1e9, "weightGB/s")
		})
	}
}

// BenchmarkPrefill measures a 128- or 512-token prompt in one step, with
// the weights as the engine's tests hold them (unpacked), packed (the
// servers' and qwenctl's default) and on VDPBF16PS (bf16dp, where the CPU
// has it).
func BenchmarkPrefill(b *testing.B) {
	for _, mode := range []string{"unpacked", "packed", "bf16dp"} {
		for _, n := range []int{128, 512} {
			for _, threads := range []int{1, 2} {
				b.Run(fmt.Sprintf("qwen2-0.5b-bf16/%s/len=%d/threads=%d", mode, n, threads), func(b *testing.B) {
					benchPrefill(b, cpu.Config{Threads: threads, PackWeights: mode != "unpacked", Compute: map[bool]string{true: "bf16dp"}[mode == "bf16dp"]}, n)
				})
			}
		}
	}
}

func benchPrefill(b *testing.B, cc cpu.Config, n int) {
	m := benchModelCfg(b, cc)
	p := prompt(n)
	bm, st := m.NewCache(len(p), model.DefaultBlockSize)
	bm.Reserve(1, len(p))
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if _, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: p, Blocks: bm.Table(1)}}}, st); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(len(p)*b.N)/b.Elapsed().Seconds(), "tokens/s")
}

// BenchmarkDecodeShapes: single-sequence decode of the qwen2-0.5b and
// qwen2-1.5b shapes and a 2-layer qwen2-7b (real widths) with packed bf16
// (and int8) weights on all threads, reporting tokens/s and, for bf16, the
// weight bytes streamed per second: its ratio to the machine's read
// bandwidth (../shared/checks/membw.c) is the share of the bandwidth bound.
// Weights are random and generated in memory.
func BenchmarkDecodeShapes(b *testing.B) {
	for _, sh := range []struct {
		preset string
		layers int
	}{{"qwen2-0.5b", 0}, {"qwen2-1.5b", 0}, {"qwen2-7b", 2}} {
		for _, quant := range []string{"", "q8", "q8a"} {
			name := sh.preset + map[bool]string{true: "-2layers", false: ""}[sh.layers > 0] + "-" + map[string]string{"": "bf16", "q8": "q8", "q8a": "q8a"}[quant]
			b.Run(name, func(b *testing.B) {
				cfg, err := model.Preset(sh.preset)
				if err != nil {
					b.Fatal(err)
				}
				if sh.layers > 0 {
					cfg.NumHiddenLayers, cfg.MaxWindowLayers = sh.layers, sh.layers
				}
				be, err := cpu.New(cpu.Config{PackWeights: true, Quantize: quant})
				if err != nil {
					b.Fatal(err)
				}
				defer be.Close()
				m, err := model.New(cfg, be, model.NewRandomWeights(cfg, kernels.BF16, 1))
				if err != nil {
					b.Fatal(err)
				}
				defer m.Close()
				bm, st := m.NewCache(64+b.N, model.DefaultBlockSize)
				bm.Reserve(1, 64+b.N)
				p := prompt(16)
				if _, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: p, Blocks: bm.Table(1)}}}, st); err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if _, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: []int32{int32(100 + i)}, Pos: 16 + i, Blocks: bm.Table(1)}}}, st); err != nil {
						b.Fatal(err)
					}
				}
				sec := b.Elapsed().Seconds()
				b.ReportMetric(float64(b.N)/sec, "tok/s")
				if quant == "" {
					// Bytes a decode step streams: every weight except an
					// untied embedding table (only its rows are read).
					read := m.WeightBytes()
					if !cfg.TieWordEmbeddings {
						read -= int64(cfg.VocabSize) * int64(cfg.HiddenSize) * 2
					}
					b.ReportMetric(float64(read)*float64(b.N)/sec/1e9, "GB/s")
				}
			})
		}
	}
}
