package kernels

import (
	"math"

	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// DType is the element type of a tensor: the checkpoint's, one enum for
// the file format and the kernels (Size, String; the widening conversions
// are safetensors' too).
type DType = safetensors.DType

// The element types a checkpoint may hold. Activations are always F32.
const (
	F32  = safetensors.F32
	F16  = safetensors.F16
	BF16 = safetensors.BF16
)

// Tensor is a dense row-major array owned by a Backend. Only the backend that
// made a tensor may be given it.
type Tensor interface {
	DType() DType
	// Shape returns the dimensions; the caller must not modify the slice.
	Shape() []int
}

// Rows is the first dimension of a tensor (1 for a scalar).
func Rows(t Tensor) int {
	s := t.Shape()
	if len(s) == 0 {
		return 1
	}
	return s[0]
}

// Cols is the product of all dimensions but the first.
func Cols(t Tensor) int {
	s := t.Shape()
	n := 1
	for i := 1; i < len(s); i++ {
		n *= s[i]
	}
	return n
}

// NumElements is the product of all dimensions.
func NumElements(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// Rope holds the rotary-embedding frequencies of one model: rotate-half
// pairing (element i with i+headDim/2), angle = position·InvFreq[i], and both
// cos and sin multiplied by Scale (YaRN's attention factor; 1 otherwise).
type Rope struct {
	InvFreq []float32 // headDim/2 frequencies
	Scale   float32
}

// AttnSeq describes one sequence of a batched attention call.
type AttnSeq struct {
	Row    int     // first row of this sequence's queries in q
	N      int     // number of query rows (new tokens)
	Start  int     // absolute position of the first query row; keys 0..Start+N-1 are cached
	Blocks []int32 // block table: block b holds positions [b·BlockSize, (b+1)·BlockSize)
}

// AttnBatch is the metadata of one Attention call.
type AttnBatch struct {
	Seqs      []AttnSeq
	Heads     int     // query heads in q
	KVHeads   int     // KV heads in the caches
	HeadDim   int     // elements per head
	BlockSize int     // slots per KV block
	Scale     float32 // multiplies q·k (1/sqrt(HeadDim))

	// DCAChunk > 0 switches on Dual Chunk Attention (qwen2.md section 2.8)
	// with chunk length c = DCAChunk (chunk_size − local_size). q then has
	// DCAVariants·Heads·HeadDim columns: each row's query rotated at its
	// intra, successive and inter positions, in that order (columns
	// [v·Heads·HeadDim, (v+1)·Heads·HeadDim) hold variant v), and the keys
	// in the cache are rotated at p mod c. A query at position p, in chunk
	// i = ⌊p/c⌋, scores the keys of chunk i (up to p) with its intra
	// variant, those of chunk i−1 with its successive variant and those of
	// chunks before that with its inter variant, all in one softmax. 0 is
	// plain causal attention.
	DCAChunk int
	// DCAOrigLen (DCA's original_max_position_embeddings), when > 0 with
	// DCAChunk, multiplies the scores of a query at position p by DCA's
	// length temperature DCATemperature(p+1, DCAOrigLen) (see RowScale).
	DCAOrigLen int
}

// DCAVariants is the number of rotated copies of each query DCA attends
// with: intra, successive, inter (AttnBatch.DCAChunk).
const DCAVariants = 3

// QueryCols is the number of columns Attention expects of q:
// Heads·HeadDim, times DCAVariants with DCA.
func (ab *AttnBatch) QueryCols() int {
	if ab.DCAChunk > 0 {
		return DCAVariants * ab.Heads * ab.HeadDim
	}
	return ab.Heads * ab.HeadDim
}

// DCATemperature is DCA's length temperature for a sequence of n
// positions: τ = max(1, 0.1·ln(n/orig) + 1), so 1 while n ≤ orig (and
// when orig ≤ 0).
func DCATemperature(n, orig int) float64 {
	if orig <= 0 || n <= orig {
		return 1
	}
	return max(1, 0.1*math.Log(float64(n)/float64(orig))+1)
}

// RowScale is the factor of the scores of a query at absolute position p:
// Scale, times DCATemperature(p+1, DCAOrigLen) with DCA. The temperature
// depends on the query's own position, not on how long the sequence is
// when the step runs, so a row's result does not depend on the chunk of
// the prompt it is computed in. It is computed in float64 and rounded
// once, so it is exactly Scale where τ = 1.
func (ab *AttnBatch) RowScale(p int) float32 {
	if ab.DCAChunk <= 0 || ab.DCAOrigLen <= 0 || p+1 <= ab.DCAOrigLen {
		return ab.Scale
	}
	return float32(float64(ab.Scale) * DCATemperature(p+1, ab.DCAOrigLen))
}

// CacheAllocator is implemented by backends that keep long-lived cache
// tensors apart from activations: the CPU backend maps them outside the Go
// heap, so a large KV pool neither raises the garbage collector's target
// (which would let garbage grow with it) nor is scanned. CacheZeros is a
// zeroed F32 tensor; FreeCache releases it (using it afterwards is an
// error).
type CacheAllocator interface {
	CacheZeros(shape ...int) Tensor
	FreeCache(t Tensor)
}

// PreciseWeights is implemented by backends that may quantise weights:
// WeightPrecise stores a weight in its own dtype regardless (MoE routers,
// whose top-k choice one rounding can flip).
type PreciseWeights interface {
	WeightPrecise(dt DType, shape []int, data []byte) (Tensor, error)
}

// Backend is the compute interface of the forward pass. Unless an op says
// otherwise, arguments are F32 activations and the result is a new F32
// activation; weights (w, table, bias, norm weights) may be of any DType.
// Shape mismatches are programming errors and panic; data-dependent errors
// (a bad token id, a slot out of range) are the caller's to rule out.
type Backend interface {
	// Name identifies the backend and the kernel variant, e.g. "cpu/avx2".
	Name() string
	// Threads is the number of threads the backend computes with.
	Threads() int

	// Weight makes a tensor from raw little-endian bytes of dtype dt. The
	// backend may keep data without copying it (the CPU backend does), so the
	// caller must not modify it afterwards.
	Weight(dt DType, shape []int, data []byte) (Tensor, error)
	// Zeros is a new zeroed F32 tensor.
	Zeros(shape ...int) Tensor
	// FromFloat32 copies host data into a new F32 tensor.
	FromFloat32(shape []int, data []float32) Tensor
	// ToFloat32 copies a tensor of any dtype to the host, widened to float32.
	ToFloat32(t Tensor) []float32
	// Free releases an activation early; using it afterwards is an error.
	Free(t Tensor)

	// Embed gathers rows ids of table [V, H] into [len(ids), H].
	Embed(table Tensor, ids []int32) Tensor
	// MatMul is x [T, K] times wᵀ for w [N, K], plus bias [N] when bias is
	// not nil: [T, N].
	MatMul(x, w, bias Tensor) Tensor
	// RMSNorm is w ⊙ x/sqrt(mean(x²)+eps), row by row; w is [cols].
	RMSNorm(x, w Tensor, eps float32) Tensor
	// Add adds src to dst in place (same shape).
	Add(dst, src Tensor)
	// RoPE rotates every head of every row of x [T, heads·headDim] in place;
	// row t is at position pos[t].
	RoPE(x Tensor, headDim int, pos []int32, r *Rope)
	// RoPEMulti returns k rotated copies of each row of x [T, C] (C =
	// heads·headDim; x is not modified), k = len(pos)/T: a new [T, k·C]
	// tensor whose columns [j·C, (j+1)·C) of row t are row t of x rotated
	// exactly as RoPE rotates it at position pos[t·k+j] (the same bits).
	// DCA's three query variants are RoPEMulti with k = 3.
	RoPEMulti(x Tensor, headDim int, pos []int32, r *Rope) Tensor
	// SwiGLU is silu(gate) ⊙ up.
	SwiGLU(gate, up Tensor) Tensor
	// WriteKV copies row i of x into row slots[i] of cache, in place.
	WriteKV(cache, x Tensor, slots []int32)
	// Attention is causal scaled-dot-product attention of q [T, Heads·HeadDim]
	// over the paged caches kc, vc [slots, KVHeads·HeadDim]: query row Row+i
	// of a sequence attends to its positions 0..Start+i. Query head h reads
	// KV head h/(Heads/KVHeads). Softmax is computed in float32 or wider.
	// With b.DCAChunk > 0 it is Dual Chunk Attention: q has
	// b.QueryCols() columns and each key is scored with the query variant
	// its chunk calls for (see AttnBatch.DCAChunk), scaled by
	// b.RowScale(position). The result is [T, Heads·HeadDim] either way.
	Attention(q, kc, vc Tensor, b *AttnBatch) Tensor

	// Gather copies rows of x into a new [len(rows), cols] tensor.
	Gather(x Tensor, rows []int32) Tensor
	// ScatterAdd adds scale[i]·src row i into dst row rows[i], in place,
	// in order of i.
	ScatterAdd(dst, src Tensor, rows []int32, scale []float32)
	// ScaleRows multiplies row i of x by s[i], in place.
	ScaleRows(x Tensor, s []float32)
}
