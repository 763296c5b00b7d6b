package cpu

import (
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
	"golang.org/x/sys/cpu"
)

//go:noescape
func dot4BF16AVX2(x *float32, w *uint16, stride, n int, out *[4]float32)

//go:noescape
func dot4F16AVX2(x *float32, w *uint16, stride, n int, out *[4]float32)

//go:noescape
func dot4F32AVX2(x *float32, w *float32, stride, n int, out *[4]float32)

//go:noescape
func gemm3x4AVX2(x *float32, ldx int, p *float32, ldp int, n int, c *float32, ldc int)

//go:noescape
func gemm5x4AVX512(x *float32, ldx int, p *float32, ldp int, n int, c *float32, ldc int)

//go:noescape
func pgemv32Q8(x *float32, w *int8, s *float32, k int, y *float32)

//go:noescape
func pgemv32Q8V(u *uint8, xs *float32, w *int8, s *float32, ws *int32, kp int, y *float32)

//go:noescape
func pgemv32x2Q8V(u *uint8, xs *float32, w1, w2 *int8, s1, s2 *float32, ws1, ws2 *int32, kp int, y1, y2 *float32)

//go:noescape
func pgemm8x32Q8V(xt *uint8, xs *float32, w *int8, s *float32, ws *int32, kp int, c *float32)

//go:noescape
func pgemm14x32Q8(xp *float32, w *int8, s *float32, k int, c *float32, ldc int)

//go:noescape
func pgemv32x2Q8(x *float32, w1, w2 *int8, s1, s2 *float32, k int, y1, y2 *float32)

//go:noescape
func pgemv32x2BF16(x *float32, w1, w2 *uint16, k int, y1, y2 *float32)

//go:noescape
func pgemv32x4BF16(x *float32, w *[4]*uint16, k int, y *[4]*float32)

//go:noescape
func pgemv32BF16(x *float32, w *uint16, k int, y *float32)

//go:noescape
func pgemv32F16(x *float32, w *uint16, k int, y *float32)

//go:noescape
func pgemv32F32(x *float32, w *float32, k int, y *float32)

//go:noescape
func pgemm14x32BF16(xp *float32, w *uint16, k int, c *float32, ldc int)

//go:noescape
func pgemm14x32F16(xp *float32, w *uint16, k int, c *float32, ldc int)

//go:noescape
func pgemm14x32F32(xp *float32, w *float32, k int, c *float32, ldc int)

//go:noescape
func pgemm8x32BF16(xp *float32, w *uint16, k int, c *float32, ldc int)

//go:noescape
func pgemm8x32F16(xp *float32, w *uint16, k int, c *float32, ldc int)

//go:noescape
func pgemm8x32F32(xp *float32, w *float32, k int, c *float32, ldc int)

//go:noescape
func gemm1x4BF16AVX512(x *float32, w *uint16, stride int, n int, c *float32)

//go:noescape
func gemm1x4F16AVX512(x *float32, w *uint16, stride int, n int, c *float32)

//go:noescape
func gemm1x4F32AVX512(x *float32, w *float32, stride int, n int, c *float32)

//go:noescape
func dot4BF16AVX512(x *float32, w *uint16, stride, n int, out *[4]float32)

//go:noescape
func pgemm14x32DP(xt *uint32, w *uint16, kp2 int, c *float32, ldc int)

//go:noescape
func pgemv32DP(x *uint32, w *uint16, kp2 int, y *float32)

//go:noescape
func pgemv32x2DP(x *uint32, w1, w2 *uint16, kp2 int, y1, y2 *float32)

func cpuid0() (ebx, edx, ecx uint32)

// cpuVendor is the CPU's vendor string ("GenuineIntel", "AuthenticAMD").
func cpuVendor() string {
	b, d, c := cpuid0()
	s := make([]byte, 0, 12)
	for _, r := range []uint32{b, d, c} {
		s = append(s, byte(r), byte(r>>8), byte(r>>16), byte(r>>24))
	}
	return string(s)
}

