package safetensors

import (
	"bytes"
	"math"
	"math/rand"
	"testing"
)

func TestDTypeBasics(t *testing.T) {
	for _, tc := range []struct {
		s    string
		d    DType
		size int
	}{{"F32", F32, 4}, {"F16", F16, 2}, {"BF16", BF16, 2}} {
		d, err := ParseDType(tc.s)
		if err != nil || d != tc.d {
			t.Errorf("ParseDType(%q) = %v, %v", tc.s, d, err)
		}
		if d.String() != tc.s || d.Size() != tc.size || !d.Valid() {
			t.Errorf("%v: String %q Size %d Valid %v", d, d.String(), d.Size(), d.Valid())
		}
	}
	for _, s := range []string{"I64", "F8_E4M3", "XYZ", "", "f32", "F64", "BOOL", "U8"} {
		if _, err := ParseDType(s); err == nil {
			t.Errorf("ParseDType(%q) succeeded", s)
		}
	}
	if DType(0).Size() != 0 || DType(0).Valid() || DType(9).Valid() {
		t.Error("invalid DType reported as valid")
	}
}

func TestBF16Cases(t *testing.T) {
	for _, tc := range []struct {
		name string
		in   uint32 // float32 bits
		want uint16
	}{
		{"zero", 0x00000000, 0x0000},
		{"neg zero", 0x80000000, 0x8000},
		{"one", 0x3F800000, 0x3F80},
		{"minus two", 0xC0000000, 0xC000},
		{"max bf16", 0x7F7F0000, 0x7F7F},
		{"max f32 overflows", 0x7F7FFFFF, 0x7F80},
		{"just below overflow tie", 0x7F7F7FFF, 0x7F7F},
		{"inf", 0x7F800000, 0x7F80},
		{"neg inf", 0xFF800000, 0xFF80},
		{"quiet nan", 0x7FC00000, 0x7FC0},
		{"neg nan", 0xFFC00001, 0xFFC0},
		{"signalling nan low payload", 0x7F800001, 0x7FC0},
		{"signalling nan high payload", 0x7F810000, 0x7FC1},
		{"tie to even down", 0x3F808000, 0x3F80},
		{"tie to even up", 0x3F818000, 0x3F82},
		{"above tie", 0x3F808001, 0x3F81},
		{"below tie", 0x3F807FFF, 0x3F80},
		{"subnormal exact", 0x00010000, 0x0001},
		{"subnormal tie down", 0x00008000, 0x0000},
		{"subnormal tie up", 0x00018000, 0x0002},
		{"neg subnormal", 0x80010000, 0x8001},
		{"largest subnormal to min normal", 0x007FFFFF, 0x0080},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := Float32ToBF16(math.Float32frombits(tc.in))
			if got != tc.want {
				t.Errorf("Float32ToBF16(%#08x) = %#04x, want %#04x", tc.in, got, tc.want)
			}
		})
	}
}

func TestBF16RoundTripAll(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		b := uint16(i)
		f := BF16ToFloat32(b)
		if math.Float32bits(f) != uint32(b)<<16 {
			t.Fatalf("BF16ToFloat32(%#04x) bits %#08x", b, math.Float32bits(f))
		}
		got := Float32ToBF16(f)
		if f != f { // NaN: stays NaN, made quiet
			if got != b|0x0040 {
				t.Fatalf("NaN %#04x -> %#04x", b, got)
			}
			continue
		}
		if got != b {
			t.Fatalf("round trip %#04x -> %v -> %#04x", b, f, got)
		}
	}
}

func TestF16ToFloat32Values(t *testing.T) {
	for _, tc := range []struct {
		h    uint16
		want float64
	}{
		{0x0000, 0},
		{0x0001, math.Ldexp(1, -24)},
		{0x8001, -math.Ldexp(1, -24)},
		{0x0200, math.Ldexp(1, -15)},
		{0x03FF, 1023 * math.Ldexp(1, -24)},
		{0x0400, math.Ldexp(1, -14)},
		{0x3C00, 1},
		{0x3C01, 1 + math.Ldexp(1, -10)},
		{0xC000, -2},
		{0x3555, 0.333251953125},
		{0x7BFF, 65504},
		{0xFBFF, -65504},
		{0x7C00, math.Inf(1)},
		{0xFC00, math.Inf(-1)},
	} {
		if got := F16ToFloat32(tc.h); float64(got) != tc.want {
			t.Errorf("F16ToFloat32(%#04x) = %v, want %v", tc.h, got, tc.want)
		}
	}
	if got := F16ToFloat32(0x8000); got != 0 || !math.Signbit(float64(got)) {
		t.Errorf("F16ToFloat32(0x8000) = %v, want -0", got)
	}
	for _, h := range []uint16{0x7C01, 0x7E00, 0xFE00, 0x7FFF} {
		got := F16ToFloat32(h)
		if got == got {
			t.Errorf("F16ToFloat32(%#04x) = %v, want NaN", h, got)
		}
		if math.Float32bits(got) != uint32(h&0x8000)<<16|0x7F800000|uint32(h&0x3FF)<<13 {
			t.Errorf("F16ToFloat32(%#04x): payload not kept: %#08x", h, math.Float32bits(got))
		}
	}
}

