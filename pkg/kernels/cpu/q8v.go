package cpu

// The int8 path with VNNI (VPDPBUSD): like llama.cpp's q8_0 × q8_0, the
// activations are quantised too, per row in groups of 32 k (scale
// max|x|/127, rounded to even), and each group's dot product is computed
// exactly in int32; it then enters the output's float32 chain as
// float32(isum)·(ws·xs) with one FMA, group after group in order. Integer
// sums do not depend on how the work is blocked and the float chain is the
// same in every kernel, so outputs are batch-invariant here too.
//
// VPDPBUSD multiplies unsigned by signed bytes: activations are stored as
// u = q+128, and 128·Σw (kept per group and row at pack time) is taken off
// the sum.
//
// Layout of a panel (32 weight rows, k padded to whole groups): for every
// 4 consecutive k, 32 rows × 4 bytes, row j's four k together (one int32
// lane of VPDPBUSD); groups of 32 k are 8 such blocks.

const (
	q8vMR = 8 // tokens per tile of the VNNI tile kernel
)

// q8vPad is k rounded up to whole groups.
func q8vPad(k int) int { return q8Groups(k) * q8Group }

// q8vIndex is the position of w[j][c] (j < 32 in the panel) in a panel.
func q8vIndex(j, c int) int { return (c/4)*packNR*4 + j*4 + c%4 }

// quantized holds the forms an activation [T, k] takes for the kernels
// that do not read it row by row: u and s quantised by quantRows (VNNI),
// bf its bf16 pairs (bf16dp.go), xp its float32 tiles (tileForm). Each is made by the first product that needs it;
// every op that changes the activation drops them all.
type quantized struct {
	k    int
	u    []uint8
	s    []float32
	bf   *bf16Act
	xp   []float32 // tiles for the float32 tile kernels (tileForm)
	plan tiling
}

// derived returns t's derived forms for k columns, new if it had none.
func (t *tensor) derived(k int) *quantized {
	if t.qa == nil || t.qa.k != k {
		t.qa = &quantized{k: k}
	}
	return t.qa
}

// quantRows quantises groups [u0, u1) (unit t·G+g is row t's group g) of
// x [T, K] for the VNNI kernels: u[t] is row t as u8 (q+128) padded with
// 128 to kp = q8vPad(K), s[t·G+g] its group scales.
func quantRows(x []float32, K, u0, u1 int, u []uint8, s []float32) {
	kp, G := q8vPad(K), q8Groups(K)
	for unit := u0; unit < u1; unit++ {
		t, g := unit/G, unit%G
		grp := x[t*K+g*q8Group : t*K+min(K, (g+1)*q8Group)]
		dst := u[t*kp+g*q8Group : t*kp+(g+1)*q8Group]
		var m float32
		for _, v := range grp {
			if a := abs32(v); a > m {
				m = a
			}
		}
		sc := m / 127
		s[unit] = sc
		if sc == 0 {
			for i := range dst {
				dst[i] = 128
			}
			continue
		}
		// |v|·(1/sc) ≤ 127 up to rounding, so no clamp is needed: the
		// rounded value is at most 127.
		inv := 1 / sc
		for i, v := range grp {
			dst[i] = uint8(int32(rne(v*inv)) + 128)
		}
		for i := len(grp); i < len(dst); i++ {
			dst[i] = 128
		}
	}
}

// rne rounds v (|v| < 2²²) to the nearest integer, ties to even: adding
// and taking away 1.5·2²³ leaves no fraction bits in float32.
func rne(v float32) float32 {
	const magic = 12582912
	return (v + magic) - magic
}

// pgemvQ8VGo is the reference of the one-row VNNI kernel: y[j] for the
// panel's 32 rows from u (kp bytes), xs (G scales), the panel's weights w,
// scales s[g·32+j] and weight sums ws[g·32+j].
func pgemvQ8VGo(u []uint8, xs []float32, w []int8, s []float32, ws []int32, kp int, y []float32) {
	G := kp / q8Group
	for j := 0; j < packNR; j++ {
		var acc float32
		for g := 0; g < G; g++ {
			var isum int32
			for c := g * q8Group; c < (g+1)*q8Group; c++ {
				isum += int32(u[c]) * int32(w[q8vIndex(j, c)])
			}
			isum -= 128 * ws[g*packNR+j]
			acc = fma32(float32(isum), s[g*packNR+j]*xs[g], acc)
		}
		y[j] = acc
	}
}

// pgemmQ8VGo is the reference of the tile kernel: q8vMR tokens whose bytes
// are interleaved by 4 (xt[(c/4)·32 + t·4 + c%4]) and scales xs[g·8+t],
// into c[t·32+j].
func pgemmQ8VGo(xt []uint8, xs []float32, w []int8, s []float32, ws []int32, kp int, c []float32) {
	G := kp / q8Group
	u := make([]uint8, kp)
	row := make([]float32, G)
	for t := 0; t < q8vMR; t++ {
		for k := 0; k < kp; k++ {
			u[k] = xt[(k/4)*q8vMR*4+t*4+k%4]
		}
		for g := range row {
			row[g] = xs[g*q8vMR+t]
		}
		pgemvQ8VGo(u, row, w, s, ws, kp, c[t*packNR:(t+1)*packNR])
	}
}

