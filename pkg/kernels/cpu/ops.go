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
		b.widenRow(out.f[i*H:(i+1)*H], tt, int(id))
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
	for i, v := range s.f {
		d.f[i] += v
	}
}

// RoPE rotates each head of each row in place (rotate-half pairing).
func (b *Backend) RoPE(x kernels.Tensor, headDim int, pos []int32, r *kernels.Rope) {
	xt := f32(x)
	T, C := xt.rows(), xt.cols()
	half := headDim / 2
	if len(pos) != T || C%headDim != 0 || len(r.InvFreq) != half {
		panic(fmt.Sprintf("cpu: RoPE x %v headDim %d with %d positions, %d freqs", xt.shape, headDim, len(pos), len(r.InvFreq)))
	}
	cs := make([]float32, 2*half)
	for t := 0; t < T; t++ {
		p := float32(pos[t])
		for j, f := range r.InvFreq {
			a := float64(p * f)
			cs[j] = float32(math.Cos(a)) * r.Scale
			cs[half+j] = float32(math.Sin(a)) * r.Scale
		}
		row := xt.f[t*C : (t+1)*C]
		for h := 0; h < C; h += headDim {
			v := row[h : h+headDim]
			for j := 0; j < half; j++ {
				c, s := cs[j], cs[half+j]
				a, bb := v[j], v[j+half]
				v[j] = a*c - bb*s
				v[j+half] = bb*c + a*s
			}
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
		for i := lo; i < hi; i++ {
			v := g.f[i]
			out.f[i] = v / (1 + float32(math.Exp(float64(-v)))) * u.f[i]
		}
	})
	return out
}

// WriteKV copies row i of x into row slots[i] of cache.
func (b *Backend) WriteKV(cache, x kernels.Tensor, slots []int32) {
	c, xt := f32(cache), f32(x)
	C := xt.cols()
	if c.cols() != C || len(slots) != xt.rows() {
		panic(fmt.Sprintf("cpu: WriteKV cache %v x %v with %d slots", c.shape, xt.shape, len(slots)))
	}
	for i, s := range slots {
		copy(c.f[int(s)*C:(int(s)+1)*C], xt.f[i*C:(i+1)*C])
	}
}

// Attention is causal attention over paged caches; one unit of work is one
// (sequence, head) pair.
func (b *Backend) Attention(q, kc, vc kernels.Tensor, ab *kernels.AttnBatch) kernels.Tensor {
	qt, kt, vt := f32(q), f32(kc), f32(vc)
	H, KVH, D, bs := ab.Heads, ab.KVHeads, ab.HeadDim, ab.BlockSize
	if qt.cols() != H*D || kt.cols() != KVH*D || vt.cols() != KVH*D || KVH == 0 || H%KVH != 0 {
		panic(fmt.Sprintf("cpu: Attention q %v k %v v %v heads %d/%d dim %d", qt.shape, kt.shape, vt.shape, H, KVH, D))
	}
	out := newF32(qt.rows(), H*D)
	group, kvStride := H/KVH, KVH*D
	slots := make([][]int32, len(ab.Seqs))
	maxCtx := 0
	for i, s := range ab.Seqs {
		n := s.Start + s.N
		sl := make([]int32, n)
		for p := range sl {
			sl[p] = s.Blocks[p/bs]*int32(bs) + int32(p%bs)
		}
		slots[i] = sl
		maxCtx = max(maxCtx, n)
	}
	b.pool.run(len(ab.Seqs)*H, 1, func(tid, lo, hi int) {
		scores := b.scratchFor(tid, maxCtx)
		for u := lo; u < hi; u++ {
			si, h := u/H, u%H
			s, sl := ab.Seqs[si], slots[si]
			kvOff := (h / group) * D
			for i := 0; i < s.N; i++ {
				row := (s.Row + i) * H * D
				qv := qt.f[row+h*D : row+(h+1)*D]
				ctx := s.Start + i + 1
				m := float32(math.Inf(-1))
				for j := 0; j < ctx; j++ {
					off := int(sl[j])*kvStride + kvOff
					kv := kt.f[off : off+D]
					var d float32
					for e, a := range qv {
						d += a * kv[e]
					}
					d *= ab.Scale
					scores[j] = d
					m = max(m, d)
				}
				var sum float32
				for j := 0; j < ctx; j++ {
					e := float32(math.Exp(float64(scores[j] - m)))
					scores[j] = e
					sum += e
				}
				o := out.f[row+h*D : row+(h+1)*D]
				inv := 1 / sum
				for j := 0; j < ctx; j++ {
					p := scores[j] * inv
					off := int(sl[j])*kvStride + kvOff
					vv := vt.f[off : off+D]
					for e := range o {
						o[e] += p * vv[e]
					}
				}
			}
		}
	})
	return out
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
