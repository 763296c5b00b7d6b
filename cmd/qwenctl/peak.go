package main

import (
	"encoding/json"
	"fmt"
	"os"

	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
)

// runPeak measures what this machine's CPU can do at best (cpu.ProbePeak):
// float32 FMA, VDPBF16PS and VPDPBUSD throughput and memory read
// bandwidth, on all threads at once.
func runPeak(args []string) error {
	fs := newFlags("peak", "[--threads N] [--json]")
	threads := fs.Int("threads", 0, "OS threads running each loop at once (0: GOMAXPROCS, all the CPUs this process may use)")
	asJSON := fs.Bool("json", false, "print the figures as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *threads < 0 || *threads > 1<<12 {
		return usagef("--threads: must be in [0, %d] (0: all CPUs), got %d", 1<<12, *threads)
	}
	p, err := cpu.ProbePeak(*threads, 0)
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(p)
	}
	model := p.Model
	if model == "" {
		model = "unknown"
	}
	fmt.Printf("cpu: %s\n", model)
	fmt.Printf("threads: %d\n", p.Threads)
	switch p.FMAWidth {
	case 512:
		fmt.Printf("fma32 (avx512): %.1f GFLOP/s\n", p.FMA32GFLOPS)
	case 256:
		fmt.Printf("fma32 (avx2): %.1f GFLOP/s\n", p.FMA32GFLOPS)
	default:
		fmt.Println("fma32: not supported")
	}
	if p.HasBF16 {
		fmt.Printf("vdpbf16ps: %.1f GFLOP/s\n", p.BF16GFLOPS)
	} else {
		fmt.Println("vdpbf16ps: not supported")
	}
	if p.HasVNNI {
		fmt.Printf("vpdpbusd: %.1f GOP/s\n", p.VNNIGOPS)
	} else {
		fmt.Println("vpdpbusd: not supported")
	}
	fmt.Printf("read bandwidth: %.1f GB/s\n", p.ReadGBs)
	return nil
}
