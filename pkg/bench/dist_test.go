package bench

import (
	"errors"
	"math"
	"math/rand/v2"
	"testing"
)

func TestParseLengthDist(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want LengthDist
		text string
	}{
		{"128", LengthDist{Kind: Fixed, N: 128}, "128"},
		{" 1 ", LengthDist{Kind: Fixed, N: 1}, "1"},
		{"uniform:16-64", LengthDist{Kind: Uniform, Min: 16, Max: 64}, "uniform:16-64"},
		{"uniform:5-5", LengthDist{Kind: Uniform, Min: 5, Max: 5}, "uniform:5-5"},
		{"normal:100,20", LengthDist{Kind: Normal, Mean: 100, Std: 20}, "normal:100,20"},
		{"normal:1.5,0", LengthDist{Kind: Normal, Mean: 1.5, Std: 0}, "normal:1.5,0"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseLengthDist(tc.in)
			if err != nil || got != tc.want || got.String() != tc.text {
				t.Fatalf("got %+v (%q), %v; want %+v", got, got.String(), err, tc.want)
			}
			again, err := ParseLengthDist(got.String())
			if err != nil || again != got {
				t.Fatalf("text form %q does not read back: %+v %v", got.String(), again, err)
			}
		})
	}
	for _, in := range []string{"", "0", "-3", "x", "1.5", "uniform:", "uniform:0-4", "uniform:9-3", "uniform:1,3",
		"normal:0,1", "normal:10", "normal:10,-1", "normal:NaN,1", "normal:10,Inf", "zipf:1"} {
		t.Run("bad "+in, func(t *testing.T) {
			if d, err := ParseLengthDist(in); !errors.Is(err, ErrBadDist) {
				t.Fatalf("got %+v, %v", d, err)
			}
		})
	}
}

func TestLengthDistSample(t *testing.T) {
	const n = 20000
	r := rand.New(rand.NewPCG(1, 2))
	for _, tc := range []struct {
		spec           string
		mean, std, tol float64
		lo, hi         int
	}{
		{"7", 7, 0, 0, 7, 7},
		// Uniform on 10..20: mean 15, std sqrt((11²-1)/12) = 3.162.
		{"uniform:10-20", 15, math.Sqrt(120.0 / 12), 0.1, 10, 20},
		{"normal:100,10", 100, 10, 0.3, 1, math.MaxInt},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			d, _ := ParseLengthDist(tc.spec)
			seen := map[int]bool{}
			var vs []float64
			for range n {
				v := d.Sample(r)
				if v < tc.lo || v > tc.hi {
					t.Fatalf("sample %d outside [%d, %d]", v, tc.lo, tc.hi)
				}
				seen[v] = true
				vs = append(vs, float64(v))
			}
			s := Describe(vs)
			if !near(s.Mean, tc.mean, tc.tol) || !near(s.Std, tc.std, 3*tc.tol) {
				t.Fatalf("mean %.3f std %.3f, want %.3f %.3f", s.Mean, s.Std, tc.mean, tc.std)
			}
			if d.Kind == Uniform && len(seen) != d.Max-d.Min+1 {
				t.Fatalf("only %d of %d values drawn", len(seen), d.Max-d.Min+1)
			}
		})
	}
	// A wide normal is clamped to 1, never below.
	d := LengthDist{Kind: Normal, Mean: 2, Std: 50}
	ones := 0
	for range n {
		v := d.Sample(r)
		if v < 1 {
			t.Fatalf("sample %d < 1", v)
		}
		if v == 1 {
			ones++
		}
	}
	if ones < n/3 {
		t.Fatalf("only %d of %d clamped to 1", ones, n)
	}
}
