package expertparallel

import (
	"fmt"
	"sync"
)

// Stats accumulates the tokens routed to each expert of each layer between
// rebalances. It is safe for concurrent use: workers' step reports may Add
// while the balancer reads Counts.
type Stats struct {
	mu      sync.Mutex
	experts int
	counts  [][]int64 // [layer][expert]
}

// NewStats returns empty Stats for layers layers of experts experts. It
// panics if either is negative.
func NewStats(layers, experts int) *Stats {
	if layers < 0 || experts < 0 {
		panic(fmt.Sprintf("expertparallel: NewStats(%d, %d)", layers, experts))
	}
	s := &Stats{experts: experts, counts: make([][]int64, layers)}
	for l := range s.counts {
		s.counts[l] = make([]int64, experts)
	}
	return s
}

// Add adds counts element-wise. It changes nothing and returns an error
// wrapping ErrInvalidArgument if counts is not [layers][experts] or holds
// a negative count. Add does not retain counts.
func (s *Stats) Add(counts [][]int64) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if len(counts) != len(s.counts) {
		return fmt.Errorf("%w: counts for %d layers, stats hold %d", ErrInvalidArgument, len(counts), len(s.counts))
	}
	for l, row := range counts {
		if len(row) != s.experts {
			return fmt.Errorf("%w: layer %d: counts for %d experts, stats hold %d", ErrInvalidArgument, l, len(row), s.experts)
		}
		for e, c := range row {
			if c < 0 {
				return fmt.Errorf("%w: layer %d expert %d: negative count %d", ErrInvalidArgument, l, e, c)
			}
		}
	}
	for l, row := range counts {
		for e, c := range row {
			s.counts[l][e] += c
		}
	}
	return nil
}

// Counts is a copy of the accumulated counts, [layer][expert]; the caller
// owns it.
func (s *Stats) Counts() [][]int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([][]int64, len(s.counts))
	for l, row := range s.counts {
		out[l] = make([]int64, len(row))
		copy(out[l], row)
	}
	return out
}

// Reset sets every count to zero (after a rebalance, or to start a new
// window).
func (s *Stats) Reset() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, row := range s.counts {
		clear(row)
	}
}