// dpFaster reports whether VDPBF16PS outruns float32 FMA here: on AMD
// (Zen 4 and 5) it issues like an FMA and does twice the work; on Intel
// (Sapphire Rapids and later) it is several micro-ops at half the FMA
// rate (measured by qwenctl peak: 86 against 174 GFLOP/s on one core),
// so float32 FMA on widened bf16 weights is the faster product there.
func dpFaster() bool { return cpuVendor() == "AuthenticAMD" }

//go:noescape
func swigluAVX2(gate, up, out *float32, n int)

//go:noescape
func cvtBF16AVX2(dst *float32, src *uint16, n int)

//go:noescape
func scaleMax16(s *float32, n int, scale float32, m *[16]float32)

//go:noescape
func expSum16(s *float32, n int, m float32, sum *[16]float32)

//go:noescape
func cvtBF16AVX512(dst *float32, src *uint16, n int)

//go:noescape
func cvtF16AVX2(dst *float32, src *uint16, n int)

// simdKernels lists the SIMD kernel sets this machine can run, best first.
func simdKernels() []kernelSet {
	if !(cpu.X86.HasAVX2 && cpu.X86.HasFMA && cpu.X86.HasF16C) {
		return nil
	}
	avx2 := kernelSet{
		name:     "avx2",
		dot4BF16: dot4BF16Asm,
		dot4F16:  dot4F16Asm,
		dot4F32:  dot4F32Asm,
		gemm:     gemm3x4Asm,
		gemmRows: 3,
		swiglu:   swigluAsm,
		cvtBF16:  cvtBF16Asm,
		cvtF16:   cvtF16Asm,
	}
	if !(cpu.X86.HasAVX512F && cpu.X86.HasAVX512VL && cpu.X86.HasAVX512DQ) {
		return []kernelSet{avx2}
	}
	// AVX-512: the same memory-bound dot products, a wider GEMM tile.
	avx512 := avx2
	avx512.name, avx512.gemm, avx512.gemmRows = "avx512", gemm5x4Asm, 5
	avx512.dot4BF16 = dot4BF16Asm512
	avx512.cvtBF16 = cvtBF16Asm512
	avx512.scaleMax16 = func(s []float32, scale float32, m *[16]float32) int {
		n := len(s) &^ 15
		if n > 0 {
			scaleMax16(&s[0], n, scale, m)
		}
		return n
	}
	avx512.expSum16 = func(s []float32, m float32, sum *[16]float32) int {
		n := len(s) &^ 15
		if n > 0 {
			expSum16(&s[0], n, m, sum)
		}
		return n
	}
	avx512.gemm1BF16 = func(x []float32, w []uint16, stride, n int, c []float32) {
		gemm1Asm(gemm1x4BF16AVX512, safetensors.BF16ToFloat32, x, w, stride, n, c)
	}
	avx512.gemm1F16 = func(x []float32, w []uint16, stride, n int, c []float32) {
		gemm1Asm(gemm1x4F16AVX512, safetensors.F16ToFloat32, x, w, stride, n, c)
	}
	avx512.pgemvBF16 = func(x []float32, w []uint16, k int, y []float32) {
		_, _, _ = x[k-1], w[32*k-1], y[31]
		pgemv32BF16(&x[0], &w[0], k, &y[0])
	}
	avx512.pgemv2BF16 = func(x []float32, w1, w2 []uint16, k int, y1, y2 []float32) {
		_, _, _, _, _ = x[k-1], w1[32*k-1], w2[32*k-1], y1[31], y2[31]
		pgemv32x2BF16(&x[0], &w1[0], &w2[0], k, &y1[0], &y2[0])
	}
	avx512.pgemv4BF16 = func(x []float32, w *[4][]uint16, k int, y *[4][]float32) {
		var wp [4]*uint16
		var yp [4]*float32
		_ = x[k-1]
		for i := range wp {
			_, _ = w[i][32*k-1], y[i][31]
			wp[i], yp[i] = &w[i][0], &y[i][0]
		}
		pgemv32x4BF16(&x[0], &wp, k, &yp)
	}
	avx512.pgemv2Q8 = func(x []float32, w1, w2 []int8, s1, s2 []float32, k int, y1, y2 []float32) {
		g := 32 * ((k + 31) / 32)
		_, _, _, _, _, _, _ = x[k-1], w1[32*k-1], w2[32*k-1], s1[g-1], s2[g-1], y1[31], y2[31]
		pgemv32x2Q8(&x[0], &w1[0], &w2[0], &s1[0], &s2[0], k, &y1[0], &y2[0])
	}
	avx512.pgemvF16 = func(x []float32, w []uint16, k int, y []float32) {
		_, _, _ = x[k-1], w[32*k-1], y[31]
		pgemv32F16(&x[0], &w[0], k, &y[0])
	}
	avx512.pgemvF32 = func(x []float32, w []float32, k int, y []float32) {
		_, _, _ = x[k-1], w[32*k-1], y[31]
		pgemv32F32(&x[0], &w[0], k, &y[0])
	}
	avx512.pgemmBF16 = func(xp []float32, w []uint16, k int, c []float32, ldc int) {
		_, _, _ = xp[14*k-1], w[32*k-1], c[13*ldc+31]
		pgemm14x32BF16(&xp[0], &w[0], k, &c[0], ldc)
	}
	avx512.pgemmF16 = func(xp []float32, w []uint16, k int, c []float32, ldc int) {
		_, _, _ = xp[14*k-1], w[32*k-1], c[13*ldc+31]
		pgemm14x32F16(&xp[0], &w[0], k, &c[0], ldc)
	}
	avx512.pgemmF32 = func(xp []float32, w []float32, k int, c []float32, ldc int) {
		_, _, _ = xp[14*k-1], w[32*k-1], c[13*ldc+31]
		pgemm14x32F32(&xp[0], &w[0], k, &c[0], ldc)
	}
	avx512.pgemm8BF16 = func(xp []float32, w []uint16, k int, c []float32, ldc int) {
		_, _, _ = xp[8*k-1], w[32*k-1], c[7*ldc+31]
		pgemm8x32BF16(&xp[0], &w[0], k, &c[0], ldc)
	}
	avx512.pgemm8F16 = func(xp []float32, w []uint16, k int, c []float32, ldc int) {
		_, _, _ = xp[8*k-1], w[32*k-1], c[7*ldc+31]
		pgemm8x32F16(&xp[0], &w[0], k, &c[0], ldc)
	}
	avx512.pgemm8F32 = func(xp []float32, w []float32, k int, c []float32, ldc int) {
		_, _, _ = xp[8*k-1], w[32*k-1], c[7*ldc+31]
		pgemm8x32F32(&xp[0], &w[0], k, &c[0], ldc)
	}
	avx512.pgemvQ8 = func(x []float32, w []int8, s []float32, k int, y []float32) {
		_, _, _, _ = x[k-1], w[32*k-1], s[32*((k+31)/32)-1], y[31]
		pgemv32Q8(&x[0], &w[0], &s[0], k, &y[0])
	}
	avx512.pgemmQ8 = func(xp []float32, w []int8, s []float32, k int, c []float32, ldc int) {
		_, _, _, _ = xp[14*k-1], w[32*k-1], s[32*((k+31)/32)-1], c[13*ldc+31]
		pgemm14x32Q8(&xp[0], &w[0], &s[0], k, &c[0], ldc)
	}
	if cpu.X86.HasAVX512VNNI {
		avx512.pgemvQ8V = func(u []uint8, xs []float32, w []int8, s []float32, ws []int32, kp int, y []float32) {
			if kp == 0 {
				clear(y[:packNR])
				return
			}
			g := kp / q8Group
			_, _, _, _, _, _ = u[kp-1], xs[g-1], w[packNR*kp-1], s[packNR*g-1], ws[packNR*g-1], y[packNR-1]
			pgemv32Q8V(&u[0], &xs[0], &w[0], &s[0], &ws[0], kp, &y[0])
		}
		avx512.pgemv2Q8V = func(u []uint8, xs []float32, w1, w2 []int8, s1, s2 []float32, ws1, ws2 []int32, kp int, y1, y2 []float32) {
			if kp == 0 {
				clear(y1[:packNR])
				clear(y2[:packNR])
				return
			}
			g := kp / q8Group
			_, _, _, _, _, _, _, _, _, _ = u[kp-1], xs[g-1], w1[packNR*kp-1], w2[packNR*kp-1], s1[packNR*g-1], s2[packNR*g-1],
				ws1[packNR*g-1], ws2[packNR*g-1], y1[packNR-1], y2[packNR-1]
			pgemv32x2Q8V(&u[0], &xs[0], &w1[0], &w2[0], &s1[0], &s2[0], &ws1[0], &ws2[0], kp, &y1[0], &y2[0])
		}
		avx512.pgemmQ8V = func(xt []uint8, xs []float32, w []int8, s []float32, ws []int32, kp int, c []float32) {
			if kp == 0 {
				clear(c[:q8vMR*packNR])
				return
			}
			g := kp / q8Group
			_, _, _, _, _, _ = xt[q8vMR*kp-1], xs[q8vMR*g-1], w[packNR*kp-1], s[packNR*g-1], ws[packNR*g-1], c[q8vMR*packNR-1]
			pgemm8x32Q8V(&xt[0], &xs[0], &w[0], &s[0], &ws[0], kp, &c[0])
		}
	}
	if cpu.X86.HasAVX512BF16 {
		avx512.pgemvDP = func(x []uint32, w []uint16, kp2 int, y []float32) {
			if kp2 == 0 {
				clear(y[:packNR])
				return
			}
			_, _, _ = x[kp2-1], w[2*packNR*kp2-1], y[packNR-1]
			pgemv32DP(&x[0], &w[0], kp2, &y[0])
		}
		avx512.pgemv2DP = func(x []uint32, w1, w2 []uint16, kp2 int, y1, y2 []float32) {
			if kp2 == 0 {
				clear(y1[:packNR])
				clear(y2[:packNR])
				return
			}
			_, _, _, _, _ = x[kp2-1], w1[2*packNR*kp2-1], w2[2*packNR*kp2-1], y1[packNR-1], y2[packNR-1]
			pgemv32x2DP(&x[0], &w1[0], &w2[0], kp2, &y1[0], &y2[0])
		}
		avx512.pgemmDP = func(xt []uint32, w []uint16, kp2 int, c []float32, ldc int) {
			if kp2 == 0 {
				for t := 0; t < dpMR; t++ {
					clear(c[t*ldc : t*ldc+packNR])
				}
				return
			}
			_, _, _ = xt[dpMR*kp2-1], w[2*packNR*kp2-1], c[(dpMR-1)*ldc+packNR-1]
			pgemm14x32DP(&xt[0], &w[0], kp2, &c[0], ldc)
		}
	}
	avx512.gemm1F32 = func(x []float32, w []float32, stride, n int, c []float32) {
		gemm1Asm(gemm1x4F32AVX512, func(v float32) float32 { return v }, x, w, stride, n, c)
	}
	return []kernelSet{avx512, avx2}
}

