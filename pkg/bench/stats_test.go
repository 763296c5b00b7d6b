package bench

import (
	"math"
	"slices"
	"testing"
	"time"
)

const msec = time.Millisecond

func near(a, b, tol float64) bool { return math.Abs(a-b) <= tol }

func TestPercentile(t *testing.T) {
	for _, tc := range []struct {
		name string
		vs   []float64
		p    float64
		want float64
	}{
		{"empty", nil, 50, 0},
		{"single", []float64{7}, 99, 7},
		{"p0 is min", []float64{1, 2, 3, 4}, 0, 1},
		{"p100 is max", []float64{1, 2, 3, 4}, 100, 4},
		{"median of even count interpolates", []float64{1, 2, 3, 4}, 50, 2.5},
		{"p90 rank 2.7", []float64{1, 2, 3, 4}, 90, 3.7},
		{"p99 rank 2.97", []float64{1, 2, 3, 4}, 99, 3.97},
		{"median of odd count", []float64{10, 20, 30}, 50, 20},
		{"p25 rank 0.5", []float64{10, 20, 30}, 25, 15},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Percentile(tc.vs, tc.p); !near(got, tc.want, 1e-9) {
				t.Fatalf("Percentile(%v, %v) = %v, want %v", tc.vs, tc.p, got, tc.want)
			}
		})
	}
}

func TestDescribe(t *testing.T) {
	vs := []float64{9, 2, 4, 4, 5, 4, 7, 5} // sorted: 2 4 4 4 5 5 7 9
	orig := slices.Clone(vs)
	got := Describe(vs)
	// By hand: mean 40/8 = 5; squared deviations 9+1+1+1+0+0+4+16 = 32, /8 = 4, std 2;
	// median between 4 and 5; p90 rank 6.3 → 7+0.3*2; p99 rank 6.93 → 7+0.93*2.
	want := Summary{Count: 8, Mean: 5, Median: 4.5, Std: 2, Min: 2, Max: 9, P90: 7.6, P99: 8.86}
	for _, f := range []struct {
		name      string
		got, want float64
	}{{"mean", got.Mean, want.Mean}, {"median", got.Median, want.Median}, {"std", got.Std, want.Std}, {"min", got.Min, want.Min},
		{"max", got.Max, want.Max}, {"p90", got.P90, want.P90}, {"p99", got.P99, want.P99}} {
		if !near(f.got, f.want, 1e-9) {
			t.Errorf("%s = %v, want %v", f.name, f.got, f.want)
		}
	}
	if got.Count != 8 || !slices.Equal(vs, orig) {
		t.Fatalf("count %d, input changed to %v", got.Count, vs)
	}
	if (Describe(nil) != Summary{}) {
		t.Fatal("empty sample is not all zeros")
	}
}

func TestRequestTimings(t *testing.T) {
	for _, tc := range []struct {
		name string
		r    Request
		ttft time.Duration // -1: none
		tpot time.Duration // -1: none
		e2e  time.Duration
		itl  []time.Duration
	}{
		{
			// Sent at 100 ms; chunks at 150 (1 token), 155 (1), 185 (2), 190 (1); done at 200.
			// TTFT 50, E2E 100, TPOT (100-50)/4 = 12.5; ITL 5, then 30/2 twice, then 5.
			name: "one and two token chunks",
			r: Request{Start: 100 * msec, End: 200 * msec, OutputTokens: 5,
				Chunks: []Chunk{{150 * msec, 1}, {155 * msec, 1}, {185 * msec, 2}, {190 * msec, 1}}},
			ttft: 50 * msec, tpot: 12500 * time.Microsecond, e2e: 100 * msec,
			itl: []time.Duration{5 * msec, 15 * msec, 15 * msec, 5 * msec},
		},
		{
			// The second token of the first chunk has no gap to measure.
			name: "first chunk carries two tokens",
			r:    Request{Start: 0, End: 40 * msec, OutputTokens: 3, Chunks: []Chunk{{10 * msec, 2}, {30 * msec, 1}}},
			ttft: 10 * msec, tpot: 15 * msec, e2e: 40 * msec, itl: []time.Duration{20 * msec},
		},
		{
			name: "one token: no TPOT, no ITL",
			r:    Request{Start: 5 * msec, End: 20 * msec, OutputTokens: 1, Chunks: []Chunk{{15 * msec, 1}}},
			ttft: 10 * msec, tpot: -1, e2e: 15 * msec,
		},
		{
			name: "failed before any token",
			r:    Request{Start: 5 * msec, End: 7 * msec, Code: "Unavailable"},
			ttft: -1, tpot: -1, e2e: 2 * msec,
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ttft, ok := tc.r.TTFT()
			if !ok {
				ttft = -1
			}
			tpot, ok := tc.r.TPOT()
			if !ok {
				tpot = -1
			}
			if ttft != tc.ttft || tpot != tc.tpot || tc.r.E2E() != tc.e2e || !slices.Equal(tc.r.ITL(), tc.itl) {
				t.Fatalf("ttft %v tpot %v e2e %v itl %v, want %v %v %v %v", ttft, tpot, tc.r.E2E(), tc.r.ITL(), tc.ttft, tc.tpot, tc.e2e, tc.itl)
			}
		})
	}
}
