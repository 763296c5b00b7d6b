package expertparallel

import (
	"cmp"
	"container/heap"
	"fmt"
	"math/bits"
	"slices"
)

// Rebalance computes a placement of G = ranks ranks with slots expert
// slots per rank that evens out the load counts[l][e] (tokens routed to
// expert e of layer l over some window, as from Stats). Each layer is
// planned alone, in the manner of DeepSeek's EPLB and vLLM's:
//
//  1. Replicate. The layer has G·slots slots. Every expert gets one; each
//     remaining slot goes, one at a time, to the expert with the highest
//     count/replicas (ties: the lower expert), never beyond G replicas.
//  2. Place. The replicas, sorted by load count/replicas descending (ties:
//     the lower expert, then the lower replica), go one by one to the
//     least-loaded rank (ties: the lower rank) that has a free slot and
//     does not already hold that expert. In the rare case that no such
//     rank exists, a replica of another expert on the least-loaded rank
//     lacking this one moves to the least-loaded rank with a free slot
//     (its lightest replica that rank lacks, ties to the lower expert),
//     and this one takes the slot it left.
//
// Every rank ends with exactly slots experts. A layer with no tokens keeps
// the Contiguous layout. The result is deterministic: the same arguments
// give an Equal Table. slots = ⌈E/G⌉ only moves experts; every slot beyond
// that replicates hot experts (slots ≤ E, since at most G replicas of each
// can be placed). Errors wrap ErrInvalidArgument: ranks < 1, no layers,
// fewer experts than ranks, layers of different lengths, a negative count,
// or slots outside [⌈E/G⌉, E].
func Rebalance(counts [][]int64, ranks, slots int) (*Table, error) {
	if ranks < 1 {
		return nil, fmt.Errorf("%w: %d ranks; need at least 1", ErrInvalidArgument, ranks)
	}
	if len(counts) == 0 {
		return nil, fmt.Errorf("%w: counts for no layers", ErrInvalidArgument)
	}
	experts := len(counts[0])
	if experts < ranks {
		return nil, fmt.Errorf("%w: %d experts over %d ranks leaves a rank without one", ErrInvalidArgument, experts, ranks)
	}
	for l, row := range counts {
		if len(row) != experts {
			return nil, fmt.Errorf("%w: layer %d has counts for %d experts, layer 0 for %d", ErrInvalidArgument, l, len(row), experts)
		}
		for e, c := range row {
			if c < 0 {
				return nil, fmt.Errorf("%w: layer %d expert %d has a negative count %d", ErrInvalidArgument, l, e, c)
			}
		}
	}
	if least := (experts + ranks - 1) / ranks; slots < least || slots > experts {
		return nil, fmt.Errorf("%w: %d slots per rank; %d experts over %d ranks need %d to %d", ErrInvalidArgument, slots, experts, ranks, least, experts)
	}
	t := &Table{Ranks: ranks, Owners: make([][][]int, len(counts))}
	for l, row := range counts {
		t.Owners[l], _ = rebalanceLayer(row, ranks, slots)
	}
	return t, nil
}

// replica is one copy of an expert: count tokens over reps copies.
type replica struct {
	expert, index int
	count         int64
	reps          int
}

// compareLoad compares a.count/a.reps with b.count/b.reps exactly (as
// a.count·b.reps against b.count·a.reps in 128 bits).
func compareLoad(a, b replica) int {
	ah, al := bits.Mul64(uint64(a.count), uint64(b.reps))
	bh, bl := bits.Mul64(uint64(b.count), uint64(a.reps))
	if c := cmp.Compare(ah, bh); c != 0 {
		return c
	}
	return cmp.Compare(al, bl)
}

// byLoad is a max-heap of experts by count/reps, ties to the lower expert.
type byLoad []replica

func (h byLoad) Len() int { return len(h) }
func (h byLoad) Less(i, j int) bool {
	if c := compareLoad(h[i], h[j]); c != 0 {
		return c > 0
	}
	return h[i].expert < h[j].expert
}
func (h byLoad) Swap(i, j int) { h[i], h[j] = h[j], h[i] }
func (h *byLoad) Push(x any)   { *h = append(*h, x.(replica)) }
func (h *byLoad) Pop() any {
	old := *h
	x := old[len(old)-1]
	*h = old[:len(old)-1]
	return x
}

