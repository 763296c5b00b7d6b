#include "textflag.h"

// Reduce the four 16-float accumulators A..D (Z registers below 16) of one
// token to [sum A, sum B, sum C, sum D] and add them to the 4 floats at
// (PTR). Clobbers Y20/X20 and the accumulators.
#define REDUCE4(ZA, ZB, ZC, ZD, YA, YB, YC, YD, XA, PTR) \
	VEXTRACTF64X4 $1, ZA, Y20; \
	VADDPS Y20, YA, YA; \
	VEXTRACTF64X4 $1, ZB, Y20; \
	VADDPS Y20, YB, YB; \
	VEXTRACTF64X4 $1, ZC, Y20; \
	VADDPS Y20, YC, YC; \
	VEXTRACTF64X4 $1, ZD, Y20; \
	VADDPS Y20, YD, YD; \
	VHADDPS YB, YA, YA; \
	VHADDPS YD, YC, YC; \
	VHADDPS YC, YA, YA; \
	VEXTRACTF32X4 $1, YA, X20; \
	VADDPS X20, XA, XA; \
	VADDPS (PTR), XA, XA; \
	VMOVUPS XA, (PTR)

#define G1SETUP(SHIFT) \
	MOVQ x+0(FP), SI; \
	MOVQ w+8(FP), DI; \
	MOVQ stride+16(FP), BX; \
	MOVQ n+24(FP), CX; \
	MOVQ c+32(FP), DX; \
	SHLQ SHIFT, BX; \
	LEAQ (DI)(BX*1), R8; \
	LEAQ (R8)(BX*1), R9; \
	LEAQ (R9)(BX*1), R10; \
	VPXORD Z0, Z0, Z0; \
	VPXORD Z1, Z1, Z1; \
	VPXORD Z2, Z2, Z2; \
	VPXORD Z3, Z3, Z3; \
	XORQ AX, AX

#define G1FMA \
	VFMADD231PS Z16, Z20, Z0; \
	VFMADD231PS Z16, Z21, Z1; \
	VFMADD231PS Z16, Z22, Z2; \
	VFMADD231PS Z16, Z23, Z3

// func gemm5x4AVX512(x *float32, ldx int, p *float32, ldp int, n int, c *float32, ldc int)
// c[i*ldc+j] += sum_k x[i*ldx+k] * p[j*ldp+k] for i < 5, j < 4; n is a multiple of 16.
TEXT ·gemm5x4AVX512(SB), NOSPLIT, $0-56
	MOVQ x+0(FP), SI
	MOVQ ldx+8(FP), AX
	MOVQ p+16(FP), DI
	MOVQ ldp+24(FP), BX
	MOVQ n+32(FP), CX
	SHLQ $2, AX
	SHLQ $2, BX
	LEAQ (SI)(AX*1), R8
	LEAQ (R8)(AX*1), R9
	LEAQ (R9)(AX*1), R10
	LEAQ (R10)(AX*1), R11
	LEAQ (DI)(BX*1), R12
	LEAQ (R12)(BX*1), R13
	ADDQ R13, BX // BX = p3
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	VPXORD Z8, Z8, Z8
	VPXORD Z9, Z9, Z9
	VPXORD Z10, Z10, Z10
	VPXORD Z11, Z11, Z11
	VPXORD Z12, Z12, Z12
	VPXORD Z13, Z13, Z13
	VPXORD Z14, Z14, Z14
	VPXORD Z15, Z15, Z15
	VPXORD Z16, Z16, Z16
	VPXORD Z17, Z17, Z17
	VPXORD Z18, Z18, Z18
	VPXORD Z19, Z19, Z19
	XORQ AX, AX