// fma32 is a·b+c as VFMADD231PS computes it, but for double-rounding ties:
// the product of two float32s is exact in float64, the sum rounds to
// float64 and then to float32 (the tests compare with a tolerance).
func fma32(a, b, c float32) float32 { return float32(float64(a)*float64(b) + float64(c)) }

// matmulQ8V computes y = x·wᵀ for a VNNI-packed w: the rows of x are
// quantised once, tiles of q8vMR tokens go through the tile kernel (a
// remainder of fewer than 4 tokens row by row), and threads split the
// panels.
func (b *Backend) matmulQ8V(xin *tensor, T int, w *tensor, y []float32) {
	pk := w.pk
	K, N, kp, G := pk.k, pk.n, pk.kp, q8Groups(pk.k)
	P := (N + packNR - 1) / packNR
	qa := xin.derived(K)
	if qa.u == nil {
		qa.u, qa.s = make([]uint8, T*kp), make([]float32, T*G)
		// Quantising is an op of the pool too: its threads stay spinning
		// for the product that follows (a parked thread costs a wake-up).
		b.pool.run(T*G, 1, func(_, lo, hi int) { quantRows(xin.f, K, lo, hi, qa.u, qa.s) })
	}
	u, xs := qa.u, qa.s
	tiles := T / q8vMR
	if T%q8vMR >= 4 {
		tiles++
	}
	// Tile layout: 4 bytes of each token in turn (one VPBROADCASTD each),
	// scales [G][q8vMR]; padding tokens are zero (their outputs are
	// dropped).
	xt := make([]uint8, tiles*kp*q8vMR)
	xst := make([]float32, tiles*G*q8vMR)
	for tl := 0; tl < tiles; tl++ {
		dst, ds := xt[tl*kp*q8vMR:(tl+1)*kp*q8vMR], xst[tl*G*q8vMR:(tl+1)*G*q8vMR]
		for t := 0; t < q8vMR && tl*q8vMR+t < T; t++ {
			row := u[(tl*q8vMR+t)*kp : (tl*q8vMR+t+1)*kp]
			for c4 := 0; c4 < kp/4; c4++ {
				copy(dst[c4*q8vMR*4+t*4:][:4], row[c4*4:])
			}
			for g := 0; g < G; g++ {
				ds[g*q8vMR+t] = xs[(tl*q8vMR+t)*G+g]
			}
		}
	}
	if T == 1 && b.k.pgemv2Q8V != nil {
		// One token: each thread streams its panels as two sequential
		// streams (the halves of its range), like gemvPacked2.
		b.pool.run(P, 1, func(_, lo, hi int) {
			half := (hi - lo + 1) / 2
			row := func(p int) {
				var o [packNR]float32
				b.k.pgemvQ8V(u, xs, pk.qp(p), pk.sp(p), pk.wsp(p), kp, o[:])
				copy(y[p*packNR:], o[:min(packNR, N-p*packNR)])
			}
			for p := lo; p < lo+half; p++ {
				q := p + half
				if q >= hi || (q+1)*packNR > N {
					row(p)
					if q < hi {
						row(q)
					}
					continue
				}
				b.k.pgemv2Q8V(u, xs, pk.qp(p), pk.qp(q), pk.sp(p), pk.sp(q), pk.wsp(p), pk.wsp(q), kp,
					y[p*packNR:(p+1)*packNR], y[q*packNR:(q+1)*packNR])
			}
		})
		return
	}
	b.pool.run(P, 1, func(_, lo, hi int) {
		var c [q8vMR * packNR]float32
		for p := lo; p < hi; p++ {
			cols := min(packNR, N-p*packNR)
			wq, sc, ws := pk.qp(p), pk.sp(p), pk.wsp(p)
			for tl := 0; tl < tiles; tl++ {
				b.k.pgemmQ8V(xt[tl*kp*q8vMR:(tl+1)*kp*q8vMR], xst[tl*G*q8vMR:(tl+1)*G*q8vMR], wq, sc, ws, kp, c[:])
				for t := 0; t < q8vMR && tl*q8vMR+t < T; t++ {
					copy(y[(tl*q8vMR+t)*N+p*packNR:][:cols], c[t*packNR:t*packNR+cols])
				}
			}
			for t := tiles * q8vMR; t < T; t++ {
				if cols == packNR {
					b.k.pgemvQ8V(u[t*kp:(t+1)*kp], xs[t*G:(t+1)*G], wq, sc, ws, kp, y[t*N+p*packNR:][:packNR])
				} else {
					var o [packNR]float32
					b.k.pgemvQ8V(u[t*kp:(t+1)*kp], xs[t*G:(t+1)*G], wq, sc, ws, kp, o[:])
					copy(y[t*N+p*packNR:][:cols], o[:cols])
				}
			}
		}
	})
}