// The wrappers check bounds (the assembly does not), run the bulk (a
// multiple of the kernel's width) in assembly and the tail in Go.

func dot4BF16Asm(x []float32, w []uint16, stride int, out *[4]float32) {
	dot4Asm(dot4BF16AVX2, 8, safetensors.BF16ToFloat32, x, w, stride, out)
}

func dot4BF16Asm512(x []float32, w []uint16, stride int, out *[4]float32) {
	dot4Asm(dot4BF16AVX512, 16, safetensors.BF16ToFloat32, x, w, stride, out)
}

func dot4F16Asm(x []float32, w []uint16, stride int, out *[4]float32) {
	dot4Asm(dot4F16AVX2, 8, safetensors.F16ToFloat32, x, w, stride, out)
}

func dot4F32Asm(x []float32, w []float32, stride int, out *[4]float32) {
	dot4Asm(dot4F32AVX2, 8, func(v float32) float32 { return v }, x, w, stride, out)
}

func dot4Asm[T uint16 | float32](kernel func(*float32, *T, int, int, *[4]float32), width int, widen func(T) float32,
	x []float32, w []T, stride int, out *[4]float32) {
	*out = [4]float32{}
	n := len(x)
	if n == 0 {
		return
	}
	_ = w[3*stride+n-1]
	nb := n - n%width
	if nb > 0 {
		kernel(&x[0], &w[0], stride, nb, out)
	}
	for k := nb; k < n; k++ {
		for j := range out {
			out[j] += x[k] * widen(w[j*stride+k])
		}
	}
}

