// Package kvcache holds the paged key/value cache: which blocks of the
// cache each sequence owns (BlockManager, pure accounting), and the per-layer
// K/V tensors those blocks index into (Storage, made through a
// kernels.Backend).
//
// The cache is a pool of fixed-size blocks of BlockSize token slots. A
// sequence owns a block table: block i of the table holds its positions
// [i·BlockSize, (i+1)·BlockSize). Blocks are handed out from a free list as a
// sequence grows and all return to it when the sequence is freed, so memory
// is never fragmented and a sequence never needs contiguous space.
//
//	bm := kvcache.NewBlockManager(numBlocks, blockSize)
//	if err := bm.Reserve(seq, len(prompt)); err != nil { ... } // ErrNoBlocks: wait or preempt
//	batch := ... bm.Table(seq) ...                             // into the forward step
//	bm.Free(seq)                                               // finished or aborted
package kvcache
