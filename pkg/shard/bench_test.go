package shard_test

import (
	"context"
	"fmt"
	"os"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/shard"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// BenchmarkDecodeStep: one decode step of B sequences on the qwen2-0.5b
// shape (random bf16 weights, or the checkpoint QWENFLEET_BENCH_MODEL
// names; all threads): plain kernels, batch-invariant ones, packed
// weights (batch-invariant too; the workers' default) and --compute bf16. tok/s is B per
// step time.
func BenchmarkDecodeStep(b *testing.B) {
	cfg, _ := model.Preset("qwen2-0.5b")
	for _, mode := range []string{"plain", "invariant", "packed", "bf16"} {
		be, err := cpu.New(cpu.Config{BatchInvariant: mode != "plain", PackWeights: mode == "packed" || mode == "bf16", Compute: map[bool]string{true: "bf16"}[mode == "bf16"]})
		if err != nil {
			b.Fatal(err)
		}
		var m *model.Model
		if dir := os.Getenv("QWENFLEET_BENCH_MODEL"); dir != "" { // a checkpoint: setup stays out of profiles
			m, err = model.Load(dir, be, model.LoadOptions{})
		} else {
			m, err = model.New(cfg, be, model.NewRandomWeights(cfg, kernels.BF16, 1))
		}
		if err != nil {
			b.Fatal(err)
		}
		x := shard.NewExecutor(m)
		if err := x.Warmup(32*8, 16, 1); err != nil {
			b.Fatal(err)
		}
		for _, B := range []int{1, 8, 32} {
			b.Run(fmt.Sprintf("%s/seqs=%d", mode, B), func(b *testing.B) {
				seqs := make([]steps.Seq, B)
				for i := range seqs {
					seqs[i] = steps.Seq{ID: uint64(i), Tokens: []int32{int32(100 + i)}, Start: 64, Blocks: []int32{int32(8 * i), int32(8*i + 1), int32(8*i + 2), int32(8*i + 3), int32(8*i + 4)}, Sample: true, TopN: 1}
				}
				pre := make([]steps.Seq, B) // fill the first 64 positions
				for i := range pre {
					pre[i] = seqs[i]
					pre[i].Tokens, pre[i].Start, pre[i].Sample = make([]int32, 64), 0, false
				}
				if _, err := x.Step(context.Background(), &steps.Batch{Seqs: pre}, nil, nil); err != nil {
					b.Fatal(err)
				}
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					if _, err := x.Step(context.Background(), &steps.Batch{Seqs: seqs}, nil, nil); err != nil {
						b.Fatal(err)
					}
				}
				b.ReportMetric(float64(B*b.N)/b.Elapsed().Seconds(), "tok/s")
			})
		}
		m.Close()
		be.Close()
	}
}
