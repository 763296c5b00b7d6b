package expertparallel

import (
	"errors"
	"math"
	"slices"
	"strings"
	"testing"
)

func TestFlat(t *testing.T) {
	tb, _ := Contiguous(2, 4, 2)
	want := []int32{2, 2, 4, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1}
	if got := tb.Flat(); !slices.Equal(got, want) {
		t.Fatalf("Flat = %v, want %v", got, want)
	}
}

func TestFlatRoundTrip(t *testing.T) {
	contiguous, _ := Contiguous(28, 64, 4)
	uneven, _ := Contiguous(3, 10, 4)
	rebalanced, err := Rebalance(zipf(2, 64), 4, 17)
	if err != nil {
		t.Fatal(err)
	}
	replicas := &Table{Ranks: 4, Owners: [][][]int{{{0, 2}, {1, 2, 3}, {3}}}}
	for _, tc := range []struct {
		name string
		t    *Table
	}{{"contiguous", contiguous}, {"uneven", uneven}, {"rebalanced", rebalanced}, {"replicas", replicas}} {
		t.Run(tc.name, func(t *testing.T) {
			flat := tc.t.Flat()
			got, err := FromFlat(flat)
			if err != nil {
				t.Fatal(err)
			}
			if !got.Equal(tc.t) {
				t.Fatalf("FromFlat(Flat()) = %v, want %v", got.Owners, tc.t.Owners)
			}
			// Every proper prefix is malformed.
			for n := range len(flat) {
				if _, err := FromFlat(flat[:n]); !errors.Is(err, ErrInvalidTable) {
					t.Fatalf("FromFlat of the first %d of %d values: err = %v", n, len(flat), err)
				}
			}
		})
	}
}

func TestFromFlatErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		v    []int32
		want string
	}{
		{"empty", nil, "0 values"},
		{"short header", []int32{2, 1}, "2 values"},
		{"no ranks", []int32{0, 1, 1, 1, 0}, "0 ranks"},
		{"negative layers", []int32{1, -1, 1, 1, 0}, "-1 layers"},
		{"no experts", []int32{1, 1000000, 0}, "0 experts"},
		{"fewer experts than ranks", []int32{3, 1, 2, 1, 0, 1, 1}, "rank 2 holds no expert"},
		{"huge header", []int32{1, math.MaxInt32, math.MaxInt32, 1, 0}, "need at least 9223372028264841218 values"},
		{"zero owners", []int32{2, 1, 2, 0, 1, 1, 1}, "layer 0 expert 0 has 0 owners"},
		{"too many owners", []int32{2, 1, 2, 3, 0, 1, 1, 1}, "layer 0 expert 0 has 3 owners; need 1 to 2"},
		{"ends in owners", []int32{2, 1, 2, 1, 0, 2, 1}, "ends in layer 0 expert 1's 2 owners"},
		{"ends before expert", []int32{3, 1, 3, 3, 0, 1, 2, 1, 0}, "ends at layer 0 expert 2"},
		{"trailing", []int32{2, 1, 2, 1, 0, 1, 1, 7}, "1 values after the last expert"},
		{"rank out of range", []int32{2, 1, 2, 1, 0, 1, 2}, "owner rank 2 outside [0, 2)"},
		{"unsorted", []int32{2, 1, 2, 2, 1, 0, 1, 1}, "not ascending"},
		{"idle rank", []int32{2, 1, 2, 1, 0, 1, 0}, "rank 1 holds no expert"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tb, err := FromFlat(tc.v)
			if tb != nil || !errors.Is(err, ErrInvalidTable) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("FromFlat = %v, %v; want ErrInvalidTable mentioning %q", tb, err, tc.want)
			}
		})
	}
}

// FuzzFromFlat feeds FromFlat hostile input (each byte one small value,
// negative ones included): it must not panic, and what it accepts must be
// valid and encode back to the same values.
func FuzzFromFlat(f *testing.F) {
	for _, seed := range [][]int32{
		{2, 2, 4, 1, 0, 1, 0, 1, 1, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1},
		{4, 1, 3, 2, 0, 2, 3, 1, 2, 3, 1, 3},
		{2, 1, 2, 0, 1, 1, 1},
		{1, 127, 127, 1, 0},
	} {
		b := make([]byte, len(seed))
		for i, x := range seed {
			b[i] = byte(int8(x))
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		v := make([]int32, len(b))
		for i, x := range b {
			v[i] = int32(int8(x))
		}
		tb, err := FromFlat(v)
		if err != nil {
			if tb != nil || !errors.Is(err, ErrInvalidTable) {
				t.Fatalf("FromFlat(%v) = %v, %v", v, tb, err)
			}
			return
		}
		if err := tb.Validate(int(v[1]), int(v[2])); err != nil {
			t.Fatalf("FromFlat(%v) accepted an invalid table: %v", v, err)
		}
		if back := tb.Flat(); !slices.Equal(back, v) {
			t.Fatalf("FromFlat(%v).Flat() = %v", v, back)
		}
	})
}
