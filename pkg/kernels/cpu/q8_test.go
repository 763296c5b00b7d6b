package cpu_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
)

// TestQ8MatMul: int8 weights with per-row scales; every output is within
// float rounding of the product with the dequantised weights, plus, where
// the activations are quantised too (VNNI), their rounding bound
// Σ_groups (max|x|/127/2)·Σ|w|; on ragged shapes through every kernel.
func TestQ8MatMul(t *testing.T) {
	for _, mode := range []string{"q8", "q8a"} {
		t.Run(mode, func(t *testing.T) { testQ8MatMul(t, mode) })
	}
}

func testQ8MatMul(t *testing.T, mode string) {
	b, err := cpu.New(cpu.Config{Threads: 2, Quantize: mode})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if !b.Quantizes() {
		t.Skip("no int8 kernels on this machine")
	}
	r := rand.New(rand.NewPCG(5, 6))
	for _, T := range []int{1, 3, 14, 19} {
		for _, K := range []int{1, 17, 300} {
			for _, N := range []int{1, 33, 70} {
				t.Run(fmt.Sprintf("T%d/K%d/N%d", T, K, N), func(t *testing.T) {
					wv := randSlice(r, N*K)
					w, err := b.Weight(kernels.BF16, []int{N, K}, bf16Bytes(wv))
					if err != nil {
						t.Fatal(err)
					}
					wv = b.ToFloat32(w) // dequantised view: q·scale
					xv := randSlice(r, T*K)
					y := b.ToFloat32(b.MatMul(b.FromFloat32([]int{T, K}, xv), w, nil))
					for i := 0; i < T; i++ {
						for j := 0; j < N; j++ {
							var exact, ax, mw, aq float64
							for g := 0; g < K; g += 32 {
								var mx, sw float64
								for k := g; k < min(K, g+32); k++ {
									mx = math.Max(mx, math.Abs(float64(xv[i*K+k])))
									sw += math.Abs(float64(wv[j*K+k]))
								}
								aq += mx / 127 / 2 * sw
							}
							if !b.QuantizesActivations() {
								aq = 0
							}
							for k := 0; k < K; k++ {
								// bf16 of the original is what was quantised;
								// compare against the dequantised weights
								// (exact up to rounding) and bound the
								// distance to the original by the scale.
								exact += float64(xv[i*K+k]) * float64(wv[j*K+k])
								ax += math.Abs(float64(xv[i*K+k]))
								mw = math.Max(mw, math.Abs(float64(wv[j*K+k])))
							}
							if d := math.Abs(float64(y[i*N+j]) - exact); d > 1e-5*ax*mw+1e-6+aq*1.0001 {
								t.Fatalf("[%d,%d] = %v, dequantised product %v", i, j, y[i*N+j], exact)
							}
						}
					}
				})
			}
		}
	}
	// The quantisation itself: dequantised weights within scale/2 of bf16.
	wv := randSlice(r, 64*100)
	w, _ := b.Weight(kernels.BF16, []int{64, 100}, bf16Bytes(wv))
	dq := b.ToFloat32(w)
	for row := 0; row < 64; row++ {
		var m float64
		for k := 0; k < 100; k++ {
			m = math.Max(m, math.Abs(float64(bf16Round(wv[row*100+k]))))
		}
		for k := 0; k < 100; k++ {
			if d := math.Abs(float64(dq[row*100+k]) - float64(bf16Round(wv[row*100+k]))); d > m/127/2*1.0001 {
				t.Fatalf("row %d col %d: %v vs %v (scale %v)", row, k, dq[row*100+k], wv[row*100+k], m/127)
			}
		}
	}
}

func bf16Round(v float32) float32 { return math.Float32frombits(math.Float32bits(v) &^ 0xffff) }

// TestQ8AReuse: q8a keeps an activation's int8 form for the next product
// of the same tensor, and an op that changes the tensor drops it.
func TestQ8AReuse(t *testing.T) {
	b, err := cpu.New(cpu.Config{Threads: 2, Quantize: "q8a"})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	r := rand.New(rand.NewPCG(9, 10))
	const T, K, N = 3, 96, 64
	w, err := b.Weight(kernels.BF16, []int{N, K}, bf16Bytes(randSlice(r, N*K)))
	if err != nil {
		t.Fatal(err)
	}
	xv, dv := randSlice(r, T*K), randSlice(r, T*K)
	x := b.FromFloat32([]int{T, K}, xv)
	first := b.ToFloat32(b.MatMul(x, w, nil))
	if again := b.ToFloat32(b.MatMul(x, w, nil)); !slices.Equal(first, again) {
		t.Fatal("the same activation gave two products")
	}
	b.Add(x, b.FromFloat32([]int{T, K}, dv))
	sum := make([]float32, T*K)
	for i := range sum {
		sum[i] = xv[i] + dv[i]
	}
	got := b.ToFloat32(b.MatMul(x, w, nil))
	want := b.ToFloat32(b.MatMul(b.FromFloat32([]int{T, K}, sum), w, nil))
	if !slices.Equal(got, want) {
		t.Fatal("a product after Add used the activation's old int8 form")
	}
}
