package cpu

import (
	"math"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// Packed weights. With Config.PackWeights and a kernel set that has packed
// kernels, Weight stores every 2-D weight [N, K] as panels of packNR rows,
// k-major: panel p holds w[p·packNR+j][k] at k·packNR+j (rows past N are
// zero). A one-token product streams each panel once, front to back (one
// sequential stream per thread); a batch goes through a 14×32 register tile
// that reads each panel once per 14 tokens. Every output is a single FMA
// chain over k in order, so a row's result does not depend on the batch
// (packed products are batch-invariant by construction).
const (
	packNR  = 32 // weight rows (outputs) per panel
	packMR  = 14 // tokens per register tile
	q8Group = 32 // k values sharing an int8 scale
)

func q8Groups(k int) int { return (k + q8Group - 1) / q8Group }

// packed is a weight in panel layout.
type packed struct {
	n, k int
	h    []uint16  // BF16 / F16
	f    []float32 // F32
	// q8: int8 weights in groups of q8Group along k, one float32 scale
	// per (group, row): scale = max|w|/127 over the group, w ≈ q·scale.
	// Panel p's scales are scale[p·G·32 : (p+1)·G·32], [G][32], G groups.
	q     []int8
	scale []float32
	// vnni: q is in the VNNI layout (q8v.go) over kp = q8vPad(k) columns,
	// and wsum[(p·G+g)·32+j] = Σ q over the group.
	vnni bool
	kp   int
	wsum []int32
	// dp: h is in the bf16 pair layout (bf16dp.go) over kp = k rounded
	// up to even.
	dp bool
}

// Packs reports whether this backend stores 2-D weights packed.
func (b *Backend) Packs() bool { return b.packW && b.canPack(kernels.BF16) }

// Quantizes reports whether this backend stores 2-D weights as int8.
func (b *Backend) Quantizes() bool { return b.quant && b.k.pgemvQ8 != nil }

// QuantizesActivations reports whether its int8 products quantise the
// activations too (the VNNI kernels; see q8v.go).
func (b *Backend) QuantizesActivations() bool { return b.Quantizes() && b.quantAct }

// Panel p's slices of each storage.
func (pk *packed) hp(p int) []uint16  { return pk.h[p*packNR*pk.k : (p+1)*packNR*pk.k] }
func (pk *packed) fp(p int) []float32 { return pk.f[p*packNR*pk.k : (p+1)*packNR*pk.k] }
func (pk *packed) qp(p int) []int8 {
	if pk.vnni {
		return pk.q[p*packNR*pk.kp : (p+1)*packNR*pk.kp]
	}
	return pk.q[p*packNR*pk.k : (p+1)*packNR*pk.k]
}
func (pk *packed) wsp(p int) []int32 {
	G := q8Groups(pk.k)
	return pk.wsum[p*G*packNR : (p+1)*G*packNR]
}
func (pk *packed) sp(p int) []float32 {
	G := q8Groups(pk.k)
	return pk.scale[p*G*packNR : (p+1)*G*packNR]
}

func (b *Backend) canPack(dt kernels.DType) bool {
	switch dt {
	case kernels.BF16:
		return b.k.pgemvBF16 != nil
	case kernels.F16:
		return b.k.pgemvF16 != nil
	case kernels.F32:
		return b.k.pgemvF32 != nil
	}
	return false
}

// pack lays out t (2-D, h or f set) in panels and drops the row-major
// data; with quantize, as int8 with per-row scales.
func (b *Backend) pack(t *tensor, quantize bool) {
	n, k := t.rows(), t.cols()
	P := (n + packNR - 1) / packNR
	pk := &packed{n: n, k: k}
	switch {
	case quantize && b.quantAct:
		pk.vnni, pk.kp = true, q8vPad(k)
		pk.q, pk.scale = make([]int8, P*packNR*pk.kp), make([]float32, P*q8Groups(k)*packNR)
		pk.wsum = make([]int32, P*q8Groups(k)*packNR)
	case quantize:
		pk.q, pk.scale = make([]int8, P*packNR*k), make([]float32, P*q8Groups(k)*packNR)
	case t.dt == kernels.F32:
		pk.f = make([]float32, P*packNR*k)
	default:
		pk.h = make([]uint16, P*packNR*k)
	}
	b.pool.run(P, 1, func(tid, lo, hi int) {
		for p := lo; p < hi; p++ {
			base := p * packNR * k
			for j := 0; j < packNR && p*packNR+j < n; j++ {
				r := (p*packNR + j) * k
				switch {
				case quantize:
					row := b.scratchFor(tid, k)[:k]
					b.widen(row, t, r)
					G := q8Groups(k)
					for g := 0; g < G; g++ {
						grp := row[g*q8Group : min(k, (g+1)*q8Group)]
						var m float32
						for _, v := range grp {
							m = max(m, abs32(v))
						}
						s := m / 127
						pk.scale[(p*G+g)*packNR+j] = s
						if s == 0 {
							continue
						}
						for i, v := range grp {
							q := int8(max(-127, min(127, roundEven(v/s))))
							if pk.vnni {
								pk.q[p*packNR*pk.kp+q8vIndex(j, g*q8Group+i)] = q
								pk.wsum[(p*G+g)*packNR+j] += int32(q)
							} else {
								pk.q[base+(g*q8Group+i)*packNR+j] = q
							}
						}
					}
				case pk.f != nil:
					for kk := 0; kk < k; kk++ {
						pk.f[base+kk*packNR+j] = t.f[r+kk]
					}
				default:
					for kk := 0; kk < k; kk++ {
						pk.h[base+kk*packNR+j] = t.h[r+kk]
					}
				}
			}
		}
	})
	t.pk, t.f, t.h = pk, nil, nil
}

func abs32(v float32) float32 { return math.Float32frombits(math.Float32bits(v) &^ (1 << 31)) }

func roundEven(v float32) float32 { return float32(math.RoundToEven(float64(v))) }

// widenPacked is widen for a packed tensor (Embed rows, ToFloat32).
func (b *Backend) widenPacked(dst []float32, t *tensor, off int) {
	pk := t.pk
	for i := range dst {
		r, c := (off+i)/pk.k, (off+i)%pk.k
		idx := (r/packNR)*packNR*pk.k + c*packNR + r%packNR
		switch {
		case pk.dp:
			dst[i] = safetensors.BF16ToFloat32(pk.h[(r/packNR)*packNR*pk.kp+dpIndex(r%packNR, c)])
			continue
		case pk.q != nil:
			G := q8Groups(pk.k)
			if pk.vnni {
				idx = (r/packNR)*packNR*pk.kp + q8vIndex(r%packNR, c)
			}
			dst[i] = float32(pk.q[idx]) * pk.scale[((r/packNR)*G+c/q8Group)*packNR+r%packNR]
			continue
		}
		switch t.dt {
		case kernels.F32:
			dst[i] = pk.f[idx]
		case kernels.BF16:
			dst[i] = safetensors.BF16ToFloat32(pk.h[idx])
		default:
			dst[i] = safetensors.F16ToFloat32(pk.h[idx])
		}
	}
}

// pgemv runs the one-row kernel: y[0:32] = x · panel p.
func (b *Backend) pgemv(dt kernels.DType, x []float32, pk *packed, p int, y []float32) {
	switch {
	case pk.k == 0:
		clear(y[:packNR])
	case pk.q != nil:
		b.k.pgemvQ8(x, pk.qp(p), pk.sp(p), pk.k, y)
	case dt == kernels.BF16:
		b.k.pgemvBF16(x, pk.hp(p), pk.k, y)
	case dt == kernels.F16:
		b.k.pgemvF16(x, pk.hp(p), pk.k, y)
	default:
		b.k.pgemvF32(x, pk.fp(p), pk.k, y)
	}
}

// pgemvRow writes panel p's outputs of one token into its output row
// (the last panel may hold fewer than 32 rows).
func (b *Backend) pgemvRow(dt kernels.DType, x []float32, pk *packed, p int, yrow []float32) {
	if cols := pk.n - p*packNR; cols >= packNR {
		b.pgemv(dt, x, pk, p, yrow[p*packNR:p*packNR+packNR])
	} else {
		var o [packNR]float32
		b.pgemv(dt, x, pk, p, o[:])
		copy(yrow[p*packNR:], o[:cols])
	}
}

// pgemm runs the tile kernel for mr (packMR or 8) tokens: c[t·ldc+j] for
// t < mr from the packed tile xp; wf, when set, is the panel already
// widened to float32.
func (b *Backend) pgemm(dt kernels.DType, mr int, xp []float32, pk *packed, p int, wf []float32, c []float32, ldc int) {
	switch {
	case pk.k == 0:
		for t := 0; t < mr; t++ {
			clear(c[t*ldc : t*ldc+packNR])
		}
	case mr == 8 && wf != nil:
		b.k.pgemm8F32(xp, wf, pk.k, c, ldc)
	case mr == 8 && dt == kernels.BF16:
		b.k.pgemm8BF16(xp, pk.hp(p), pk.k, c, ldc)
	case mr == 8 && dt == kernels.F16:
		b.k.pgemm8F16(xp, pk.hp(p), pk.k, c, ldc)
	case mr == 8:
		b.k.pgemm8F32(xp, pk.fp(p), pk.k, c, ldc)
	case wf != nil:
		b.k.pgemmF32(xp, wf, pk.k, c, ldc)
	case pk.q != nil:
		b.k.pgemmQ8(xp, pk.qp(p), pk.sp(p), pk.k, c, ldc)
	case dt == kernels.BF16:
		b.k.pgemmBF16(xp, pk.hp(p), pk.k, c, ldc)
	case dt == kernels.F16:
		b.k.pgemmF16(xp, pk.hp(p), pk.k, c, ldc)
	default:
		b.k.pgemmF32(xp, pk.fp(p), pk.k, c, ldc)
	}
}

// gemvPacked2 is the one-token product with multi-panel kernels: each
// thread streams its panels as several sequential streams (its range cut
// in parts, streamed side by side: more loads in flight than one stream
// keeps); outputs are exactly pgemv's. bf16 panels go four at a time where
// the kernel set has it (gemvStreams), int8 ones two at a time.
func (b *Backend) gemvPacked2(x []float32, w *tensor, y []float32) {
	pk := w.pk
	P := (pk.n + packNR - 1) / packNR
	S := 2
	if pk.q == nil && b.k.pgemv4BF16 != nil && b.streams == 4 {
		S = 4
	}
	b.pool.run(P, 1, func(_, lo, hi int) {
		streamPanels(lo, hi, S, pk.n, func(p int) { b.pgemvRow(w.dt, x, pk, p, y) }, func(ps *[4]int) {
			yp := func(p int) []float32 { return y[p*packNR : (p+1)*packNR] }
			switch {
			case S == 4:
				b.k.pgemv4BF16(x, &[4][]uint16{pk.hp(ps[0]), pk.hp(ps[1]), pk.hp(ps[2]), pk.hp(ps[3])}, pk.k,
					&[4][]float32{yp(ps[0]), yp(ps[1]), yp(ps[2]), yp(ps[3])})
			case pk.q != nil:
				b.k.pgemv2Q8(x, pk.qp(ps[0]), pk.qp(ps[1]), pk.sp(ps[0]), pk.sp(ps[1]), pk.k, yp(ps[0]), yp(ps[1]))
			default:
				b.k.pgemv2BF16(x, pk.hp(ps[0]), pk.hp(ps[1]), pk.k, yp(ps[0]), yp(ps[1]))
			}
		})
	})
}

// streamPanels walks panels [lo, hi) of a weight with n rows as S (2 or 4)
// streams side by side (the range cut in S parts): group gets S whole
// panels at a time, one the panels without a whole partner (past the
// range's end, or the ragged last panel of the weight).
func streamPanels(lo, hi, S, n int, one func(p int), group func(ps *[4]int)) {
	part := (hi - lo + S - 1) / S
	for i := 0; i < part; i++ {
		var ps [4]int
		whole := true
		for j := 0; j < S; j++ {
			ps[j] = lo + i + j*part
			if ps[j] >= hi || (ps[j]+1)*packNR > n {
				whole = false
			}
		}
		if whole {
			group(&ps)
			continue
		}
		for j := 0; j < S; j++ {
			if ps[j] < hi {
				one(ps[j])
			}
		}
	}
}

// matmulPacked computes y = x·wᵀ for a packed w.
func (b *Backend) matmulPacked(xin *tensor, T int, w *tensor, y []float32) {
	x := xin.f
	pk := w.pk
	K, N := pk.k, pk.n
	if T == 1 && K > 0 && ((pk.q == nil && w.dt == kernels.BF16 && b.k.pgemv2BF16 != nil) || (pk.q != nil && b.k.pgemv2Q8 != nil)) {
		b.gemvPacked2(x, w, y)
		return
	}
	P := (N + packNR - 1) / packNR
	xp, plan := b.tileForm(xin, T, K, pk.q == nil && b.k.pgemm8F32 != nil)
	// With many tiles (prefill), a bf16/f16 panel is widened once into
	// scratch (exactly: the products are the same) and the tiles read
	// float32; with few (batched decode) the tile kernels widen in
	// registers as they stream the panel from memory, which overlaps the
	// weights' read with the arithmetic (32 sequences: 10-20% faster steps
	// than widening first). int8 panels are always dequantised in
	// registers by the tile kernel itself.
	widen := len(plan.tiles) >= 5 && w.dt != kernels.F32 && pk.q == nil && K > 0
	b.pool.run(P, 1, func(tid, lo, hi int) {
		var c [packMR * packNR]float32
		var wf []float32
		if widen {
			wf = b.scratchFor(tid, packNR*K)[:packNR*K]
		}
		for p := lo; p < hi; p++ {
			cols := min(packNR, N-p*packNR)
			if widen {
				if w.dt == kernels.BF16 {
					b.k.cvtBF16(wf, pk.hp(p))
				} else {
					b.k.cvtF16(wf, pk.hp(p))
				}
			}
			for _, tl := range plan.tiles {
				tile := xp[tl.row*K : (tl.row+tl.mr)*K]
				if rows := min(tl.mr, T-tl.row); rows == tl.mr && cols == packNR {
					// A whole tile: straight into y.
					b.pgemm(w.dt, tl.mr, tile, pk, p, wf, y[tl.row*N+p*packNR:], N)
					continue
				}
				b.pgemm(w.dt, tl.mr, tile, pk, p, wf, c[:], packNR)
				for t := 0; t < tl.mr && tl.row+t < T; t++ {
					copy(y[(tl.row+t)*N+p*packNR:][:cols], c[t*packNR:t*packNR+cols])
				}
			}
			for t := plan.rows; t < T; t++ {
				b.pgemvRow(w.dt, x[t*K:(t+1)*K], pk, p, y[t*N:(t+1)*N])
			}
		}
	})
}

// tileSpan is one tile of a tiling: rows [row, row+mr) of x (the last
// tile may run past T: its extra rows are zero).
type tileSpan struct{ row, mr int }

// tiling is how a product covers x's T rows: tiles of packMR or 8 rows
// (8 only where the kernel set has them), then rows [rows, T) one at a
// time through the one-row kernel (at most 3).
type tiling struct {
	tiles []tileSpan
	rows  int
	has8  bool
}

// planTiles picks the tiling of T rows that computes the fewest padding
// rows, counting an 8-row tile's row 5% dearer than a 14-row tile's (its
// panel loads are spread over fewer tokens) and a row through the one-row
// kernel 3 times dearer. Every kernel runs the same chain per output, so
// the tiling changes no bit of the result.
func planTiles(T int, has8 bool) tiling {
	build := func(mr int) (tiling, float64) {
		t := tiling{has8: has8}
		var cost float64
		row := 0
		for ; T-row >= mr; row += mr {
			t.tiles = append(t.tiles, tileSpan{row, mr})
		}
		rest := T - row
		switch {
		case rest >= 4 && has8 && rest <= 8:
			t.tiles = append(t.tiles, tileSpan{row, 8})
			row += rest
		case rest >= 4:
			t.tiles = append(t.tiles, tileSpan{row, mr})
			row += rest
		}
		t.rows = row
		for _, s := range t.tiles {
			cost += float64(s.mr) * map[bool]float64{true: 1.05, false: 1}[s.mr == 8]
		}
		return t, cost + 3*float64(T-row)
	}
	best, cost := build(packMR)
	if has8 {
		if t, c := build(8); c < cost {
			best = t
		}
	}
	return best
}

// tileForm returns x [T, K] laid out for the tile kernels, each tile's rows
// k-major (xp[row·K + k·mr + t] for the tile at row; padding rows zero),
// and its tiling. It is made once per activation (q, k and v, or gate and
// up, read the same x) and cached with its other derived forms.
func (b *Backend) tileForm(xt *tensor, T, K int, has8 bool) ([]float32, tiling) {
	d := xt.derived(K)
	if d.xp != nil && d.plan.has8 == has8 {
		return d.xp, d.plan
	}
	plan := planTiles(T, has8)
	end := 0
	if n := len(plan.tiles); n > 0 {
		end = plan.tiles[n-1].row + plan.tiles[n-1].mr
	}
	xp := make([]float32, end*K)
	x := xt.f
	b.pool.run(len(plan.tiles), 1, func(_, lo, hi int) {
		for _, tl := range plan.tiles[lo:hi] {
			dst := xp[tl.row*K : (tl.row+tl.mr)*K]
			rows := min(tl.mr, T-tl.row)
			r := x[tl.row*K : (tl.row+rows)*K]
			if rows < packMR || tl.mr != packMR {
				for t := 0; t < rows; t++ {
					for k, v := range r[t*K : (t+1)*K] {
						dst[k*tl.mr+t] = v
					}
				}
				continue
			}
			// A whole 14-row tile: write dst in order, reading the 14 rows
			// side by side (sequential streams both ways).
			for k := 0; k < K; k++ {
				o := dst[k*packMR : k*packMR+packMR]
				o[0], o[1], o[2], o[3], o[4], o[5], o[6] = r[k], r[K+k], r[2*K+k], r[3*K+k], r[4*K+k], r[5*K+k], r[6*K+k]
				o[7], o[8], o[9], o[10], o[11], o[12], o[13] = r[7*K+k], r[8*K+k], r[9*K+k], r[10*K+k], r[11*K+k], r[12*K+k], r[13*K+k]
			}
		}
	})
	d.xp, d.plan = xp, plan
	return xp, plan
}
