package cpu_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
)

// BenchmarkMatMul reports GFLOP/s (2 per multiply-add) of x [T, K] · wᵀ for
// a bf16 w [N, K] of the qwen2-0.5b MLP shape.
func BenchmarkMatMul(b *testing.B) {
	variants := append(cpu.Variants(), "packed", "packed2", "q8", "q8a", "bf16dp")
	for _, v := range variants {
		for _, threads := range []int{1, 2} {
			for _, sh := range []struct{ T, K, N int }{{1, 896, 4864}, {1, 4864, 896}, {1, 896, 151936}, {8, 896, 4864}, {32, 896, 4864}, {35, 896, 4864}, {32, 896, 151936}, {32, 896, 896}, {32, 896, 128}, {32, 4864, 896}, {128, 896, 4864}, {128, 4864, 896}, {512, 896, 4864}} {
				T, K, N := sh.T, sh.K, sh.N
				b.Run(fmt.Sprintf("%s/threads=%d/T=%d/K=%d/N=%d", v, threads, T, K, N), func(b *testing.B) {
					cfg := cpu.Config{Threads: threads, Generic: v == "generic", Kernels: v}
					if v == "generic" || v == "packed" || v == "packed2" || v == "q8" || v == "q8a" || v == "bf16dp" {
						cfg.Kernels = ""
					}
					cfg.PackWeights = v == "packed" || v == "packed2"
					if v == "packed2" {
						cfg.DecodeStreams = 2 // the four-stream default's alternative
					}
					if v == "bf16dp" {
						cfg.Compute = v
					}
					if v == "q8" || v == "q8a" {
						cfg.Quantize = v
					}
					be, err := cpu.New(cfg)
					if err != nil {
						b.Fatal(err)
					}
					defer be.Close()
					rng := rand.New(rand.NewPCG(1, 1))
					raw := make([]byte, N*K*2)
					for i := 0; i < len(raw); i += 2 {
						h := math.Float32bits(rng.Float32()*0.1-0.05) >> 16
						raw[i], raw[i+1] = byte(h), byte(h>>8)
					}
					w, _ := be.Weight(kernels.BF16, []int{N, K}, raw)
					xs := make([]float32, T*K)
					for i := range xs {
						xs[i] = rng.Float32()
					}
					x := be.FromFloat32([]int{T, K}, xs)
					b.ResetTimer()
					for i := 0; i < b.N; i++ {
						be.Free(be.MatMul(x, w, nil))
					}
					b.ReportMetric(2*float64(T*K*N)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
				})
			}
		}
	}
}
