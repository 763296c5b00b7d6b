package cpu

import "github.com/qwenfleet/qwenfleet/pkg/safetensors"

// kernelSet is one implementation of the inner loops. Every function handles
// any length; SIMD sets run the bulk in assembly and the tail in Go.
type kernelSet struct {
	name string
	// dot4* compute out[j] = Σ_k x[k]·w[j·stride+k] for j < 4, k < len(x).
	dot4BF16 func(x []float32, w []uint16, stride int, out *[4]float32)
	dot4F16  func(x []float32, w []uint16, stride int, out *[4]float32)
	dot4F32  func(x []float32, w []float32, stride int, out *[4]float32)
	// gemm adds Σ_{k<n} x[i·ldx+k]·p[j·ldp+k] to c[i·ldc+j] for
	// i < gemmRows, j < 4: a register-blocked tile of gemmRows tokens by 4
	// weight rows.
	gemm     func(x []float32, ldx int, p []float32, ldp int, n int, c []float32, ldc int)
	gemmRows int
	// gemm1* (optional) add the one-token row of gemm's tile, with gemm's
	// exact arithmetic, reading 4 weight rows (stride apart) in their
	// storage dtype: c[j] += Σ_{k<n} x[k]·w[j·stride+k] for j < 4.
	gemm1BF16 func(x []float32, w []uint16, stride, n int, c []float32)
	gemm1F16  func(x []float32, w []uint16, stride, n int, c []float32)
	gemm1F32  func(x []float32, w []float32, stride, n int, c []float32)
	// pgemv* / pgemm* (optional) are the packed-weight kernels: y[j] =
	// Σ_k x[k]·w[k·32+j] for j < 32, and the same for a 14-token tile whose
	// x is k-major (xp[k·14+t]) into c[t·ldc+j]. Each output is one FMA
	// chain over k in order.
	pgemvBF16, pgemvF16 func(x []float32, w []uint16, k int, y []float32)
	pgemvF32            func(x []float32, w []float32, k int, y []float32)
	// pgemv2BF16 (optional) is pgemvBF16 on two panels at once.
	pgemv2BF16 func(x []float32, w1, w2 []uint16, k int, y1, y2 []float32)
	// pgemv4BF16 (optional) is pgemvBF16 on four panels at once.
	pgemv4BF16          func(x []float32, w *[4][]uint16, k int, y *[4][]float32)
	pgemv2Q8            func(x []float32, w1, w2 []int8, s1, s2 []float32, k int, y1, y2 []float32)
	pgemmBF16, pgemmF16 func(xp []float32, w []uint16, k int, c []float32, ldc int)
	pgemmF32            func(xp []float32, w []float32, k int, c []float32, ldc int)
	// pgemm8* (optional, with pgemm*) are the tile kernels for 8 tokens
	// (xp[k·8+t]): the same chains, fewer padding rows for small batches.
	pgemm8BF16, pgemm8F16 func(xp []float32, w []uint16, k int, c []float32, ldc int)
	pgemm8F32             func(xp []float32, w []float32, k int, c []float32, ldc int)
	// pgemvQ8 / pgemmQ8 take int8 weights in groups of 32 k with scales
	// s[g·32+j]; a weight enters the chain as float32(q)·s.
	pgemvQ8 func(x []float32, w []int8, s []float32, k int, y []float32)
	pgemmQ8 func(xp []float32, w []int8, s []float32, k int, c []float32, ldc int)
	// pgemvQ8V / pgemmQ8V (optional, with pgemvQ8) are the int8 × int8
	// kernels over the VNNI layout (q8v.go): one token, or a tile of
	// q8vMR tokens; kp is k padded to whole groups.
	pgemvQ8V func(u []uint8, xs []float32, w []int8, s []float32, ws []int32, kp int, y []float32)
	pgemmQ8V func(xt []uint8, xs []float32, w []int8, s []float32, ws []int32, kp int, c []float32)
	// pgemv2Q8V (optional) is pgemvQ8V on two panels at once.
	pgemv2Q8V func(u []uint8, xs []float32, w1, w2 []int8, s1, s2 []float32, ws1, ws2 []int32, kp int, y1, y2 []float32)
	// pgemvDP / pgemmDP / pgemv2DP (optional, AVX512_BF16) are the bf16
	// compute kernels over the pair layout (bf16dp.go): one token of kp2
	// bf16 pairs, a tile of dpMR tokens (xt[c·14+t]), or one token on two
	// panels at once.
	pgemvDP  func(x []uint32, w []uint16, kp2 int, y []float32)
	pgemmDP  func(xt []uint32, w []uint16, kp2 int, c []float32, ldc int)
	pgemv2DP func(x []uint32, w1, w2 []uint16, kp2 int, y1, y2 []float32)
	// scaleMax16 and expSum16 (optional) do the bulk of a softmax row, 16
	// lanes at a time, and return how many values they did (a multiple of
	// 16): s[j] *= scale with m[l] the running maximum of lane l; then
	// s[j] = expf(s[j] − m) with sum[l] adding lane l's values.
	scaleMax16 func(s []float32, scale float32, m *[16]float32) int
	expSum16   func(s []float32, m float32, sum *[16]float32) int
	// swiglu writes out[i] = silu(g[i])·u[i] for i < len(out).
	swiglu func(g, u, out []float32)
	// cvt* widen len(dst) elements of src into dst.
	cvtBF16 func(dst []float32, src []uint16)
	cvtF16  func(dst []float32, src []uint16)
}

