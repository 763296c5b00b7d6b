package bench_test

import (
	"fmt"
	"os"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/bench"
)

// Two requests of a closed loop, as the client recorded them, and the
// report they make.
func ExampleSummarize() {
	ms := time.Millisecond
	reqs := []bench.Request{
		{Index: 0, Start: 0, End: 100 * ms, PromptTokens: 16, OutputTokens: 4,
			Chunks: []bench.Chunk{{At: 40 * ms, Tokens: 1}, {At: 60 * ms, Tokens: 1}, {At: 100 * ms, Tokens: 2}}},
		{Index: 1, Start: 100 * ms, End: 180 * ms, PromptTokens: 16, OutputTokens: 4,
			Chunks: []bench.Chunk{{At: 120 * ms, Tokens: 1}, {At: 140 * ms, Tokens: 1}, {At: 160 * ms, Tokens: 1}, {At: 180 * ms, Tokens: 1}}},
	}
	slo, _ := bench.ParseSLO("ttft=30ms")
	rep := bench.Summarize(bench.Config{Concurrency: 1}, reqs, 200*ms, &slo)
	fmt.Printf("TPOT of request 0: %.1f ms; ITL of request 0: %v ms\n", *rep.Records[0].TPOTMs, rep.Records[0].ITLMs)
	rep.WriteText(os.Stdout)
	// Output:
	// TPOT of request 0: 20.0 ms; ITL of request 0: [20 20 20] ms
	// ============ Serving Benchmark Result ============
	// Successful requests:                     2
	// Failed requests:                         0
	// Benchmark duration (s):                  0.20
	// Total input tokens:                      32
	// Total generated tokens:                  8
	// Request throughput (req/s):              10.00
	// Request goodput (req/s):                 5.00
	// Good requests:                           1 (SLO ttft=30ms)
	// Output token throughput (tok/s):         40.00
	// Total token throughput (tok/s):          200.00
	// ---------------Time to First Token----------------
	// Mean TTFT (ms):                          30.00
	// Median TTFT (ms):                        30.00
	// P90 TTFT (ms):                           38.00
	// P99 TTFT (ms):                           39.80
	// -----Time per Output Token (excl. 1st token)------
	// Mean TPOT (ms):                          20.00
	// Median TPOT (ms):                        20.00
	// P90 TPOT (ms):                           20.00
	// P99 TPOT (ms):                           20.00
	// ---------------Inter-token Latency----------------
	// Mean ITL (ms):                           20.00
	// Median ITL (ms):                         20.00
	// P90 ITL (ms):                            20.00
	// P99 ITL (ms):                            20.00
	// ----------------End-to-end Latency----------------
	// Mean E2EL (ms):                          90.00
	// Median E2EL (ms):                        90.00
	// P90 E2EL (ms):                           98.00
	// P99 E2EL (ms):                           99.80
	// ==================================================
}
