package safetensors

import (
	"encoding/binary"
	"fmt"
	"math"
)

// DType is the element type of a tensor. Only the floating-point types used
// by LLM checkpoints are supported. It is the one dtype enum of the module:
// pkg/kernels.DType is an alias of it.
type DType uint8

// Supported element types. The zero DType is invalid.
const (
	F32 DType = iota + 1
	F16
	BF16
)

// Size returns the number of bytes per element (0 for an invalid DType).
func (d DType) Size() int {
	switch d {
	case F32:
		return 4
	case F16, BF16:
		return 2
	}
	return 0
}

// String returns the safetensors spelling of d: "F32", "F16" or "BF16".
func (d DType) String() string {
	switch d {
	case F32:
		return "F32"
	case F16:
		return "F16"
	case BF16:
		return "BF16"
	}
	return fmt.Sprintf("DType(%d)", uint8(d))
}

// Valid reports whether d is one of the supported element types.
func (d DType) Valid() bool { return d >= F32 && d <= BF16 }

// ParseDType parses the safetensors spelling of a dtype. Only "F32", "F16"
// and "BF16" are supported; anything else (including valid safetensors
// dtypes such as "I64" or "F8_E4M3") is an error.
func ParseDType(s string) (DType, error) {
	switch s {
	case "F32":
		return F32, nil
	case "F16":
		return F16, nil
	case "BF16":
		return BF16, nil
	}
	return 0, fmt.Errorf("safetensors: unsupported dtype %q (supported: F32, F16, BF16)", s)
}

// BF16ToFloat32 widens a bfloat16 bit pattern to float32 (exact).
func BF16ToFloat32(b uint16) float32 {
	return math.Float32frombits(uint32(b) << 16)
}

// Float32ToBF16 narrows f to bfloat16, rounding to nearest, ties to even.
// Values too large become ±Inf; a NaN stays a NaN (made quiet, sign and the
// top payload bits kept).
func Float32ToBF16(f float32) uint16 {
	bits := math.Float32bits(f)
	if bits&0x7F800000 == 0x7F800000 && bits&0x007FFFFF != 0 { // NaN
		return uint16(bits>>16) | 0x0040
	}
	bits += 0x7FFF + (bits>>16)&1
	return uint16(bits >> 16)
}

// F16ToFloat32 widens an IEEE 754 binary16 bit pattern to float32. Every
// half value (subnormals, ±0, ±Inf, NaN payloads) is represented exactly.
func F16ToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1F
	mant := uint32(h & 0x3FF)
	switch {
	case exp == 0x1F: // Inf or NaN
		return math.Float32frombits(sign | 0x7F800000 | mant<<13)
	case exp == 0:
		if mant == 0 {
			return math.Float32frombits(sign)
		}
		// Subnormal: normalise the mantissa.
		e := uint32(127 - 15 + 1)
		for mant&0x400 == 0 {
			mant <<= 1
			e--
		}
		mant &= 0x3FF
		return math.Float32frombits(sign | e<<23 | mant<<13)
	default:
		return math.Float32frombits(sign | (exp+127-15)<<23 | mant<<13)
	}
}

// Float32ToF16 narrows f to IEEE 754 binary16, rounding to nearest, ties to
// even (also into the subnormal range). Values too large become ±Inf; a NaN
// stays a NaN (made quiet, sign and the top payload bits kept).
func Float32ToF16(f float32) uint16 {
	bits := math.Float32bits(f)
	sign := uint16(bits>>16) & 0x8000
	exp := int(bits>>23) & 0xFF
	mant := bits & 0x7FFFFF
	if exp == 0xFF {
		if mant != 0 {
			return sign | 0x7E00 | uint16(mant>>13)
		}
		return sign | 0x7C00
	}
	e := exp - 127 + 15 // biased half exponent
	if e >= 31 {
		return sign | 0x7C00
	}
	if e <= 0 {
		// Result is a half subnormal (or zero, or rounds up to the
		// smallest normal). Float32 subnormals (exp == 0) land here
		// with e == -112 and round to zero.
		if e < -10 {
			return sign
		}
		m := mant | 0x800000
		shift := uint(14 - e)
		hm := m >> shift
		rem := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rem > half || (rem == half && hm&1 == 1) {
			hm++
		}
		return sign | uint16(hm)
	}
	hm := mant >> 13
	rem := mant & 0x1FFF
	if rem > 0x1000 || (rem == 0x1000 && hm&1 == 1) {
		hm++
	}
	// A mantissa carry correctly bumps the exponent (up to Inf).
	return sign | uint16(uint32(e)<<10+hm)
}

// DecodeFloat32 widens little-endian elements of type dt to float32.
// len(b) must be a multiple of dt.Size().
func DecodeFloat32(dt DType, b []byte) ([]float32, error) {
	sz := dt.Size()
	if sz == 0 {
		return nil, fmt.Errorf("safetensors: DecodeFloat32: invalid dtype %v", dt)
	}
	if len(b)%sz != 0 {
		return nil, fmt.Errorf("safetensors: DecodeFloat32: %d bytes is not a multiple of the %v element size %d", len(b), dt, sz)
	}
	out := make([]float32, len(b)/sz)
	switch dt {
	case F32:
		for i := range out {
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(b[4*i:]))
		}
	case F16:
		for i := range out {
			out[i] = F16ToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
	case BF16:
		for i := range out {
			out[i] = BF16ToFloat32(binary.LittleEndian.Uint16(b[2*i:]))
		}
	}
	return out, nil
}

// EncodeFloat32 narrows f to little-endian elements of type dt (rounding to
// nearest even for F16 and BF16). It panics if dt is not a valid DType.
func EncodeFloat32(dt DType, f []float32) []byte {
	sz := dt.Size()
	if sz == 0 {
		panic(fmt.Sprintf("safetensors: EncodeFloat32: invalid dtype %v", dt))
	}
	out := make([]byte, len(f)*sz)
	switch dt {
	case F32:
		for i, v := range f {
			binary.LittleEndian.PutUint32(out[4*i:], math.Float32bits(v))
		}
	case F16:
		for i, v := range f {
			binary.LittleEndian.PutUint16(out[2*i:], Float32ToF16(v))
		}
	case BF16:
		for i, v := range f {
			binary.LittleEndian.PutUint16(out[2*i:], Float32ToBF16(v))
		}
	}
	return out
}
