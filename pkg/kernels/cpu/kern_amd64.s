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

// Constants of swigluAVX2, each replicated to a 32-byte vector:
// log2e, c1, c2, p0..p5 (Cephes expf), 1, 88, -87, int 127.
DATA expc<>+0(SB)/4, $0x3fb8aa3b // log2e
DATA expc<>+4(SB)/4, $0x3fb8aa3b
DATA expc<>+8(SB)/4, $0x3fb8aa3b
DATA expc<>+12(SB)/4, $0x3fb8aa3b
DATA expc<>+16(SB)/4, $0x3fb8aa3b
DATA expc<>+20(SB)/4, $0x3fb8aa3b
DATA expc<>+24(SB)/4, $0x3fb8aa3b
DATA expc<>+28(SB)/4, $0x3fb8aa3b
DATA expc<>+32(SB)/4, $0x3f318000 // c1
DATA expc<>+36(SB)/4, $0x3f318000
DATA expc<>+40(SB)/4, $0x3f318000
DATA expc<>+44(SB)/4, $0x3f318000
DATA expc<>+48(SB)/4, $0x3f318000
DATA expc<>+52(SB)/4, $0x3f318000
DATA expc<>+56(SB)/4, $0x3f318000
DATA expc<>+60(SB)/4, $0x3f318000
DATA expc<>+64(SB)/4, $0xb95e8083 // c2
DATA expc<>+68(SB)/4, $0xb95e8083
DATA expc<>+72(SB)/4, $0xb95e8083
DATA expc<>+76(SB)/4, $0xb95e8083
DATA expc<>+80(SB)/4, $0xb95e8083
DATA expc<>+84(SB)/4, $0xb95e8083
DATA expc<>+88(SB)/4, $0xb95e8083
DATA expc<>+92(SB)/4, $0xb95e8083
DATA expc<>+96(SB)/4, $0x39506967 // p0
DATA expc<>+100(SB)/4, $0x39506967
DATA expc<>+104(SB)/4, $0x39506967
DATA expc<>+108(SB)/4, $0x39506967
DATA expc<>+112(SB)/4, $0x39506967
DATA expc<>+116(SB)/4, $0x39506967
DATA expc<>+120(SB)/4, $0x39506967
DATA expc<>+124(SB)/4, $0x39506967
DATA expc<>+128(SB)/4, $0x3ab743ce // p1
DATA expc<>+132(SB)/4, $0x3ab743ce
DATA expc<>+136(SB)/4, $0x3ab743ce
DATA expc<>+140(SB)/4, $0x3ab743ce
DATA expc<>+144(SB)/4, $0x3ab743ce
DATA expc<>+148(SB)/4, $0x3ab743ce
DATA expc<>+152(SB)/4, $0x3ab743ce
DATA expc<>+156(SB)/4, $0x3ab743ce
DATA expc<>+160(SB)/4, $0x3c088908 // p2
DATA expc<>+164(SB)/4, $0x3c088908
DATA expc<>+168(SB)/4, $0x3c088908
DATA expc<>+172(SB)/4, $0x3c088908
DATA expc<>+176(SB)/4, $0x3c088908
DATA expc<>+180(SB)/4, $0x3c088908
DATA expc<>+184(SB)/4, $0x3c088908
DATA expc<>+188(SB)/4, $0x3c088908
DATA expc<>+192(SB)/4, $0x3d2aa9c1 // p3
DATA expc<>+196(SB)/4, $0x3d2aa9c1
DATA expc<>+200(SB)/4, $0x3d2aa9c1
DATA expc<>+204(SB)/4, $0x3d2aa9c1
DATA expc<>+208(SB)/4, $0x3d2aa9c1
DATA expc<>+212(SB)/4, $0x3d2aa9c1
DATA expc<>+216(SB)/4, $0x3d2aa9c1
DATA expc<>+220(SB)/4, $0x3d2aa9c1
DATA expc<>+224(SB)/4, $0x3e2aaaaa // p4
DATA expc<>+228(SB)/4, $0x3e2aaaaa
DATA expc<>+232(SB)/4, $0x3e2aaaaa
DATA expc<>+236(SB)/4, $0x3e2aaaaa
DATA expc<>+240(SB)/4, $0x3e2aaaaa
DATA expc<>+244(SB)/4, $0x3e2aaaaa
DATA expc<>+248(SB)/4, $0x3e2aaaaa
DATA expc<>+252(SB)/4, $0x3e2aaaaa
DATA expc<>+256(SB)/4, $0x3f000000 // p5
DATA expc<>+260(SB)/4, $0x3f000000
DATA expc<>+264(SB)/4, $0x3f000000
DATA expc<>+268(SB)/4, $0x3f000000
DATA expc<>+272(SB)/4, $0x3f000000
DATA expc<>+276(SB)/4, $0x3f000000
DATA expc<>+280(SB)/4, $0x3f000000
DATA expc<>+284(SB)/4, $0x3f000000
DATA expc<>+288(SB)/4, $0x3f800000 // one
DATA expc<>+292(SB)/4, $0x3f800000
DATA expc<>+296(SB)/4, $0x3f800000
DATA expc<>+300(SB)/4, $0x3f800000
DATA expc<>+304(SB)/4, $0x3f800000
DATA expc<>+308(SB)/4, $0x3f800000
DATA expc<>+312(SB)/4, $0x3f800000
DATA expc<>+316(SB)/4, $0x3f800000
DATA expc<>+320(SB)/4, $0x42b00000 // hi
DATA expc<>+324(SB)/4, $0x42b00000
DATA expc<>+328(SB)/4, $0x42b00000
DATA expc<>+332(SB)/4, $0x42b00000
DATA expc<>+336(SB)/4, $0x42b00000
DATA expc<>+340(SB)/4, $0x42b00000
DATA expc<>+344(SB)/4, $0x42b00000
DATA expc<>+348(SB)/4, $0x42b00000
DATA expc<>+352(SB)/4, $0xc2ae0000 // lo
DATA expc<>+356(SB)/4, $0xc2ae0000
DATA expc<>+360(SB)/4, $0xc2ae0000
DATA expc<>+364(SB)/4, $0xc2ae0000
DATA expc<>+368(SB)/4, $0xc2ae0000
DATA expc<>+372(SB)/4, $0xc2ae0000
DATA expc<>+376(SB)/4, $0xc2ae0000
DATA expc<>+380(SB)/4, $0xc2ae0000
DATA expc<>+384(SB)/4, $0x7f // i127
DATA expc<>+388(SB)/4, $0x7f
DATA expc<>+392(SB)/4, $0x7f
DATA expc<>+396(SB)/4, $0x7f
DATA expc<>+400(SB)/4, $0x7f
DATA expc<>+404(SB)/4, $0x7f
DATA expc<>+408(SB)/4, $0x7f
DATA expc<>+412(SB)/4, $0x7f
GLOBL expc<>(SB), RODATA|NOPTR, $416