func TestFloat32ToF16Cases(t *testing.T) {
	ld := func(m float64, e int) float32 { return float32(math.Ldexp(m, e)) }
	for _, tc := range []struct {
		name string
		in   float32
		want uint16
	}{
		{"zero", 0, 0x0000},
		{"neg zero", float32(math.Copysign(0, -1)), 0x8000},
		{"one", 1, 0x3C00},
		{"max", 65504, 0x7BFF},
		{"below overflow tie", 65519.99, 0x7BFF},
		{"overflow tie to inf", 65520, 0x7C00},
		{"overflow", 1e6, 0x7C00},
		{"neg overflow", -1e6, 0xFC00},
		{"max float32", math.MaxFloat32, 0x7C00},
		{"inf", float32(math.Inf(1)), 0x7C00},
		{"neg inf", float32(math.Inf(-1)), 0xFC00},
		{"nan", float32(math.NaN()), 0x7E00},
		{"min subnormal", ld(1, -24), 0x0001},
		{"half min subnormal tie to zero", ld(1, -25), 0x0000},
		{"just above half min subnormal", ld(1.0000001, -25), 0x0001},
		{"neg tiny", ld(-1, -26), 0x8000},
		{"subnormal tie to even up", ld(3, -25), 0x0002},
		{"subnormal tie to even down", ld(5, -25), 0x0002},
		{"largest subnormal", ld(1023, -24), 0x03FF},
		{"tie to min normal", ld(1023.5, -24), 0x0400},
		{"min normal", ld(1, -14), 0x0400},
		{"float32 subnormal", ld(1, -140), 0x0000},
		{"neg float32 subnormal", ld(-1, -140), 0x8000},
		{"normal tie to even down", 1 + ld(1, -11), 0x3C00},
		{"normal tie to even up", 1 + ld(3, -11), 0x3C02},
		{"normal above tie", 1 + ld(1, -11) + ld(1, -20), 0x3C01},
		{"carry into exponent", 2 - ld(1, -12), 0x4000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Float32ToF16(tc.in); got != tc.want {
				t.Errorf("Float32ToF16(%v) = %#04x, want %#04x", tc.in, got, tc.want)
			}
		})
	}
	// NaN payload and sign are kept, quiet bit set.
	if got := Float32ToF16(math.Float32frombits(0xFF800001)); got&0x7C00 != 0x7C00 || got&0x3FF == 0 || got&0x8000 == 0 {
		t.Errorf("signalling negative NaN -> %#04x", got)
	}
}

func TestF16RoundTripAll(t *testing.T) {
	for i := 0; i < 1<<16; i++ {
		h := uint16(i)
		f := F16ToFloat32(h)
		got := Float32ToF16(f)
		if f != f {
			if got != h|0x0200 {
				t.Fatalf("NaN %#04x -> %#04x", h, got)
			}
			continue
		}
		if got != h {
			t.Fatalf("round trip %#04x -> %v -> %#04x", h, f, got)
		}
	}
}

// TestFloat32ToF16Nearest checks rounding of random values against the
// definition: the result is (one of) the nearest halves, ties to even.
func TestFloat32ToF16Nearest(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for i := 0; i < 200000; i++ {
		x := float32(math.Ldexp(rng.Float64()*2-1, rng.Intn(44)-28))
		h := Float32ToF16(x)
		hv := float64(F16ToFloat32(h))
		if math.IsInf(hv, 0) {
			if math.Abs(float64(x)) < 65520 {
				t.Fatalf("%v -> inf", x)
			}
			continue
		}
		d := math.Abs(hv - float64(x))
		for _, n := range []uint16{h + 1, h - 1} {
			nv := float64(F16ToFloat32(n))
			if math.IsNaN(nv) || n&0x8000 != h&0x8000 && hv != 0 {
				continue
			}
			nd := math.Abs(nv - float64(x))
			if nd < d || (nd == d && h&1 == 1) {
				t.Fatalf("%v (%#08x) -> %#04x (%v), but %#04x (%v) is nearer or even",
					x, math.Float32bits(x), h, hv, n, nv)
			}
		}
	}
}

func TestDecodeEncodeFloat32(t *testing.T) {
	vals := []float32{0, 1, -2.5, 0.1, 65504, 3.0e-5, float32(math.Inf(-1))}
	for _, dt := range []DType{F32, F16, BF16} {
		b := EncodeFloat32(dt, vals)
		if len(b) != len(vals)*dt.Size() {
			t.Fatalf("%v: %d bytes", dt, len(b))
		}
		got, err := DecodeFloat32(dt, b)
		if err != nil {
			t.Fatal(err)
		}
		for i, v := range vals {
			var want float32
			switch dt {
			case F32:
				want = v
			case F16:
				want = F16ToFloat32(Float32ToF16(v))
			case BF16:
				want = BF16ToFloat32(Float32ToBF16(v))
			}
			if got[i] != want {
				t.Errorf("%v[%d] = %v, want %v", dt, i, got[i], want)
			}
		}
		if !bytes.Equal(EncodeFloat32(dt, got), b) {
			t.Errorf("%v: re-encode differs", dt)
		}
	}
	if _, err := DecodeFloat32(F32, make([]byte, 6)); err == nil {
		t.Error("DecodeFloat32 of 6 bytes as F32 succeeded")
	}
	if _, err := DecodeFloat32(DType(0), make([]byte, 4)); err == nil {
		t.Error("DecodeFloat32 with invalid dtype succeeded")
	}
	if got, err := DecodeFloat32(BF16, nil); err != nil || len(got) != 0 {
		t.Errorf("DecodeFloat32(nil) = %v, %v", got, err)
	}
}
