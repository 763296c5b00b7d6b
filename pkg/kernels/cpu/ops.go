package cpu

import (
	"fmt"
	"math"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// Embed gathers rows of table, widened to F32.
func (b *Backend) Embed(table kernels.Tensor, ids []int32) kernels.Tensor {
	tt := cast(table)
	V, H := tt.rows(), tt.cols()
	out := newF32(len(ids), H)
	for i, id := range ids {
		if id < 0 || int(id) >= V {
			panic(fmt.Sprintf("cpu: Embed id %d outside [0, %d)", id, V))
		}
		b.widen(out.f[i*H:(i+1)*H], tt, int(id)*H)
	}
	return out
}

// RMSNorm normalises each row of x and multiplies by w.
func (b *Backend) RMSNorm(x, w kernels.Tensor, eps float32) kernels.Tensor {
	xt := f32(x)
	T, H := xt.rows(), xt.cols()
	wv := b.ToFloat32(w)
	if len(wv) != H {
		panic(fmt.Sprintf("cpu: RMSNorm x %v with w of %d", xt.shape, len(wv)))
	}
	out := newF32(xt.shape...)
	b.pool.run(T, max(1, 16384/max(H, 1)), func(_, lo, hi int) {
		for t := lo; t < hi; t++ {
			row := xt.f[t*H : (t+1)*H]
			var ss float64
			for _, v := range row {
				ss += float64(v) * float64(v)
			}
			r := float32(1 / math.Sqrt(ss/float64(H)+float64(eps)))
			o := out.f[t*H : (t+1)*H]
			for i, v := range row {
				o[i] = wv[i] * (v * r)
			}
		}
	})
	return out
}

// Add adds src into dst.
func (b *Backend) Add(dst, src kernels.Tensor) {
	d, s := f32(dst), f32(src)
	if len(d.f) != len(s.f) {
		panic(fmt.Sprintf("cpu: Add %v += %v", d.shape, s.shape))
	}
	d.qa = nil
	for i, v := range s.f {
		d.f[i] += v
	}
}

// RoPE rotates each head of each row in place (rotate-half pairing).
func (b *Backend) RoPE(x kernels.Tensor, headDim int, pos []int32, r *kernels.Rope) {
	xt := f32(x)
	xt.qa = nil
	T, C := xt.rows(), xt.cols()
	half := headDim / 2
	if len(pos) != T || C%headDim != 0 || len(r.InvFreq) != half {
		panic(fmt.Sprintf("cpu: RoPE x %v headDim %d with %d positions, %d freqs", xt.shape, headDim, len(pos), len(r.InvFreq)))
	}
	cs := make([]float32, 2*half)
	for t := 0; t < T; t++ {
		ropeTable(cs, pos[t], r)
		row := xt.f[t*C : (t+1)*C]
		ropeRow(row, row, headDim, cs)
	}
}

// RoPEMulti returns len(pos)/T rotated copies of each row of x side by
// side (RoPE's arithmetic, so the same bits as RoPE at each position).
func (b *Backend) RoPEMulti(x kernels.Tensor, headDim int, pos []int32, r *kernels.Rope) kernels.Tensor {
	xt := f32(x)
	T, C := xt.rows(), xt.cols()
	half := headDim / 2
	if T == 0 || len(pos)%T != 0 || len(pos) == 0 || C%headDim != 0 || len(r.InvFreq) != half {
		panic(fmt.Sprintf("cpu: RoPEMulti x %v headDim %d with %d positions, %d freqs", xt.shape, headDim, len(pos), len(r.InvFreq)))
	}
	k := len(pos) / T
	out := newF32(T, k*C)
	cs := make([]float32, 2*half)
	for t := 0; t < T; t++ {
		src := xt.f[t*C : (t+1)*C]
		for j := 0; j < k; j++ {
			ropeTable(cs, pos[t*k+j], r)
			o := (t*k + j) * C
			ropeRow(out.f[o:o+C], src, headDim, cs)
		}
	}
	return out
}

// ropeTable fills cs with the cosines (first half) and sines (second half)
// of position p's angles, times r.Scale.
func ropeTable(cs []float32, p int32, r *kernels.Rope) {
	half := len(r.InvFreq)
	pf := float32(p)
	for j, f := range r.InvFreq {
		a := float64(pf * f)
		cs[j] = float32(math.Cos(a)) * r.Scale
		cs[half+j] = float32(math.Sin(a)) * r.Scale
	}
}

// ropeRow writes every head of src, rotated by the table cs, to dst (which
// may be src).
func ropeRow(dst, src []float32, headDim int, cs []float32) {
	half := headDim / 2
	for h := 0; h < len(src); h += headDim {
		v, d := src[h:h+headDim], dst[h:h+headDim]
		for j := 0; j < half; j++ {
			c, s := cs[j], cs[half+j]
			a, bb := v[j], v[j+half]
			d[j] = a*c - bb*s
			d[j+half] = bb*c + a*s
		}
	}
}

// SwiGLU is silu(gate) ⊙ up.
func (b *Backend) SwiGLU(gate, up kernels.Tensor) kernels.Tensor {
	g, u := f32(gate), f32(up)
	if len(g.f) != len(u.f) {
		panic(fmt.Sprintf("cpu: SwiGLU %v with %v", g.shape, u.shape))
	}
	out := newF32(g.shape...)
	b.pool.run(len(g.f), 4096, func(_, lo, hi int) {
		b.k.swiglu(g.f[lo:hi], u.f[lo:hi], out.f[lo:hi])
	})
	return out
}

// WriteKV copies row i of x into row slots[i] of cache.
func (b *Backend) WriteKV(cache, x kernels.Tensor, slots []int32) {
	c, xt := f32(cache), f32(x)
	c.qa = nil
	C := xt.cols()
	if c.cols() != C || len(slots) != xt.rows() {
		panic(fmt.Sprintf("cpu: WriteKV cache %v x %v with %d slots", c.shape, xt.shape, len(slots)))
	}
	for i, s := range slots {
		copy(c.f[int(s)*C:(int(s)+1)*C], xt.f[i*C:(i+1)*C])
	}
}

// attnBlock is the number of key positions one pass of Attention holds:
// blocks are aligned to absolute positions (block j covers [j·attnBlock,
// (j+1)·attnBlock)), so a query row meets the same blocks whatever chunk
// of its sequence it is computed in.
const attnBlock = 256

// attnRows bounds the query rows (times heads per KV head) of one unit.
const attnRows = 512

// Attention is causal attention over paged caches, flash-style: one unit of
// work is a (sequence, KV head, chunk of query rows); the unit walks the
// keys in blocks of attnBlock positions, gathering each block's keys and
// (transposed) values from the pages, multiplies the queries of all heads
// sharing the KV head against them with the GEMM micro-kernel, and folds the
// block into a running maximum, sum and output per row (online softmax). No
// score row longer than a block is ever materialised, so memory per unit
// does not grow with the context.
//
// With DCA (ab.DCAChunk > 0) the online softmax over the blocks is the
// log-sum-exp merge of the intra, successive and inter partial attentions:
// each block's scores are computed with those query variants some row of
// the unit needs for some key of the block (one GEMM each), and each row
// takes, key by key, the score of the variant the key's chunk calls for.
// A row's scores, and so its result, depend only on its own query and
// position, as without DCA; where every key a row sees lies in its own
// chunk it takes the intra scores only, through the same operations as
// plain attention (the same bits).
func (b *Backend) Attention(q, kc, vc kernels.Tensor, ab *kernels.AttnBatch) kernels.Tensor {
	qt, kt, vt := f32(q), f32(kc), f32(vc)
	H, KVH, D := ab.Heads, ab.KVHeads, ab.HeadDim
	if qt.cols() != ab.QueryCols() || kt.cols() != KVH*D || vt.cols() != KVH*D || KVH == 0 || H%KVH != 0 || ab.DCAChunk < 0 {
		panic(fmt.Sprintf("cpu: Attention q %v k %v v %v heads %d/%d dim %d DCA chunk %d", qt.shape, kt.shape, vt.shape, H, KVH, D, ab.DCAChunk))
	}
	out := newF32(qt.rows(), H*D)
	G := H / KVH
	type unit struct{ seq, kvh, i0, i1 int }
	var units []unit
	for si, s := range ab.Seqs {
		chunk := max(1, min(s.N, attnRows/G))
		for g := 0; g < KVH; g++ {
			for i0 := 0; i0 < s.N; i0 += chunk {
				units = append(units, unit{si, g, i0, min(s.N, i0+chunk)})
			}
		}
	}
	b.pool.run(len(units), 1, func(tid, lo, hi int) {
		for _, u := range units[lo:hi] {
			b.attendUnit(qt, kt, vt, out, ab, ab.Seqs[u.seq], u.kvh, u.i0, u.i1, tid)
		}
	})
	return out
}

// attendUnit computes query rows [i0, i1) of sequence s for the G heads of
// KV head g.
func (b *Backend) attendUnit(qt, kt, vt, out *tensor, ab *kernels.AttnBatch, s kernels.AttnSeq, g, i0, i1, tid int) {
	H, KVH, D, bs := ab.Heads, ab.KVHeads, ab.HeadDim, ab.BlockSize
	G, kvStride := H/KVH, KVH*D
	nv, c := 1, ab.DCAChunk // query variants: intra (0), succ (1), inter (2)
	if c > 0 {
		nv = kernels.DCAVariants
	}
	ctx := s.Start + i1 // keys the last row of the unit sees
	M := (i1 - i0) * G
	Mp := M // rows through the GEMMs: whole tiles when batch-invariant
	if mr := b.k.gemmRows; b.invariant {
		Mp = (M + mr - 1) / mr * mr
	}
	const Bk = attnBlock
	buf := b.scratchFor(tid, Bk*D+D*Bk+nv*Mp*D+nv*Mp*Bk+2*Mp*D+3*Mp)
	keys, buf := buf[:Bk*D], buf[Bk*D:]
	valsT, buf := buf[:D*Bk], buf[D*Bk:]
	qs, buf := buf[:nv*Mp*D], buf[nv*Mp*D:]   // variant v's queries at v·Mp·D
	sc, buf := buf[:nv*Mp*Bk], buf[nv*Mp*Bk:] // variant v's scores at v·Mp·Bk
	acc, buf := buf[:Mp*D], buf[Mp*D:]        // running output per row
	pv, buf := buf[:Mp*D], buf[Mp*D:]         // this block's P·V
	mx, sum := buf[:Mp], buf[Mp:2*Mp]         // running maximum and sum per row
	rscale := buf[2*Mp : 3*Mp]                // score scale per row
	for i := i0; i < i1; i++ {
		row := (s.Row + i) * nv * H * D
		for v := 0; v < nv; v++ {
			for hh := 0; hh < G; hh++ {
				h := g*G + hh
				copy(qs[v*Mp*D+((i-i0)*G+hh)*D:], qt.f[row+(v*H+h)*D:row+(v*H+h+1)*D])
			}
		}
	}
	for v := 0; v < nv; v++ {
		clear(qs[v*Mp*D+M*D : (v+1)*Mp*D])
	}
	clear(acc)
	for r := range mx {
		mx[r], sum[r] = float32(math.Inf(-1)), 0
	}
	for r := 0; r < M; r++ {
		rscale[r] = ab.RowScale(s.Start + i0 + r/G)
	}
	var offs [16]int
	for k0 := 0; k0 < ctx; k0 += Bk {
		n := min(Bk, ctx-k0)
		// L: the block's score rows; when batch-invariant, keys are padded
		// with zero keys and weights to a multiple of 16, so neither GEMM
		// takes the micro-kernel's leftover paths differently for a row
		// depending on how many keys the other rows of its unit see.
		L := n
		if b.invariant {
			L = (n + 15) &^ 15
		}
		// Keys are copied row by row; values are transposed in tiles of 16
		// positions, so each write fills a cache line.
		for p0 := 0; p0 < n; p0 += 16 {
			m := min(16, n-p0)
			for k := 0; k < m; k++ {
				p := k0 + p0 + k
				offs[k] = (int(s.Blocks[p/bs])*bs+p%bs)*kvStride + g*D
				copy(keys[(p0+k)*D:(p0+k+1)*D], kt.f[offs[k]:offs[k]+D])
			}
			for e := 0; e < D; e++ {
				dst := valsT[e*L+p0 : e*L+p0+m]
				for k := range dst {
					dst[k] = vt.f[offs[k]+e]
				}
			}
		}
		for e := 0; e < D && L > n; e++ {
			clear(valsT[e*L+n : (e+1)*L])
		}
		clear(keys[n*D : L*D])
		// The variants the block needs: with DCA, row r takes keys
		// [0, dcaSucc(r)) of the block from the inter variant,
		// [dcaSucc(r), dcaIntra(r)) from the successive one and the rest
		// from the intra one (sc itself).
		need := [kernels.DCAVariants]bool{true}
		if nv > 1 {
			need[0] = false
			for r := 0; r < M; r++ {
				valid, bS, bI := dcaSplit(s.Start+i0+r/G, k0, n, c)
				need[0] = need[0] || valid > bI
				need[1] = need[1] || bI > bS
				need[2] = need[2] || bS > 0
			}
		}
		for v := 0; v < nv; v++ {
			if need[v] || v == 0 {
				clear(sc[v*Mp*Bk : v*Mp*Bk+Mp*L])
			}
			if need[v] {
				b.panelMulAdd(qs[v*Mp*D:], D, Mp, D, keys, D, L, sc[v*Mp*Bk:], L)
			}
		}
		for r := 0; r < M; r++ {
			srow := sc[r*L : (r+1)*L]
			p := s.Start + i0 + r/G
			valid := min(n, p+1-k0) // keys of this block the row sees
			if valid <= 0 {
				clear(srow) // a block past the row: nothing changes
				continue
			}
			if nv > 1 {
				_, bS, bI := dcaSplit(p, k0, n, c)
				copy(srow[:bS], sc[2*Mp*Bk+r*L:2*Mp*Bk+r*L+bS])
				copy(srow[bS:bI], sc[Mp*Bk+r*L+bS:Mp*Bk+r*L+bI])
			}
			scale := rscale[r]
			m := mx[r]
			j0 := 0
			if b.k.scaleMax16 != nil { // the bulk in SIMD lanes, the tail here
				lanes := [16]float32{m, m, m, m, m, m, m, m, m, m, m, m, m, m, m, m}
				j0 = b.k.scaleMax16(srow[:valid], scale, &lanes)
				for _, v := range lanes {
					m = max(m, v)
				}
			}
			for j := j0; j < valid; j++ {
				srow[j] *= scale
				m = max(m, srow[j])
			}
			alpha := expf(mx[r] - m) // 0 on the first block (-Inf)
			var bsum float32
			j0 = 0
			if b.k.expSum16 != nil {
				var lanes [16]float32
				j0 = b.k.expSum16(srow[:valid], m, &lanes)
				for _, v := range lanes {
					bsum += v
				}
			}
			for j := j0; j < valid; j++ {
				e := expf(srow[j] - m)
				srow[j] = e
				bsum += e
			}
			clear(srow[valid:])
			mx[r], sum[r] = m, sum[r]*alpha+bsum
			if alpha != 1 {
				for e, v := range acc[r*D : (r+1)*D] {
					acc[r*D+e] = v * alpha
				}
			}
		}
		clear(sc[M*L : Mp*L]) // padding rows weigh nothing
		clear(pv)
		b.panelMulAdd(sc, L, Mp, L, valsT, L, D, pv, D)
		for i, v := range pv[:M*D] {
			acc[i] += v
		}
	}
	for i := i0; i < i1; i++ {
		row := (s.Row + i) * H * D
		for hh := 0; hh < G; hh++ {
			h, r := g*G+hh, (i-i0)*G+hh
			inv := 1 / sum[r]
			dst := out.f[row+h*D : row+(h+1)*D]
			for e, v := range acc[r*D : (r+1)*D] {
				dst[e] = v * inv
			}
		}
	}
}

// dcaSplit places the DCA chunk boundaries of a query at position p in
// the key block [k0, k0+n) (chunk length c): the row sees the block's keys
// [0, valid); those before bS lie in chunks ≥ 2 before the query's (inter
// variant), those in [bS, bI) in the chunk just before it (successive) and
// those in [bI, valid) in its own chunk (intra). All are clamped to
// [0, valid].
func dcaSplit(p, k0, n, c int) (valid, bS, bI int) {
	valid = max(0, min(n, p+1-k0))
	i := p / c // the query's chunk
	bS = min(valid, max(0, (i-1)*c-k0))
	bI = min(valid, max(0, i*c-k0))
	return valid, bS, bI
}

// expf is e^x in float32 (Cephes' expf: range reduction by ln 2 and a
// degree-6 polynomial; within 2 ulp), much cheaper than math.Exp.
func expf(x float32) float32 {
	const (
		log2e = 1.44269504088896341
		c1    = 0.693359375
		c2    = -2.12194440e-4
	)
	if x > 88.72283 {
		return float32(math.Inf(1))
	}
	if x < -87.33654 {
		return 0
	}
	fx := x * log2e
	var n int32
	if fx >= 0 {
		n = int32(fx + 0.5)
	} else {
		n = int32(fx - 0.5)
	}
	fn := float32(n)
	r := x - fn*c1 - fn*c2
	z := r * r
	y := ((((1.9875691500e-4*r+1.3981999507e-3)*r+8.3334519073e-3)*r+4.1665795894e-2)*r+1.6666665459e-1)*r + 5.0000001201e-1
	y = y*z + r + 1
	return y * math.Float32frombits(uint32(n+127)<<23)
}

// Gather copies rows of x.
func (b *Backend) Gather(x kernels.Tensor, rows []int32) kernels.Tensor {
	xt := f32(x)
	C := xt.cols()
	out := newF32(len(rows), C)
	for i, r := range rows {
		copy(out.f[i*C:(i+1)*C], xt.f[int(r)*C:(int(r)+1)*C])
	}
	return out
}

// ScatterAdd adds scale[i]·src[i] into dst[rows[i]].
func (b *Backend) ScatterAdd(dst, src kernels.Tensor, rows []int32, scale []float32) {
	d, s := f32(dst), f32(src)
	d.qa = nil
	C := s.cols()
	if d.cols() != C || len(rows) != s.rows() || len(scale) != len(rows) {
		panic(fmt.Sprintf("cpu: ScatterAdd dst %v src %v with %d rows", d.shape, s.shape, len(rows)))
	}
	for i, r := range rows {
		dr := d.f[int(r)*C : (int(r)+1)*C]
		w := scale[i]
		for e, v := range s.f[i*C : (i+1)*C] {
			dr[e] += w * v
		}
	}
}

// ScaleRows multiplies row i of x by s[i].
func (b *Backend) ScaleRows(x kernels.Tensor, s []float32) {
	xt := f32(x)
	xt.qa = nil
	C := xt.cols()
	if len(s) != xt.rows() {
		panic(fmt.Sprintf("cpu: ScaleRows x %v with %d scales", xt.shape, len(s)))
	}
	for i, w := range s {
		row := xt.f[i*C : (i+1)*C]
		for e := range row {
			row[e] *= w
		}
	}
}
