package expertparallel

import (
	"errors"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

// zipf is a skewed workload: in even layers expert i gets 1000/(i+1)
// tokens (the hot experts are rank 0's under Contiguous), in odd layers
// the order is reversed (the last rank's).
func zipf(layers, experts int) [][]int64 {
	counts := make([][]int64, layers)
	for l := range counts {
		counts[l] = make([]int64, experts)
		for e := range counts[l] {
			rank := e
			if l%2 == 1 {
				rank = experts - 1 - e
			}
			counts[l][e] = int64(1000 / (rank + 1))
		}
	}
	return counts
}

func TestRebalanceSkewed(t *testing.T) {
	const L, E, G = 2, 64, 4
	counts := zipf(L, E)
	contiguous, _ := Contiguous(L, E, G)
	before := contiguous.Imbalance(counts)
	if before < 2 {
		t.Fatalf("contiguous imbalance %.3f; the workload should be skewed", before)
	}
	prev := before
	for _, slots := range []int{16, 17, 20} {
		tb, err := Rebalance(counts, G, slots)
		if err != nil {
			t.Fatal(err)
		}
		checkRebalanced(t, tb, counts, G, slots)
		after := tb.Imbalance(counts)
		t.Logf("slots %d: imbalance %.4f (contiguous %.4f)", slots, after, before)
		if after >= 1.15 || slots <= 17 && after >= prev {
			t.Errorf("slots %d: imbalance %.4f, want < 1.15 and below %.4f", slots, after, prev)
		}
		prev = after
		again, _ := Rebalance(counts, G, slots)
		if !again.Equal(tb) {
			t.Errorf("slots %d: a second Rebalance gave a different table", slots)
		}
	}
}

// TestRebalanceSmall follows both steps by hand. G=2, slots=3, counts
// 8, 4, 2, 1: the two spare slots go to expert 0 (8/1), then to expert 1
// (4/1 ties 8/2, and expert 0 already has a replica on both ranks). The
// replicas by load: e0 4, e0 4, e1 2, e1 2, e2 2, e3 1, placed on ranks
// 0, 1, 0 (tie), 1, 0 (tie at 6), 1: loads 8 and 7.
func TestRebalanceSmall(t *testing.T) {
	tb, err := Rebalance([][]int64{{8, 4, 2, 1}}, 2, 3)
	if err != nil {
		t.Fatal(err)
	}
	want := &Table{Ranks: 2, Owners: [][][]int{{{0, 1}, {0, 1}, {0}, {1}}}}
	if !tb.Equal(want) {
		t.Fatalf("Rebalance = %v, want %v", tb.Owners, want.Owners)
	}
	if got := tb.RankLoad([][]int64{{8, 4, 2, 1}})[0]; !slices.Equal(got, []float64{8, 7}) {
		t.Fatalf("RankLoad = %v, want [8 7]", got)
	}
}

func TestRebalanceNoTokens(t *testing.T) {
	counts := [][]int64{make([]int64, 10), {5, 1, 1, 1, 1, 1, 1, 1, 1, 1}}
	tb, err := Rebalance(counts, 4, 4)
	if err != nil {
		t.Fatal(err)
	}
	contiguous, _ := Contiguous(1, 10, 4)
	if !slices.EqualFunc(tb.Owners[0], contiguous.Owners[0], slices.Equal) {
		t.Errorf("layer without tokens: %v, want the contiguous %v", tb.Owners[0], contiguous.Owners[0])
	}
	checkRebalanced(t, &Table{Ranks: 4, Owners: tb.Owners[1:]}, counts[1:], 4, 4)
}

// TestRebalanceRandom checks the invariants on random workloads, heavy
// replication and ties included, and a case that needs placer.repair.
func TestRebalanceRandom(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 11))
	for i := range 2000 {
		g := 1 + rng.IntN(8)
		e := g + rng.IntN(3*g)
		least := (e + g - 1) / g
		slots := least + rng.IntN(e-least+1)
		counts := make([][]int64, 1+rng.IntN(3))
		for l := range counts {
			counts[l] = make([]int64, e)
			scale := []int64{1, 3, 1000}[rng.IntN(3)]
			for x := range counts[l] {
				counts[l][x] = rng.Int64N(scale + 1)
			}
		}
		tb, err := Rebalance(counts, g, slots)
		if err != nil {
			t.Fatalf("case %d: %v", i, err)
		}
		checkRebalanced(t, tb, counts, g, slots)
		if t.Failed() {
			t.Fatalf("case %d: G=%d slots=%d counts %v", i, g, slots, counts)
		}
	}

	// Found by search: when expert 1's second replica comes, the only rank
	// with a free slot already holds expert 1.
	counts := []int64{2, 1, 1, 1, 1, 3, 2, 2, 3}
	owners, repairs := rebalanceLayer(counts, 3, 7)
	if repairs == 0 {
		t.Fatalf("no repair: %v", owners)
	}
	checkRebalanced(t, &Table{Ranks: 3, Owners: [][][]int{owners}}, [][]int64{counts}, 3, 7)
}

