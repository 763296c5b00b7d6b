package kvcache

import (
	"errors"
	"fmt"
)

// ErrNoBlocks means the free list cannot cover a reservation; nothing was
// allocated. The caller waits for other sequences to finish or preempts one.
var ErrNoBlocks = errors.New("kvcache: not enough free blocks")

// SeqID names a sequence in a BlockManager.
type SeqID uint64

// Copy asks the executor to copy block Src's K and V (every layer) into
// block Dst before a step writes Dst: copy-on-write of a shared block.
type Copy struct{ Src, Dst int32 }

// block is one block's bookkeeping.
type block struct {
	ref    int32 // sequences whose table holds the block
	hashed bool  // in the prefix cache under hash
	inFree bool  // on the free list (ref == 0)
	hash   BlockHash
	// prev, next link the free list (-1: none).
	prev, next int32
}

// BlockManager hands out cache blocks to sequences and, with prefix caching
// on, keeps full blocks by the hash of their token prefix for later
// sequences to share. It is pure accounting (no tensors) and is not safe
// for concurrent use.
//
// Every block is in exactly one of two states: owned (ref > 0: in the
// tables of ref sequences), or free (ref == 0, on the free list). A free
// block may still be cached (its hash maps to it): it is handed out again,
// and leaves the cache, only when the free blocks without a cached prefix
// are used up, least recently used first (the free list's head).
type BlockManager struct {
	blockSize  int
	blocks     []block
	head, tail int32 // free list; blocks are taken from head
	nfree      int
	used       int // blocks with ref > 0
	tables     map[SeqID][]int32
	cache      map[BlockHash]int32 // nil: prefix caching off
	evictions  int64
}

// NewBlockManager manages numBlocks blocks of blockSize slots each, with
// prefix caching off (see SetPrefixCaching).
func NewBlockManager(numBlocks, blockSize int) *BlockManager {
	if numBlocks < 0 || blockSize <= 0 {
		panic(fmt.Sprintf("kvcache: NewBlockManager(%d, %d)", numBlocks, blockSize))
	}
	m := &BlockManager{blockSize: blockSize, blocks: make([]block, numBlocks), head: -1, tail: -1, tables: map[SeqID][]int32{}}
	for i := range m.blocks {
		m.blocks[i].prev, m.blocks[i].next = -1, -1
		m.pushTail(int32(i)) // block 0 first
	}
	return m
}

// SetPrefixCaching turns prefix caching on or off; turning it off forgets
// every cached prefix (the blocks stay where they are).
func (m *BlockManager) SetPrefixCaching(on bool) {
	switch {
	case on && m.cache == nil:
		m.cache = map[BlockHash]int32{}
	case !on && m.cache != nil:
		m.ResetCache()
		m.cache = nil
	}
}

// PrefixCaching reports whether prefix caching is on.
func (m *BlockManager) PrefixCaching() bool { return m.cache != nil }

// BlockSize is the number of token slots in a block.
func (m *BlockManager) BlockSize() int { return m.blockSize }

// NumFree is the number of blocks no sequence owns (cached or not): what
// Reserve can hand out.
func (m *BlockManager) NumFree() int { return m.nfree }

// NumUsed is the number of blocks owned by sequences (a block shared by
// several counts once).
func (m *BlockManager) NumUsed() int { return m.used }

// NumCached is the number of blocks in the prefix cache, owned or free.
func (m *BlockManager) NumCached() int { return len(m.cache) }

// Evictions is how many cached blocks were handed out again (their prefix
// forgotten) since the start.
func (m *BlockManager) Evictions() int64 { return m.evictions }

// BlocksFor is the number of blocks that hold n tokens.
func (m *BlockManager) BlocksFor(n int) int { return (n + m.blockSize - 1) / m.blockSize }

// Reserve grows seq's table so it covers tokens positions (a sequence
// unknown so far starts empty). It allocates all or nothing: on ErrNoBlocks
// the table is unchanged. New blocks are exclusively seq's.
func (m *BlockManager) Reserve(seq SeqID, tokens int) error {
	t, ok := m.tables[seq]
	need := m.BlocksFor(tokens) - len(t)
	if need <= 0 {
		if !ok {
			m.tables[seq] = t
		}
		return nil
	}
	if need > m.nfree {
		return fmt.Errorf("%w: sequence %d needs %d more, %d free", ErrNoBlocks, seq, need, m.nfree)
	}
	for range need {
		t = append(t, m.take())
	}
	m.tables[seq] = t
	return nil
}

