// Package cpu is the CPU implementation of kernels.Backend, in Go with
// vectorised inner loops in Go assembly where the processor allows.
//
// # Kernel variants
//
// Each hot inner loop (a dot product of four weight rows with one activation
// row, a 3×4 register-blocked GEMM tile, bf16/f16 → f32 widening) exists as a
// pure-Go version, the reference that runs everywhere, and as an AVX2+FMA
// version chosen at start-up from the CPU's features
// (golang.org/x/sys/cpu). Config.Generic forces the pure-Go loops; the
// conformance suite (package kernelstest) runs every variant the machine
// supports against float64 loops.
//
// # Weights in their own dtype
//
// A weight tensor keeps the checkpoint's bytes: bf16 stays bf16 (2 bytes an
// element), widened to float32 in registers (a bf16 is the top half of a
// float32: shift left 16). No float32 copy of a weight matrix is made.
//
// # Matrix multiplication
//
// Decode (one row of x): every weight row is streamed once, four rows at a
// time, the threads splitting the rows between them. This is bound by memory
// bandwidth, not arithmetic.
//
// Prefill and batched decode (several rows of x): the weight rows are taken a
// panel at a time (a few rows, widened into a per-thread float32 buffer that
// stays in L2), and every row of x is multiplied against the panel with a 3×4
// register-blocked micro-kernel, so each weight byte is read from memory once
// per call however many tokens there are.
//
// Packed weights (pack.go, the default of workers and qwenctl) replace both
// with panels of 32 rows stored k-major: four weight streams per thread for
// one token, 14×32 and 8×32 register tiles for several (planTiles), and, with
// Config.Compute "bf16" on a CPU where VDPBF16PS outruns float32 FMA, bf16
// pairs on that instruction (bf16dp.go). docs/cpu-kernels.md has the whole
// picture; qwenctl peak (peak.go) measures what the machine can do.
//
// # Threads
//
// A fixed pool of one goroutine per thread (Config.Threads, default
// GOMAXPROCS) is started by New and stopped by Close. An op splits its rows
// into one contiguous range per thread; the calling goroutine computes the
// first range. There are no goroutines or channels per row.
package cpu
