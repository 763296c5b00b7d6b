package kvcache

import (
	"errors"
	"math/rand/v2"
	"slices"
	"testing"
)

func toks(n, seed int) []int32 {
	t := make([]int32, n)
	for i := range t {
		t[i] = int32((i*7919 + seed*104729) % 151000)
	}
	return t
}

func TestPrefixHashes(t *testing.T) {
	root := RootHash("qwen2-0.5b")
	a := PrefixHashes(root, nil, toks(50, 1), 16)
	if len(a) != 3 {
		t.Fatalf("%d hashes for 50 tokens of 16, want 3", len(a))
	}
	// Incremental equals at once.
	b := PrefixHashes(root, nil, toks(20, 1), 16)
	b = PrefixHashes(root, b, toks(50, 1), 16)
	if !slices.Equal(a, b) {
		t.Fatal("incremental hashes differ")
	}
	// A change in block 1 changes blocks 1 and 2, not 0.
	x := toks(50, 1)
	x[20]++
	c := PrefixHashes(root, nil, x, 16)
	if c[0] != a[0] || c[1] == a[1] || c[2] == a[2] {
		t.Fatal("hash chain does not follow the prefix")
	}
	// Another identity shares nothing.
	if d := PrefixHashes(RootHash("qwen2-7b"), nil, toks(50, 1), 16); d[0] == a[0] {
		t.Fatal("identity not in the hash")
	}
}

func mustOK(t *testing.T, m *BlockManager) {
	t.Helper()
	if err := m.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}

func TestShareRegisterEvict(t *testing.T) {
	const bs = 4
	m := NewBlockManager(8, bs)
	m.SetPrefixCaching(true)
	root := RootHash("m")
	p := toks(10, 1) // 2 full blocks + 2 tokens
	hs := PrefixHashes(root, nil, p, bs)
	if got := m.Share(1, hs, 10); got != 0 {
		t.Fatalf("empty cache shared %d", got)
	}
	if err := m.Reserve(1, 10); err != nil {
		t.Fatal(err)
	}
	m.Register(1, 0, hs)
	if m.NumCached() != 2 {
		t.Fatalf("cached %d, want 2", m.NumCached())
	}
	mustOK(t, m)
	// A second sequence with the same prompt shares both full blocks.
	if got := m.Share(2, hs, 10); got != 2 {
		t.Fatalf("shared %d, want 2", got)
	}
	t1, t2 := m.Table(1), m.Table(2)
	if t2[0] != t1[0] || t2[1] != t1[1] || m.NumUsed() != 3 {
		t.Fatalf("tables %v %v used %d", t1, t2, m.NumUsed())
	}
	if err := m.Reserve(2, 10); err != nil {
		t.Fatal(err)
	}
	mustOK(t, m)
	// Both end: cached blocks stay cached on the free list.
	m.Free(1)
	m.Free(2)
	mustOK(t, m)
	if m.NumFree() != 8 || m.NumCached() != 2 || m.Match(hs) != 2 {
		t.Fatalf("free %d cached %d match %d", m.NumFree(), m.NumCached(), m.Match(hs))
	}
	// Filling the pool uses uncached blocks first, then evicts.
	if err := m.Reserve(3, 6*bs); err != nil {
		t.Fatal(err)
	}
	if m.Match(hs) != 2 || m.Evictions() != 0 {
		t.Fatalf("uncached blocks were not used first: match %d evictions %d", m.Match(hs), m.Evictions())
	}
	if err := m.Reserve(3, 7*bs); err != nil {
		t.Fatal(err)
	}
	// The later block of the prefix goes first, so the first still matches.
	if m.Match(hs) != 1 || m.Evictions() != 1 {
		t.Fatalf("after one eviction: match %d evictions %d", m.Match(hs), m.Evictions())
	}
	mustOK(t, m)
}

func TestLRUOrder(t *testing.T) {
	const bs = 2
	m := NewBlockManager(4, bs)
	m.SetPrefixCaching(true)
	root := RootHash("m")
	a, b := PrefixHashes(root, nil, toks(4, 1), bs), PrefixHashes(root, nil, toks(4, 2), bs)
	for i, hs := range [][]BlockHash{a, b} {
		seq := SeqID(i + 1)
		m.Reserve(seq, 4)
		m.Register(seq, 0, hs)
		m.Free(seq)
	}
	// a was freed first: least recently used. Using a again makes b the
	// older one.
	if m.Share(9, a, 2) != 2 {
		t.Fatal("a not cached")
	}
	m.Free(9)
	if err := m.Reserve(10, 2*bs); err != nil {
		t.Fatal(err)
	}
	if m.Match(a) != 2 || m.Match(b) != 0 {
		t.Fatalf("LRU evicted the wrong prefix: a %d b %d", m.Match(a), m.Match(b))
	}
	mustOK(t, m)
}

