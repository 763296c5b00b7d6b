//go:build cuda

package server

import "github.com/qwenfleet/qwenfleet/pkg/kernels/cuda"

func init() {
	openCUDA = func(ordinal int) (gpuBackend, error) { return cuda.New(cuda.Config{Device: ordinal}) }
	probeCUDA = func(ordinal int) (string, int64, error) {
		in, err := cuda.Probe(ordinal)
		return in.Name, in.MemoryBytes, err
	}
}
