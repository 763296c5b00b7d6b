package expertparallel

import (
	"errors"
	"slices"
	"sync"
	"testing"
)

func TestStats(t *testing.T) {
	s := NewStats(2, 3)
	if err := s.Add([][]int64{{1, 2, 3}, {4, 5, 6}}); err != nil {
		t.Fatal(err)
	}
	if err := s.Add([][]int64{{10, 0, 0}, {0, 0, 1}}); err != nil {
		t.Fatal(err)
	}
	want := [][]int64{{11, 2, 3}, {4, 5, 7}}
	got := s.Counts()
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("Counts = %v, want %v", got, want)
	}
	got[0][0] = 999 // a copy: does not reach s
	for _, tc := range []struct {
		name   string
		counts [][]int64
	}{
		{"layers", [][]int64{{1, 1, 1}}},
		{"experts", [][]int64{{1, 1, 1}, {1, 1}}},
		{"negative", [][]int64{{1, 1, 1}, {1, -1, 1}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := s.Add(tc.counts); !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("Add(%v) = %v, want ErrInvalidArgument", tc.counts, err)
			}
		})
	}
	if got := s.Counts(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("after the copy was changed and bad Adds: Counts = %v, want %v", got, want)
	}
	s.Reset()
	if got, zero := s.Counts(), [][]int64{{0, 0, 0}, {0, 0, 0}}; !slices.EqualFunc(got, zero, slices.Equal) {
		t.Fatalf("after Reset: Counts = %v", got)
	}
}

func TestStatsConcurrent(t *testing.T) {
	s := NewStats(2, 4)
	one := [][]int64{{1, 0, 2, 0}, {0, 3, 0, 1}}
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			for range 100 {
				if err := s.Add(one); err != nil {
					t.Error(err)
				}
				_ = s.Counts()
			}
		})
	}
	wg.Wait()
	want := [][]int64{{800, 0, 1600, 0}, {0, 2400, 0, 800}}
	if got := s.Counts(); !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("Counts = %v, want %v", got, want)
	}
}
