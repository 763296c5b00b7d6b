package placement_test

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/placement"
)

// Qwen2-72B on two hosts of four 80 GiB GPUs: tp=4 inside a host fits,
// so no pipeline is needed and each host holds one replica.
func ExampleNew() {
	cfg, _ := model.Preset("qwen2-72b")
	var workers []placement.Worker
	for i := range 8 {
		workers = append(workers, placement.Worker{
			ID: fmt.Sprintf("gpu%d", i), Host: fmt.Sprintf("host%d", i/4), MemoryBytes: 80 << 30, Backend: "cuda",
		})
	}
	plan, err := placement.New(cfg, workers, placement.Options{Model: "qwen2-72b"})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("tp=%d pp=%d replicas=%d\n", plan.TP, plan.PP, len(plan.Replicas))
	for _, r := range plan.Replicas {
		s := r.Stages[0]
		fmt.Printf("replica %d: layers %d-%d on %s, %.2f GiB of weights per rank\n",
			r.Index, s.LayersBegin, s.LayersEnd-1, s.Ranks[0].Host, float64(s.WeightBytes)/(1<<30))
	}
	// Output:
	// tp=4 pp=1 replicas=2
	// replica 0: layers 0-79 on host0, 33.86 GiB of weights per rank
	// replica 1: layers 0-79 on host1, 33.86 GiB of weights per rank
}

// Why a layout is impossible is part of the error.
func ExampleNew_noFit() {
	cfg, _ := model.Preset("qwen2-7b")
	_, err := placement.New(cfg, []placement.Worker{{ID: "gpu0", MemoryBytes: 16 << 30}}, placement.Options{Model: "qwen2-7b"})
	fmt.Println(err)
	// Output:
	// qwen2-7b needs 14.19 GiB of bf16 weights; the best layout on 1 worker (tp=1) needs 17.81 GiB per worker (14.19 GiB weights + 1.75 GiB KV for 32768 tokens + 1.88 GiB activations) but 14.4 GiB is usable (0.9 × 16 GiB); 2 workers of 16 GiB would fit it (tp=2)
}
