package bench

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"strconv"
	"strings"
)

// DistKind names the shape of a LengthDist.
type DistKind int

const (
	Fixed   DistKind = iota // always N
	Uniform                 // uniform on the integers [Min, Max]
	Normal                  // round(Normal(Mean, Std)), clamped to >= 1
)

// LengthDist is a distribution of token counts (prompt or output lengths).
// Its text form, accepted by ParseLengthDist and given back by String, is
// "N", "uniform:A-B" or "normal:MEAN,STD". Every sample is >= 1.
type LengthDist struct {
	Kind      DistKind
	N         int     // Fixed
	Min, Max  int     // Uniform, inclusive, 1 <= Min <= Max
	Mean, Std float64 // Normal, Mean >= 1, Std >= 0
}

// ErrBadDist is wrapped by every ParseLengthDist error.
var ErrBadDist = errors.New("bad length distribution")

// ParseLengthDist parses "N", "uniform:A-B" or "normal:MEAN,STD".
func ParseLengthDist(s string) (LengthDist, error) {
	bad := func(why string) (LengthDist, error) {
		return LengthDist{}, fmt.Errorf("%w %q: %s", ErrBadDist, s, why)
	}
	kind, args, ok := strings.Cut(strings.TrimSpace(s), ":")
	if !ok {
		n, err := strconv.Atoi(kind)
		if err != nil || n < 1 {
			return bad("want N >= 1, uniform:A-B or normal:MEAN,STD")
		}
		return LengthDist{Kind: Fixed, N: n}, nil
	}
	switch kind {
	case "uniform":
		a, b, ok := strings.Cut(args, "-")
		lo, err1 := strconv.Atoi(strings.TrimSpace(a))
		hi, err2 := strconv.Atoi(strings.TrimSpace(b))
		if !ok || err1 != nil || err2 != nil || lo < 1 || hi < lo {
			return bad("uniform:A-B wants integers 1 <= A <= B")
		}
		return LengthDist{Kind: Uniform, Min: lo, Max: hi}, nil
	case "normal":
		a, b, ok := strings.Cut(args, ",")
		mean, err1 := strconv.ParseFloat(strings.TrimSpace(a), 64)
		std, err2 := strconv.ParseFloat(strings.TrimSpace(b), 64)
		if !ok || err1 != nil || err2 != nil || !(mean >= 1) || !(std >= 0) || math.IsInf(mean, 0) || math.IsInf(std, 0) {
			return bad("normal:MEAN,STD wants MEAN >= 1 and STD >= 0")
		}
		return LengthDist{Kind: Normal, Mean: mean, Std: std}, nil
	}
	return bad("unknown kind " + strconv.Quote(kind) + "; want N, uniform:A-B or normal:MEAN,STD")
}

// Sample draws one length (>= 1) from r.
func (d LengthDist) Sample(r *rand.Rand) int {
	switch d.Kind {
	case Uniform:
		return d.Min + r.IntN(d.Max-d.Min+1)
	case Normal:
		v := math.Round(d.Mean + d.Std*r.NormFloat64())
		return int(max(1, min(v, math.MaxInt32)))
	default:
		return max(d.N, 1)
	}
}

// String gives the text form ParseLengthDist reads.
func (d LengthDist) String() string {
	switch d.Kind {
	case Uniform:
		return fmt.Sprintf("uniform:%d-%d", d.Min, d.Max)
	case Normal:
		return "normal:" + strconv.FormatFloat(d.Mean, 'g', -1, 64) + "," + strconv.FormatFloat(d.Std, 'g', -1, 64)
	default:
		return strconv.Itoa(d.N)
	}
}

// MarshalText writes the text form, so a LengthDist is a string in JSON.
func (d LengthDist) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// UnmarshalText reads the text form.
func (d *LengthDist) UnmarshalText(b []byte) error {
	v, err := ParseLengthDist(string(b))
	if err != nil {
		return err
	}
	*d = v
	return nil
}
