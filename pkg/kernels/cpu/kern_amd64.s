#include "textflag.h"

// Horizontal sum of the 8 floats of Y into the low float of X (X is Y's low half);
// T is a scratch X register.
#define HSUM(Y, X, T) \
	VEXTRACTF128 $1, Y, T; \
	VADDPS T, X, X; \
	VHADDPS X, X, X; \
	VHADDPS X, X, X

// func dot4BF16AVX2(x *float32, w *uint16, stride int, n int, out *[4]float32)
// n is a multiple of 8.
TEXT ·dot4BF16AVX2(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ stride+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ out+32(FP), DX
	SHLQ $1, BX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ AX, AX

bf16loop:
	CMPQ AX, CX
	JGE  bf16done
	VMOVUPS   (SI)(AX*4), Y4
	VPMOVZXWD (DI)(AX*2), Y5
	VPMOVZXWD (R8)(AX*2), Y6
	VPMOVZXWD (R9)(AX*2), Y7
	VPMOVZXWD (R10)(AX*2), Y8
	VPSLLD    $16, Y5, Y5
	VPSLLD    $16, Y6, Y6
	VPSLLD    $16, Y7, Y7
	VPSLLD    $16, Y8, Y8
	VFMADD231PS Y4, Y5, Y0
	VFMADD231PS Y4, Y6, Y1
	VFMADD231PS Y4, Y7, Y2
	VFMADD231PS Y4, Y8, Y3
	ADDQ $8, AX
	JMP  bf16loop

bf16done:
	HSUM(Y0, X0, X9)
	HSUM(Y1, X1, X9)
	HSUM(Y2, X2, X9)
	HSUM(Y3, X3, X9)
	VMOVSS X0, 0(DX)
	VMOVSS X1, 4(DX)
	VMOVSS X2, 8(DX)
	VMOVSS X3, 12(DX)
	VZEROUPPER
	RET

// func dot4F16AVX2(x *float32, w *uint16, stride int, n int, out *[4]float32)
TEXT ·dot4F16AVX2(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ stride+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ out+32(FP), DX
	SHLQ $1, BX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ AX, AX

f16loop:
	CMPQ AX, CX
	JGE  f16done
	VMOVUPS   (SI)(AX*4), Y4
	VCVTPH2PS (DI)(AX*2), Y5
	VCVTPH2PS (R8)(AX*2), Y6
	VCVTPH2PS (R9)(AX*2), Y7
	VCVTPH2PS (R10)(AX*2), Y8
	VFMADD231PS Y4, Y5, Y0
	VFMADD231PS Y4, Y6, Y1
	VFMADD231PS Y4, Y7, Y2
	VFMADD231PS Y4, Y8, Y3
	ADDQ $8, AX
	JMP  f16loop

f16done:
	HSUM(Y0, X0, X9)
	HSUM(Y1, X1, X9)
	HSUM(Y2, X2, X9)
	HSUM(Y3, X3, X9)
	VMOVSS X0, 0(DX)
	VMOVSS X1, 4(DX)
	VMOVSS X2, 8(DX)
	VMOVSS X3, 12(DX)
	VZEROUPPER
	RET

// func dot4F32AVX2(x *float32, w *float32, stride int, n int, out *[4]float32)
TEXT ·dot4F32AVX2(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ stride+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ out+32(FP), DX
	SHLQ $2, BX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	XORQ AX, AX

f32loop:
	CMPQ AX, CX
	JGE  f32done
	VMOVUPS (SI)(AX*4), Y4
	VFMADD231PS (DI)(AX*4), Y4, Y0
	VFMADD231PS (R8)(AX*4), Y4, Y1
	VFMADD231PS (R9)(AX*4), Y4, Y2
	VFMADD231PS (R10)(AX*4), Y4, Y3
	ADDQ $8, AX
	JMP  f32loop

f32done:
	HSUM(Y0, X0, X9)
	HSUM(Y1, X1, X9)
	HSUM(Y2, X2, X9)
	HSUM(Y3, X3, X9)
	VMOVSS X0, 0(DX)
	VMOVSS X1, 4(DX)
	VMOVSS X2, 8(DX)
	VMOVSS X3, 12(DX)
	VZEROUPPER
	RET

// Reduce the four 8-float accumulators A..D of one token to
// [sum A, sum B, sum C, sum D] and add them to the 4 floats at (PTR).
// Clobbers X12 and the accumulators.
#define REDUCE4Y(YA, YB, YC, YD, XA, PTR) \
	VHADDPS YB, YA, YA; \
	VHADDPS YD, YC, YC; \
	VHADDPS YC, YA, YA; \
	VEXTRACTF128 $1, YA, X12; \
	VADDPS X12, XA, XA; \
	VADDPS (PTR), XA, XA; \
	VMOVUPS XA, (PTR)

// func gemm3x4AVX2(x *float32, ldx int, p *float32, ldp int, n int, c *float32, ldc int)
// c[i*ldc+j] += sum_k x[i*ldx+k] * p[j*ldp+k], i < 3, j < 4; n is a multiple of 8.
TEXT ·gemm3x4AVX2(SB), NOSPLIT, $0-56
	MOVQ x+0(FP), SI
	MOVQ ldx+8(FP), BX
	MOVQ p+16(FP), DI
	MOVQ ldp+24(FP), R13
	MOVQ n+32(FP), CX
	SHLQ $2, BX
	SHLQ $2, R13
	LEAQ (SI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (DI)(R13*1), R10
	LEAQ (R10)(R13*1), R11
	LEAQ (R11)(R13*1), R12
	VXORPS Y0, Y0, Y0
	VXORPS Y1, Y1, Y1
	VXORPS Y2, Y2, Y2
	VXORPS Y3, Y3, Y3
	VXORPS Y4, Y4, Y4
	VXORPS Y5, Y5, Y5
	VXORPS Y6, Y6, Y6
	VXORPS Y7, Y7, Y7
	VXORPS Y8, Y8, Y8
	VXORPS Y9, Y9, Y9
	VXORPS Y10, Y10, Y10
	VXORPS Y11, Y11, Y11
	XORQ AX, AX

gemmloop:
	CMPQ AX, CX
	JGE  gemmdone
	VMOVUPS (DI)(AX*4), Y12
	VMOVUPS (R10)(AX*4), Y13
	VMOVUPS (R11)(AX*4), Y14
	VMOVUPS (R12)(AX*4), Y15
	VFMADD231PS (SI)(AX*4), Y12, Y0
	VFMADD231PS (SI)(AX*4), Y13, Y1
	VFMADD231PS (SI)(AX*4), Y14, Y2
	VFMADD231PS (SI)(AX*4), Y15, Y3
	VFMADD231PS (R8)(AX*4), Y12, Y4
	VFMADD231PS (R8)(AX*4), Y13, Y5
	VFMADD231PS (R8)(AX*4), Y14, Y6
	VFMADD231PS (R8)(AX*4), Y15, Y7
	VFMADD231PS (R9)(AX*4), Y12, Y8
	VFMADD231PS (R9)(AX*4), Y13, Y9
	VFMADD231PS (R9)(AX*4), Y14, Y10
	VFMADD231PS (R9)(AX*4), Y15, Y11
	ADDQ $8, AX
	JMP  gemmloop

gemmdone:
	MOVQ c+40(FP), DX
	MOVQ ldc+48(FP), BX
	SHLQ $2, BX
	REDUCE4Y(Y0, Y1, Y2, Y3, X0, DX)
	ADDQ BX, DX
	REDUCE4Y(Y4, Y5, Y6, Y7, X4, DX)
	ADDQ BX, DX
	REDUCE4Y(Y8, Y9, Y10, Y11, X8, DX)
	VZEROUPPER
	RET

// func cvtBF16AVX2(dst *float32, src *uint16, n int); n is a multiple of 8.
TEXT ·cvtBF16AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	XORQ AX, AX

cvtbloop:
	CMPQ AX, CX
	JGE  cvtbdone
	VPMOVZXWD (SI)(AX*2), Y0
	VPSLLD    $16, Y0, Y0
	VMOVUPS   Y0, (DI)(AX*4)
	ADDQ $8, AX
	JMP  cvtbloop

cvtbdone:
	VZEROUPPER
	RET

// func cvtF16AVX2(dst *float32, src *uint16, n int); n is a multiple of 8.
TEXT ·cvtF16AVX2(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	XORQ AX, AX

cvthloop:
	CMPQ AX, CX
	JGE  cvthdone
	VCVTPH2PS (SI)(AX*2), Y0
	VMOVUPS   Y0, (DI)(AX*4)
	ADDQ $8, AX
	JMP  cvthloop

cvthdone:
	VZEROUPPER
	RET
