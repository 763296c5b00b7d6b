package server_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/server"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// BenchmarkServingDecode measures aggregate greedy decode throughput of a
// local cluster (coordinator + one worker process, all cores) on the
// qwen2-0.5b shape (random bf16 weights, made once under the temp dir) at
// 1, 8 and 32 concurrent streams: 16-token prompts, 64 new tokens each.
//
//	go test ./pkg/server -run '^$' -bench ServingDecode -benchtime 1x
func BenchmarkServingDecode(b *testing.B) {
	preset := os.Getenv("QWENFLEET_BENCH_PRESET")
	if preset == "" {
		preset = "qwen2-0.5b"
	}
	dir, err := server.EnsurePresetModel(filepath.Join(os.TempDir(), "qwenfleet-bench", preset), preset)
	if err != nil {
		b.Fatal(err)
	}
	c := startCluster(b, dir)
	const promptLen, newTokens = 16, 64
	for _, conc := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("streams=%d", conc), func(b *testing.B) {
			var total int
			var elapsed, ttft time.Duration
			for it := 0; it < b.N; it++ {
				var wg sync.WaitGroup
				var mu sync.Mutex
				t0 := time.Now()
				for s := 0; s < conc; s++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						p := make([]int32, promptLen)
						for j := range p {
							p[j] = int32((it*7919 + s*104729 + j*31) % 150000)
						}
						stream, err := c.client.Generate(context.Background(), idsReq(p, newTokens))
						if err != nil {
							b.Error(err)
							return
						}
						first := true
						for {
							resp, err := stream.Recv()
							if err != nil {
								b.Error(err)
								return
							}
							if ch := resp.GetChunk(); ch != nil && first {
								first = false
								mu.Lock()
								ttft += time.Since(t0)
								mu.Unlock()
							}
							if cp := resp.GetComplete(); cp != nil {
								mu.Lock()
								total += int(cp.Usage.CompletionTokens)
								mu.Unlock()
								return
							}
						}
					}()
				}
				wg.Wait()
				elapsed += time.Since(t0)
			}
			b.ReportMetric(float64(total)/elapsed.Seconds(), "tok/s")
			b.ReportMetric(float64(ttft.Milliseconds())/float64(conc*b.N), "ms-ttft")
			b.ReportMetric(0, "ns/op")
		})
	}
	info, err := c.client.GetServerInfo(context.Background(), &pb.GetServerInfoRequest{})
	if err == nil {
		b.Logf("steps %d, tokens %d, preemptions %d", info.Scheduler.Steps, info.Scheduler.GeneratedTokens, info.Scheduler.Preemptions)
	}
}
