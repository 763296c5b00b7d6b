package cpu

import (
	"math"
	"testing"
	"time"
)

func TestProbePeak(t *testing.T) {
	p, err := ProbePeak(1, 20*time.Millisecond)
	if err != nil {
		if _, kerr := peakKernelSet(); kerr != nil {
			t.Skipf("ProbePeak: %v", err)
		}
		t.Fatalf("ProbePeak: %v", err)
	}
	t.Logf("%+v", p)
	if p.Threads != 1 {
		t.Errorf("Threads = %d, want 1", p.Threads)
	}
	good := func(v float64) bool { return v > 0 && !math.IsInf(v, 0) && !math.IsNaN(v) }
	switch p.FMAWidth {
	case 512, 256:
		if !good(p.FMA32GFLOPS) {
			t.Errorf("FMA32GFLOPS = %v with FMAWidth %d", p.FMA32GFLOPS, p.FMAWidth)
		}
	case 0:
		if p.FMA32GFLOPS != 0 {
			t.Errorf("FMA32GFLOPS = %v with FMAWidth 0", p.FMA32GFLOPS)
		}
	default:
		t.Errorf("FMAWidth = %d", p.FMAWidth)
	}
	for _, f := range []struct {
		name string
		has  bool
		v    float64
	}{{"BF16GFLOPS", p.HasBF16, p.BF16GFLOPS}, {"VNNIGOPS", p.HasVNNI, p.VNNIGOPS}} {
		if f.has && !good(f.v) || !f.has && f.v != 0 {
			t.Errorf("%s = %v with Has %v", f.name, f.v, f.has)
		}
	}
	if !good(p.ReadGBs) {
		t.Errorf("ReadGBs = %v", p.ReadGBs)
	}
}

// TestPeakRead checks the read loop's sum, so that the bandwidth figure
// comes from a loop that reads every word.
func TestPeakRead(t *testing.T) {
	k, err := peakKernelSet()
	if err != nil {
		t.Skip(err)
	}
	for _, read := range append(k.reads, sumWordsGo) {
		for _, n := range []int{0, 1, 31, 32, 33, 64, 1000, 4096 + 7} {
			b := make([]uint64, n)
			var want uint64
			for i := range b {
				b[i] = uint64(i)*0x9E3779B97F4A7C15 + 1
				want += b[i]
			}
			if got := read(b); got != want {
				t.Errorf("n=%d: sum %#x, want %#x", n, got, want)
			}
		}
	}
}

// TestPeakLoops runs each compute loop with 0 and a few iterations: they
// return (their registers restored by VZEROUPPER) without a fault.
func TestPeakLoops(t *testing.T) {
	k, err := peakKernelSet()
	if err != nil {
		t.Skip(err)
	}
	for _, l := range []*peakLoop{k.fma, k.bf16, k.vnni} {
		if l != nil {
			l.run(0)
			l.run(3)
		}
	}
}
