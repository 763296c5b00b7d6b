//go:build !unix

package cpu

// mapFloats is not available here: cache tensors are ordinary slices.
func mapFloats(n int) ([]float32, bool) { return nil, false }

func unmapFloats(f []float32) {}
