// Package bench holds the pure parts of a serving benchmark modelled on
// `vllm bench serve`: where prompts come from, when requests arrive, and what
// the timings of finished requests add up to. It does no I/O of its own
// beyond reading a dataset and writing a report or a PNG to the writers it is
// given; the loop that sends requests (gRPC, timers, signals) lives in
// cmd/qwenctl and is kept thin around it:
//
//	src := bench.Synthetic{Input: in, Output: out, Limit: bench.TokenLimit(vocab, eos), Avoid: eos, Seed: seed}
//	gaps := bench.NewPoisson(rate, seed) // open loop; a closed loop just keeps C requests running
//	for i := 0; i < n; i++ {
//		wait(gaps.Next())
//		go func() { reqs <- send(src.Prompt(i)) }() // the client records a bench.Request
//	}
//	rep := bench.Summarize(cfg, collected, elapsed, slo)
//	rep.WriteText(os.Stdout)
//	bench.WritePNG(f, rep)
//
// SharedPrefixes is the source of a shared-prefix workload (the load a
// prefix cache serves): N synthetic system prompts of L tokens, each request
// one of them and a short user turn. Every Record carries the output token
// ids, so Compare can tell whether two runs of the same seed generated the
// same tokens.
//
// # Timings
//
// A Request carries offsets from the start of the benchmark: when it was
// sent, when each chunk that carried tokens arrived, and when it ended. From
// those:
//
//   - TTFT is the first token-carrying chunk minus the start;
//   - E2E is the end (the complete message) minus the start;
//   - TPOT is (E2E - TTFT) / (n - 1) for n >= 2 output tokens, the time per
//     output token after the first (undefined, and left out, for n < 2);
//   - ITL is every gap between consecutive token-carrying chunks. A chunk
//     that carries k tokens counts as k tokens, each with gap/k, so a server
//     that batches tokens into chunks shows the same ITL as one that sends
//     them one by one at the same pace. Tokens that arrive in the very first
//     chunk beyond the first token have no earlier chunk to measure from and
//     add no ITL sample.
//
// Summaries follow numpy (and so vLLM): percentiles interpolate linearly
// between the closest ranks, the standard deviation is the population one.
//
// Goodput counts the completed requests that meet every given SLO (TTFT,
// TPOT, E2E; a request with one output token has no TPOT and meets a TPOT
// SLO), per second of the benchmark.
package bench