// func swigluAVX2(gate, up, out *float32, n int)
// out = g / (1 + exp(-g)) * u, 8 lanes at a time; n is a multiple of 8.
// exp is Cephes' expf with its argument clamped to [-87, 88].
TEXT ·swigluAVX2(SB), NOSPLIT, $0-32
	MOVQ gate+0(FP), SI
	MOVQ up+8(FP), DI
	MOVQ out+16(FP), DX
	MOVQ n+24(FP), CX
	VMOVUPS expc<>+0(SB), Y15   // log2e
	VMOVUPS expc<>+32(SB), Y14  // c1
	VMOVUPS expc<>+64(SB), Y13  // c2
	VMOVUPS expc<>+96(SB), Y12  // p0
	VMOVUPS expc<>+288(SB), Y6  // 1
	VMOVUPS expc<>+320(SB), Y5  // 88
	VMOVUPS expc<>+352(SB), Y4  // -87
	XORQ AX, AX

sgloop:
	CMPQ AX, CX
	JGE  sgdone
	VMOVUPS (SI)(AX*4), Y0
	VXORPS  Y1, Y1, Y1
	VSUBPS  Y0, Y1, Y1      // t = -x
	VMINPS  Y5, Y1, Y1
	VMAXPS  Y4, Y1, Y1
	VMULPS  Y15, Y1, Y2     // t*log2e
	VROUNDPS $0, Y2, Y2     // n
	VFNMADD231PS Y14, Y2, Y1 // r = t - n*c1
	VFNMADD231PS Y13, Y2, Y1 //     - n*c2
	VMOVAPS Y12, Y3
	VFMADD213PS expc<>+128(SB), Y1, Y3
	VFMADD213PS expc<>+160(SB), Y1, Y3
	VFMADD213PS expc<>+192(SB), Y1, Y3
	VFMADD213PS expc<>+224(SB), Y1, Y3
	VFMADD213PS expc<>+256(SB), Y1, Y3
	VMULPS  Y1, Y1, Y7      // r*r
	VFMADD213PS Y1, Y7, Y3  // y*r*r + r
	VADDPS  Y6, Y3, Y3      // + 1
	VCVTPS2DQ Y2, Y2
	VPADDD  expc<>+384(SB), Y2, Y2
	VPSLLD  $23, Y2, Y2     // 2^n
	VMULPS  Y2, Y3, Y3      // exp(-x)
	VADDPS  Y6, Y3, Y3      // 1 + exp(-x)
	VDIVPS  Y3, Y0, Y0      // silu(x)
	VMULPS  (DI)(AX*4), Y0, Y0
	VMOVUPS Y0, (DX)(AX*4)
	ADDQ $8, AX
	JMP  sgloop

sgdone:
	VZEROUPPER
	RET

// func cpuid0() (ebx, edx, ecx uint32)
// CPUID leaf 0: the vendor string is ebx, edx, ecx.
TEXT ·cpuid0(SB), NOSPLIT, $0-12
	XORL AX, AX
	XORL CX, CX
	CPUID
	MOVL BX, ebx+0(FP)
	MOVL DX, edx+4(FP)
	MOVL CX, ecx+8(FP)
	RET
