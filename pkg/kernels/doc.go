// Package kernels is the compute interface the Qwen2 forward pass is written
// against, and the home of its implementations (cpu/, later cuda/).
//
// # Model
//
// A Backend owns Tensors: dense, row-major arrays in its own memory. Two kinds
// of tensor exist:
//
//   - weights, made once by Weight from the raw little-endian bytes of a
//     checkpoint, in the checkpoint's dtype (F32, F16 or BF16). A bf16 model
//     stays bf16 in memory; kernels widen it on the fly.
//   - activations, always F32, made by the ops (or Zeros / FromFloat32) and
//     dropped by the caller when no longer needed (Free).
//
// Every op takes F32 activations and returns a new F32 tensor, except the ones
// documented "in place". A 2-D activation is [rows, cols]; a batch of T tokens
// is T rows. Weights follow the PyTorch Linear convention: W is [out, in] and
// MatMul computes x·Wᵀ.
//
// The interface is deliberately small. A backend may add fused kernels as
// optional interfaces; each documents the unfused computation it must equal.
// The pure-Go implementation in package cpu is the reference: the
// conformance suite in kernelstest runs every backend (and every CPU kernel
// variant the machine supports) against plain float64 loops.
//
// # Paged KV cache
//
// K and V caches are F32 tensors of shape [slots, kvHeads·headDim], where
// slots = blocks·blockSize. Token position p of a sequence with block table B
// lives in slot B[p/blockSize]·blockSize + p%blockSize. WriteKV scatters new
// rows into slots; Attention reads them back through the same block tables.
// Who owns which block is decided outside (package kvcache); kernels only
// follow the tables they are given.
//
// # Dual Chunk Attention
//
// With AttnBatch.DCAChunk = c > 0, Attention is Qwen2's Dual Chunk
// Attention (qwen2.md section 2.8; docs/long-context.md): the model stores
// keys rotated at p mod c, gives Attention each query rotated three ways
// (RoPEMulti: intra, successive, inter positions), and the kernel scores
// each key with the variant its chunk calls for inside one online softmax,
// which is exactly the log-sum-exp merge of the three partial attentions.
// The KV cache is unchanged.
//
// # Threads
//
// A Backend is used by one goroutine at a time (a worker runs one step after
// another); it parallelises each op internally over its own threads.
package kernels
