package server_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/server"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// BenchmarkServingDecode measures aggregate greedy decode throughput of a
// local cluster (coordinator + one worker process, all cores) on the
// qwen2-0.5b shape (random bf16 weights, made once under the temp dir) at
// 1, 8 and 32 concurrent streams: 16-token prompts, 64 new tokens each.
// Besides tokens/s and the time to first token it reports the served
// decode step as the client sees it (ms-token: the median time between a
// stream's tokens, so prefill steps drop out) and, per step, the
// coordinator's round trip (ms/step) and the worker's forward pass
// (ms-fwd/step), both averaged over all steps, prefill included.
//
//	go test ./pkg/server -run '^$' -bench ServingDecode -benchtime 1x
func BenchmarkServingDecode(b *testing.B) {
	needE2E(b)
	dir := benchModel(b)
	c := startCluster(b, dir, "--metrics-listen", freeAddr(b))
	maddr := serverInfo(b, c.client).Workers[0].MetricsAddress
	const promptLen, newTokens = 16, 64
	for _, conc := range []int{1, 8, 32} {
		b.Run(fmt.Sprintf("streams=%d", conc), func(b *testing.B) {
			var total int
			var elapsed, ttft time.Duration
			var gaps []time.Duration // between a stream's tokens, per token
			before, wbefore := schedulerStats(b, c.client), scrape(b, maddr)
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
						var last time.Time
						var mine []time.Duration
						for {
							resp, err := stream.Recv()
							if err != nil {
								b.Error(err)
								return
							}
							if ch := resp.GetChunk(); ch != nil && len(ch.TokenIds) > 0 {
								now := time.Now()
								if last.IsZero() {
									mu.Lock()
									ttft += now.Sub(t0)
									mu.Unlock()
								} else {
									for range ch.TokenIds {
										mine = append(mine, now.Sub(last)/time.Duration(len(ch.TokenIds)))
									}
								}
								last = now
							}
							if cp := resp.GetComplete(); cp != nil {
								mu.Lock()
								total += int(cp.Usage.CompletionTokens)
								gaps = append(gaps, mine...)
								mu.Unlock()
								return
							}
						}
					}()
				}
				wg.Wait()
				elapsed += time.Since(t0)
			}
			after, wafter := schedulerStats(b, c.client), scrape(b, maddr)
			b.ReportMetric(float64(total)/elapsed.Seconds(), "tok/s")
			b.ReportMetric(float64(ttft.Milliseconds())/float64(conc*b.N), "ms-ttft")
			if len(gaps) > 0 {
				slices.Sort(gaps)
				b.ReportMetric(float64(gaps[len(gaps)/2].Microseconds())/1000, "ms-token")
			}
			steps := float64(after.Steps - before.Steps)
			b.ReportMetric(1000*(after.StepSeconds-before.StepSeconds)/steps, "ms/step")
			fwd := func(m map[string]float64) float64 { return sum(m, "qwenfleet:worker_forward_seconds_sum") }
			b.ReportMetric(1000*(fwd(wafter)-fwd(wbefore))/steps, "ms-fwd/step")
			b.ReportMetric(0, "ns/op")
		})
	}
	info, err := c.client.GetServerInfo(context.Background(), &pb.GetServerInfoRequest{})
	if err == nil {
		b.Logf("steps %d, tokens %d, preemptions %d", info.Scheduler.Steps, info.Scheduler.GeneratedTokens, info.Scheduler.Preemptions)
	}
}

// BenchmarkParallelDecode compares layouts of one replica on this machine,
// all processes local and the CPUs shared among the workers: TP=1, TP=2
// and PP=2 on the qwen2-0.5b shape, at 1 and 16 concurrent streams
// (16-token prompts, 32 new tokens each). It reports aggregate decode
// tokens/s and the mean per-step time workers spent communicating
// (all-reduces, stage transfers).
//
//	go test ./pkg/server -run '^$' -bench ParallelDecode -benchtime 1x
func BenchmarkParallelDecode(b *testing.B) {
	needE2E(b)
	dir := benchModel(b)
	cpus := runtime.NumCPU()
	for _, l := range [][2]int{{1, 1}, {2, 1}, {1, 2}} {
		tp, pp := l[0], l[1]
		n := tp * pp
		c := startCluster(b, dir, "--tp", fmt.Sprint(tp), "--pp", fmt.Sprint(pp), "--local-workers", fmt.Sprint(n),
			"--worker-threads", fmt.Sprint(max(cpus/n, 1)))
		for _, conc := range []int{1, 16} {
			b.Run(fmt.Sprintf("tp=%d,pp=%d,streams=%d", tp, pp, conc), func(b *testing.B) {
				before := schedulerStats(b, c.client)
				total, elapsed := decodeRounds(b, c, conc)
				after := schedulerStats(b, c.client)
				reportSteps(b, before, after, total, elapsed)
				b.ReportMetric(0, "ns/op")
			})
		}
		c.coord.stop(syscall.SIGTERM)
	}
}

