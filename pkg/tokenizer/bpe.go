package tokenizer

// noMerge is the rank of a pair without a merge.
const noMerge = int32(1<<31 - 1)

// bpe appends the ids of one pre-token: its bytes as byte symbols, merged
// pair by pair, always the adjacent pair of lowest merge rank first (the
// leftmost on ties), until no adjacent pair has a merge. Each pair's rank
// is looked up once; after a merge only the two new pairs are.
func (t *Tokenizer) bpe(p string, out []int32, sc *bpeScratch) []int32 {
	if len(p) == 1 {
		return append(out, t.byteID[p[0]])
	}
	if len(p) > 48 {
		return t.bpeHeap(p, out, sc)
	}
	var symBuf, rankBuf, idBuf [48]int32
	n := len(p)
	syms, ranks, ids := symBuf[:n], rankBuf[:n], idBuf[:n] // ranks[i], ids[i]: pair (i, i+1)
	for i := 0; i < n; i++ {
		syms[i] = t.byteID[p[i]]
	}
	look := func(i int) {
		ranks[i], ids[i] = t.merges.get(syms[i], syms[i+1])
	}
	for i := 0; i+1 < n; i++ {
		look(i)
	}
	for n > 1 {
		best := 0
		for i := 1; i+1 < n; i++ {
			if ranks[i] < ranks[best] {
				best = i
			}
		}
		if ranks[best] == noMerge {
			break
		}
		syms[best] = ids[best]
		copy(syms[best+1:n-1], syms[best+2:n])
		copy(ranks[best+1:n-1], ranks[best+2:n])
		copy(ids[best+1:n-1], ids[best+2:n])
		n--
		if best+1 < n {
			look(best)
		}
		if best > 0 {
			look(best - 1)
		}
	}
	return append(out, syms[:n]...)
}

// bpeHeap is bpe for long pieces (runs of CJK text can be hundreds of
// bytes): symbols in a linked list, candidate merges in a min-heap ordered
// by (rank, position), stale candidates skipped when popped. O(n log n).
func (t *Tokenizer) bpeHeap(p string, out []int32, sc *bpeScratch) []int32 {
	n := len(p)
	if sc == nil {
		sc = &bpeScratch{}
	}
	sc.grow(n)
	id, next, prev := sc.id[:n], sc.next[:n], sc.prev[:n] // next -1 at the end, prev -1 at the start
	for i := 0; i < n; i++ {
		id[i] = t.byteID[p[i]]
		next[i], prev[i] = int32(i+1), int32(i-1)
	}
	next[n-1] = -1
	h := sc.heap[:0]
	defer func() { sc.heap = h[:0] }()
	push := func(i int32) {
		j := next[i]
		if j < 0 {
			return
		}
		if rank, _ := t.merges.get(id[i], id[j]); rank != noMerge {
			h.push(uint64(rank)<<32 | uint64(i))
		}
	}
	for i := 0; i < n-1; i++ {
		push(int32(i))
	}
	for len(h) > 0 {
		e := h.pop()
		rank, i := int32(e>>32), int32(uint32(e))
		if id[i] < 0 {
			continue // merged into its left neighbour
		}
		j := next[i]
		if j < 0 {
			continue
		}
		r, merged := t.merges.get(id[i], id[j])
		if r != rank {
			continue // the pair changed since it was pushed
		}
		id[i] = merged
		id[j] = -1
		next[i] = next[j]
		if next[j] >= 0 {
			prev[next[j]] = i
		}
		if prev[i] >= 0 {
			push(prev[i])
		}
		push(i)
	}
	for i := int32(0); i >= 0; i = next[i] {
		out = append(out, id[i])
	}
	return out
}

// bpeScratch is reusable memory of bpeHeap.
type bpeScratch struct {
	id, next, prev []int32
	heap           pairHeap
}

func (s *bpeScratch) grow(n int) {
	if cap(s.id) < n {
		s.id, s.next, s.prev = make([]int32, n), make([]int32, n), make([]int32, n)
		s.heap = make(pairHeap, 0, n)
	}
}

// pairHeap is a binary min-heap of rank<<32 | position.
type pairHeap []uint64

func (h *pairHeap) push(v uint64) {
	*h = append(*h, v)
	a := *h
	i := len(a) - 1
	for i > 0 {
		p := (i - 1) / 2
		if a[p] <= v {
			break
		}
		a[i] = a[p]
		i = p
	}
	a[i] = v
}

func (h *pairHeap) pop() uint64 {
	a := *h
	top := a[0]
	last := a[len(a)-1]
	a = a[:len(a)-1]
	*h = a
	if len(a) == 0 {
		return top
	}
	i := 0
	for {
		l := 2*i + 1
		if l >= len(a) {
			break
		}
		c := l
		if r := l + 1; r < len(a) && a[r] < a[l] {
			c = r
		}
		if a[c] >= last {
			break
		}
		a[i] = a[c]
		i = c
	}
	a[i] = last
	return top
}

// mergeTable maps a pair of ids to its merge rank and result: open
// addressing with linear probing over a power-of-two table at most half
// full (much faster than a Go map on this hot path).
type mergeTable struct {
	slots []mergeSlot // key and value side by side: one cache line a probe
	shift uint
	mask  uint64
}

type mergeSlot struct {
	key uint64 // 1<<63 | left<<32 | right; 0 = empty
	val uint64 // rank<<32 | merged id
}

func newMergeTable(n int) *mergeTable {
	size, shift := 1, uint(64)
	for size < 2*n+2 {
		size <<= 1
		shift--
	}
	return &mergeTable{slots: make([]mergeSlot, size), shift: shift, mask: uint64(size - 1)}
}

func pairKey(a, b int32) uint64 { return 1<<63 | uint64(uint32(a))<<32 | uint64(uint32(b)) }

// add records a merge; the first one of a pair wins.
func (m *mergeTable) add(a, b, rank, id int32) {
	k := pairKey(a, b)
	h := (k * 0x9e3779b97f4a7c15) >> m.shift
	for m.slots[h].key != 0 {
		if m.slots[h].key == k {
			return
		}
		h = (h + 1) & m.mask
	}
	m.slots[h] = mergeSlot{k, uint64(uint32(rank))<<32 | uint64(uint32(id))}
}

// get returns the rank and merged id of a pair, or noMerge.
func (m *mergeTable) get(a, b int32) (rank, id int32) {
	k := pairKey(a, b)
	h := (k * 0x9e3779b97f4a7c15) >> m.shift
	for {
		s := &m.slots[h]
		switch s.key {
		case k:
			return int32(s.val >> 32), int32(uint32(s.val))
		case 0:
			return noMerge, 0
		}
		h = (h + 1) & m.mask
	}
}
