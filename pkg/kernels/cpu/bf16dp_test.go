package cpu

import (
	"math"
	"math/rand/v2"
	"testing"
)

// The DP assembly against its Go reference, on ragged pair counts.
func TestDPKernels(t *testing.T) {
	var k kernelSet
	for _, s := range simdKernels() {
		if s.pgemmDP != nil {
			k = s
		}
	}
	if k.pgemmDP == nil {
		t.Skip("no AVX512_BF16 on this CPU")
	}
	r := rand.New(rand.NewPCG(5, 6))
	bf := func() uint32 {
		return uint32(toBF16(float32(r.NormFloat64()))) | uint32(toBF16(float32(r.NormFloat64())))<<16
	}
	for _, kp2 := range []int{1, 2, 3, 17, 448, 2433} {
		w1, w2 := make([]uint16, 2*packNR*kp2), make([]uint16, 2*packNR*kp2)
		for i := range w1 {
			w1[i], w2[i] = uint16(bf()), uint16(bf())
		}
		xt := make([]uint32, dpMR*kp2)
		for i := range xt {
			xt[i] = bf()
		}
		want := make([]float32, dpMR*packNR)
		pgemmDPGo(xt, w1, kp2, want)
		got := make([]float32, dpMR*packNR)
		k.pgemmDP(xt, w1, kp2, got, packNR)
		near(t, "tile", kp2, got, want)
		for tk := 0; tk < dpMR; tk++ {
			x := make([]uint32, kp2)
			for c := range x {
				x[c] = xt[c*dpMR+tk]
			}
			y, y1, y2, w2want := make([]float32, packNR), make([]float32, packNR), make([]float32, packNR), make([]float32, packNR)
			k.pgemvDP(x, w1, kp2, y)
			k.pgemv2DP(x, w1, w2, kp2, y1, y2)
			pgemvDPGo(x, w2, kp2, w2want)
			for j := range y {
				// One row, two streams and the tile: the same chain, the
				// same bits.
				if y[j] != got[tk*packNR+j] || y1[j] != y[j] {
					t.Fatalf("kp2 %d token %d out %d: row %v, two-stream %v, tile %v", kp2, tk, j, y[j], y1[j], got[tk*packNR+j])
				}
			}
			near(t, "second stream", kp2, y2, w2want)
		}
	}
}

func near(t *testing.T, what string, kp2 int, got, want []float32) {
	t.Helper()
	for i := range want {
		if d := math.Abs(float64(got[i] - want[i])); d > 1e-5*math.Max(1, math.Abs(float64(want[i]))) {
			t.Fatalf("%s kp2 %d [%d]: %v, reference %v", what, kp2, i, got[i], want[i])
		}
	}
}

func TestToBF16(t *testing.T) {
	for _, c := range []struct {
		in   float32
		want uint16
	}{{1, 0x3f80}, {math.Float32frombits(0x3f808000), 0x3f80}, {math.Float32frombits(0x3f818000), 0x3f82},
		{math.Float32frombits(0x3f808001), 0x3f81}, {float32(math.Inf(-1)), 0xff80}, {math.MaxFloat32, 0x7f80}} {
		if got := toBF16(c.in); got != c.want {
			t.Errorf("toBF16(%#x) = %#x, want %#x", math.Float32bits(c.in), got, c.want)
		}
	}
	if got := toBF16(float32(math.NaN())); got&0x7f80 != 0x7f80 || got&0x7f == 0 {
		t.Errorf("NaN rounds to %#x", got)
	}
}
