#include "textflag.h"

// Kernels over packed weights: a panel holds 32 weight rows (outputs)
// k-major, w[k*32+j]. Every output is one accumulator lane summed over k
// in order with FMA, from zero, so an output comes out bit-identical
// whatever kernel (one row or a 14-row tile) computed it.

// The 14-token tile: x is k-major (xp[k*14+t]); Z28/Z29 hold the 32
// weights of this k as float32; Z0..Z27 accumulate c[t][0:16], c[t][16:32].
#define TILE14 \
	VBROADCASTSS 0(SI), Z30; \
	VFMADD231PS Z30, Z28, Z0; \
	VFMADD231PS Z30, Z29, Z1 \
	VBROADCASTSS 4(SI), Z31; \
	VFMADD231PS Z31, Z28, Z2; \
	VFMADD231PS Z31, Z29, Z3 \
	VBROADCASTSS 8(SI), Z30; \
	VFMADD231PS Z30, Z28, Z4; \
	VFMADD231PS Z30, Z29, Z5 \
	VBROADCASTSS 12(SI), Z31; \
	VFMADD231PS Z31, Z28, Z6; \
	VFMADD231PS Z31, Z29, Z7 \
	VBROADCASTSS 16(SI), Z30; \
	VFMADD231PS Z30, Z28, Z8; \
	VFMADD231PS Z30, Z29, Z9 \
	VBROADCASTSS 20(SI), Z31; \
	VFMADD231PS Z31, Z28, Z10; \
	VFMADD231PS Z31, Z29, Z11 \
	VBROADCASTSS 24(SI), Z30; \
	VFMADD231PS Z30, Z28, Z12; \
	VFMADD231PS Z30, Z29, Z13 \
	VBROADCASTSS 28(SI), Z31; \
	VFMADD231PS Z31, Z28, Z14; \
	VFMADD231PS Z31, Z29, Z15 \
	VBROADCASTSS 32(SI), Z30; \
	VFMADD231PS Z30, Z28, Z16; \
	VFMADD231PS Z30, Z29, Z17 \
	VBROADCASTSS 36(SI), Z31; \
	VFMADD231PS Z31, Z28, Z18; \
	VFMADD231PS Z31, Z29, Z19 \
	VBROADCASTSS 40(SI), Z30; \
	VFMADD231PS Z30, Z28, Z20; \
	VFMADD231PS Z30, Z29, Z21 \
	VBROADCASTSS 44(SI), Z31; \
	VFMADD231PS Z31, Z28, Z22; \
	VFMADD231PS Z31, Z29, Z23 \
	VBROADCASTSS 48(SI), Z30; \
	VFMADD231PS Z30, Z28, Z24; \
	VFMADD231PS Z30, Z29, Z25 \
	VBROADCASTSS 52(SI), Z31; \
	VFMADD231PS Z31, Z28, Z26; \
	VFMADD231PS Z31, Z29, Z27

#define ZERO28 \
	VPXORD Z0, Z0, Z0 \
	VPXORD Z1, Z1, Z1 \
	VPXORD Z2, Z2, Z2 \
	VPXORD Z3, Z3, Z3 \
	VPXORD Z4, Z4, Z4 \
	VPXORD Z5, Z5, Z5 \
	VPXORD Z6, Z6, Z6 \
	VPXORD Z7, Z7, Z7 \
	VPXORD Z8, Z8, Z8 \
	VPXORD Z9, Z9, Z9 \
	VPXORD Z10, Z10, Z10 \
	VPXORD Z11, Z11, Z11 \
	VPXORD Z12, Z12, Z12 \
	VPXORD Z13, Z13, Z13 \
	VPXORD Z14, Z14, Z14 \
	VPXORD Z15, Z15, Z15 \
	VPXORD Z16, Z16, Z16 \
	VPXORD Z17, Z17, Z17 \
	VPXORD Z18, Z18, Z18 \
	VPXORD Z19, Z19, Z19 \
	VPXORD Z20, Z20, Z20 \
	VPXORD Z21, Z21, Z21 \
	VPXORD Z22, Z22, Z22 \
	VPXORD Z23, Z23, Z23 \
	VPXORD Z24, Z24, Z24 \
	VPXORD Z25, Z25, Z25 \
	VPXORD Z26, Z26, Z26 \
	VPXORD Z27, Z27, Z27

