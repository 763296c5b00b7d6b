#include "textflag.h"

// VNNI int8 × int8 kernels over the layout of q8v.go. A group is 8 blocks
// of 4 k: per block, the 32 rows' 4 weight bytes (two zmm) and 4 bytes of
// activations per token, broadcast to every lane; VPDPBUSD adds the four
// u8×s8 products of each lane into its int32 sum. At the end of a group the
// sums lose 128·Σw, become float32 and enter each output's chain with one
// FMA by (weight scale × activation scale).

// Group epilogue of one panel (one token): int32 sums A, B (rows 0-15,
// 16-31) lose 128·Σw (at WS), become float32 and are added to F, G with one
// FMA by weight scale (at S) × activation scale (Z5).
#define EPI1(A, B, WS, S, F, G) \
	VMOVDQU32 (WS), Z3; \
	VMOVDQU32 64(WS), Z4; \
	VPSLLD $7, Z3, Z3; \
	VPSLLD $7, Z4, Z4; \
	VPSUBD Z3, A, A; \
	VPSUBD Z4, B, B; \
	VCVTDQ2PS A, A; \
	VCVTDQ2PS B, B; \
	VMULPS (S), Z5, Z6; \
	VMULPS 64(S), Z5, Z7; \
	VFMADD231PS Z6, A, F; \
	VFMADD231PS Z7, B, G

// func pgemv32Q8V(u *uint8, xs *float32, w *int8, s *float32, ws *int32, kp int, y *float32)
TEXT ·pgemv32Q8V(SB), NOSPLIT, $0-56
	MOVQ u+0(FP), SI
	MOVQ xs+8(FP), R9
	MOVQ w+16(FP), DI
	MOVQ s+24(FP), BX
	MOVQ ws+32(FP), R10
	MOVQ kp+40(FP), CX
	MOVQ y+48(FP), DX
	VPXORD Z8, Z8, Z8
	VPXORD Z9, Z9, Z9
	SHRQ $5, CX
	JZ   pvVdone
pvVgroup:
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	MOVQ $8, R8
pvVloop:
	PREFETCHT0 4096(DI)
	VPBROADCASTD (SI), Z2
	VPDPBUSD (DI), Z2, Z0
	VPDPBUSD 64(DI), Z2, Z1
	ADDQ $4, SI
	ADDQ $128, DI
	DECQ R8
	JNZ  pvVloop
	VBROADCASTSS (R9), Z5
	EPI1(Z0, Z1, R10, BX, Z8, Z9)
	ADDQ $4, R9
	ADDQ $128, BX
	ADDQ $128, R10
	DECQ CX
	JNZ  pvVgroup
pvVdone:
	VMOVUPS Z8, (DX)
	VMOVUPS Z9, 64(DX)
	VZEROUPPER
	RET

// One block of 4 k for the 8-token tile: weights in Z16/Z17, token t's
// four bytes at 4t(SI) into Z(2t), Z(2t+1).
#define BLOCK8 \
	VMOVDQU32 (DI), Z16; \
	VMOVDQU32 64(DI), Z17; \
	VPBROADCASTD 0(SI), Z18; \
	VPDPBUSD Z16, Z18, Z0; \
	VPDPBUSD Z17, Z18, Z1; \
	VPBROADCASTD 4(SI), Z19; \
	VPDPBUSD Z16, Z19, Z2; \
	VPDPBUSD Z17, Z19, Z3; \
	VPBROADCASTD 8(SI), Z18; \
	VPDPBUSD Z16, Z18, Z4; \
	VPDPBUSD Z17, Z18, Z5; \
	VPBROADCASTD 12(SI), Z19; \
	VPDPBUSD Z16, Z19, Z6; \
	VPDPBUSD Z17, Z19, Z7; \
	VPBROADCASTD 16(SI), Z18; \
	VPDPBUSD Z16, Z18, Z8; \
	VPDPBUSD Z17, Z18, Z9; \
	VPBROADCASTD 20(SI), Z19; \
	VPDPBUSD Z16, Z19, Z10; \
	VPDPBUSD Z17, Z19, Z11; \
	VPBROADCASTD 24(SI), Z18; \
	VPDPBUSD Z16, Z18, Z12; \
	VPDPBUSD Z17, Z18, Z13; \
	VPBROADCASTD 28(SI), Z19; \
	VPDPBUSD Z16, Z19, Z14; \
	VPDPBUSD Z17, Z19, Z15