loop512:
	CMPQ AX, CX
	JGE  done512
	VMOVUPS (DI)(AX*4), Z20
	VMOVUPS (R12)(AX*4), Z21
	VMOVUPS (R13)(AX*4), Z22
	VMOVUPS (BX)(AX*4), Z23
	VMOVUPS (SI)(AX*4), Z24
	VMOVUPS (R8)(AX*4), Z25
	VMOVUPS (R9)(AX*4), Z26
	VMOVUPS (R10)(AX*4), Z27
	VMOVUPS (R11)(AX*4), Z28
	VFMADD231PS Z24, Z20, Z0
	VFMADD231PS Z24, Z21, Z1
	VFMADD231PS Z24, Z22, Z2
	VFMADD231PS Z24, Z23, Z3
	VFMADD231PS Z25, Z20, Z4
	VFMADD231PS Z25, Z21, Z5
	VFMADD231PS Z25, Z22, Z6
	VFMADD231PS Z25, Z23, Z7
	VFMADD231PS Z26, Z20, Z8
	VFMADD231PS Z26, Z21, Z9
	VFMADD231PS Z26, Z22, Z10
	VFMADD231PS Z26, Z23, Z11
	VFMADD231PS Z27, Z20, Z12
	VFMADD231PS Z27, Z21, Z13
	VFMADD231PS Z27, Z22, Z14
	VFMADD231PS Z27, Z23, Z15
	VFMADD231PS Z28, Z20, Z16
	VFMADD231PS Z28, Z21, Z17
	VFMADD231PS Z28, Z22, Z18
	VFMADD231PS Z28, Z23, Z19
	ADDQ $16, AX
	JMP  loop512

done512:
	MOVQ c+40(FP), DX
	MOVQ ldc+48(FP), BX
	SHLQ $2, BX
	REDUCE4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0, DX)
	ADDQ BX, DX
	REDUCE4(Z4, Z5, Z6, Z7, Y4, Y5, Y6, Y7, X4, DX)
	ADDQ BX, DX
	REDUCE4(Z8, Z9, Z10, Z11, Y8, Y9, Y10, Y11, X8, DX)
	ADDQ BX, DX
	REDUCE4(Z12, Z13, Z14, Z15, Y12, Y13, Y14, Y15, X12, DX)
	ADDQ BX, DX
	VMOVAPS Z16, Z0
	VMOVAPS Z17, Z1
	VMOVAPS Z18, Z2
	VMOVAPS Z19, Z3
	REDUCE4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0, DX)
	VZEROUPPER
	RET

// Sum the 16 floats of zmm Z into the low float of X (Z's low quarter);
// clobbers Y21/X21.
#define HSUM16(Z, Y, X) \
	VEXTRACTF64X4 $1, Z, Y21; \
	VADDPS Y21, Y, Y; \
	VEXTRACTF32X4 $1, Y, X21; \
	VADDPS X21, X, X; \
	VHADDPS X, X, X; \
	VHADDPS X, X, X

// func dot4BF16AVX512(x *float32, w *uint16, stride int, n int, out *[4]float32)
// n is a multiple of 16. Two accumulators per row (32 elements a step) keep
// more loads in flight.
TEXT ·dot4BF16AVX512(SB), NOSPLIT, $0-40
	MOVQ x+0(FP), SI
	MOVQ w+8(FP), DI
	MOVQ stride+16(FP), BX
	MOVQ n+24(FP), CX
	MOVQ out+32(FP), DX
	SHLQ $1, BX
	LEAQ (DI)(BX*1), R8
	LEAQ (R8)(BX*1), R9
	LEAQ (R9)(BX*1), R10
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z2, Z2, Z2
	VPXORD Z3, Z3, Z3
	VPXORD Z4, Z4, Z4
	VPXORD Z5, Z5, Z5
	VPXORD Z6, Z6, Z6
	VPXORD Z7, Z7, Z7
	XORQ AX, AX
	MOVQ CX, R11
	SUBQ $16, R11 // last start of a 32-element step