// checkRebalanced checks Rebalance's postconditions: a valid table, every
// layer with tokens filling exactly slots slots on every rank, replicas
// following the count/replicas rule, at most one replica per rank.
func checkRebalanced(t *testing.T, tb *Table, counts [][]int64, ranks, slots int) {
	t.Helper()
	if err := tb.Validate(len(counts), len(counts[0])); err != nil {
		t.Error(err)
		return
	}
	if tb.Ranks != ranks {
		t.Errorf("Ranks = %d, want %d", tb.Ranks, ranks)
	}
	if tb.Slots() > slots {
		t.Errorf("Slots = %d > %d", tb.Slots(), slots)
	}
	for l, layer := range tb.Owners {
		var total int64
		for _, c := range counts[l] {
			total += c
		}
		if total == 0 {
			continue
		}
		for r := range ranks {
			if n := len(tb.Experts(l, r)); n != slots {
				t.Errorf("layer %d rank %d holds %d experts, want %d", l, r, n, slots)
			}
		}
		// The replica rule: an expert with a spare replica (n > 1) had the
		// highest count/replicas when it got it, so count/(n-1) is at least
		// any expert's count/n' where n' < G.
		for a, oa := range layer {
			if len(oa) == 1 {
				continue
			}
			for b, ob := range layer {
				if a == b || len(ob) >= ranks {
					continue
				}
				if counts[l][a]*int64(len(ob)) < counts[l][b]*int64(len(oa)-1) {
					t.Errorf("layer %d: expert %d (%d tokens) has %d replicas while expert %d (%d tokens) has %d",
						l, a, counts[l][a], len(oa), b, counts[l][b], len(ob))
				}
			}
		}
	}
}

func TestRebalanceErrors(t *testing.T) {
	ok := [][]int64{{1, 2, 3, 4}, {4, 3, 2, 1}}
	for _, tc := range []struct {
		name   string
		counts [][]int64
		ranks  int
		slots  int
		want   string
	}{
		{"no ranks", ok, 0, 2, "0 ranks"},
		{"no layers", nil, 2, 2, "no layers"},
		{"fewer experts than ranks", [][]int64{{1, 2}}, 3, 1, "2 experts over 3 ranks"},
		{"ragged", [][]int64{{1, 2, 3, 4}, {1, 2, 3}}, 2, 2, "layer 1 has counts for 3 experts"},
		{"negative", [][]int64{{1, 2, 3, 4}, {1, 2, -3, 4}}, 2, 2, "layer 1 expert 2 has a negative count"},
		{"too few slots", ok, 2, 1, "1 slots per rank; 4 experts over 2 ranks need 2 to 4"},
		{"too many slots", ok, 2, 5, "need 2 to 4"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb, err := Rebalance(tc.counts, tc.ranks, tc.slots)
			if tb != nil || !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Rebalance = %v, %v; want ErrInvalidArgument mentioning %q", tb, err, tc.want)
			}
		})
	}
}
