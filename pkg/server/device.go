package server

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// gpuBackend is a GPU kernels backend a worker owns.
type gpuBackend interface {
	kernels.Backend
	Close()
}

// The CUDA backend, where the binary is built with it (-tags cuda, see
// device_cuda.go): a binary that loads libcuda at run time needs glibc, so
// the default build (static, for images FROM scratch) leaves it out.
var (
	openCUDA  func(ordinal int) (gpuBackend, error)
	probeCUDA func(ordinal int) (name string, memory int64, err error)
)

// parseDevice reads --device: "cpu" (default), "cuda" (= cuda:0) or
// "cuda:N".
func parseDevice(s string) (kind string, ordinal int, err error) {
	switch {
	case s == "" || s == "cpu":
		return "cpu", 0, nil
	case s == "cuda":
		return "cuda", 0, nil
	case strings.HasPrefix(s, "cuda:"):
		n, err := strconv.Atoi(s[len("cuda:"):])
		if err != nil || n < 0 || n > 255 {
			return "", 0, fmt.Errorf("%q: want cuda:N with N a device ordinal", s)
		}
		return "cuda", n, nil
	}
	return "", 0, fmt.Errorf("%q: want cpu, cuda or cuda:N", s)
}

// probeDevice checks that the device exists (a GPU worker with no usable
// GPU refuses to start) and returns its name and memory.
func probeDevice(kind string, ordinal int) (name string, memory int64, err error) {
	if kind != "cuda" {
		return "", 0, nil
	}
	if probeCUDA == nil {
		return "", 0, fmt.Errorf("cuda:%d: this binary was built without the CUDA backend (go build -tags cuda ./cmd/worker)", ordinal)
	}
	return probeCUDA(ordinal)
}
