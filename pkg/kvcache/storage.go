package kvcache

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// Storage is the K and V tensors of every layer, [blocks·blockSize,
// kvDim] each, allocated on a backend. It satisfies model.Cache.
type Storage struct {
	blockSize int
	k, v      []kernels.Tensor
	b         kernels.Backend
}

// NewStorage allocates layers × 2 tensors of numBlocks·blockSize rows of
// kvDim (KV heads × head dim) float32 values, as cache tensors where the
// backend keeps them apart (kernels.CacheAllocator).
func NewStorage(b kernels.Backend, layers, numBlocks, blockSize, kvDim int) *Storage {
	if layers < 0 || numBlocks < 0 || blockSize <= 0 || kvDim <= 0 {
		panic(fmt.Sprintf("kvcache: NewStorage(%d layers, %d blocks, block size %d, kv dim %d)", layers, numBlocks, blockSize, kvDim))
	}
	s := &Storage{blockSize: blockSize, b: b}
	zeros := b.Zeros
	if ca, ok := b.(kernels.CacheAllocator); ok {
		zeros = ca.CacheZeros
	}
	for range layers {
		s.k = append(s.k, zeros(numBlocks*blockSize, kvDim))
		s.v = append(s.v, zeros(numBlocks*blockSize, kvDim))
	}
	return s
}

// Free releases the tensors (the storage must not be used afterwards).
func (s *Storage) Free() {
	free := s.b.Free
	if ca, ok := s.b.(kernels.CacheAllocator); ok {
		free = ca.FreeCache
	}
	for _, t := range append(s.k, s.v...) {
		free(t)
	}
	s.k, s.v = nil, nil
}

// BlockSize is the number of token slots in a block.
func (s *Storage) BlockSize() int { return s.blockSize }

// NumBlocks is the number of blocks of the storage.
func (s *Storage) NumBlocks() int {
	if len(s.k) == 0 {
		return 0
	}
	return kernels.Rows(s.k[0]) / s.blockSize
}

// KV returns the cache tensors of layer l.
func (s *Storage) KV(l int) (k, v kernels.Tensor) { return s.k[l], s.v[l] }

// BytesPerToken is the cache memory one token takes over all layers
// (float32 K and V).
func BytesPerToken(layers, kvDim int) int { return layers * 2 * kvDim * 4 }