// reportSteps reports tokens/s and, per step between the scheduler stats
// before and after, the step and communication times.
func reportSteps(b *testing.B, before, after *pb.SchedulerStats, total int, elapsed time.Duration) {
	steps := float64(after.Steps - before.Steps)
	b.ReportMetric(float64(total)/elapsed.Seconds(), "tok/s")
	b.ReportMetric(1000*(after.StepSeconds-before.StepSeconds)/steps, "ms/step")
	b.ReportMetric(1000*(after.CommSeconds-before.CommSeconds)/steps, "ms-comm/step")
}

// decodeRounds runs b.N rounds of conc concurrent greedy requests (16-token
// prompts, 32 new tokens) and returns the tokens generated and the time.
func decodeRounds(b *testing.B, c *clusterT, conc int) (total int, elapsed time.Duration) {
	for it := 0; it < b.N; it++ {
		t0 := time.Now()
		var wg sync.WaitGroup
		var mu sync.Mutex
		for s := 0; s < conc; s++ {
			wg.Go(func() {
				p := make([]int32, 16)
				for j := range p {
					p[j] = int32((it*7919 + s*104729 + j*31) % 150000)
				}
				r, err := generate(context.Background(), c.client, idsReq(p, 32))
				if err != nil {
					b.Error(err)
					return
				}
				mu.Lock()
				total += len(r.ids)
				mu.Unlock()
			})
		}
		wg.Wait()
		elapsed += time.Since(t0)
	}
	return total, elapsed
}

// benchModel makes (once, under the temp dir) the benchmarks' random bf16
// checkpoint: qwen2-0.5b, or the preset QWENFLEET_BENCH_PRESET names.
func benchModel(b *testing.B) string {
	preset := os.Getenv("QWENFLEET_BENCH_PRESET")
	if preset == "" {
		preset = "qwen2-0.5b"
	}
	dir, err := server.EnsurePresetModel(filepath.Join(os.TempDir(), "qwenfleet-bench", preset), preset)
	if err != nil {
		b.Fatal(err)
	}
	return dir
}

// BenchmarkExpertParallelDecode compares expert-parallel layouts of one
// replica of a small MoE model (the tiny-moe preset: 4 layers, 64 experts
// top-8, hidden 128, random bf16 weights) on this machine, all processes
// local with the CPUs shared among the workers: EP=1 (one worker), EP=2
// and EP=4 (attention replicated, tp=1), at 1 and 16 concurrent streams
// (16-token prompts, 32 new tokens each). Besides tokens/s it reports the
// bytes the workers sent each other per token computed.
//
//	go test ./pkg/server -run '^$' -bench ExpertParallelDecode -benchtime 1x
func BenchmarkExpertParallelDecode(b *testing.B) {
	needE2E(b)
	dir, err := server.EnsurePresetModel(filepath.Join(os.TempDir(), "qwenfleet-bench", "tiny-moe"), "tiny-moe")
	if err != nil {
		b.Fatal(err)
	}
	cpus := runtime.NumCPU()
	for _, ep := range []int{1, 2, 4} {
		c := startCluster(b, dir, "--ep", fmt.Sprint(ep), "--tp", "1", "--local-workers", fmt.Sprint(ep),
			"--worker-threads", fmt.Sprint(max(cpus/ep, 1)))
		for _, conc := range []int{1, 16} {
			b.Run(fmt.Sprintf("ep=%d,streams=%d", ep, conc), func(b *testing.B) {
				before := schedulerStats(b, c.client)
				total, elapsed := decodeRounds(b, c, conc)
				after := schedulerStats(b, c.client)
				reportSteps(b, before, after, total, elapsed)
				b.ReportMetric(float64(after.ExchangeBytes-before.ExchangeBytes)/float64(after.StepTokens-before.StepTokens), "B/token")
				b.ReportMetric(0, "ns/op")
			})
		}
		c.coord.stop(syscall.SIGTERM)
	}
}
