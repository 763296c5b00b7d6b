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
}

// NewStorage allocates layers × 2 tensors of numBlocks·blockSize rows of
// kvDim (KV heads × head dim) float32 values.
func NewStorage(b kernels.Backend, layers, numBlocks, blockSize, kvDim int) *Storage {
	if layers < 0 || numBlocks < 0 || blockSize <= 0 || kvDim <= 0 {
		panic(fmt.Sprintf("kvcache: NewStorage(%d layers, %d blocks, block size %d, kv dim %d)", layers, numBlocks, blockSize, kvDim))
	}
	s := &Storage{blockSize: blockSize}
	for range layers {
		s.k = append(s.k, b.Zeros(numBlocks*blockSize, kvDim))
		s.v = append(s.v, b.Zeros(numBlocks*blockSize, kvDim))
	}
	return s
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