// genericKernels is the pure-Go reference set.
var genericKernels = kernelSet{
	name:     "generic",
	dot4BF16: dot4BF16Go,
	dot4F16:  dot4F16Go,
	dot4F32:  dot4F32Go,
	gemm:     gemm3x4Go,
	gemmRows: 3,
	swiglu:   swigluGo,
	cvtBF16:  cvtBF16Go,
	cvtF16:   cvtF16Go,
}

func swigluGo(g, u, out []float32) {
	g, u = g[:len(out)], u[:len(out)]
	for i, v := range g {
		out[i] = v / (1 + expf(-v)) * u[i]
	}
}

func dot4BF16Go(x []float32, w []uint16, stride int, out *[4]float32) {
	n := len(x)
	w0, w1, w2, w3 := w[:n], w[stride:stride+n], w[2*stride:2*stride+n], w[3*stride:3*stride+n]
	var s0, s1, s2, s3 float32
	for k, xv := range x {
		s0 += xv * safetensors.BF16ToFloat32(w0[k])
		s1 += xv * safetensors.BF16ToFloat32(w1[k])
		s2 += xv * safetensors.BF16ToFloat32(w2[k])
		s3 += xv * safetensors.BF16ToFloat32(w3[k])
	}
	*out = [4]float32{s0, s1, s2, s3}
}

func dot4F16Go(x []float32, w []uint16, stride int, out *[4]float32) {
	n := len(x)
	w0, w1, w2, w3 := w[:n], w[stride:stride+n], w[2*stride:2*stride+n], w[3*stride:3*stride+n]
	var s0, s1, s2, s3 float32
	for k, xv := range x {
		s0 += xv * safetensors.F16ToFloat32(w0[k])
		s1 += xv * safetensors.F16ToFloat32(w1[k])
		s2 += xv * safetensors.F16ToFloat32(w2[k])
		s3 += xv * safetensors.F16ToFloat32(w3[k])
	}
	*out = [4]float32{s0, s1, s2, s3}
}

func dot4F32Go(x []float32, w []float32, stride int, out *[4]float32) {
	n := len(x)
	w0, w1, w2, w3 := w[:n], w[stride:stride+n], w[2*stride:2*stride+n], w[3*stride:3*stride+n]
	var s0, s1, s2, s3 float32
	for k, xv := range x {
		s0 += xv * w0[k]
		s1 += xv * w1[k]
		s2 += xv * w2[k]
		s3 += xv * w3[k]
	}
	*out = [4]float32{s0, s1, s2, s3}
}

func gemm3x4Go(x []float32, ldx int, p []float32, ldp int, n int, c []float32, ldc int) {
	var out [4]float32
	for i := 0; i < 3; i++ {
		dot4F32Go(x[i*ldx:i*ldx+n], p, ldp, &out)
		for j, v := range out {
			c[i*ldc+j] += v
		}
	}
}

func cvtBF16Go(dst []float32, src []uint16) {
	src = src[:len(dst)]
	for i, h := range src {
		dst[i] = safetensors.BF16ToFloat32(h)
	}
}

func cvtF16Go(dst []float32, src []uint16) {
	src = src[:len(dst)]
	for i, h := range src {
		dst[i] = safetensors.F16ToFloat32(h)
	}
}