dbloop2:
	CMPQ AX, R11
	JGE  dbloop1
	PREFETCHT0 1024(DI)(AX*2)
	PREFETCHT0 1024(R8)(AX*2)
	PREFETCHT0 1024(R9)(AX*2)
	PREFETCHT0 1024(R10)(AX*2)
	VMOVUPS   (SI)(AX*4), Z16
	VMOVUPS   64(SI)(AX*4), Z17
	VPMOVZXWD (DI)(AX*2), Z20
	VPMOVZXWD (R8)(AX*2), Z21
	VPMOVZXWD (R9)(AX*2), Z22
	VPMOVZXWD (R10)(AX*2), Z23
	VPMOVZXWD 32(DI)(AX*2), Z24
	VPMOVZXWD 32(R8)(AX*2), Z25
	VPMOVZXWD 32(R9)(AX*2), Z26
	VPMOVZXWD 32(R10)(AX*2), Z27
	VPSLLD $16, Z20, Z20
	VPSLLD $16, Z21, Z21
	VPSLLD $16, Z22, Z22
	VPSLLD $16, Z23, Z23
	VPSLLD $16, Z24, Z24
	VPSLLD $16, Z25, Z25
	VPSLLD $16, Z26, Z26
	VPSLLD $16, Z27, Z27
	VFMADD231PS Z16, Z20, Z0
	VFMADD231PS Z16, Z21, Z1
	VFMADD231PS Z16, Z22, Z2
	VFMADD231PS Z16, Z23, Z3
	VFMADD231PS Z17, Z24, Z4
	VFMADD231PS Z17, Z25, Z5
	VFMADD231PS Z17, Z26, Z6
	VFMADD231PS Z17, Z27, Z7
	ADDQ $32, AX
	JMP  dbloop2

dbloop1:
	CMPQ AX, CX
	JGE  dbdone
	VMOVUPS   (SI)(AX*4), Z16
	VPMOVZXWD (DI)(AX*2), Z20
	VPMOVZXWD (R8)(AX*2), Z21
	VPMOVZXWD (R9)(AX*2), Z22
	VPMOVZXWD (R10)(AX*2), Z23
	VPSLLD $16, Z20, Z20
	VPSLLD $16, Z21, Z21
	VPSLLD $16, Z22, Z22
	VPSLLD $16, Z23, Z23
	VFMADD231PS Z16, Z20, Z0
	VFMADD231PS Z16, Z21, Z1
	VFMADD231PS Z16, Z22, Z2
	VFMADD231PS Z16, Z23, Z3
	ADDQ $16, AX
	JMP  dbloop1

dbdone:
	VADDPS Z4, Z0, Z0
	VADDPS Z5, Z1, Z1
	VADDPS Z6, Z2, Z2
	VADDPS Z7, Z3, Z3
	HSUM16(Z0, Y0, X0)
	HSUM16(Z1, Y1, X1)
	HSUM16(Z2, Y2, X2)
	HSUM16(Z3, Y3, X3)
	VMOVSS X0, 0(DX)
	VMOVSS X1, 4(DX)
	VMOVSS X2, 8(DX)
	VMOVSS X3, 12(DX)
	VZEROUPPER
	RET

// One-token tiles with the arithmetic of gemm5x4AVX512's rows: one 16-lane
// accumulator per weight row, k in order, then REDUCE4 adds the four sums
// to c[0..3]. A token's result is bit-identical whether it went through
// gemm5x4 (in a batch) or here (alone); the weights are read (and widened
// exactly) straight from their storage dtype. n is a multiple of 16.

// func gemm1x4BF16AVX512(x *float32, w *uint16, stride int, n int, c *float32)
TEXT ·gemm1x4BF16AVX512(SB), NOSPLIT, $0-40
	G1SETUP($1)
g1b:
	CMPQ AX, CX
	JGE  g1bdone
	PREFETCHT0 1024(DI)(AX*2)
	PREFETCHT0 1024(R8)(AX*2)
	PREFETCHT0 1024(R9)(AX*2)
	PREFETCHT0 1024(R10)(AX*2)
	VMOVUPS   (SI)(AX*4), Z16
	VPMOVZXWD (DI)(AX*2), Z20
	VPMOVZXWD (R8)(AX*2), Z21
	VPMOVZXWD (R9)(AX*2), Z22
	VPMOVZXWD (R10)(AX*2), Z23
	VPSLLD $16, Z20, Z20
	VPSLLD $16, Z21, Z21
	VPSLLD $16, Z22, Z22
	VPSLLD $16, Z23, Z23
	G1FMA
	ADDQ $16, AX
	JMP  g1b