func gemm3x4Asm(x []float32, ldx int, p []float32, ldp int, n int, c []float32, ldc int) {
	gemmAsm(gemm3x4AVX2, 3, 8, x, ldx, p, ldp, n, c, ldc)
}

func gemm5x4Asm(x []float32, ldx int, p []float32, ldp int, n int, c []float32, ldc int) {
	gemmAsm(gemm5x4AVX512, 5, 16, x, ldx, p, ldp, n, c, ldc)
}

// gemmAsm checks bounds, runs the bulk of k (a multiple of width) in kernel
// and adds the tail in Go.
func gemmAsm(kernel func(*float32, int, *float32, int, int, *float32, int), rows, width int,
	x []float32, ldx int, p []float32, ldp int, n int, c []float32, ldc int) {
	if n == 0 {
		return
	}
	_ = x[(rows-1)*ldx+n-1]
	_ = p[3*ldp+n-1]
	_ = c[(rows-1)*ldc+3]
	nb := n - n%width
	if nb > 0 {
		kernel(&x[0], ldx, &p[0], ldp, nb, &c[0], ldc)
	}
	if nb == n {
		return
	}
	for i := 0; i < rows; i++ {
		for j := 0; j < 4; j++ {
			var s float32
			for k := nb; k < n; k++ {
				s += x[i*ldx+k] * p[j*ldp+k]
			}
			c[i*ldc+j] += s
		}
	}
}

