package cpu_test

import (
	"fmt"
	"math"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/kernelstest"
)

// TestConformance runs the suite on every kernel variant this machine
// supports, single- and multi-threaded.
func TestConformance(t *testing.T) {
	for _, v := range cpu.Variants() {
		for _, threads := range []int{1, 3} {
			for _, mode := range []string{"plain", "invariant", "packed", "bf16"} {
				t.Run(fmt.Sprintf("%s/%dthreads/%s", v, threads, mode), func(t *testing.T) {
					cfg := cpu.Config{Threads: threads, Generic: v == "generic", BatchInvariant: mode == "invariant", PackWeights: mode == "packed"}
					if mode == "bf16" {
						cfg.Compute = "bf16dp"
					}
					if !cfg.Generic {
						cfg.Kernels = v
					}
					b, err := cpu.New(cfg)
					if err != nil {
						t.Fatal(err)
					}
					defer b.Close()
					if mode == "bf16" && !b.ComputesBF16() {
						t.Skip("no bf16 compute kernels in this set on this CPU")
					}
					kernelstest.Run(t, b)
				})
			}
		}
	}
}

func TestComputeConfig(t *testing.T) {
	if _, err := cpu.New(cpu.Config{Compute: "fp8"}); err == nil {
		t.Fatal("compute fp8 accepted")
	}
	if _, err := cpu.New(cpu.Config{Compute: "bf16", Quantize: "q8"}); err == nil {
		t.Fatal("compute bf16 with q8 accepted")
	}
	b, err := cpu.New(cpu.Config{Compute: "bf16", Generic: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	if b.ComputesBF16() {
		t.Fatal("generic kernels claim bf16 compute")
	}
}

func TestUnknownKernels(t *testing.T) {
	if _, err := cpu.New(cpu.Config{Kernels: "sse1"}); err == nil {
		t.Fatal("unknown kernel set accepted")
	}
}

func TestExpf(t *testing.T) {
	for x := float32(-87); x < 88; x += 0.01 {
		got, want := float64(cpu.Expf(x)), math.Exp(float64(x))
		if math.Abs(got-want) > 3e-7*want {
			t.Fatalf("expf(%v) = %v, want %v", x, got, want)
		}
	}
	if cpu.Expf(-100) != 0 || !math.IsInf(float64(cpu.Expf(100)), 1) {
		t.Fatal("expf out of range")
	}
}

func TestThreadLimit(t *testing.T) {
	if _, err := cpu.New(cpu.Config{Threads: 50_000_000}); err == nil {
		t.Fatal("50M threads accepted")
	}
	if _, err := cpu.New(cpu.Config{Threads: -1}); err == nil {
		t.Fatal("-1 threads accepted")
	}
}