g1bdone:
	REDUCE4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0, DX)
	VZEROUPPER
	RET

// func gemm1x4F16AVX512(x *float32, w *uint16, stride int, n int, c *float32)
TEXT ·gemm1x4F16AVX512(SB), NOSPLIT, $0-40
	G1SETUP($1)
g1h:
	CMPQ AX, CX
	JGE  g1hdone
	PREFETCHT0 1024(DI)(AX*2)
	PREFETCHT0 1024(R8)(AX*2)
	PREFETCHT0 1024(R9)(AX*2)
	PREFETCHT0 1024(R10)(AX*2)
	VMOVUPS   (SI)(AX*4), Z16
	VCVTPH2PS (DI)(AX*2), Z20
	VCVTPH2PS (R8)(AX*2), Z21
	VCVTPH2PS (R9)(AX*2), Z22
	VCVTPH2PS (R10)(AX*2), Z23
	G1FMA
	ADDQ $16, AX
	JMP  g1h
g1hdone:
	REDUCE4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0, DX)
	VZEROUPPER
	RET

// func gemm1x4F32AVX512(x *float32, w *float32, stride int, n int, c *float32)
TEXT ·gemm1x4F32AVX512(SB), NOSPLIT, $0-40
	G1SETUP($2)
g1f:
	CMPQ AX, CX
	JGE  g1fdone
	PREFETCHT0 1024(DI)(AX*4)
	PREFETCHT0 1024(R8)(AX*4)
	PREFETCHT0 1024(R9)(AX*4)
	PREFETCHT0 1024(R10)(AX*4)
	VMOVUPS (SI)(AX*4), Z16
	VMOVUPS (DI)(AX*4), Z20
	VMOVUPS (R8)(AX*4), Z21
	VMOVUPS (R9)(AX*4), Z22
	VMOVUPS (R10)(AX*4), Z23
	G1FMA
	ADDQ $16, AX
	JMP  g1f
g1fdone:
	REDUCE4(Z0, Z1, Z2, Z3, Y0, Y1, Y2, Y3, X0, DX)
	VZEROUPPER
	RET

// func cvtBF16AVX512(dst *float32, src *uint16, n int); n is a multiple of 32.
TEXT ·cvtBF16AVX512(SB), NOSPLIT, $0-24
	MOVQ dst+0(FP), DI
	MOVQ src+8(FP), SI
	MOVQ n+16(FP), CX
	XORQ AX, AX

cvtb512loop:
	CMPQ AX, CX
	JGE  cvtb512done
	VPMOVZXWD (SI)(AX*2), Z0
	VPMOVZXWD 32(SI)(AX*2), Z1
	VPSLLD    $16, Z0, Z0
	VPSLLD    $16, Z1, Z1
	VMOVUPS   Z0, (DI)(AX*4)
	VMOVUPS   Z1, 64(DI)(AX*4)
	ADDQ $32, AX
	JMP  cvtb512loop

cvtb512done:
	VZEROUPPER
	RET

// Softmax rows for attention (ops.go): the exponential is expf's (Cephes:
// range reduction by ln 2, a degree-6 polynomial, scaling by 2^n), 16
// lanes at a time; an argument under expf's lower limit gives 0 as there.
DATA expc<>+0(SB)/4, $0x3fb8aa3b  // log2(e)
DATA expc<>+4(SB)/4, $0x3f318000  // c1
DATA expc<>+8(SB)/4, $0xb95e8083  // c2
DATA expc<>+12(SB)/4, $0x39506967 // p0
DATA expc<>+16(SB)/4, $0x3ab743ce // p1
DATA expc<>+20(SB)/4, $0x3c088908 // p2
DATA expc<>+24(SB)/4, $0x3d2aa9c1 // p3
DATA expc<>+28(SB)/4, $0x3e2aaaaa // p4
DATA expc<>+32(SB)/4, $0x3f000000 // p5
DATA expc<>+36(SB)/4, $0xc2aeac4f // lower limit -87.33654
DATA expc<>+40(SB)/4, $0x3f800000 // 1
GLOBL expc<>(SB), RODATA|NOPTR, $44