#define STORE28 \
	VMOVUPS Z0, 0(DX) \
	VMOVUPS Z1, 64(DX) \
	VMOVUPS Z2, 128(DX) \
	VMOVUPS Z3, 192(DX) \
	VMOVUPS Z4, 256(DX) \
	VMOVUPS Z5, 320(DX) \
	VMOVUPS Z6, 384(DX) \
	VMOVUPS Z7, 448(DX) \
	VMOVUPS Z8, 512(DX) \
	VMOVUPS Z9, 576(DX) \
	VMOVUPS Z10, 640(DX) \
	VMOVUPS Z11, 704(DX) \
	VMOVUPS Z12, 768(DX) \
	VMOVUPS Z13, 832(DX) \
	VMOVUPS Z14, 896(DX) \
	VMOVUPS Z15, 960(DX) \
	VMOVUPS Z16, 1024(DX) \
	VMOVUPS Z17, 1088(DX) \
	VMOVUPS Z18, 1152(DX) \
	VMOVUPS Z19, 1216(DX) \
	VMOVUPS Z20, 1280(DX) \
	VMOVUPS Z21, 1344(DX) \
	VMOVUPS Z22, 1408(DX) \
	VMOVUPS Z23, 1472(DX) \
	VMOVUPS Z24, 1536(DX) \
	VMOVUPS Z25, 1600(DX) \
	VMOVUPS Z26, 1664(DX) \
	VMOVUPS Z27, 1728(DX)

// Weight loads of one k: 32 values into Z28/Z29 (tile) or Z3/Z4 (one row).
#define LOADBF16(A, B) \
	VPMOVZXWD (DI), A; \
	VPMOVZXWD 32(DI), B; \
	VPSLLD $16, A, A; \
	VPSLLD $16, B, B

#define LOADF16(A, B) \
	VCVTPH2PS (DI), A; \
	VCVTPH2PS 32(DI), B

#define LOADF32(A, B) \
	VMOVUPS (DI), A; \
	VMOVUPS 64(DI), B

// func pgemv32BF16(x *float32, w *uint16, k int, y *float32)
// y[j] = sum_k x[k]*w[k*32+j] for j < 32.
TEXT ·pgemv32BF16(SB), NOSPLIT, $0-32
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ y+24(FP), DX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	TESTQ CX, CX
	JZ   pvBF16done
pvBF16loop:
	PREFETCHT0 4096(DI)
	VBROADCASTSS (SI), Z2
	LOADBF16(Z3, Z4)
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	ADDQ $4, SI
	ADDQ $64, DI
	DECQ CX
	JNZ  pvBF16loop
pvBF16done:
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	VZEROUPPER
	RET

// func pgemm14x32BF16(xp *float32, w *uint16, k int, c *float32)
// c[t*32+j] = sum_k xp[k*14+t]*w[k*32+j] for t < 14, j < 32.
TEXT ·pgemm14x32BF16(SB), NOSPLIT, $0-32
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO28
	TESTQ CX, CX
	JZ   pgBF16done
pgBF16loop:
	PREFETCHT0 512(DI)
	LOADBF16(Z28, Z29)
	TILE14
	ADDQ $56, SI
	ADDQ $64, DI
	DECQ CX
	JNZ  pgBF16loop
pgBF16done:
	STORE28
	VZEROUPPER
	RET

// func pgemv32F16(x *float32, w *uint16, k int, y *float32)
// y[j] = sum_k x[k]*w[k*32+j] for j < 32.
TEXT ·pgemv32F16(SB), NOSPLIT, $0-32
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ y+24(FP), DX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	TESTQ CX, CX
	JZ   pvF16done
pvF16loop:
	PREFETCHT0 4096(DI)
	VBROADCASTSS (SI), Z2
	LOADF16(Z3, Z4)
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	ADDQ $4, SI
	ADDQ $64, DI
	DECQ CX
	JNZ  pvF16loop
pvF16done:
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	VZEROUPPER
	RET

