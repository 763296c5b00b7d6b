package bench

import (
	"math"
	"testing"
	"time"
)

func TestPoissonRate(t *testing.T) {
	for _, rate := range []float64{0.5, 10, 2000} {
		p := NewPoisson(rate, 42)
		const n = 100000
		var gaps []float64
		var total time.Duration
		for range n {
			g := p.Next()
			if g < 0 {
				t.Fatalf("negative gap %v", g)
			}
			total += g
			gaps = append(gaps, g.Seconds())
		}
		got := n / total.Seconds()
		if math.Abs(got-rate)/rate > 0.02 {
			t.Errorf("rate %v: %d arrivals in %v is %.4g/s", rate, n, total, got)
		}
		// Exponential gaps: the standard deviation equals the mean.
		s := Describe(gaps)
		if math.Abs(s.Std/s.Mean-1) > 0.03 {
			t.Errorf("rate %v: std/mean = %.3f, want 1", rate, s.Std/s.Mean)
		}
	}
}

func TestPoissonSeeded(t *testing.T) {
	a, b, c := NewPoisson(5, 7), NewPoisson(5, 7), NewPoisson(5, 8)
	same, differ := true, false
	for range 100 {
		x, y, z := a.Next(), b.Next(), c.Next()
		same = same && x == y
		differ = differ || x != z
	}
	if !same || !differ {
		t.Fatalf("same seed same gaps: %v; other seed other gaps: %v", same, differ)
	}
	inf := NewPoisson(math.Inf(1), 1)
	if g := inf.Next(); g != 0 {
		t.Fatalf("rate inf gap %v", g)
	}
}