func swigluAsm(g, u, out []float32) {
	n := len(out)
	g, u = g[:n], u[:n]
	n8 := n &^ 7
	if n8 > 0 {
		swigluAVX2(&g[0], &u[0], &out[0], n8)
	}
	swigluGo(g[n8:], u[n8:], out[n8:])
}

func cvtBF16Asm(dst []float32, src []uint16) {
	n := len(dst)
	src = src[:n]
	n8 := n &^ 7
	if n8 > 0 {
		cvtBF16AVX2(&dst[0], &src[0], n8)
	}
	for i := n8; i < n; i++ {
		dst[i] = safetensors.BF16ToFloat32(src[i])
	}
}

func cvtBF16Asm512(dst []float32, src []uint16) {
	n := len(dst)
	src = src[:n]
	n32 := n &^ 31
	if n32 > 0 {
		cvtBF16AVX512(&dst[0], &src[0], n32)
	}
	cvtBF16Asm(dst[n32:], src[n32:])
}

func cvtF16Asm(dst []float32, src []uint16) {
	n := len(dst)
	src = src[:n]
	n8 := n &^ 7
	if n8 > 0 {
		cvtF16AVX2(&dst[0], &src[0], n8)
	}
	for i := n8; i < n; i++ {
		dst[i] = safetensors.F16ToFloat32(src[i])
	}
}

// gemm1Asm checks bounds, runs the bulk of k (a multiple of 16) in kernel
// and adds the tail exactly as gemmAsm does for a row of a tile.
func gemm1Asm[T uint16 | float32](kernel func(*float32, *T, int, int, *float32), widen func(T) float32,
	x []float32, w []T, stride, n int, c []float32) {
	if n == 0 {
		return
	}
	_ = x[n-1]
	_ = w[3*stride+n-1]
	_ = c[3]
	nb := n - n%16
	if nb > 0 {
		kernel(&x[0], &w[0], stride, nb, &c[0])
	}
	if nb == n {
		return
	}
	for j := 0; j < 4; j++ {
		var s float32
		for k := nb; k < n; k++ {
			s += x[k] * widen(w[j*stride+k])
		}
		c[j] += s
	}
}