// Table is seq's block table (nil if it owns none). The slice is the
// manager's: read it before the next call that changes seq.
func (m *BlockManager) Table(seq SeqID) []int32 { return m.tables[seq] }

// Free drops seq's references to its blocks; those no other sequence owns
// go back to the free list (cached ones at its tail, the sequence's last
// block nearest the head, so later blocks of a prefix are forgotten before
// earlier ones; uncached ones at its head, to be used first). Freeing an
// unknown sequence does nothing.
func (m *BlockManager) Free(seq SeqID) {
	t, ok := m.tables[seq]
	if !ok {
		return
	}
	for i := len(t) - 1; i >= 0; i-- {
		m.unref(t[i])
	}
	delete(m.tables, seq)
}

// Match is how many of hashes, from the first, name cached blocks: a
// prefix of that many full blocks could be shared. It changes nothing.
func (m *BlockManager) Match(hashes []BlockHash) int {
	if m.cache == nil {
		return 0
	}
	n := 0
	for _, h := range hashes {
		if _, ok := m.cache[h]; !ok {
			break
		}
		n++
	}
	return n
}

// Share starts seq (which must own no blocks) with the cached blocks of
// the leading hashes, at most maxBlocks of them, taking a reference on
// each, and returns how many it took. The blocks' contents are those
// prefixes' KV; seq must not write them (see PrepareWrite).
func (m *BlockManager) Share(seq SeqID, hashes []BlockHash, maxBlocks int) int {
	if m.cache == nil || len(m.tables[seq]) > 0 {
		return 0
	}
	var t []int32
	for _, h := range hashes[:min(len(hashes), max(maxBlocks, 0))] {
		b, ok := m.cache[h]
		if !ok {
			break
		}
		m.ref(b)
		t = append(t, b)
	}
	if len(t) > 0 {
		m.tables[seq] = t
	}
	return len(t)
}

// PrepareWrite makes the blocks of seq that positions [from, to) fall in
// writable: a block another sequence shares is replaced by a fresh copy
// (returned: the executor copies it before the step), and a block seq
// alone holds that is cached leaves the cache (its contents will change).
// It is all or nothing: on ErrNoBlocks (no free block for a copy) nothing
// changed.
func (m *BlockManager) PrepareWrite(seq SeqID, from, to int) ([]Copy, error) {
	t := m.tables[seq]
	if from >= to {
		return nil, nil
	}
	lo, hi := from/m.blockSize, min(m.BlocksFor(to), len(t))
	need := 0
	for _, b := range t[lo:hi] {
		if m.blocks[b].ref > 1 {
			need++
		}
	}
	if need > m.nfree {
		return nil, fmt.Errorf("%w: sequence %d needs %d blocks to copy shared ones, %d free", ErrNoBlocks, seq, need, m.nfree)
	}
	var copies []Copy
	for i := lo; i < hi; i++ {
		b := t[i]
		switch {
		case m.blocks[b].ref > 1:
			d := m.take()
			m.unref(b)
			t[i] = d
			copies = append(copies, Copy{Src: b, Dst: d})
		case m.blocks[b].hashed:
			m.unhash(b)
		}
	}
	return copies, nil
}

// Register caches seq's blocks from table index from on under hashes[i]
// (hashes[i] names the content of the full block i: see PrefixHashes),
// for i < len(hashes). Blocks already cached, and hashes another block is
// cached under, are left as they are.
func (m *BlockManager) Register(seq SeqID, from int, hashes []BlockHash) {
	if m.cache == nil {
		return
	}
	t := m.tables[seq]
	for i := max(from, 0); i < len(hashes) && i < len(t); i++ {
		b := t[i]
		if m.blocks[b].hashed {
			continue
		}
		if _, dup := m.cache[hashes[i]]; dup {
			continue
		}
		m.blocks[b].hashed, m.blocks[b].hash = true, hashes[i]
		m.cache[hashes[i]] = b
	}
}

