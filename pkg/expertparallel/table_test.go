package expertparallel

import (
	"errors"
	"slices"
	"strings"
	"testing"
)

func TestContiguous(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		layers, experts, ranks int
		want                   [][]int // experts of each rank
		slots                  int
	}{
		{"E=64 G=4", 2, 64, 4, [][]int{span(0, 16), span(16, 32), span(32, 48), span(48, 64)}, 16},
		{"uneven E=10 G=4", 3, 10, 4, [][]int{{0, 1}, {2, 3, 4}, {5, 6}, {7, 8, 9}}, 3},
		{"E=G", 1, 4, 4, [][]int{{0}, {1}, {2}, {3}}, 1},
		{"one rank", 1, 5, 1, [][]int{span(0, 5)}, 5},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb, err := Contiguous(tc.layers, tc.experts, tc.ranks)
			if err != nil {
				t.Fatal(err)
			}
			if err := tb.Validate(tc.layers, tc.experts); err != nil {
				t.Fatal(err)
			}
			for l := range tc.layers {
				for r, want := range tc.want {
					if got := tb.Experts(l, r); !slices.Equal(got, want) {
						t.Errorf("layer %d rank %d: experts %v, want %v", l, r, got, want)
					}
				}
				for e := range tc.experts {
					// pkg/model's Contiguous.Owner formula: the r with r·E/G ≤ e < (r+1)·E/G.
					want := ((e+1)*tc.ranks - 1) / tc.experts
					if got := tb.Owner(l, e, 7); got != want {
						t.Errorf("layer %d expert %d: owner %d, want %d", l, e, got, want)
					}
				}
			}
			if got := tb.Slots(); got != tc.slots {
				t.Errorf("Slots = %d, want %d", got, tc.slots)
			}
		})
	}
}

func TestContiguousErrors(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		layers, experts, ranks int
		want                   string
	}{
		{"no ranks", 2, 8, 0, "0 ranks"},
		{"no layers", 0, 8, 2, "0 layers"},
		{"fewer experts than ranks", 2, 3, 4, "3 experts over 4 ranks"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Contiguous(tc.layers, tc.experts, tc.ranks)
			if !errors.Is(err, ErrInvalidArgument) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrInvalidArgument mentioning %q", err, tc.want)
			}
		})
	}
}

func TestOwnerRoundRobin(t *testing.T) {
	tb := &Table{Ranks: 4, Owners: [][][]int{{
		{0, 2},    // expert 0: two replicas
		{1, 2, 3}, // expert 1: three
		{3},       // expert 2: one
	}}}
	if err := tb.Validate(1, 3); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		expert int
		want   []int // owners of rows 0, 1, 2, …
	}{
		{0, []int{0, 2, 0, 2, 0, 2}},
		{1, []int{1, 2, 3, 1, 2, 3}},
		{2, []int{3, 3, 3, 3, 3, 3}},
	} {
		var got []int
		for row := range tc.want {
			got = append(got, tb.Owner(0, tc.expert, row))
		}
		if !slices.Equal(got, tc.want) {
			t.Errorf("expert %d: owners by row %v, want %v", tc.expert, got, tc.want)
		}
	}
	for _, tc := range []struct {
		expert, rank int
		want         bool
	}{{0, 0, true}, {0, 1, false}, {0, 2, true}, {1, 0, false}, {1, 3, true}, {2, 3, true}, {2, 2, false}} {
		if got := tb.Holds(0, tc.expert, tc.rank); got != tc.want {
			t.Errorf("Holds(0, %d, %d) = %v, want %v", tc.expert, tc.rank, got, tc.want)
		}
	}
	for r, want := range [][]int{{0}, {1}, {0, 1}, {1, 2}} {
		if got := tb.Experts(0, r); !slices.Equal(got, want) {
			t.Errorf("Experts(0, %d) = %v, want %v", r, got, want)
		}
	}
	if got := tb.Slots(); got != 2 {
		t.Errorf("Slots = %d, want 2", got)
	}
}

func TestValidateErrors(t *testing.T) {
	good := func() *Table { tb, _ := Contiguous(2, 4, 2); return tb }
	for _, tc := range []struct {
		name   string
		table  func() *Table
		layers int
		want   string
	}{
		{"nil", func() *Table { return nil }, 2, "nil"},
		{"no ranks", func() *Table { tb := good(); tb.Ranks = 0; return tb }, 2, "0 ranks"},
		{"layer count", good, 3, "2 layers, want 3"},
		{"expert count", func() *Table { tb := good(); tb.Owners[1] = tb.Owners[1][:3]; return tb }, 2, "layer 1 has 3 experts, want 4"},
		{"no owner", func() *Table { tb := good(); tb.Owners[1][2] = nil; return tb }, 2, "layer 1 expert 2 has no owner"},
		{"rank too large", func() *Table { tb := good(); tb.Owners[0][3] = []int{1, 2}; return tb }, 2, "layer 0 expert 3: owner rank 2 outside [0, 2)"},
		{"negative rank", func() *Table { tb := good(); tb.Owners[0][0] = []int{-1}; return tb }, 2, "layer 0 expert 0: owner rank -1"},
		{"not ascending", func() *Table { tb := good(); tb.Owners[1][0] = []int{1, 0}; return tb }, 2, "layer 1 expert 0: owners [1 0] are not ascending"},
		{"duplicate", func() *Table { tb := good(); tb.Owners[1][0] = []int{0, 0}; return tb }, 2, "layer 1 expert 0: owners [0 0]"},
		{"idle rank", func() *Table {
			tb := good()
			tb.Owners[1] = [][]int{{0}, {0}, {0}, {0}}
			return tb
		}, 2, "layer 1: rank 1 holds no expert"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.table().Validate(tc.layers, 4)
			if !errors.Is(err, ErrInvalidTable) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrInvalidTable mentioning %q", err, tc.want)
			}
		})
	}
}

func TestEqual(t *testing.T) {
	a, _ := Contiguous(2, 4, 2)
	b, _ := Contiguous(2, 4, 2)
	c, _ := Contiguous(2, 4, 2)
	c.Owners[1][3] = []int{0, 1}
	d, _ := Contiguous(2, 4, 4)
	var none *Table
	for _, tc := range []struct {
		name string
		t, u *Table
		want bool
	}{
		{"same", a, b, true},
		{"replica differs", a, c, false},
		{"ranks differ", a, d, false},
		{"layers differ", a, &Table{Ranks: 2, Owners: a.Owners[:1]}, false},
		{"nil and table", none, a, false},
		{"table and nil", a, none, false},
		{"both nil", none, none, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := tc.t.Equal(tc.u); got != tc.want {
				t.Fatalf("Equal = %v, want %v", got, tc.want)
			}
		})
	}
}

// span is [begin, end).
func span(begin, end int) []int {
	var s []int
	for i := begin; i < end; i++ {
		s = append(s, i)
	}
	return s
}

// Table has the method set of pkg/model's ExpertMap (checked here without
// importing pkg/model, which sits below this package).
var _ interface {
	Holds(layer, expert, rank int) bool
	Owner(layer, expert, row int) int
} = (*Table)(nil)
