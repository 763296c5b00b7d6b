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

// BlockManager hands out cache blocks to sequences. It is pure accounting
// (no tensors) and is not safe for concurrent use.
type BlockManager struct {
	blockSize int
	free      []int32 // stack; the next block handed out is free[len-1]
	tables    map[SeqID][]int32
}

// NewBlockManager manages numBlocks blocks of blockSize slots each.
func NewBlockManager(numBlocks, blockSize int) *BlockManager {
	if numBlocks < 0 || blockSize <= 0 {
		panic(fmt.Sprintf("kvcache: NewBlockManager(%d, %d)", numBlocks, blockSize))
	}
	m := &BlockManager{blockSize: blockSize, free: make([]int32, numBlocks), tables: map[SeqID][]int32{}}
	for i := range m.free {
		m.free[i] = int32(numBlocks - 1 - i) // block 0 first
	}
	return m
}

// BlockSize is the number of token slots in a block.
func (m *BlockManager) BlockSize() int { return m.blockSize }

// NumFree is the number of unowned blocks.
func (m *BlockManager) NumFree() int { return len(m.free) }

// NumUsed is the number of blocks owned by sequences.
func (m *BlockManager) NumUsed() int {
	n := 0
	for _, t := range m.tables {
		n += len(t)
	}
	return n
}

// BlocksFor is the number of blocks that hold n tokens.
func (m *BlockManager) BlocksFor(n int) int { return (n + m.blockSize - 1) / m.blockSize }

// Reserve grows seq's table so it covers tokens positions (a sequence
// unknown so far starts empty). It allocates all or nothing: on ErrNoBlocks
// the table is unchanged.
func (m *BlockManager) Reserve(seq SeqID, tokens int) error {
	t := m.tables[seq]
	need := m.BlocksFor(tokens) - len(t)
	if need <= 0 {
		if _, ok := m.tables[seq]; !ok {
			m.tables[seq] = t
		}
		return nil
	}
	if need > len(m.free) {
		return fmt.Errorf("%w: sequence %d needs %d more, %d free", ErrNoBlocks, seq, need, len(m.free))
	}
	n := len(m.free)
	for i := 0; i < need; i++ {
		t = append(t, m.free[n-1-i])
	}
	m.free = m.free[:n-need]
	m.tables[seq] = t
	return nil
}

// Table is seq's block table (nil if it owns none). The slice is the
// manager's: read it before the next Reserve or Free.
func (m *BlockManager) Table(seq SeqID) []int32 { return m.tables[seq] }

// Free returns all of seq's blocks to the free list; freeing an unknown
// sequence does nothing.
func (m *BlockManager) Free(seq SeqID) {
	t, ok := m.tables[seq]
	if !ok {
		return
	}
	for i := len(t) - 1; i >= 0; i-- {
		m.free = append(m.free, t[i])
	}
	delete(m.tables, seq)
}
