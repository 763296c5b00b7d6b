package bench

import (
	"math"
	"slices"
	"time"
)

// Chunk is one streamed response that carried Tokens (>= 1) new tokens and
// arrived At (an offset from the start of the benchmark).
type Chunk struct {
	At     time.Duration
	Tokens int
}

// Request is what the client saw of one request. All times are offsets from
// the start of the benchmark.
type Request struct {
	Index int           // the order in which the request was made, from 0
	ID    string        // the request_id sent (the server logs it)
	Start time.Duration // when it was sent
	End   time.Duration // when the complete message (or the failure) arrived
	// Chunks are the chunks that carried tokens, in arrival order.
	Chunks []Chunk
	// PromptTokens and OutputTokens are the server's usage counts (the
	// client's count of streamed tokens when the server sent none).
	PromptTokens, OutputTokens int
	// OutputIDs are the generated token ids, in order (those received
	// before a failure when it failed).
	OutputIDs []int32
	// Prefix is the prompt's Prefix: the index of its shared prefix in a
	// shared-prefix workload, nil otherwise.
	Prefix *int
	// Code is "" for a request that completed, otherwise the gRPC status
	// code name it failed with ("Unavailable", "Internal", ...).
	Code string
	// Interrupted marks a request cut off because the run was stopped
	// (Ctrl-C): neither completed nor failed.
	Interrupted bool
}

// OK reports whether the request completed.
func (r *Request) OK() bool { return r.Code == "" && !r.Interrupted }

// TTFT is the time to the first token; false when no token arrived.
func (r *Request) TTFT() (time.Duration, bool) {
	if len(r.Chunks) == 0 {
		return 0, false
	}
	return r.Chunks[0].At - r.Start, true
}

// E2E is the time from sending the request to its end.
func (r *Request) E2E() time.Duration { return r.End - r.Start }

// TPOT is the time per output token after the first, (E2E - TTFT) /
// (OutputTokens - 1); false with fewer than two output tokens.
func (r *Request) TPOT() (time.Duration, bool) {
	ttft, ok := r.TTFT()
	if !ok || r.OutputTokens < 2 {
		return 0, false
	}
	return (r.E2E() - ttft) / time.Duration(r.OutputTokens-1), true
}

// ITL gives one inter-token latency per token after the first chunk: the
// gap between a chunk and the one before it, split evenly over the chunk's
// tokens (a chunk of k tokens counts as k tokens, each gap/k, so batched and
// token-by-token streaming at the same pace look the same). Extra tokens in
// the first chunk have no earlier chunk to measure from and give no sample.
func (r *Request) ITL() []time.Duration {
	var out []time.Duration
	for i := 1; i < len(r.Chunks); i++ {
		k := max(r.Chunks[i].Tokens, 1)
		gap := (r.Chunks[i].At - r.Chunks[i-1].At) / time.Duration(k)
		for range k {
			out = append(out, gap)
		}
	}
	return out
}

// Summary describes a sample of latencies, in milliseconds. An empty sample
// is all zeros.
type Summary struct {
	Count  int     `json:"count"`
	Mean   float64 `json:"mean"`
	Median float64 `json:"median"`
	Std    float64 `json:"std"`
	Min    float64 `json:"min"`
	Max    float64 `json:"max"`
	P90    float64 `json:"p90"`
	P99    float64 `json:"p99"`
}

// Describe summarizes the values (in milliseconds); it does not modify vs.
func Describe(vs []float64) Summary {
	if len(vs) == 0 {
		return Summary{}
	}
	s := slices.Clone(vs)
	slices.Sort(s)
	var sum float64
	for _, v := range s {
		sum += v
	}
	mean := sum / float64(len(s))
	var sq float64
	for _, v := range s {
		sq += (v - mean) * (v - mean)
	}
	return Summary{Count: len(s), Mean: mean, Median: Percentile(s, 50), Std: math.Sqrt(sq / float64(len(s))),
		Min: s[0], Max: s[len(s)-1], P90: Percentile(s, 90), P99: Percentile(s, 99)}
}

// Percentile is the p-th percentile (0 <= p <= 100) of sorted, interpolated
// linearly between the closest ranks like numpy's default: rank p/100*(n-1).
// It is 0 for an empty slice.
func Percentile(sorted []float64, p float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	rank := p / 100 * float64(len(sorted)-1)
	lo := int(math.Floor(rank))
	hi := min(lo+1, len(sorted)-1)
	return sorted[lo] + (sorted[hi]-sorted[lo])*(rank-float64(lo))
}

func ms(d time.Duration) float64 { return float64(d) / float64(time.Millisecond) }
