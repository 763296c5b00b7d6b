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

// STORE28 writes the tile's 14 rows of 32 outputs, R11 bytes apart.
#define STORE28 \
	VMOVUPS Z0, (DX); \
	VMOVUPS Z1, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z2, (DX); \
	VMOVUPS Z3, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z4, (DX); \
	VMOVUPS Z5, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z6, (DX); \
	VMOVUPS Z7, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z8, (DX); \
	VMOVUPS Z9, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z10, (DX); \
	VMOVUPS Z11, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z12, (DX); \
	VMOVUPS Z13, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z14, (DX); \
	VMOVUPS Z15, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z16, (DX); \
	VMOVUPS Z17, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z18, (DX); \
	VMOVUPS Z19, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z20, (DX); \
	VMOVUPS Z21, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z22, (DX); \
	VMOVUPS Z23, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z24, (DX); \
	VMOVUPS Z25, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z26, (DX); \
	VMOVUPS Z27, 64(DX)

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

// func pgemm14x32BF16(xp *float32, w *uint16, k int, c *float32, ldc int)
// c[t*ldc+j] = sum_k xp[k*14+t]*w[k*32+j] for t < 14, j < 32.
TEXT ·pgemm14x32BF16(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
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

// func pgemm14x32F16(xp *float32, w *uint16, k int, c *float32, ldc int)
// c[t*ldc+j] = sum_k xp[k*14+t]*w[k*32+j] for t < 14, j < 32.
TEXT ·pgemm14x32F16(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
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

// func pgemm14x32F32(xp *float32, w *float32, k int, c *float32, ldc int)
// c[t*ldc+j] = sum_k xp[k*14+t]*w[k*32+j] for t < 14, j < 32.
TEXT ·pgemm14x32F32(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
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

// func pgemm14x32Q8(xp *float32, w *int8, s *float32, k int, c *float32, ldc int)
TEXT ·pgemm14x32Q8(SB), NOSPLIT, $0-48
	MOVQ ldc+40(FP), R11
	SHLQ $2, R11
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

// func pgemv32x2BF16(x *float32, w1 *uint16, w2 *uint16, k int, y1 *float32, y2 *float32)
// Two panels at once (two memory streams), each exactly as pgemv32BF16.
TEXT ·pgemv32x2BF16(SB), NOSPLIT, $0-48
	MOVQ x+0(FP), SI
	MOVQ w1+8(FP), DI
	MOVQ w2+16(FP), R9
	MOVQ k+24(FP), CX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	TESTQ CX, CX
	JZ   pv2done
pv2loop:
	PREFETCHT0 4096(DI)
	PREFETCHT0 4096(R9)
	VBROADCASTSS (SI), Z2
	LOADBF16(Z3, Z4)
	VPMOVZXWD (R9), Z5
	VPMOVZXWD 32(R9), Z6
	VPSLLD $16, Z5, Z5
	VPSLLD $16, Z6, Z6
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	VFMADD231PS Z2, Z5, Z7
	VFMADD231PS Z2, Z6, Z8
	ADDQ $4, SI
	ADDQ $64, DI
	ADDQ $64, R9
	DECQ CX
	JNZ  pv2loop
pv2done:
	MOVQ y1+32(FP), DX
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	MOVQ y2+40(FP), DX
	VMOVUPS Z7, (DX)
	VMOVUPS Z8, 64(DX)
	VZEROUPPER
	RET

// func pgemv32x2Q8(x *float32, w1 *int8, w2 *int8, s1 *float32, s2 *float32, k int, y1 *float32, y2 *float32)
// Two int8 panels at once, each exactly as pgemv32Q8.
TEXT ·pgemv32x2Q8(SB), NOSPLIT, $0-64
	MOVQ x+0(FP), SI
	MOVQ w1+8(FP), DI
	MOVQ w2+16(FP), R9
	MOVQ s1+24(FP), BX
	MOVQ s2+32(FP), R10
	MOVQ k+40(FP), CX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	TESTQ CX, CX
	JZ   pv2qdone
pv2qgroup:
	GROUP
	VMOVUPS (BX), Z9
	VMOVUPS 64(BX), Z10
	VMOVUPS (R10), Z11
	VMOVUPS 64(R10), Z12
	ADDQ $128, BX
	ADDQ $128, R10
pv2qloop:
	PREFETCHT0 4096(DI)
	PREFETCHT0 4096(R9)
	VBROADCASTSS (SI), Z2
	LOADQ8(Z3, Z4)
	VPMOVSXBD (R9), Z5
	VPMOVSXBD 16(R9), Z6
	VCVTDQ2PS Z5, Z5
	VCVTDQ2PS Z6, Z6
	VMULPS Z9, Z3, Z3
	VMULPS Z10, Z4, Z4
	VMULPS Z11, Z5, Z5
	VMULPS Z12, Z6, Z6
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	VFMADD231PS Z2, Z5, Z7
	VFMADD231PS Z2, Z6, Z8
	ADDQ $4, SI
	ADDQ $32, DI
	ADDQ $32, R9
	DECQ R8
	JNZ  pv2qloop
	TESTQ CX, CX
	JNZ  pv2qgroup
pv2qdone:
	MOVQ y1+48(FP), DX
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	MOVQ y2+56(FP), DX
	VMOVUPS Z7, (DX)
	VMOVUPS Z8, 64(DX)
	VZEROUPPER
	RET

// bf16 × bf16 products with AVX512_BF16 (bf16dp.go). The Go assembler does
// not know VDPBF16PS; DPBF16(s2, s1, dst) encodes "VDPBF16PS Zs2, Zs1,
// Zdst" (Go operand order; arguments are register numbers 0..31): each
// float32 lane of dst adds the products of its two bf16 pairs,
// dst[i] += s1[2i+1]·s2[2i+1], then += s1[2i]·s2[2i].
#define DPBF16(s2, s1, dst) \
	BYTE $0x62; \
	BYTE $((((dst>>3)&1)^1)<<7 | (((s2>>4)&1)^1)<<6 | (((s2>>3)&1)^1)<<5 | (((dst>>4)&1)^1)<<4 | 2); \
	BYTE $(((s1&15)^15)<<3 | 4 | 2); \
	BYTE $(2<<5 | (((s1>>4)&1)^1)<<3); \
	BYTE $0x52; \
	BYTE $(0xC0 | (dst&7)<<3 | (s2&7))

// Panels in pair layout: for each pair of k, 32 rows × 2 bf16 (row j's
// w[2c], w[2c+1] in one 32-bit lane): 128 bytes, rows 0–15 then 16–31.
// Activations are bf16 pairs too (one uint32 per pair of k).


// func pgemm14x32DP(xt *uint32, w *uint16, kp2 int, c *float32, ldc int)
// c[t*ldc+j] = Σ_c dot(xt[c*14+t], w pair c of row j) for t < 14, j < 32.
TEXT ·pgemm14x32DP(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
	MOVQ xt+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ kp2+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO28
	TESTQ CX, CX
	JZ   pgDPdone
pgDPloop:
	PREFETCHT0 1024(DI)
	VMOVDQU32 (DI), Z28
	VMOVDQU32 64(DI), Z29
	VPBROADCASTD 0(SI), Z30
	DPBF16(30, 28, 0)
	DPBF16(30, 29, 1)
	VPBROADCASTD 4(SI), Z31
	DPBF16(31, 28, 2)
	DPBF16(31, 29, 3)
	VPBROADCASTD 8(SI), Z30
	DPBF16(30, 28, 4)
	DPBF16(30, 29, 5)
	VPBROADCASTD 12(SI), Z31
	DPBF16(31, 28, 6)
	DPBF16(31, 29, 7)
	VPBROADCASTD 16(SI), Z30
	DPBF16(30, 28, 8)
	DPBF16(30, 29, 9)
	VPBROADCASTD 20(SI), Z31
	DPBF16(31, 28, 10)
	DPBF16(31, 29, 11)
	VPBROADCASTD 24(SI), Z30
	DPBF16(30, 28, 12)
	DPBF16(30, 29, 13)
	VPBROADCASTD 28(SI), Z31
	DPBF16(31, 28, 14)
	DPBF16(31, 29, 15)
	VPBROADCASTD 32(SI), Z30
	DPBF16(30, 28, 16)
	DPBF16(30, 29, 17)
	VPBROADCASTD 36(SI), Z31
	DPBF16(31, 28, 18)
	DPBF16(31, 29, 19)
	VPBROADCASTD 40(SI), Z30
	DPBF16(30, 28, 20)
	DPBF16(30, 29, 21)
	VPBROADCASTD 44(SI), Z31
	DPBF16(31, 28, 22)
	DPBF16(31, 29, 23)
	VPBROADCASTD 48(SI), Z30
	DPBF16(30, 28, 24)
	DPBF16(30, 29, 25)
	VPBROADCASTD 52(SI), Z31
	DPBF16(31, 28, 26)
	DPBF16(31, 29, 27)
	ADDQ $56, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  pgDPloop
pgDPdone:
	STORE28
	VZEROUPPER
	RET

// func pgemv32DP(x *uint32, w *uint16, kp2 int, y *float32)
// y[j] = Σ_c dot(x[c], w pair c of row j): one row of the tile, the same
// chain per output.
TEXT ·pgemv32DP(SB), NOSPLIT, $0-32
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ kp2+16(FP), CX
	MOVQ y+24(FP), DX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	TESTQ CX, CX
	JZ   pvDPdone
pvDPloop:
	PREFETCHT0 4096(DI)
	VPBROADCASTD (SI), Z2
	VMOVDQU32 (DI), Z3
	VMOVDQU32 64(DI), Z4
	DPBF16(3, 2, 0)
	DPBF16(4, 2, 1)
	ADDQ $4, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  pvDPloop
pvDPdone:
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	VZEROUPPER
	RET

// func pgemv32x2DP(x *uint32, w1 *uint16, w2 *uint16, kp2 int, y1 *float32, y2 *float32)
// Two panels at once (two memory streams), each exactly as pgemv32DP.
TEXT ·pgemv32x2DP(SB), NOSPLIT, $0-48
	MOVQ x+0(FP), SI
	MOVQ w1+8(FP), DI
	MOVQ w2+16(FP), R9
	MOVQ kp2+24(FP), CX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	TESTQ CX, CX
	JZ   pv2DPdone
pv2DPloop:
	PREFETCHT0 4096(DI)
	PREFETCHT0 4096(R9)
	VPBROADCASTD (SI), Z2
	VMOVDQU32 (DI), Z3
	VMOVDQU32 64(DI), Z4
	VMOVDQU32 (R9), Z5
	VMOVDQU32 64(R9), Z6
	DPBF16(3, 2, 0)
	DPBF16(4, 2, 1)
	DPBF16(5, 2, 7)
	DPBF16(6, 2, 8)
	ADDQ $4, SI
	ADDQ $128, DI
	ADDQ $128, R9
	DECQ CX
	JNZ  pv2DPloop
pv2DPdone:
	MOVQ y1+32(FP), DX
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	MOVQ y2+40(FP), DX
	VMOVUPS Z7, (DX)
	VMOVUPS Z8, 64(DX)
	VZEROUPPER
	RET

// The 8-token tile: x k-major (xp[k*8+t]); Z0..Z15 accumulate.
#define TILE8 \
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
	VFMADD231PS Z31, Z29, Z15

#define ZERO16 \
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
	VPXORD Z15, Z15, Z15

#define STORE16 \
	VMOVUPS Z0, (DX); \
	VMOVUPS Z1, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z2, (DX); \
	VMOVUPS Z3, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z4, (DX); \
	VMOVUPS Z5, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z6, (DX); \
	VMOVUPS Z7, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z8, (DX); \
	VMOVUPS Z9, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z10, (DX); \
	VMOVUPS Z11, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z12, (DX); \
	VMOVUPS Z13, 64(DX); \
	ADDQ R11, DX; \
	VMOVUPS Z14, (DX); \
	VMOVUPS Z15, 64(DX)

// func pgemm8x32F32(xp *float32, w *float32, k int, c *float32, ldc int)
// c[t*ldc+j] = sum_k xp[k*8+t]*w[k*32+j] for t < 8, j < 32: the 14-token
// tile's chains for 8 tokens (batches of 8–40 waste fewer padding rows).
TEXT ·pgemm8x32F32(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO16
	TESTQ CX, CX
	JZ   pgemm8x32F32done
pgemm8x32F32loop:
	PREFETCHT0 512(DI)
	LOADF32(Z28, Z29)
	TILE8
	ADDQ $32, SI
	ADDQ $128, DI
	DECQ CX
	JNZ  pgemm8x32F32loop
pgemm8x32F32done:
	STORE16
	VZEROUPPER
	RET

// func pgemm8x32BF16(xp *float32, w *uint16, k int, c *float32, ldc int)
// c[t*ldc+j] = sum_k xp[k*8+t]*w[k*32+j] for t < 8, j < 32: the 14-token
// tile's chains for 8 tokens (batches of 8–40 waste fewer padding rows).
TEXT ·pgemm8x32BF16(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO16
	TESTQ CX, CX
	JZ   pgemm8x32BF16done
pgemm8x32BF16loop:
	PREFETCHT0 512(DI)
	LOADBF16(Z28, Z29)
	TILE8
	ADDQ $32, SI
	ADDQ $64, DI
	DECQ CX
	JNZ  pgemm8x32BF16loop
pgemm8x32BF16done:
	STORE16
	VZEROUPPER
	RET

// func pgemm8x32F16(xp *float32, w *uint16, k int, c *float32, ldc int)
// c[t*ldc+j] = sum_k xp[k*8+t]*w[k*32+j] for t < 8, j < 32: the 14-token
// tile's chains for 8 tokens (batches of 8–40 waste fewer padding rows).
TEXT ·pgemm8x32F16(SB), NOSPLIT, $0-40
	MOVQ ldc+32(FP), R11
	SHLQ $2, R11
	MOVQ xp+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ k+16(FP), CX
	MOVQ c+24(FP), DX
	ZERO16
	TESTQ CX, CX
	JZ   pgemm8x32F16done
pgemm8x32F16loop:
	PREFETCHT0 512(DI)
	LOADF16(Z28, Z29)
	TILE8
	ADDQ $32, SI
	ADDQ $64, DI
	DECQ CX
	JNZ  pgemm8x32F16loop
pgemm8x32F16done:
	STORE16
	VZEROUPPER
	RET

// func pgemv32x4BF16(x *float32, w *[4]*uint16, k int, y *[4]*float32)
// Four panels at once (four memory streams), each exactly as pgemv32BF16.
TEXT ·pgemv32x4BF16(SB), NOSPLIT, $0-32
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), AX
	MOVQ 0(AX), DI
	MOVQ 8(AX), R9
	MOVQ 16(AX), R10
	MOVQ 24(AX), R12
	MOVQ k+16(FP), CX
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	VPXORD Z9, Z9, Z9
	VPXORD Z10, Z10, Z10
	VPXORD Z11, Z11, Z11
	VPXORD Z12, Z12, Z12
	TESTQ CX, CX
	JZ   pv4done
pv4loop:
	PREFETCHT0 4096(DI)
	PREFETCHT0 4096(R9)
	PREFETCHT0 4096(R10)
	PREFETCHT0 4096(R12)
	VBROADCASTSS (SI), Z2
	VPMOVZXWD (DI), Z3
	VPMOVZXWD 32(DI), Z4
	VPMOVZXWD (R9), Z5
	VPMOVZXWD 32(R9), Z6
	VPMOVZXWD (R10), Z13
	VPMOVZXWD 32(R10), Z14
	VPMOVZXWD (R12), Z15
	VPMOVZXWD 32(R12), Z16
	VPSLLD $16, Z3, Z3
	VPSLLD $16, Z4, Z4
	VPSLLD $16, Z5, Z5
	VPSLLD $16, Z6, Z6
	VPSLLD $16, Z13, Z13
	VPSLLD $16, Z14, Z14
	VPSLLD $16, Z15, Z15
	VPSLLD $16, Z16, Z16
	VFMADD231PS Z2, Z3, Z0
	VFMADD231PS Z2, Z4, Z1
	VFMADD231PS Z2, Z5, Z7
	VFMADD231PS Z2, Z6, Z8
	VFMADD231PS Z2, Z13, Z9
	VFMADD231PS Z2, Z14, Z10
	VFMADD231PS Z2, Z15, Z11
	VFMADD231PS Z2, Z16, Z12
	ADDQ $4, SI
	ADDQ $64, DI
	ADDQ $64, R9
	ADDQ $64, R10
	ADDQ $64, R12
	DECQ CX
	JNZ  pv4loop
pv4done:
	MOVQ y+24(FP), AX
	MOVQ 0(AX), DX
	VMOVUPS Z0, (DX)
	VMOVUPS Z1, 64(DX)
	MOVQ 8(AX), DX
	VMOVUPS Z7, (DX)
	VMOVUPS Z8, 64(DX)
	MOVQ 16(AX), DX
	VMOVUPS Z9, (DX)
	VMOVUPS Z10, 64(DX)
	MOVQ 24(AX), DX
	VMOVUPS Z11, (DX)
	VMOVUPS Z12, 64(DX)
	VZEROUPPER
	RET
