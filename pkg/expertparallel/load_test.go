package expertparallel

import (
	"math"
	"slices"
	"testing"
)

func TestImbalance(t *testing.T) {
	for _, tc := range []struct {
		name string
		load []float64
		want float64
	}{
		{"empty", nil, 1},
		{"all zero", []float64{0, 0, 0}, 1},
		{"balanced", []float64{5, 5, 5, 5}, 1},
		{"one rank does all", []float64{0, 8, 0, 0}, 4},
		{"1 and 3", []float64{1, 3}, 1.5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := Imbalance(tc.load); got != tc.want {
				t.Fatalf("Imbalance(%v) = %v, want %v", tc.load, got, tc.want)
			}
		})
	}
}

func TestRankLoad(t *testing.T) {
	// G=2, E=4. Layer 0: expert 0 replicated on both ranks. Layer 1:
	// contiguous. Layer 2: contiguous, no tokens.
	tb := &Table{Ranks: 2, Owners: [][][]int{
		{{0, 1}, {0}, {1}, {1}},
		{{0}, {0}, {1}, {1}},
		{{0}, {0}, {1}, {1}},
	}}
	counts := [][]int64{
		{10, 4, 6, 2}, // rank 0: 10/2 + 4 = 9; rank 1: 10/2 + 6 + 2 = 13
		{1, 2, 3, 6},  // rank 0: 3; rank 1: 9
		{0, 0, 0, 0},
	}
	want := [][]float64{{9, 13}, {3, 9}, {0, 0}}
	got := tb.RankLoad(counts)
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("RankLoad = %v, want %v", got, want)
	}
	for l, w := range []float64{13.0 / 11, 9.0 / 6, 1} {
		if g := Imbalance(got[l]); math.Abs(g-w) > 1e-12 {
			t.Errorf("layer %d: Imbalance = %v, want %v", l, g, w)
		}
	}
	// Token-weighted: (13 + 9 + 0) / (11 + 6 + 0).
	if g, w := tb.Imbalance(counts), 22.0/17; math.Abs(g-w) > 1e-12 {
		t.Errorf("Table.Imbalance = %v, want %v", g, w)
	}
	if g := tb.Imbalance([][]int64{{0, 0, 0, 0}, {0, 0, 0, 0}, {0, 0, 0, 0}}); g != 1 {
		t.Errorf("Table.Imbalance without tokens = %v, want 1", g)
	}
}

func TestRankLoadShapePanics(t *testing.T) {
	tb, _ := Contiguous(2, 4, 2)
	for _, tc := range []struct {
		name   string
		counts [][]int64
	}{
		{"layers", [][]int64{{1, 2, 3, 4}}},
		{"experts", [][]int64{{1, 2, 3, 4}, {1, 2, 3}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			defer func() {
				if recover() == nil {
					t.Fatal("no panic")
				}
			}()
			tb.RankLoad(tc.counts)
		})
	}
}
