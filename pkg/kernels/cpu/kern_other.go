//go:build !amd64

package cpu

// simdKernels lists the SIMD kernel sets this machine can run: none yet
// outside amd64, where the pure-Go loops run.
func simdKernels() []kernelSet { return nil }

// dpFaster: no VDPBF16PS kernels outside amd64.
func dpFaster() bool { return false }
