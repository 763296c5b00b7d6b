package cpu

import (
	"math"

	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// bf16 compute (Config.Compute "bf16" where dpFaster, or "bf16dp"):
// products of bf16 weights with activations rounded to bf16, on
// AVX512_BF16's VDPBF16PS (32 bf16 multiply-adds into 16 float32 sums per
// instruction: on AMD Zen 4/5 twice the work of a float32 FMA at the same
// rate, from half the weight bytes of a widened panel and none of the
// widening work; on Intel half the FMA rate, so not chosen there).
//
// Arithmetic: an activation row is rounded to bf16 once (round to nearest
// even), the first product that reads it caches the result on the tensor
// (q, k and v, or gate and up, read the same one) and every op that writes
// the tensor drops it. Each output is one float32 chain over the pairs of
// k in order, starting from zero: chain += x[2c+1]·w[2c+1], then
// += x[2c]·w[2c] (the instruction's order, flushing denormals). The tile
// kernel (14 tokens) and the one-row kernel run the same chain per output,
// so a row's result does not depend on its batch (batch-invariant by
// construction, as the other packed kernels).
//
// Layout: panels of 32 weight rows as packed.go, k padded to even (kp) and
// taken in pairs: pair c of the panel is 32 rows × 2 bf16 (row j's w[2c],
// w[2c+1] in one 32-bit lane), 128 bytes. Activations are uint32 pairs
// (low half k = 2c, high half 2c+1); a tile of 14 tokens interleaves them
// pair-major, xt[c·14+t], for one VPBROADCASTD each.
const dpMR = 14

// dpIndex is the position of w[j][c] (j < 32 in the panel) in a panel.
func dpIndex(j, c int) int { return (c/2)*2*packNR + j*2 + c%2 }

// toBF16 rounds v to the nearest bf16, ties to even; NaNs stay NaNs.
func toBF16(v float32) uint16 {
	u := math.Float32bits(v)
	if u&0x7fffffff > 0x7f800000 {
		return uint16(u>>16) | 0x40
	}
	return uint16((u + 0x7fff + (u>>16)&1) >> 16)
}

// roundPairs writes rows [r0, r1) of x [T, K] as bf16 pairs into xb
// [T][kp2] (an odd K's last pair has a zero high half).
func roundPairs(x []float32, K, r0, r1 int, xb []uint32) {
	kp2 := (K + 1) / 2
	for t := r0; t < r1; t++ {
		row, dst := x[t*K:(t+1)*K], xb[t*kp2:(t+1)*kp2]
		for c := range dst {
			lo := uint32(toBF16(row[2*c]))
			var hi uint32
			if 2*c+1 < K {
				hi = uint32(toBF16(row[2*c+1]))
			}
			dst[c] = lo | hi<<16
		}
	}
}

// dpGo is the reference of one pair's step of a chain: the instruction's
// two fused multiply-adds (each product of two bf16 is exact in float32),
// high half first, denormal inputs and results flushed to zero.
func dpGo(acc float32, x, w uint32) float32 {
	for _, sh := range []uint{16, 0} {
		a, b := ftz(safetensors.BF16ToFloat32(uint16(x>>sh))), ftz(safetensors.BF16ToFloat32(uint16(w>>sh)))
		acc = ftz(float32(float64(a)*float64(b) + float64(acc)))
	}
	return acc
}

func ftz(v float32) float32 {
	if u := math.Float32bits(v); u&0x7f800000 == 0 {
		return math.Float32frombits(u & 0x80000000)
	}
	return v
}

// pgemvDPGo is the reference of the one-row kernel over a panel.
func pgemvDPGo(x []uint32, w []uint16, kp2 int, y []float32) {
	for j := 0; j < packNR; j++ {
		var acc float32
		for c := 0; c < kp2; c++ {
			i := c*2*packNR + j*2
			acc = dpGo(acc, x[c], uint32(w[i])|uint32(w[i+1])<<16)
		}
		y[j] = acc
	}
}

// pgemmDPGo is the reference of the tile kernel.
func pgemmDPGo(xt []uint32, w []uint16, kp2 int, c []float32) {
	row := make([]uint32, kp2)
	for t := 0; t < dpMR; t++ {
		for p := range row {
			row[p] = xt[p*dpMR+t]
		}
		pgemvDPGo(row, w, kp2, c[t*packNR:(t+1)*packNR])
	}
}

// packDP lays out a 2-D bf16 weight in pair layout.
func (b *Backend) packDP(t *tensor) {
	n, k := t.rows(), t.cols()
	P := (n + packNR - 1) / packNR
	kp := 2 * ((k + 1) / 2)
	pk := &packed{n: n, k: k, dp: true, kp: kp, h: make([]uint16, P*packNR*kp)}
	b.pool.run(P, 1, func(_, lo, hi int) {
		for p := lo; p < hi; p++ {
			dst := pk.h[p*packNR*kp : (p+1)*packNR*kp]
			for j := 0; j < packNR && p*packNR+j < n; j++ {
				row := t.h[(p*packNR+j)*k : (p*packNR+j+1)*k]
				for c, v := range row {
					dst[dpIndex(j, c)] = v
				}
			}
		}
	})
	t.pk, t.h = pk, nil
}

// bf16Act is an activation's bf16 form for the DP kernels: rows as pairs
// (xb [T][kp2]) and whole tiles of dpMR rows interleaved (xt).
type bf16Act struct {
	xb, xt []uint32
	tiles  int
}

// bf16Form returns x's bf16 form, making it (and caching it on x) on first
// use.
func (b *Backend) bf16Form(x *tensor, T, K int) *bf16Act {
	d := x.derived(K)
	if d.bf != nil {
		return d.bf
	}
	kp2 := (K + 1) / 2
	// A remainder of fewer than 4 rows goes row by row through the one-row
	// kernel; more is a tile padded with zero rows.
	tiles := T / dpMR
	if T%dpMR >= 4 {
		tiles++
	}
	a := &bf16Act{xb: make([]uint32, T*kp2), tiles: tiles}
	b.pool.run(T, 1, func(_, lo, hi int) { roundPairs(x.f, K, lo, hi, a.xb) })
	if tiles > 0 {
		a.xt = make([]uint32, tiles*kp2*dpMR)
		b.pool.run(tiles, 1, func(_, lo, hi int) {
			for tl := lo; tl < hi; tl++ {
				dst := a.xt[tl*kp2*dpMR : (tl+1)*kp2*dpMR]
				for t := 0; t < dpMR && tl*dpMR+t < T; t++ {
					for c, v := range a.xb[(tl*dpMR+t)*kp2 : (tl*dpMR+t+1)*kp2] {
						dst[c*dpMR+t] = v
					}
				}
			}
		})
	}
	d.bf = a
	return a
}

// matmulDP computes y = x·wᵀ for a weight in pair layout: one token as two
// streams per thread (gemvPacked2's split), more through the tile kernel,
// the threads splitting the panels.
func (b *Backend) matmulDP(xin *tensor, T int, w *tensor, y []float32) {
	pk := w.pk
	K, N, kp2 := pk.k, pk.n, pk.kp/2
	P := (N + packNR - 1) / packNR
	a := b.bf16Form(xin, T, K)
	panel := func(p int) []uint16 { return pk.h[p*packNR*pk.kp : (p+1)*packNR*pk.kp] }
	row := func(x []uint32, p int, yrow []float32) {
		if cols := N - p*packNR; cols >= packNR {
			b.k.pgemvDP(x, panel(p), kp2, yrow[p*packNR:(p+1)*packNR])
		} else {
			var o [packNR]float32
			b.k.pgemvDP(x, panel(p), kp2, o[:])
			copy(yrow[p*packNR:], o[:cols])
		}
	}
	if T == 1 {
		b.pool.run(P, 1, func(_, lo, hi int) {
			streamPanels(lo, hi, 2, N, func(p int) { row(a.xb, p, y) }, func(ps *[4]int) {
				p, q := ps[0], ps[1]
				b.k.pgemv2DP(a.xb, panel(p), panel(q), kp2, y[p*packNR:(p+1)*packNR], y[q*packNR:(q+1)*packNR])
			})
		})
		return
	}
	b.pool.run(P, 1, func(_, lo, hi int) {
		var c [dpMR * packNR]float32
		for p := lo; p < hi; p++ {
			cols := min(packNR, N-p*packNR)
			for tl := 0; tl < a.tiles; tl++ {
				tile := a.xt[tl*kp2*dpMR : (tl+1)*kp2*dpMR]
				if min(dpMR, T-tl*dpMR) == dpMR && cols == packNR {
					b.k.pgemmDP(tile, panel(p), kp2, y[tl*dpMR*N+p*packNR:], N) // a whole tile: straight into y
					continue
				}
				b.k.pgemmDP(tile, panel(p), kp2, c[:], packNR)
				for t := 0; t < dpMR && tl*dpMR+t < T; t++ {
					copy(y[(tl*dpMR+t)*N+p*packNR:][:cols], c[t*packNR:t*packNR+cols])
				}
			}
			for t := a.tiles * dpMR; t < T; t++ {
				row(a.xb[t*kp2:(t+1)*kp2], p, y[t*N:(t+1)*N])
			}
		}
	})
}