// ResetCache forgets every cached prefix (the executor's KV is no longer
// trusted); owned blocks stay owned.
func (m *BlockManager) ResetCache() {
	for b := range m.blocks {
		if m.blocks[b].hashed {
			m.unhash(int32(b))
		}
	}
}

// CheckInvariants verifies the bookkeeping (for tests): references match
// the tables, the free list holds exactly the unowned blocks once, and the
// cache maps each hash to a block cached under it.
func (m *BlockManager) CheckInvariants() error {
	refs := make([]int32, len(m.blocks))
	for seq, t := range m.tables {
		for _, b := range t {
			if b < 0 || int(b) >= len(m.blocks) {
				return fmt.Errorf("sequence %d holds block %d of %d", seq, b, len(m.blocks))
			}
			refs[b]++
		}
	}
	used := 0
	for b, blk := range m.blocks {
		if blk.ref != refs[b] {
			return fmt.Errorf("block %d: ref %d, tables hold it %d times", b, blk.ref, refs[b])
		}
		if blk.inFree != (blk.ref == 0) {
			return fmt.Errorf("block %d: ref %d but inFree %v", b, blk.ref, blk.inFree)
		}
		if blk.ref > 0 {
			used++
		}
		if blk.hashed && (m.cache == nil || m.cache[blk.hash] != int32(b)) {
			return fmt.Errorf("block %d is marked cached but the cache does not map its hash to it", b)
		}
	}
	if used != m.used {
		return fmt.Errorf("used %d, counted %d", m.used, used)
	}
	for h, b := range m.cache {
		if !m.blocks[b].hashed || m.blocks[b].hash != h {
			return fmt.Errorf("cache maps a hash to block %d, which is not cached under it", b)
		}
	}
	n, prev := 0, int32(-1)
	for b := m.head; b != -1; b = m.blocks[b].next {
		if !m.blocks[b].inFree || m.blocks[b].prev != prev {
			return fmt.Errorf("free list broken at block %d", b)
		}
		if n++; n > len(m.blocks) {
			return errors.New("free list has a cycle")
		}
		prev = b
	}
	if prev != m.tail || n != m.nfree || n+used != len(m.blocks) {
		return fmt.Errorf("free list: %d blocks (tail %d), nfree %d, used %d of %d", n, prev, m.nfree, used, len(m.blocks))
	}
	return nil
}

// take hands out the free list's head, forgetting its cached prefix.
func (m *BlockManager) take() int32 {
	b := m.head
	m.unlink(b)
	if m.blocks[b].hashed {
		m.unhash(b)
		m.evictions++
	}
	m.blocks[b].ref = 1
	m.used++
	return b
}

func (m *BlockManager) ref(b int32) {
	if m.blocks[b].ref == 0 {
		m.unlink(b)
		m.used++
	}
	m.blocks[b].ref++
}

func (m *BlockManager) unref(b int32) {
	if m.blocks[b].ref--; m.blocks[b].ref > 0 {
		return
	}
	m.used--
	if m.blocks[b].hashed {
		m.pushTail(b)
	} else {
		m.pushHead(b)
	}
}

func (m *BlockManager) unhash(b int32) {
	delete(m.cache, m.blocks[b].hash)
	m.blocks[b].hashed, m.blocks[b].hash = false, BlockHash{}
}

func (m *BlockManager) unlink(b int32) {
	blk := &m.blocks[b]
	if blk.prev >= 0 {
		m.blocks[blk.prev].next = blk.next
	} else {
		m.head = blk.next
	}
	if blk.next >= 0 {
		m.blocks[blk.next].prev = blk.prev
	} else {
		m.tail = blk.prev
	}
	blk.prev, blk.next, blk.inFree = -1, -1, false
	m.nfree--
}

func (m *BlockManager) pushTail(b int32) {
	blk := &m.blocks[b]
	blk.prev, blk.next, blk.inFree = m.tail, -1, true
	if m.tail >= 0 {
		m.blocks[m.tail].next = b
	} else {
		m.head = b
	}
	m.tail = b
	m.nfree++
}

func (m *BlockManager) pushHead(b int32) {
	blk := &m.blocks[b]
	blk.prev, blk.next, blk.inFree = -1, m.head, true
	if m.head >= 0 {
		m.blocks[m.head].prev = b
	} else {
		m.tail = b
	}
	m.head = b
	m.nfree++
}
