package cpu

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"
)

// TestQ8VKernels: the VNNI kernels of every kernel set that has them
// compute what the Go reference computes (but for float double rounding),
// on random bytes, scales and weight sums, one token and a tile.
func TestQ8VKernels(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for _, ks := range simdKernels() {
		if ks.pgemvQ8V == nil {
			continue
		}
		for _, kp := range []int{32, 64, 896, 4864} {
			t.Run(fmt.Sprintf("%s/kp%d", ks.name, kp), func(t *testing.T) {
				G := kp / q8Group
				u := make([]uint8, q8vMR*kp)
				xs := make([]float32, q8vMR*G)
				w := make([]int8, packNR*kp)
				s := make([]float32, packNR*G)
				ws := make([]int32, packNR*G)
				for i := range u {
					u[i] = uint8(r.IntN(256))
				}
				for i := range w {
					w[i] = int8(r.IntN(255) - 127)
				}
				for i := range xs {
					xs[i] = r.Float32() / 100
				}
				for i := range s {
					s[i] = r.Float32() / 100
					ws[i] = int32(r.IntN(2000) - 1000)
				}
				got, want := make([]float32, q8vMR*packNR), make([]float32, q8vMR*packNR)
				ks.pgemmQ8V(u, xs, w, s, ws, kp, got)
				pgemmQ8VGo(u, xs, w, s, ws, kp, want)
				closeTo(t, "tile", got, want)
				// Token 3 of the tile alone through the one-token kernel.
				u1 := make([]uint8, kp)
				for k := range u1 {
					u1[k] = u[(k/4)*q8vMR*4+3*4+k%4]
				}
				x1 := make([]float32, G)
				for g := range x1 {
					x1[g] = xs[g*q8vMR+3]
				}
				one := make([]float32, packNR)
				ks.pgemvQ8V(u1, x1, w, s, ws, kp, one)
				for j := range one {
					if one[j] != got[3*packNR+j] { // same chain: bit-identical
						t.Fatalf("one-token output %d: %v, tile %v", j, one[j], got[3*packNR+j])
					}
				}
			})
		}
	}
}

func closeTo(t *testing.T, what string, got, want []float32) {
	t.Helper()
	for i := range got {
		if d := math.Abs(float64(got[i] - want[i])); d > 1e-6*math.Abs(float64(want[i]))+1e-6 {
			t.Fatalf("%s output %d: %v, reference %v", what, i, got[i], want[i])
		}
	}
}