// func pgemm14x32F16(xp *float32, w *uint16, k int, c *float32)
// c[t*32+j] = sum_k xp[k*14+t]*w[k*32+j] for t < 14, j < 32.
TEXT ·pgemm14x32F16(SB), NOSPLIT, $0-32
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO28
	TESTQ CX, CX
	JZ   pgF16done
pgF16loop:
	PREFETCHT0 512(DI)
	LOADF16(Z28, Z29)
	TILE14
	ADDQ $56, SI
	ADDQ $64, DI
	DECQ CX
	JNZ  pgF16loop
pgF16done:
	STORE28
	VZEROUPPER
	RET

// func pgemv32F32(x *float32, w *float32, k int, y *float32)
// y[j] = sum_k x[k]*w[k*32+j] for j < 32.
TEXT ·pgemv32F32(SB), NOSPLIT, $0-32
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ y+24(FP), DX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	TESTQ CX, CX
	JZ   pvF32done
pvF32loop:
	PREFETCHT0 4096(DI)
	VBROADCASTSS (SI), Z2
	LOADF32(Z3, Z4)
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	ADDQ $4, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  pvF32loop
pvF32done:
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	VZEROUPPER
	RET

// func pgemm14x32F32(xp *float32, w *float32, k int, c *float32)
// c[t*32+j] = sum_k xp[k*14+t]*w[k*32+j] for t < 14, j < 32.
TEXT ·pgemm14x32F32(SB), NOSPLIT, $0-32
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO28
	TESTQ CX, CX
	JZ   pgF32done
pgF32loop:
	PREFETCHT0 512(DI)
	LOADF32(Z28, Z29)
	TILE14
	ADDQ $56, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  pgF32loop
pgF32done:
	STORE28
	VZEROUPPER
	RET

// Int8 weights in groups of 32 k with one float32 scale per (group,
// output): each weight is dequantised exactly as float32(q)*scale (one
// rounding) and then enters the same FMA chain as a float32 weight.
// s points at the panel's scales, [ceil(k/32)][32].

#define LOADQ8(A, B) \
	VPMOVSXBD (DI), A; \
	VPMOVSXBD 16(DI), B; \
	VCVTDQ2PS A, A; \
	VCVTDQ2PS B, B

// Group loop head: R8 = min(32, CX) k values in this group; CX -= R8.
#define GROUP \
	MOVQ $32, R8; \
	CMPQ CX, R8; \
	CMOVQLT CX, R8; \
	SUBQ R8, CX

// func pgemv32Q8(x *float32, w *int8, s *float32, k int, y *float32)
TEXT ·pgemv32Q8(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ s+16(FP), BX
	MOVQ k+24(FP), CX
	MOVQ y+32(FP), DX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	TESTQ CX, CX
	JZ   pvQ8done
pvQ8group:
	GROUP
	VMOVUPS (BX), Z5
	VMOVUPS 64(BX), Z6
	ADDQ $128, BX
pvQ8loop:
	PREFETCHT0 4096(DI)
	VBROADCASTSS (SI), Z2
	LOADQ8(Z3, Z4)
	VMULPS Z5, Z3, Z3
	VMULPS Z6, Z4, Z4
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	ADDQ $4, SI
	ADDQ $32, DI
	DECQ R8
	JNZ  pvQ8loop
	TESTQ CX, CX
	JNZ  pvQ8group
pvQ8done:
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	VZEROUPPER
	RET

// func pgemm14x32Q8(xp *float32, w *int8, s *float32, k int, c *float32)
TEXT ·pgemm14x32Q8(SB), NOSPLIT, $0-40
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ s+16(FP), BX
	MOVQ k+24(FP), CX
	MOVQ c+32(FP), DX
	ZERO28
	TESTQ CX, CX
	JZ   pgQ8done
pgQ8group:
	GROUP
pgQ8loop:
	PREFETCHT0 256(DI)
	LOADQ8(Z28, Z29)
	VMULPS (BX), Z28, Z28
	VMULPS 64(BX), Z29, Z29
	TILE14
	ADDQ $56, SI
	ADDQ $32, DI
	DECQ R8
	JNZ  pgQ8loop
	ADDQ $128, BX
	TESTQ CX, CX
	JNZ  pgQ8group
pgQ8done:
	STORE28
	VZEROUPPER
	RET
