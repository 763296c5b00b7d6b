package expertparallel

import (
	"fmt"
	"math"
)

// Exchanger is the transport of an expert-parallel stage: pkg/server's
// worker-to-worker streams, or model.LocalExchangers in one process.
type Exchanger interface {
	// AllReduce sums x over the rank's attention (tensor-parallel) group.
	AllReduce(x []float32) error
	// AllToAll sends send[j] to stage rank j and returns recv, recv[j]
	// being what rank j sent to this one (recv[own] is send[own]).
	AllToAll(send [][]float32) ([][]float32, error)
}

// Stage is rank Rank of an expert-parallel stage of Size ranks over an
// Exchanger: the model.StageComm of an expert-parallel shard.
type Stage struct {
	Exchanger
	Rank, Size int
}

// ReduceStage adds x, [T, H] partial sums of the ranks of the stage,
// over the stage with two all-to-alls (the combine of an MoE block): each
// rank sends the rows it holds a part of (touched; nil: all) to their
// home rank (rows [h·T/n, (h+1)·T/n) are rank h's), the home adds the
// parts in rank order, and sends the sums to every rank. Every rank ends
// with the same bits. A part is [k, k row indices (as int32 bits), k·H
// values]; a malformed part is an error, never a panic.
func (s *Stage) ReduceStage(x []float32, H int, touched []bool) error {
	rank, n, c := s.Rank, s.Size, s.Exchanger
	if H <= 0 || len(x)%H != 0 || touched != nil && len(touched) != len(x)/H {
		return fmt.Errorf("expertparallel: %d values, %d touched rows, of width %d", len(x), len(touched), H)
	}
	T := len(x) / H
	home := func(h int) (lo, hi int) { return h * T / n, (h + 1) * T / n }
	send := make([][]float32, n)
	for h := range send {
		lo, hi := home(h)
		var idx []int
		for r := lo; r < hi; r++ {
			if touched == nil || touched[r] {
				idx = append(idx, r)
			}
		}
		part := make([]float32, 1+len(idx)+len(idx)*H)
		part[0] = math.Float32frombits(uint32(len(idx)))
		for i, r := range idx {
			part[1+i] = math.Float32frombits(uint32(r))
			copy(part[1+len(idx)+i*H:], x[r*H:(r+1)*H])
		}
		send[h] = part
	}
	recv, err := c.AllToAll(send)
	if err != nil {
		return err
	}
	if len(recv) != n {
		return fmt.Errorf("all-to-all returned %d parts for %d ranks", len(recv), n)
	}
	lo, hi := home(rank)
	sum := make([]float32, (hi-lo)*H)
	for from, part := range recv { // rank order
		if len(part) < 1 {
			return fmt.Errorf("rank %d sent an empty part", from)
		}
		k := int(math.Float32bits(part[0]))
		if k > hi-lo || len(part) != 1+k+k*H {
			return fmt.Errorf("rank %d sent %d values for %d rows of width %d", from, len(part), k, H)
		}
		for i := 0; i < k; i++ {
			r := int(math.Float32bits(part[1+i]))
			if r < lo || r >= hi {
				return fmt.Errorf("rank %d sent row %d, outside [%d, %d)", from, r, lo, hi)
			}
			dst := sum[(r-lo)*H : (r-lo+1)*H]
			for j, v := range part[1+k+i*H : 1+k+(i+1)*H] {
				dst[j] += v
			}
		}
	}
	for h := range send {
		send[h] = sum
	}
	if recv, err = c.AllToAll(send); err != nil {
		return err
	}
	if len(recv) != n {
		return fmt.Errorf("all-to-all returned %d parts for %d ranks", len(recv), n)
	}
	for h, part := range recv {
		lo, hi := home(h)
		if len(part) != (hi-lo)*H {
			return fmt.Errorf("rank %d sent %d summed values for %d rows of width %d", h, len(part), hi-lo, H)
		}
		copy(x[lo*H:hi*H], part)
	}
	return nil
}