// Group epilogue of token t (sums in A, B; its scale at XOFF(R9); its
// outputs at COFF(DX)): Z20/Z21 hold 128·Σw, Z22/Z23 the weight scales.
#define EPI8(A, B, XOFF, COFF) \
	VPSUBD Z20, A, A; \
	VPSUBD Z21, B, B; \
	VCVTDQ2PS A, A; \
	VCVTDQ2PS B, B; \
	VBROADCASTSS XOFF(R9), Z24; \
	VMULPS Z22, Z24, Z25; \
	VMULPS Z23, Z24, Z26; \
	VMOVUPS COFF(DX), Z27; \
	VFMADD231PS Z25, A, Z27; \
	VMOVUPS Z27, COFF(DX); \
	VMOVUPS COFF+64(DX), Z28; \
	VFMADD231PS Z26, B, Z28; \
	VMOVUPS Z28, COFF+64(DX); \
	VPXORD A, A, A; \
	VPXORD B, B, B

// func pgemm8x32Q8V(xt *uint8, xs *float32, w *int8, s *float32, ws *int32, kp int, c *float32)
TEXT ·pgemm8x32Q8V(SB), NOSPLIT, $0-56
	MOVQ xt+0(FP), SI
	MOVQ xs+8(FP), R9
	MOVQ w+16(FP), DI
	MOVQ s+24(FP), BX
	MOVQ ws+32(FP), R10
	MOVQ kp+40(FP), CX
	MOVQ c+48(FP), DX
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
	MOVQ $16, R8
	MOVQ DX, R11
pgVzero:
	VMOVUPS Z0, (R11)
	ADDQ $64, R11
	DECQ R8
	JNZ  pgVzero
	SHRQ $5, CX
	JZ   pgVdone
pgVgroup:
	MOVQ $8, R8
pgVloop:
	PREFETCHT0 1024(DI)
	BLOCK8
	ADDQ $32, SI
	ADDQ $128, DI
	DECQ R8
	JNZ  pgVloop
	VMOVDQU32 (R10), Z20
	VMOVDQU32 64(R10), Z21
	VPSLLD $7, Z20, Z20
	VPSLLD $7, Z21, Z21
	VMOVUPS (BX), Z22
	VMOVUPS 64(BX), Z23
	EPI8(Z0, Z1, 0, 0)
	EPI8(Z2, Z3, 4, 128)
	EPI8(Z4, Z5, 8, 256)
	EPI8(Z6, Z7, 12, 384)
	EPI8(Z8, Z9, 16, 512)
	EPI8(Z10, Z11, 20, 640)
	EPI8(Z12, Z13, 24, 768)
	EPI8(Z14, Z15, 28, 896)
	ADDQ $32, R9
	ADDQ $128, BX
	ADDQ $128, R10
	DECQ CX
	JNZ  pgVgroup
pgVdone:
	VZEROUPPER
	RET

// func pgemv32x2Q8V(u *uint8, xs *float32, w1, w2 *int8, s1, s2 *float32, ws1, ws2 *int32, kp int, y1, y2 *float32)
// Two panels at once (two memory streams), each exactly as pgemv32Q8V.
TEXT ·pgemv32x2Q8V(SB), NOSPLIT, $0-88
	MOVQ u+0(FP), SI
	MOVQ xs+8(FP), R9
	MOVQ w1+16(FP), DI
	MOVQ w2+24(FP), R11
	MOVQ s1+32(FP), BX
	MOVQ s2+40(FP), R12
	MOVQ ws1+48(FP), R10
	MOVQ ws2+56(FP), R13
	MOVQ kp+64(FP), CX
	MOVQ y1+72(FP), DX
	MOVQ y2+80(FP), AX
	VPXORD Z8, Z8, Z8
	VPXORD Z9, Z9, Z9
	VPXORD Z12, Z12, Z12
	VPXORD Z13, Z13, Z13
	SHRQ $5, CX
	JZ   pv2Vdone
pv2Vgroup:
	VPXORD Z0, Z0, Z0
	VPXORD Z1, Z1, Z1
	VPXORD Z10, Z10, Z10
	VPXORD Z11, Z11, Z11
	MOVQ $8, R8
pv2Vloop:
	PREFETCHT0 4096(DI)
	PREFETCHT0 4096(R11)
	VPBROADCASTD (SI), Z2
	VPDPBUSD (DI), Z2, Z0
	VPDPBUSD 64(DI), Z2, Z1
	VPDPBUSD (R11), Z2, Z10
	VPDPBUSD 64(R11), Z2, Z11
	ADDQ $4, SI
	ADDQ $128, DI
	ADDQ $128, R11
	DECQ R8
	JNZ  pv2Vloop
	VBROADCASTSS (R9), Z5
	EPI1(Z0, Z1, R10, BX, Z8, Z9)
	EPI1(Z10, Z11, R13, R12, Z12, Z13)
	ADDQ $4, R9
	ADDQ $128, BX
	ADDQ $128, R12
	ADDQ $128, R10
	ADDQ $128, R13
	DECQ CX
	JNZ  pv2Vgroup
pv2Vdone:
	VMOVUPS Z8, (DX)
	VMOVUPS Z9, 64(DX)
	VMOVUPS Z12, (AX)
	VMOVUPS Z13, 64(AX)
	VZEROUPPER
	RET