// rebalanceLayer is Rebalance for one layer's counts; repairs is how many
// replicas needed placer.repair (for tests).
func rebalanceLayer(counts []int64, ranks, slots int) (owners [][]int, repairs int) {
	experts := len(counts)
	if !slices.ContainsFunc(counts, func(c int64) bool { return c > 0 }) {
		return contiguousLayer(experts, ranks), 0
	}

	// 1. Replicate.
	reps := make([]int, experts)
	h := make(byLoad, 0, experts)
	for e, c := range counts {
		reps[e] = 1
		if ranks > 1 {
			h = append(h, replica{expert: e, count: c, reps: 1})
		}
	}
	heap.Init(&h)
	for range ranks*slots - experts {
		// Never empty: slots ≤ experts, so the remaining slots fit under
		// the G-replica cap.
		top := &h[0]
		top.reps++
		reps[top.expert] = top.reps
		if top.reps == ranks {
			heap.Pop(&h)
		} else {
			heap.Fix(&h, 0)
		}
	}

	// 2. Place.
	items := make([]replica, 0, ranks*slots)
	for e, c := range counts {
		for i := range reps[e] {
			items = append(items, replica{expert: e, index: i, count: c, reps: reps[e]})
		}
	}
	slices.SortFunc(items, func(a, b replica) int {
		if c := compareLoad(b, a); c != 0 {
			return c
		}
		if c := cmp.Compare(a.expert, b.expert); c != 0 {
			return c
		}
		return cmp.Compare(a.index, b.index)
	})
	p := placer{
		load:   make([]float64, ranks),
		placed: make([][]replica, ranks),
		holds:  make([]bool, ranks*experts),
		slots:  slots,
		exps:   experts,
	}
	for _, it := range items {
		if r := p.least(func(r int) bool { return !p.full(r) && !p.has(r, it.expert) }); r >= 0 {
			p.put(r, it)
			continue
		}
		p.repair(it)
		repairs++
	}

	owners = make([][]int, experts)
	for r, held := range p.placed {
		for _, it := range held {
			owners[it.expert] = append(owners[it.expert], r)
		}
	}
	// Ranks were visited in ascending order, so each owners list is sorted.
	return owners, repairs
}

// placer is the state of one layer's placement.
type placer struct {
	load   []float64   // per rank: Σ count/reps of its replicas
	placed [][]replica // per rank, in placement order
	holds  []bool      // [rank·exps + expert]
	slots  int
	exps   int
}

func (p *placer) full(r int) bool        { return len(p.placed[r]) >= p.slots }
func (p *placer) has(r, expert int) bool { return p.holds[r*p.exps+expert] }

func share(it replica) float64 { return float64(it.count) / float64(it.reps) }

// least is the least-loaded rank satisfying ok (ties: the lower rank), or -1.
func (p *placer) least(ok func(r int) bool) int {
	best := -1
	for r := range p.load {
		if ok(r) && (best < 0 || p.load[r] < p.load[best]) {
			best = r
		}
	}
	return best
}

func (p *placer) put(r int, it replica) {
	p.placed[r] = append(p.placed[r], it)
	p.holds[r*p.exps+it.expert] = true
	p.load[r] += share(it)
}

func (p *placer) take(r, i int) replica {
	it := p.placed[r][i]
	p.placed[r] = slices.Delete(p.placed[r], i, i+1)
	p.holds[r*p.exps+it.expert] = false
	p.load[r] -= share(it)
	return it
}

// repair places it when every rank with a free slot already holds its
// expert. Such a rank from exists (one slot is left per item left), and
// so does a full rank to lacking the expert (it has fewer than G replicas
// placed). to holds slots experts and from at most slots-2 besides it, so
// some replica on to is of an expert from lacks: it moves to from, and it
// takes its place on to.
func (p *placer) repair(it replica) {
	from := p.least(func(r int) bool { return !p.full(r) })
	to := p.least(func(r int) bool { return !p.has(r, it.expert) })
	if from < 0 || to < 0 {
		panic("expertparallel: rebalance ran out of slots") // slots·G = replicas: unreachable
	}
	move := -1
	for i, m := range p.placed[to] {
		if p.has(from, m.expert) {
			continue
		}
		if move < 0 {
			move = i
			continue
		}
		best := p.placed[to][move]
		if c := compareLoad(m, best); c < 0 || c == 0 && m.expert < best.expert {
			move = i
		}
	}
	if move < 0 {
		panic("expertparallel: rebalance found no replica to move") // unreachable, see above
	}
	p.put(from, p.take(to, move))
	p.put(to, it)
}