// func scaleMax16(s *float32, n int, scale float32, m *[16]float32)
// s[j] *= scale for j < n (a multiple of 16); m[l] = max(m[l], lane l's
// scaled values).
TEXT ·scaleMax16(SB), NOSPLIT, $0-32
	MOVQ s+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS scale+16(FP), Z1
	MOVQ m+24(FP), DX
	VMOVUPS (DX), Z2
	SHRQ $4, CX
	JZ   smdone
smloop:
	VMULPS (SI), Z1, Z0
	VMOVUPS Z0, (SI)
	VMAXPS Z0, Z2, Z2
	ADDQ $64, SI
	DECQ CX
	JNZ  smloop
smdone:
	VMOVUPS Z2, (DX)
	VZEROUPPER
	RET

// func expSum16(s *float32, n int, m float32, sum *[16]float32)
// s[j] = exp(s[j] - m) for j < n (a multiple of 16); sum[l] += lane l's
// values.
TEXT ·expSum16(SB), NOSPLIT, $0-32
	MOVQ s+0(FP), SI
	MOVQ n+8(FP), CX
	VBROADCASTSS m+16(FP), Z1
	MOVQ sum+24(FP), DX
	VMOVUPS (DX), Z2
	VBROADCASTSS expc<>+0(SB), Z16
	VBROADCASTSS expc<>+4(SB), Z17
	VBROADCASTSS expc<>+8(SB), Z18
	VBROADCASTSS expc<>+12(SB), Z19
	VBROADCASTSS expc<>+16(SB), Z20
	VBROADCASTSS expc<>+20(SB), Z21
	VBROADCASTSS expc<>+24(SB), Z22
	VBROADCASTSS expc<>+28(SB), Z23
	VBROADCASTSS expc<>+32(SB), Z24
	VBROADCASTSS expc<>+36(SB), Z25
	VBROADCASTSS expc<>+40(SB), Z26
	SHRQ $4, CX
	JZ   esdone
esloop:
	VMOVUPS (SI), Z0
	VSUBPS Z1, Z0, Z0            // x = s - m
	VCMPPS $1, Z25, Z0, K1       // x < limit: 0
	VMULPS Z16, Z0, Z3           // fx = x·log2e
	VRNDSCALEPS $0, Z3, Z3       // n = round(fx), ties to even
	VFNMADD231PS Z17, Z3, Z0     // r = x - n·c1
	VFNMADD231PS Z18, Z3, Z0     // r -= n·c2
	VMULPS Z0, Z0, Z4            // z = r²
	VMOVAPS Z19, Z5              // Horner: y = p0
	VFMADD213PS Z20, Z0, Z5      // y = y·r + p1
	VFMADD213PS Z21, Z0, Z5
	VFMADD213PS Z22, Z0, Z5
	VFMADD213PS Z23, Z0, Z5
	VFMADD213PS Z24, Z0, Z5      // y = y·r + p5
	VFMADD213PS Z0, Z4, Z5       // y = y·z + r
	VADDPS Z26, Z5, Z5           // y += 1
	VSCALEFPS Z3, Z5, Z5         // y·2^n
	VPXORD Z5, Z5, K1, Z5
	VMOVUPS Z5, (SI)
	VADDPS Z5, Z2, Z2
	ADDQ $64, SI
	DECQ CX
	JNZ  esloop
esdone:
	VMOVUPS Z2, (DX)
	VZEROUPPER
	RET
