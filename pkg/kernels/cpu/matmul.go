package cpu

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// MatMul computes x·wᵀ (+ bias): x [T, K] F32, w [N, K] in any dtype.
func (b *Backend) MatMul(x, w, bias kernels.Tensor) kernels.Tensor {
	xt, wt := f32(x), cast(w)
	T, K, N := xt.rows(), xt.cols(), wt.rows()
	if wt.cols() != K {
		panic(fmt.Sprintf("cpu: MatMul x %v with w %v", xt.shape, wt.shape))
	}
	out := newF32(T, N)
	switch {
	case T == 0 || N == 0:
	case wt.pk != nil && wt.pk.dp:
		b.matmulDP(xt, T, wt, out.f)
	case wt.pk != nil && wt.pk.vnni:
		b.matmulQ8V(xt, T, wt, out.f)
	case wt.pk != nil:
		b.matmulPacked(xt, T, wt, out.f)
	case T == 1 && !b.invariant:
		b.gemv(xt.f, wt, out.f)
	case T == 1 && b.hasGemm1(wt.dt):
		b.gemv1(xt.f, wt, out.f)
	default:
		b.gemm(xt.f, T, wt, out.f)
	}
	if bias != nil {
		bt := cast(bias)
		if kernels.NumElements(bt.shape) != N {
			panic(fmt.Sprintf("cpu: MatMul bias %v for %d outputs", bt.shape, N))
		}
		bv := b.ToFloat32(bt)
		for t := 0; t < T; t++ {
			row := out.f[t*N : (t+1)*N]
			for i, v := range bv {
				row[i] += v
			}
		}
	}
	return out
}

// dot4 computes four rows of w (r, r+stride, r+2·stride, r+3·stride in rows;
// stride 0 repeats row r) against x.
func (b *Backend) dot4(x []float32, w *tensor, r, stride int, out *[4]float32) {
	K := len(x)
	switch w.dt {
	case kernels.BF16:
		b.k.dot4BF16(x, w.h[r*K:], stride*K, out)
	case kernels.F16:
		b.k.dot4F16(x, w.h[r*K:], stride*K, out)
	default:
		b.k.dot4F32(x, w.f[r*K:], stride*K, out)
	}
}

// gemv is the one-token case: each weight row is streamed once.
func (b *Backend) gemv(x []float32, w *tensor, y []float32) {
	N := len(y)
	b.pool.run(N, 4, func(_, lo, hi int) {
		var o [4]float32
		r := lo
		for ; r+4 <= hi; r += 4 {
			b.dot4(x, w, r, 1, &o)
			copy(y[r:r+4], o[:])
		}
		for ; r < hi; r++ {
			b.dot4(x, w, r, 0, &o)
			y[r] = o[0]
		}
	})
}

func (b *Backend) hasGemm1(dt kernels.DType) bool {
	switch dt {
	case kernels.BF16:
		return b.k.gemm1BF16 != nil
	case kernels.F16:
		return b.k.gemm1F16 != nil
	}
	return b.k.gemm1F32 != nil
}

// gemv1 is the batch-invariant one-token case: the arithmetic of gemm (the
// same k blocks, tile rows and leftover rows) with each weight row streamed
// once, as in gemv.
func (b *Backend) gemv1(x []float32, w *tensor, y []float32) {
	K, N := len(x), len(y)
	b.pool.run(N, 4, func(tid, lo, hi int) {
		full := lo + (hi-lo)&^3
		// Rows outer, k blocks inner: each weight row streams contiguously;
		// y still sums its k blocks in gemm's order.
		for r := lo; r < full; r += 4 {
			for k0 := 0; k0 < K; k0 += gemmKC {
				kn := min(gemmKC, K-k0)
				switch w.dt {
				case kernels.BF16:
					b.k.gemm1BF16(x[k0:k0+kn], w.h[r*K+k0:], K, kn, y[r:r+4])
				case kernels.F16:
					b.k.gemm1F16(x[k0:k0+kn], w.h[r*K+k0:], K, kn, y[r:r+4])
				default:
					b.k.gemm1F32(x[k0:k0+kn], w.f[r*K+k0:], K, kn, y[r:r+4])
				}
			}
		}
		// Rows past the last whole group of 4 (N % 4 of them, at the end),
		// as panelMulAdd does them: widened, then dot4.
		var o [4]float32
		for r := full; r < hi; r++ {
			for k0 := 0; k0 < K; k0 += gemmKC {
				kn := min(gemmKC, K-k0)
				buf := b.scratchFor(tid, kn)[:kn]
				b.widen(buf, w, r*K+k0)
				b.k.dot4F32(x[k0:k0+kn], buf, 0, &o)
				y[r] += o[0]
			}
		}
	})
}

