// Package cuda is the GPU backend of pkg/kernels, built without cgo or
// CUDA headers: libcuda.so.1 and NVRTC are loaded at run time
// (github.com/ebitengine/purego) and bound to their versioned symbols
// (cuMemAlloc_v2, cuDevicePrimaryCtxRelease_v2, ...). Where there is no
// driver, New and Probe fail with ErrNoDriver ("no CUDA driver"), and a
// worker asked for --device cuda:N refuses to start rather than run on the
// CPU.
//
// New compiles the embedded CUDA C (kernels.cu and gemm.cu, Source) to PTX
// for the device's compute capability with NVRTC, and loads it. Every op of
// kernels.Backend is one or a few of those kernels on the default stream:
//
//   - weights: bf16 matrices stay bf16 on the device; vectors (norms,
//     biases), MoE routers (WeightPrecise) and matrices of other dtypes are
//     float32. Activations and the KV cache are float32.
//   - MatMul: up to 8 rows (decode), qf_gemv_* reads each weight row once
//     with 16-byte loads, so a decode step streams the weights at memory
//     bandwidth; more rows (prefill), the tiled qf_gemm_* (64×64 tiles,
//     float32 accumulation, no tensor cores yet).
//   - Attention: causal over the paged cache, one block of 4 warps per
//     (query row, head), each warp an online softmax over its share of the
//     keys, merged at the end; no scores are stored. With Dual Chunk
//     Attention the block walks the row's inter, successive and intra key
//     segments in turn, each with its query variant, in the same online
//     softmax.
//   - RMSNorm, RoPE (rotate-half, YaRN's scale) and RoPEMulti (DCA's
//     three rotated queries), SwiGLU, embedding lookup, gather /
//     scatter-add / row scaling for the MoE block.
//
// cuBLAS is not used: purego calls functions of at most 15 arguments and
// cublasGemmEx takes 19 (cublasLtMatmul 16). MoE routing (softmax, top-k)
// runs on the host on the router's float32 logits, as for every backend.
//
// The kernels' logic is tested here without a GPU: emu/ is a CPU emulator
// of the CUDA thread model (a std::thread per CUDA thread, barriers for
// __syncthreads, warp shuffles through shared buffers) that g++ compiles
// with the same source; TestKernelsEmulated checks every kernel against
// double-precision loops. On a GPU, scripts/device-check.sh runs the
// kernels conformance suite, the reference cases and the benchmarks.
package cuda
