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
//
// # Prefix caching
//
// With SetPrefixCaching(true), a full block whose KV has been computed is
// kept under the hash of its token prefix (PrefixHashes: SHA-256 chained
// block by block from RootHash of the model's identity), as in vLLM. A new
// sequence whose prompt starts with cached blocks shares them (Share: a
// reference count per block) and computes only the rest. A shared block is
// never written: PrepareWrite, called for the positions a step will write,
// gives the sequence its own copy of a shared block (copy-on-write, for a
// last block that is only partly the sequence's prefix) and returns the
// copies the executor makes before the step. Freed blocks that are cached
// stay cached on the free list until their slot is needed: blocks without a
// cached prefix are handed out first, then cached ones, least recently used
// first. ResetCache forgets everything when the executor's KV cannot be
// trusted (a step failed).
//
//	hs := kvcache.PrefixHashes(root, nil, prompt, bs)
//	n := bm.Share(seq, hs, (len(prompt)-1)/bs) // n·bs prompt tokens are cached
//	bm.Reserve(seq, len(prompt))
//	copies, _ := bm.PrepareWrite(seq, n*bs, len(prompt))
//	... step computes positions n·bs.. (after copies) ...
//	bm.Register(seq, n, kvcache.PrefixHashes(root, hs, prompt, bs))
package kvcache