// Cache blocking of gemm: the k dimension is cut into blocks of gemmKC
// columns, so a block of x ([T, gemmKC] float32; 512 KiB for 128 tokens)
// stays in L2 while every panel of weight rows ([gemmP, gemmKC] widened to
// float32, 256 KiB) passes over it. The sizes were tuned on the qwen2-0.5b
// shapes (128-token prefill, Xeon with 1 MiB L2 per core): kc 256/512/1024/
// 2048 × P 32/64/128 gave 82–129 tokens/s, best at 1024 × 64.
const (
	gemmKC = 1024
	gemmP  = 64
)

// gemm is the several-token case. For each k block, the threads split the
// weight rows between them a panel at a time; a thread widens its panel
// into its scratch buffer once and multiplies every row of x against it,
// adding into y.
func (b *Backend) gemm(x []float32, T int, w *tensor, y []float32) {
	K := len(x) / T
	N := len(y) / T
	if mr := b.k.gemmRows; b.invariant && T%mr != 0 {
		// Pad to whole tiles so no row takes the leftover-row path.
		Tp := (T + mr - 1) / mr * mr
		xp := make([]float32, Tp*K)
		copy(xp, x)
		yp := make([]float32, Tp*N)
		b.gemm(xp, Tp, w, yp)
		copy(y, yp[:T*N])
		return
	}
	for k0 := 0; k0 < K; k0 += gemmKC {
		kn := min(gemmKC, K-k0)
		b.pool.run(N, gemmP, func(tid, lo, hi int) {
			var buf []float32
			if w.dt != kernels.F32 {
				buf = b.scratchFor(tid, gemmP*kn)
			}
			for r0 := lo; r0 < hi; r0 += gemmP {
				rows := min(gemmP, hi-r0)
				var p []float32
				ldp := kn
				if w.dt == kernels.F32 {
					p, ldp = w.f[r0*K+k0:], K
				} else {
					p = buf[:rows*kn]
					for j := 0; j < rows; j++ {
						b.widen(p[j*kn:(j+1)*kn], w, (r0+j)*K+k0)
					}
				}
				b.panelMulAdd(x[k0:], K, T, kn, p, ldp, rows, y[r0:], N)
			}
		})
	}
}

// panelMulAdd adds x[t]·p[j] (over n columns) to y[t·ldy+j] for all t < T,
// j < rows; x rows are ldx apart, p rows ldp apart.
func (b *Backend) panelMulAdd(x []float32, ldx, T, n int, p []float32, ldp, rows int, y []float32, ldy int) {
	full := rows &^ 3
	mr := b.k.gemmRows
	var o [4]float32
	t := 0
	for ; t+mr <= T; t += mr {
		for j := 0; j < full; j += 4 {
			b.k.gemm(x[t*ldx:], ldx, p[j*ldp:], ldp, n, y[t*ldy+j:], ldy)
		}
	}
	for ; t < T; t++ {
		xr := x[t*ldx : t*ldx+n]
		for j := 0; j < full; j += 4 {
			b.k.dot4F32(xr, p[j*ldp:], ldp, &o)
			for i, v := range o {
				y[t*ldy+j+i] += v
			}
		}
	}
	for j := full; j < rows; j++ {
		for t := 0; t < T; t++ {
			b.k.dot4F32(x[t*ldx:t*ldx+n], p[j*ldp:], 0, &o)
			y[t*ldy+j] += o[0]
		}
	}
}
