package expertparallel

import (
	"fmt"
	"math"
)

// Flat encodes t as integers for a protobuf repeated int32 field:
//
//	G, L, E, then for each layer l and expert e in order:
//	    n, r₁ … rₙ      (n = len(Owners[l][e]), then the owning ranks)
//
// Contiguous(2, 4, 2).Flat() is [2 2 4  1 0 1 0 1 1 1 1  1 0 1 0 1 1 1 1].
// It panics if a size or rank does not fit in an int32.
func (t *Table) Flat() []int32 {
	experts := 0
	if len(t.Owners) > 0 {
		experts = len(t.Owners[0])
	}
	n := 3
	for _, layer := range t.Owners {
		for _, owners := range layer {
			n += 1 + len(owners)
		}
	}
	v := make([]int32, 0, n)
	v = append(v, i32(t.Ranks), i32(len(t.Owners)), i32(experts))
	for _, layer := range t.Owners {
		for _, owners := range layer {
			v = append(v, i32(len(owners)))
			for _, r := range owners {
				v = append(v, i32(r))
			}
		}
	}
	return v
}

func i32(n int) int32 {
	if n < math.MinInt32 || n > math.MaxInt32 {
		panic(fmt.Sprintf("expertparallel: %d does not fit in an int32", n))
	}
	return int32(n)
}

// FromFlat decodes Flat's encoding. It never panics and allocates no more
// than the input's length warrants: a header whose sizes the rest cannot
// hold, a count outside [1, G], missing or trailing values, and anything
// Validate rejects give an error wrapping ErrInvalidTable.
func FromFlat(v []int32) (*Table, error) {
	if len(v) < 3 {
		return nil, fmt.Errorf("%w: flat encoding of %d values; need at least the 3 of the header", ErrInvalidTable, len(v))
	}
	g, layers, experts := int(v[0]), int(v[1]), int(v[2])
	switch {
	case g < 1:
		return nil, fmt.Errorf("%w: %d ranks; need at least 1", ErrInvalidTable, g)
	case layers < 1:
		return nil, fmt.Errorf("%w: %d layers; need at least 1", ErrInvalidTable, layers)
	case experts < 1:
		return nil, fmt.Errorf("%w: %d experts; need at least 1", ErrInvalidTable, experts)
	}
	// Each expert takes at least two values (a count and a rank); both
	// factors are below 2³¹, so the product fits in an int64.
	if need := 2 * int64(layers) * int64(experts); int64(len(v)-3) < need {
		return nil, fmt.Errorf("%w: %d layers × %d experts need at least %d values after the header, have %d", ErrInvalidTable, layers, experts, need, len(v)-3)
	}
	t := &Table{Ranks: g, Owners: make([][][]int, layers)}
	i := 3
	for l := range t.Owners {
		t.Owners[l] = make([][]int, experts)
		for e := range t.Owners[l] {
			if i >= len(v) {
				return nil, fmt.Errorf("%w: flat encoding ends at layer %d expert %d", ErrInvalidTable, l, e)
			}
			n := int(v[i])
			i++
			if n < 1 || n > g {
				return nil, fmt.Errorf("%w: layer %d expert %d has %d owners; need 1 to %d", ErrInvalidTable, l, e, n, g)
			}
			if n > len(v)-i {
				return nil, fmt.Errorf("%w: flat encoding ends in layer %d expert %d's %d owners", ErrInvalidTable, l, e, n)
			}
			owners := make([]int, n)
			for j := range owners {
				owners[j] = int(v[i+j])
			}
			i += n
			t.Owners[l][e] = owners
		}
	}
	if i != len(v) {
		return nil, fmt.Errorf("%w: %d values after the last expert", ErrInvalidTable, len(v)-i)
	}
	if err := t.Validate(layers, experts); err != nil {
		return nil, err
	}
	return t, nil
}