func TestCopyOnWrite(t *testing.T) {
	const bs = 4
	m := NewBlockManager(6, bs)
	m.SetPrefixCaching(true)
	p := toks(8, 3) // exactly 2 blocks
	hs := PrefixHashes(RootHash("m"), nil, p, bs)
	m.Reserve(1, 8)
	m.Register(1, 0, hs)
	// Sequence 2 has the whole prompt cached; it recomputes the last
	// token, which lies in a block sequence 1 still holds: it gets a copy.
	if m.Share(2, hs, 2) != 2 {
		t.Fatal("not shared")
	}
	m.Reserve(2, 8)
	shared := m.Table(2)[1]
	cp, err := m.PrepareWrite(2, 7, 8)
	if err != nil {
		t.Fatal(err)
	}
	if len(cp) != 1 || cp[0].Src != shared || cp[0].Dst == shared || m.Table(2)[1] != cp[0].Dst || m.Table(1)[1] != shared {
		t.Fatalf("copies %v, tables %v %v", cp, m.Table(1), m.Table(2))
	}
	if m.Table(2)[0] != m.Table(1)[0] {
		t.Fatal("the block not written was copied too")
	}
	mustOK(t, m)
	// Alone in a cached block: no copy, but the block leaves the cache.
	m.Free(1)
	m.Free(2)
	m.Share(3, hs, 2)
	m.Reserve(3, 8)
	if cp, _ := m.PrepareWrite(3, 7, 8); len(cp) != 0 || m.Match(hs) != 1 {
		t.Fatalf("copies %v, match %d (want none, 1)", cp, m.Match(hs))
	}
	mustOK(t, m)
	// No block for the copy: nothing changes.
	m2 := NewBlockManager(2, bs)
	m2.SetPrefixCaching(true)
	m2.Reserve(1, 8)
	m2.Register(1, 0, hs)
	m2.Share(2, hs, 2)
	before := slices.Clone(m2.Table(2))
	if _, err := m2.PrepareWrite(2, 0, 8); !errors.Is(err, ErrNoBlocks) {
		t.Fatalf("err %v, want ErrNoBlocks", err)
	}
	if !slices.Equal(before, m2.Table(2)) {
		t.Fatal("failed PrepareWrite changed the table")
	}
	mustOK(t, m2)
}

func TestResetAndOff(t *testing.T) {
	m := NewBlockManager(4, 2)
	m.SetPrefixCaching(true)
	hs := PrefixHashes(RootHash("m"), nil, toks(4, 1), 2)
	m.Reserve(1, 4)
	m.Register(1, 0, hs)
	m.ResetCache()
	if m.Match(hs) != 0 || m.NumUsed() != 2 {
		t.Fatal("ResetCache")
	}
	m.Register(1, 0, hs)
	m.SetPrefixCaching(false)
	if m.Match(hs) != 0 || m.Share(2, hs, 2) != 0 {
		t.Fatal("caching off still matches")
	}
	m.Register(1, 0, hs) // no-op
	mustOK(t, m)
}

// TestRandomOps runs random reservations, shares, writes and frees and
// checks the invariants, and that no block is ever written while another
// sequence holds it.
func TestRandomOps(t *testing.T) {
	const bs = 4
	r := rand.New(rand.NewPCG(1, 2))
	m := NewBlockManager(40, bs)
	m.SetPrefixCaching(true)
	root := RootHash("m")
	prompts := [][]int32{toks(13, 1), toks(16, 2), toks(30, 3), toks(9, 4)}
	type live struct {
		toks     []int32
		computed int
	}
	seqs := map[SeqID]*live{}
	next := SeqID(1)
	for step := 0; step < 5000; step++ {
		switch op := r.IntN(4); {
		case op == 0 || len(seqs) == 0: // admit
			p := prompts[r.IntN(len(prompts))]
			id := next
			next++
			hs := PrefixHashes(root, nil, p, bs)
			n := m.Share(id, hs, len(hs))
			computed := min(n*bs, len(p)-1)
			if err := m.Reserve(id, len(p)); err != nil {
				m.Free(id)
				continue
			}
			if _, err := m.PrepareWrite(id, computed, len(p)); err != nil {
				m.Free(id)
				continue
			}
			for i := computed / bs; i < m.BlocksFor(len(p)); i++ {
				if b := m.Table(id)[i]; m.blocks[b].ref != 1 || m.blocks[b].hashed {
					t.Fatalf("step %d: block %d to be written is shared (ref %d) or cached", step, b, m.blocks[b].ref)
				}
			}
			m.Register(id, 0, hs)
			seqs[id] = &live{toks: slices.Clone(p), computed: len(p)}
		case op == 1: // free one
			for id := range seqs {
				m.Free(id)
				delete(seqs, id)
				break
			}
		default: // decode one token on one
			for id, s := range seqs {
				s.toks = append(s.toks, int32(r.IntN(1000)))
				if m.Reserve(id, len(s.toks)) != nil {
					break
				}
				if _, err := m.PrepareWrite(id, s.computed, len(s.toks)); err != nil {
					break
				}
				s.computed = len(s.toks)
				m.Register(id, 0, PrefixHashes(root, nil, s.toks, bs))
				break
			}
		}
		if err := m.CheckInvariants(); err != nil {
			t.Fatalf("step %d: %v", step, err)
		}
	}
}
