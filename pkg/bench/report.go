package bench

import (
	"errors"
	"fmt"
	"io"
	"maps"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Rate is a request rate in requests per second; 0 means a closed loop (no
// arrival process). In JSON, +Inf is the string "inf" (JSON has no infinity).
type Rate float64

// MarshalJSON writes the rate as a number, or "inf".
func (r Rate) MarshalJSON() ([]byte, error) {
	if math.IsInf(float64(r), 1) {
		return []byte(`"inf"`), nil
	}
	return strconv.AppendFloat(nil, float64(r), 'g', -1, 64), nil
}

// UnmarshalJSON reads a number or "inf".
func (r *Rate) UnmarshalJSON(b []byte) error {
	if string(b) == `"inf"` {
		*r = Rate(math.Inf(1))
		return nil
	}
	v, err := strconv.ParseFloat(string(b), 64)
	*r = Rate(v)
	return err
}

// Config records what a run was asked to do, for the report. It does not
// drive anything here: cmd/qwenctl validates its flags and runs the loop.
type Config struct {
	Addr string `json:"addr"`
	// API is what was driven: "grpc" (the public gRPC API) or "http" (the
	// OpenAI-compatible HTTP API; Addr is then its URL).
	API   string `json:"api,omitempty"`
	Model string `json:"model,omitempty"` // the served model's name
	// Concurrency caps the requests in flight (0: no cap, only with Rate).
	Concurrency int `json:"concurrency"`
	// Rate is the Poisson arrival rate (0: closed loop of Concurrency).
	Rate Rate `json:"rate"`
	// Requests and DurationS stop the run, whichever comes first (0: no limit).
	Requests  int     `json:"requests"`
	DurationS float64 `json:"duration_limit_s"`
	// Dataset is the JSONL file of prompts ("": synthetic token ids of
	// InputLen tokens).
	Dataset  string      `json:"dataset,omitempty"`
	InputLen *LengthDist `json:"input_len,omitempty"` // synthetic only; with SharedPrefix, the user turn's
	// SharedPrefix is a shared-prefix workload's N:L: every prompt is one
	// of N synthetic prefixes of L tokens, then InputLen tokens of user
	// turn (see SharedPrefixes).
	SharedPrefix *SharedPrefix `json:"shared_prefix,omitempty"`
	OutputLen    LengthDist    `json:"output_len"` // when a prompt names no max_tokens
	IgnoreEOS    bool          `json:"ignore_eos"`
	Temperature  float64       `json:"temperature"`
	Seed         int64         `json:"seed"`
}

// SLO is a set of latency objectives; a zero field is not an objective.
type SLO struct {
	TTFT, TPOT, E2E time.Duration
}

// ErrBadSLO is wrapped by every ParseSLO error.
var ErrBadSLO = errors.New("bad SLO")

// ParseSLO reads "ttft=200ms,tpot=50ms,e2e=2s" (any non-empty subset, each
// key once, values > 0; a bare number is milliseconds).
func ParseSLO(s string) (SLO, error) {
	var slo SLO
	seen := map[string]bool{}
	for _, part := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(strings.TrimSpace(part), "=")
		k = strings.ToLower(strings.TrimSpace(k))
		if !ok {
			return SLO{}, fmt.Errorf("%w %q: want KEY=DURATION, as in ttft=200ms,tpot=50ms,e2e=2s", ErrBadSLO, part)
		}
		if k == "e2el" { // vLLM's name
			k = "e2e"
		}
		if k != "ttft" && k != "tpot" && k != "e2e" {
			return SLO{}, fmt.Errorf("%w: unknown objective %q; want ttft, tpot or e2e", ErrBadSLO, k)
		}
		d, err := time.ParseDuration(strings.TrimSpace(v))
		if f, ferr := strconv.ParseFloat(strings.TrimSpace(v), 64); ferr == nil {
			d, err = time.Duration(f*float64(time.Millisecond)), nil
			if !(f > 0) || f > float64(math.MaxInt64/time.Millisecond) {
				d = 0
			}
		}
		if err != nil || d <= 0 {
			return SLO{}, fmt.Errorf("%w: %s: %q is not a duration > 0 (a bare number is ms)", ErrBadSLO, k, v)
		}
		if seen[k] {
			return SLO{}, fmt.Errorf("%w: %s given twice", ErrBadSLO, k)
		}
		seen[k] = true
		switch k {
		case "ttft":
			slo.TTFT = d
		case "tpot":
			slo.TPOT = d
		default:
			slo.E2E = d
		}
	}
	return slo, nil
}

// Met reports whether a completed request meets every objective.
func (s SLO) Met(r *Request) bool {
	if !r.OK() {
		return false
	}
	if s.TTFT > 0 {
		if t, ok := r.TTFT(); !ok || t > s.TTFT {
			return false
		}
	}
	if s.TPOT > 0 {
		if t, ok := r.TPOT(); ok && t > s.TPOT {
			return false
		}
	}
	return s.E2E == 0 || r.E2E() <= s.E2E
}

// String is the text form ParseSLO reads.
func (s SLO) String() string {
	var parts []string
	for _, kv := range []struct {
		k string
		d time.Duration
	}{{"ttft", s.TTFT}, {"tpot", s.TPOT}, {"e2e", s.E2E}} {
		if kv.d > 0 {
			parts = append(parts, kv.k+"="+kv.d.String())
		}
	}
	return strings.Join(parts, ",")
}

// MarshalJSON writes the objectives in milliseconds.
func (s SLO) MarshalJSON() ([]byte, error) {
	var parts []string
	for _, kv := range []struct {
		k string
		d time.Duration
	}{{"ttft_ms", s.TTFT}, {"tpot_ms", s.TPOT}, {"e2e_ms", s.E2E}} {
		if kv.d > 0 {
			parts = append(parts, strconv.Quote(kv.k)+":"+strconv.FormatFloat(ms(kv.d), 'g', -1, 64))
		}
	}
	return []byte("{" + strings.Join(parts, ",") + "}"), nil
}

// Goodput is the rate of completed requests that met every objective.
type Goodput struct {
	SLO        SLO     `json:"slo"`
	Good       int     `json:"good_requests"`
	Throughput float64 `json:"request_goodput"` // good requests per second
}

// Record is one request in the report, in milliseconds and seconds.
type Record struct {
	Index        int       `json:"index"`
	ID           string    `json:"request_id,omitempty"`
	StartS       float64   `json:"start_s"`       // offset from the start of the run
	TTFTMs       *float64  `json:"ttft_ms"`       // null when no token arrived
	TPOTMs       *float64  `json:"tpot_ms"`       // null with fewer than 2 tokens
	E2EMs        float64   `json:"e2e_ms"`        // to the end or the failure
	PromptTokens int       `json:"prompt_tokens"` // 0 when unknown (failed text prompts)
	OutputTokens int       `json:"output_tokens"`
	ITLMs        []float64 `json:"itl_ms,omitempty"` // see Request.ITL
	Error        string    `json:"error,omitempty"`  // gRPC status code name
	Interrupted  bool      `json:"interrupted,omitempty"`
	// PrefixIndex is the shared prefix the prompt began with (shared-prefix
	// workloads only).
	PrefixIndex *int `json:"prefix_index,omitempty"`
	// OutputTokenIDs are the generated token ids, in order: two runs of the
	// same prompts (the same seed) and greedy sampling should agree on them
	// record for record (see Compare).
	OutputTokenIDs []int32 `json:"output_token_ids,omitempty"`
}

// Report is the result of a run: what `qwenctl bench` prints and writes as
// JSON. Token totals and throughputs count completed requests only.
type Report struct {
	Config      Config         `json:"config"`
	Completed   int            `json:"completed"`
	Failed      int            `json:"failed"`
	Interrupted int            `json:"interrupted"`
	Failures    map[string]int `json:"failures"` // gRPC status code name → requests

	DurationS            float64 `json:"duration_s"`
	TotalInputTokens     int     `json:"total_input_tokens"`
	TotalOutputTokens    int     `json:"total_output_tokens"`
	RequestThroughput    float64 `json:"request_throughput"`     // completed requests/s
	OutputThroughput     float64 `json:"output_throughput"`      // output tokens/s
	TotalTokenThroughput float64 `json:"total_token_throughput"` // (input+output) tokens/s

	TTFT Summary `json:"ttft_ms"`
	TPOT Summary `json:"tpot_ms"`
	ITL  Summary `json:"itl_ms"`
	E2E  Summary `json:"e2e_ms"`

	Goodput *Goodput `json:"goodput"` // null without SLOs

	// SharedPrefix adds up a shared-prefix workload (absent otherwise).
	SharedPrefix *PrefixStats `json:"shared_prefix,omitempty"`

	Records []Record `json:"records"` // every request made, by Index
}

// PrefixStats adds up a shared-prefix workload: how many of the N prefixes
// the requests made used, and the TTFT of the completed requests that were
// the first (lowest index) to use their prefix, against that of the
// completed ones that reused a prefix. Only a reuse can find its prefix in
// a cache; at concurrency C, a reuse sent while its prefix's first use is
// still in prefill may not find it either.
type PrefixStats struct {
	Used      int     `json:"prefixes_used"`
	FirstTTFT Summary `json:"first_use_ttft_ms"`
	ReuseTTFT Summary `json:"reuse_ttft_ms"`
}

// Summarize adds up the requests of a run that took duration. slo may be
// nil (no goodput). reqs is not modified.
func Summarize(cfg Config, reqs []Request, duration time.Duration, slo *SLO) *Report {
	rep := &Report{Config: cfg, Failures: map[string]int{}, DurationS: duration.Seconds(), Records: []Record{}}
	var ttft, tpot, itl, e2e, firstTTFT, reuseTTFT []float64
	good := 0
	used := map[int]bool{} // shared prefixes used so far
	sorted := slices.Clone(reqs)
	slices.SortFunc(sorted, func(a, b Request) int { return a.Index - b.Index })
	for i := range sorted {
		r := &sorted[i]
		rec := Record{Index: r.Index, ID: r.ID, StartS: r.Start.Seconds(), E2EMs: ms(r.E2E()), PromptTokens: r.PromptTokens,
			OutputTokens: r.OutputTokens, Error: r.Code, Interrupted: r.Interrupted, OutputTokenIDs: slices.Clone(r.OutputIDs)}
		first := false
		if r.Prefix != nil {
			rec.PrefixIndex = ptr(*r.Prefix)
			if !used[*r.Prefix] {
				used[*r.Prefix], first = true, true
			}
		}
		if t, ok := r.TTFT(); ok {
			rec.TTFTMs = ptr(ms(t))
		}
		if t, ok := r.TPOT(); ok {
			rec.TPOTMs = ptr(ms(t))
		}
		for _, d := range r.ITL() {
			rec.ITLMs = append(rec.ITLMs, ms(d))
		}
		rep.Records = append(rep.Records, rec)
		switch {
		case r.Interrupted:
			rep.Interrupted++
			continue
		case r.Code != "":
			rep.Failed++
			rep.Failures[r.Code]++
			continue
		}
		rep.Completed++
		rep.TotalInputTokens += r.PromptTokens
		rep.TotalOutputTokens += r.OutputTokens
		if rec.TTFTMs != nil {
			ttft = append(ttft, *rec.TTFTMs)
			if r.Prefix != nil && first {
				firstTTFT = append(firstTTFT, *rec.TTFTMs)
			} else if r.Prefix != nil {
				reuseTTFT = append(reuseTTFT, *rec.TTFTMs)
			}
		}
		if rec.TPOTMs != nil {
			tpot = append(tpot, *rec.TPOTMs)
		}
		itl = append(itl, rec.ITLMs...)
		e2e = append(e2e, rec.E2EMs)
		if slo != nil && slo.Met(r) {
			good++
		}
	}
	rep.TTFT, rep.TPOT, rep.ITL, rep.E2E = Describe(ttft), Describe(tpot), Describe(itl), Describe(e2e)
	per := func(n int) float64 {
		if duration <= 0 {
			return 0
		}
		return float64(n) / duration.Seconds()
	}
	rep.RequestThroughput = per(rep.Completed)
	rep.OutputThroughput = per(rep.TotalOutputTokens)
	rep.TotalTokenThroughput = per(rep.TotalInputTokens + rep.TotalOutputTokens)
	if slo != nil {
		rep.Goodput = &Goodput{SLO: *slo, Good: good, Throughput: per(good)}
	}
	if cfg.SharedPrefix != nil {
		rep.SharedPrefix = &PrefixStats{Used: len(used), FirstTTFT: Describe(firstTTFT), ReuseTTFT: Describe(reuseTTFT)}
	}
	return rep
}

func ptr[T any](v T) *T { return &v }

// WriteText prints the report like vLLM's "Serving Benchmark Result" block.
func (r *Report) WriteText(w io.Writer) error {
	var b strings.Builder
	head := func(title string, fill byte) {
		pad := 50 - len(title)
		b.WriteString(strings.Repeat(string(fill), pad/2) + title + strings.Repeat(string(fill), pad-pad/2) + "\n")
	}
	row := func(k string, v any) {
		if f, ok := v.(float64); ok {
			v = strconv.FormatFloat(f, 'f', 2, 64)
		}
		fmt.Fprintf(&b, "%-40s %v\n", k+":", v)
	}
	head(" Serving Benchmark Result ", '=')
	if sp := r.Config.SharedPrefix; sp != nil {
		w := "shared prefix " + sp.String()
		if in := r.Config.InputLen; in != nil {
			w += ", user turn " + in.String()
		}
		row("Workload", w)
	}
	row("Successful requests", r.Completed)
	row("Failed requests", r.Failed)
	for _, code := range slices.Sorted(maps.Keys(r.Failures)) {
		row("  "+code, r.Failures[code])
	}
	if r.Interrupted > 0 {
		row("Interrupted requests", r.Interrupted)
	}
	row("Benchmark duration (s)", r.DurationS)
	row("Total input tokens", r.TotalInputTokens)
	row("Total generated tokens", r.TotalOutputTokens)
	row("Request throughput (req/s)", r.RequestThroughput)
	if g := r.Goodput; g != nil {
		row("Request goodput (req/s)", g.Throughput)
		row("Good requests", fmt.Sprintf("%d (SLO %s)", g.Good, g.SLO))
	}
	row("Output token throughput (tok/s)", r.OutputThroughput)
	row("Total token throughput (tok/s)", r.TotalTokenThroughput)
	for _, m := range []struct {
		title, name string
		s           Summary
	}{
		{"Time to First Token", "TTFT", r.TTFT},
		{"Time per Output Token (excl. 1st token)", "TPOT", r.TPOT},
		{"Inter-token Latency", "ITL", r.ITL},
		{"End-to-end Latency", "E2EL", r.E2E},
	} {
		head(m.title, '-')
		row("Mean "+m.name+" (ms)", m.s.Mean)
		row("Median "+m.name+" (ms)", m.s.Median)
		row("P90 "+m.name+" (ms)", m.s.P90)
		row("P99 "+m.name+" (ms)", m.s.P99)
		if p := r.SharedPrefix; m.name == "TTFT" && p != nil {
			n := "?"
			if sp := r.Config.SharedPrefix; sp != nil {
				n = strconv.Itoa(sp.N)
			}
			row("Prefixes used", fmt.Sprintf("%d of %s", p.Used, n))
			row("Mean TTFT, prefix first use (ms)", p.FirstTTFT.Mean)
			row("Median TTFT, prefix first use (ms)", p.FirstTTFT.Median)
			row("Mean TTFT, prefix reuse (ms)", p.ReuseTTFT.Mean)
			row("Median TTFT, prefix reuse (ms)", p.ReuseTTFT.Median)
		}
	}
	b.WriteString(strings.Repeat("=", 50) + "\n")
	_, err := io.WriteString(w, b.String())
	return err
}
