package cpu

import (
	"fmt"
	"runtime"
	"unsafe"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// Config configures a CPU backend.
type Config struct {
	// Threads computing each op; 0 means runtime.GOMAXPROCS(0). More
	// threads than cores only adds contention.
	Threads int
	// Generic forces the pure-Go inner loops even where SIMD ones exist
	// (for testing, and to measure what the assembly buys).
	Generic bool
	// Kernels names a SIMD kernel set to use ("avx2"); empty picks the best
	// the CPU supports. Ignored when Generic is set.
	Kernels string
	// BatchInvariant makes every row of a MatMul or Attention come out
	// bit-identical whatever the other rows of the batch are (and whether
	// there are any): every row goes through the same GEMM micro-kernel,
	// padded with zero rows to its tile height, even a single token. A
	// server needs it so that batching never changes a request's tokens;
	// it costs one-token decode some speed (see the README).
	BatchInvariant bool
	// PackWeights stores 2-D weights in the panel layout of the packed
	// kernels (where the kernel set has them): faster one-token and batched
	// products, batch-invariant by construction. It copies each weight, so
	// it is off for memory-mapped weights.
	PackWeights bool
	// DecodeStreams is how many weight streams each thread of a one-token
	// product of packed bf16 weights reads side by side: 2 or 4 (0: the
	// default, 4 where the kernel set has the four-stream kernel). The
	// outputs are the same bits either way.
	DecodeStreams int
	// Quantize "q8" stores 2-D weights as int8 with one scale per 32 k of
	// an output row (weight-only quantisation: activations stay float32),
	// packed; "q8a" also quantises the activations (per 32 k, like
	// llama.cpp's q8_0) and multiplies int8 by int8 with VNNI where the
	// CPU has it (else it is "q8"); "" keeps the stored dtype.
	Quantize string
	// Compute "bf16" asks for the fastest product of bf16 weights the CPU
	// has: VDPBF16PS (AVX512_BF16) on weights packed in the pair layout of
	// bf16dp.go, with activations rounded to bf16, where that instruction
	// outruns float32 FMA (AMD Zen 4 and 5); elsewhere (Intel, where it
	// runs at half the FMA rate, and CPUs without it) the float32 kernels,
	// exactly as "f32". "bf16dp" takes VDPBF16PS wherever the CPU has it
	// (to test and measure it). "f32" or "" (the default) keeps float32
	// activations. ComputesBF16 reports what was chosen; weights of other
	// dtypes always multiply in float32. It cannot be combined with
	// Quantize.
	Compute string
}

// Variants lists the kernel sets this machine can run: "generic" always,
// then the SIMD ones its CPU supports.
func Variants() []string {
	names := []string{genericKernels.name}
	for _, k := range simdKernels() {
		names = append(names, k.name)
	}
	return names
}

// MaxThreads bounds Config.Threads.
const MaxThreads = 1024

// Backend implements kernels.Backend on the CPU.
type Backend struct {
	k       kernelSet
	pool    *pool
	scratch [][]float32 // per thread
	// invariant: see Config.BatchInvariant.
	invariant bool
	packW     bool
	quant     bool
	quantAct  bool // q8a with VNNI kernels
	dp        bool // Compute "bf16" with the DP kernels
	streams   int  // weight streams per thread of one-token bf16 products (2 or 4)
}

var _ kernels.Backend = (*Backend)(nil)

// New starts a backend and its threads; Close stops them.
func New(cfg Config) (*Backend, error) {
	if cfg.Threads < 0 || cfg.Threads > MaxThreads {
		return nil, fmt.Errorf("cpu: Threads %d outside [0, %d]", cfg.Threads, MaxThreads)
	}
	if cfg.Threads == 0 {
		cfg.Threads = runtime.GOMAXPROCS(0)
	}
	if cfg.Quantize != "" && cfg.Quantize != "q8" && cfg.Quantize != "q8a" {
		return nil, fmt.Errorf("cpu: quantisation %q not supported (q8, q8a)", cfg.Quantize)
	}
	switch cfg.Compute {
	case "", "f32", "bf16", "bf16dp":
	default:
		return nil, fmt.Errorf("cpu: compute %q not supported (bf16, bf16dp, f32)", cfg.Compute)
	}
	if (cfg.Compute == "bf16" || cfg.Compute == "bf16dp") && cfg.Quantize != "" {
		return nil, fmt.Errorf("cpu: compute bf16 with quantisation %q: choose one", cfg.Quantize)
	}
	switch cfg.DecodeStreams {
	case 0:
		cfg.DecodeStreams = 4
	case 2, 4:
	default:
		return nil, fmt.Errorf("cpu: %d decode streams (2 or 4)", cfg.DecodeStreams)
	}
	k := genericKernels
	if !cfg.Generic {
		found := cfg.Kernels == ""
		for _, s := range simdKernels() {
			if cfg.Kernels == "" || s.name == cfg.Kernels {
				k, found = s, true
				break
			}
		}
		if !found {
			return nil, fmt.Errorf("cpu: kernel set %q not supported here (have %v)", cfg.Kernels, Variants())
		}
	}
	return &Backend{k: k, pool: newPool(cfg.Threads), scratch: make([][]float32, cfg.Threads), invariant: cfg.BatchInvariant, packW: cfg.PackWeights || cfg.Quantize != "", quant: cfg.Quantize != "",
		quantAct: cfg.Quantize == "q8a" && k.pgemvQ8V != nil, dp: k.pgemmDP != nil && (cfg.Compute == "bf16dp" || cfg.Compute == "bf16" && dpFaster()), streams: cfg.DecodeStreams}, nil
}

// Close stops the backend's threads. The backend must not be used afterwards.
func (b *Backend) Close() { b.pool.close() }

// Name is "cpu/" and the kernel set.
func (b *Backend) Name() string { return "cpu/" + b.k.name }

// Threads is the number of threads each op runs on.
func (b *Backend) Threads() int { return b.pool.threads }

// tensor is the CPU tensor: F32 data in f, F16/BF16 data in h.
type tensor struct {
	dt    kernels.DType
	shape []int
	f     []float32
	h     []uint16
	pk    *packed // a weight in panel layout (f and h are then nil)
	// qa is an activation's int8 form for the VNNI kernels (q8v.go),
	// made by its first product and reused by the next ones (q, k and v
	// read the same activation); every op that changes f drops it.
	qa *quantized
	// mapped: f lies outside the Go heap (CacheZeros); FreeCache unmaps
	// it, or unmap does when the tensor is garbage.
	mapped bool
	unmap  runtime.Cleanup
}

func (t *tensor) DType() kernels.DType { return t.dt }
func (t *tensor) Shape() []int         { return t.shape }
func (t *tensor) rows() int            { return kernels.Rows(t) }
func (t *tensor) cols() int            { return kernels.Cols(t) }

func cast(t kernels.Tensor) *tensor {
	c, ok := t.(*tensor)
	if !ok {
		panic(fmt.Sprintf("cpu: tensor %T is not from the CPU backend", t))
	}
	return c
}

// f32 returns the F32 data of an activation, panicking on other dtypes.
func f32(t kernels.Tensor) *tensor {
	c := cast(t)
	if c.dt != kernels.F32 {
		panic(fmt.Sprintf("cpu: want an F32 activation, got %v", c.dt))
	}
	return c
}

func newF32(shape ...int) *tensor {
	return &tensor{dt: kernels.F32, shape: append([]int(nil), shape...), f: make([]float32, kernels.NumElements(shape))}
}

// Weight wraps data without copying when it is suitably aligned.
func (b *Backend) Weight(dt kernels.DType, shape []int, data []byte) (kernels.Tensor, error) {
	return b.weight(dt, shape, data, false)
}

// WeightPrecise implements kernels.PreciseWeights: the weight keeps its
// dtype even when the backend quantises, and its products float32
// activations under bf16 compute (packed all the same).
func (b *Backend) WeightPrecise(dt kernels.DType, shape []int, data []byte) (kernels.Tensor, error) {
	return b.weight(dt, shape, data, true)
}

// ComputesBF16 reports whether bf16 weights multiply bf16-rounded
// activations on VDPBF16PS (see Config.Compute).
func (b *Backend) ComputesBF16() bool { return b.dp }

// MatMulInputDType implements the conformance suite's optional interface:
// the dtype MatMul rounds its activations to for weight w (F32: none).
func (b *Backend) MatMulInputDType(w kernels.Tensor) kernels.DType {
	if pk := cast(w).pk; pk != nil && pk.dp {
		return kernels.BF16
	}
	return kernels.F32
}

func (b *Backend) weight(dt kernels.DType, shape []int, data []byte, precise bool) (kernels.Tensor, error) {
	n := kernels.NumElements(shape)
	if dt.Size() == 0 {
		return nil, fmt.Errorf("cpu: unsupported dtype %v", dt)
	}
	if len(data) != n*dt.Size() {
		return nil, fmt.Errorf("cpu: %v%v needs %d bytes, got %d", dt, shape, n*dt.Size(), len(data))
	}
	t := &tensor{dt: dt, shape: append([]int(nil), shape...)}
	if n == 0 {
		t.f, t.h = []float32{}, []uint16{}
		return t, nil
	}
	p := unsafe.Pointer(&data[0])
	if uintptr(p)%uintptr(dt.Size()) != 0 {
		data = append([]byte(nil), data...) // fresh allocations are aligned
		p = unsafe.Pointer(&data[0])
	}
	if dt == kernels.F32 {
		t.f = unsafe.Slice((*float32)(p), n)
	} else {
		t.h = unsafe.Slice((*uint16)(p), n)
	}
	switch {
	case !precise && b.quant && len(shape) == 2 && b.k.pgemvQ8 != nil:
		b.pack(t, true)
	case !precise && b.dp && len(shape) == 2 && dt == kernels.BF16:
		b.packDP(t)
	case b.packW && len(shape) == 2 && b.canPack(dt):
		b.pack(t, false)
	}
	return t, nil
}

// Zeros is a new zeroed F32 tensor.
func (b *Backend) Zeros(shape ...int) kernels.Tensor { return newF32(shape...) }

// mapMin is the smallest cache tensor CacheZeros maps outside the Go heap
// (smaller ones cost the collector little).
const mapMin = 1 << 20

// CacheZeros implements kernels.CacheAllocator: a zeroed F32 tensor mapped
// outside the Go heap when it is large (an ordinary one where mapping is
// not available). It is unmapped by FreeCache, or once unreachable.
func (b *Backend) CacheZeros(shape ...int) kernels.Tensor {
	n := kernels.NumElements(shape)
	if 4*n < mapMin {
		return newF32(shape...)
	}
	f, ok := mapFloats(n)
	if !ok {
		return newF32(shape...)
	}
	t := &tensor{dt: kernels.F32, shape: append([]int(nil), shape...), f: f, mapped: true}
	t.unmap = runtime.AddCleanup(t, unmapFloats, f)
	return t
}

// FreeCache implements kernels.CacheAllocator.
func (b *Backend) FreeCache(t kernels.Tensor) {
	c := cast(t)
	if c.mapped {
		c.unmap.Stop()
		unmapFloats(c.f)
		c.mapped = false
	}
	b.Free(c)
}

// FromFloat32 copies data into a new F32 tensor.
func (b *Backend) FromFloat32(shape []int, data []float32) kernels.Tensor {
	t := newF32(shape...)
	if len(data) != len(t.f) {
		panic(fmt.Sprintf("cpu: FromFloat32 shape %v with %d values", shape, len(data)))
	}
	copy(t.f, data)
	return t
}

// ToFloat32 copies t to the host, widened to float32.
func (b *Backend) ToFloat32(t kernels.Tensor) []float32 {
	c := cast(t)
	out := make([]float32, kernels.NumElements(c.shape))
	b.widen(out, c, 0)
	return out
}

// Free drops the backend's reference; Go's collector reclaims the memory.
func (b *Backend) Free(t kernels.Tensor) {
	c := cast(t)
	c.f, c.h, c.pk, c.qa = nil, nil, nil, nil
}

// widen writes len(dst) elements of a (any dtype), from flat offset off,
// into dst as float32.
func (b *Backend) widen(dst []float32, a *tensor, off int) {
	if a.pk != nil {
		b.widenPacked(dst, a, off)
		return
	}
	end := off + len(dst)
	switch a.dt {
	case kernels.F32:
		copy(dst, a.f[off:end])
	case kernels.BF16:
		b.k.cvtBF16(dst, a.h[off:end])
	case kernels.F16:
		b.k.cvtF16(dst, a.h[off:end])
	}
}

// scratchFor returns thread tid's scratch buffer of at least n floats.
func (b *Backend) scratchFor(tid, n int) []float32 {
	if cap(b.scratch[tid]) < n {
		b.scratch[tid] = make([]float32, n)
	}
	return b.scratch[tid][:n]
}
