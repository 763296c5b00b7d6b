package bench

import (
	"encoding/json"
	"errors"
	"math"
	"reflect"
	"strings"
	"testing"
	"time"
)

// run is a small run of 2 s: three completed requests, two failures, one
// request cut off by Ctrl-C, given out of order.
func run() []Request {
	return []Request{
		{Index: 2, Start: 200 * msec, End: 400 * msec, PromptTokens: 10, OutputTokens: 3,
			Chunks: []Chunk{{270 * msec, 1}, {330 * msec, 1}, {400 * msec, 1}}}, // TTFT 70, TPOT 65
		{Index: 0, Start: 0, End: 100 * msec, PromptTokens: 10, OutputTokens: 3,
			Chunks: []Chunk{{50 * msec, 1}, {70 * msec, 2}}}, // TTFT 50, TPOT 25, ITL 10, 10
		{Index: 1, Start: 100 * msec, End: 150 * msec, PromptTokens: 20, OutputTokens: 1,
			Chunks: []Chunk{{140 * msec, 1}}}, // TTFT 40, no TPOT
		{Index: 3, Start: 300 * msec, End: 310 * msec, Code: "Unavailable"},
		{Index: 4, Start: 400 * msec, End: 500 * msec, Code: "Internal", Chunks: []Chunk{{450 * msec, 1}}},
		{Index: 5, Start: 500 * msec, End: 900 * msec, Code: "Canceled", Interrupted: true},
	}
}

func TestSummarize(t *testing.T) {
	rep := Summarize(Config{Addr: "a:1", Concurrency: 2}, run(), 2*time.Second, nil)
	if rep.Completed != 3 || rep.Failed != 2 || rep.Interrupted != 1 ||
		!reflect.DeepEqual(rep.Failures, map[string]int{"Unavailable": 1, "Internal": 1}) {
		t.Fatalf("counts %d/%d/%d %v", rep.Completed, rep.Failed, rep.Interrupted, rep.Failures)
	}
	if rep.TotalInputTokens != 40 || rep.TotalOutputTokens != 7 || rep.DurationS != 2 {
		t.Fatalf("tokens %d in %d out, %v s", rep.TotalInputTokens, rep.TotalOutputTokens, rep.DurationS)
	}
	if rep.RequestThroughput != 1.5 || rep.OutputThroughput != 3.5 || rep.TotalTokenThroughput != 23.5 {
		t.Fatalf("throughput %v %v %v", rep.RequestThroughput, rep.OutputThroughput, rep.TotalTokenThroughput)
	}
	// Completed requests only: TTFT 50, 40, 70; TPOT 25, 65; ITL 10, 10, 60, 70; E2E 100, 50, 200.
	for _, c := range []struct {
		name         string
		s            Summary
		n            int
		mean, median float64
	}{
		{"ttft", rep.TTFT, 3, 160.0 / 3, 50},
		{"tpot", rep.TPOT, 2, 45, 45},
		{"itl", rep.ITL, 4, 37.5, 35},
		{"e2e", rep.E2E, 3, 350.0 / 3, 100},
	} {
		if c.s.Count != c.n || !near(c.s.Mean, c.mean, 1e-9) || !near(c.s.Median, c.median, 1e-9) {
			t.Errorf("%s: %+v, want n=%d mean %v median %v", c.name, c.s, c.n, c.mean, c.median)
		}
	}
	if len(rep.Records) != 6 || rep.Goodput != nil {
		t.Fatalf("%d records, goodput %v", len(rep.Records), rep.Goodput)
	}
	for i, r := range rep.Records {
		if r.Index != i {
			t.Fatalf("records out of order: %+v", rep.Records)
		}
	}
	if r := rep.Records[1]; *r.TTFTMs != 40 || r.TPOTMs != nil || r.E2EMs != 50 || r.StartS != 0.1 || r.Error != "" {
		t.Fatalf("record 1: %+v", r)
	}
	if r := rep.Records[3]; r.TTFTMs != nil || r.Error != "Unavailable" || r.E2EMs != 10 {
		t.Fatalf("record 3: %+v", r)
	}
	if r := rep.Records[5]; !r.Interrupted {
		t.Fatalf("record 5: %+v", r)
	}
	if z := Summarize(Config{}, nil, 0, nil); z.Completed != 0 || z.RequestThroughput != 0 || z.Records == nil {
		t.Fatalf("empty run: %+v", z)
	}
}

func TestGoodput(t *testing.T) {
	for _, tc := range []struct {
		slo  string
		good int
	}{
		{"ttft=60ms", 2},          // 50 and 40 pass, 70 does not
		{"tpot=30ms", 2},          // 25 passes, one token has no TPOT and passes, 65 fails
		{"e2e=100ms", 2},          // 100 (inclusive) and 50
		{"ttft=60ms,e2e=60ms", 1}, // only the 40/50 request
		{"ttft=1s,tpot=1s,e2e=1s", 3},
		{"ttft=1ms", 0},
	} {
		t.Run(tc.slo, func(t *testing.T) {
			slo, err := ParseSLO(tc.slo)
			if err != nil {
				t.Fatal(err)
			}
			rep := Summarize(Config{}, run(), 2*time.Second, &slo)
			if rep.Goodput == nil || rep.Goodput.Good != tc.good || rep.Goodput.Throughput != float64(tc.good)/2 {
				t.Fatalf("goodput %+v, want %d good", rep.Goodput, tc.good)
			}
		})
	}
}

func TestParseSLO(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want SLO
	}{
		{"ttft=200ms,tpot=50ms,e2e=2s", SLO{TTFT: 200 * msec, TPOT: 50 * msec, E2E: 2 * time.Second}},
		{"tpot=50", SLO{TPOT: 50 * msec}},
		{" E2E = 1.5s ", SLO{E2E: 1500 * msec}},
		{"e2el=250", SLO{E2E: 250 * msec}},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSLO(tc.in)
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v", got, err)
			}
			if again, err := ParseSLO(got.String()); err != nil || again != got {
				t.Fatalf("%q does not read back: %+v %v", got.String(), again, err)
			}
		})
	}
	for _, in := range []string{"", "ttft", "ttft=", "ttft=0", "ttft=-1s", "ttft=NaN", "ttft=fast", "itl=5ms", "ttft=1s,ttft=2s", "e2e=1s,e2el=2s", "ttft=1s,"} {
		t.Run("bad "+in, func(t *testing.T) {
			if got, err := ParseSLO(in); !errors.Is(err, ErrBadSLO) {
				t.Fatalf("got %+v, %v", got, err)
			}
		})
	}
}

func TestReportJSON(t *testing.T) {
	in, _ := ParseLengthDist("uniform:8-16")
	slo := SLO{TTFT: 60 * msec}
	cfg := Config{Addr: "127.0.0.1:50051", Concurrency: 4, Rate: Rate(math.Inf(1)), Requests: 6, InputLen: &in,
		OutputLen: LengthDist{Kind: Fixed, N: 3}, Seed: 9}
	b, err := json.Marshal(Summarize(cfg, run(), 2*time.Second, &slo))
	if err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b, &got); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"completed", "failed", "interrupted", "failures", "duration_s", "total_input_tokens", "total_output_tokens",
		"request_throughput", "output_throughput", "total_token_throughput", "ttft_ms", "tpot_ms", "itl_ms", "e2e_ms", "goodput", "config", "records"} {
		if _, ok := got[k]; !ok {
			t.Errorf("no %q in %s", k, b)
		}
	}
	for _, k := range []string{"mean", "median", "std", "min", "max", "p90", "p99"} {
		if _, ok := got["ttft_ms"].(map[string]any)[k]; !ok {
			t.Errorf("no ttft_ms.%s", k)
		}
	}
	c := got["config"].(map[string]any)
	if c["rate"] != "inf" || c["input_len"] != "uniform:8-16" || c["output_len"] != "3" || c["addr"] != "127.0.0.1:50051" || c["seed"] != 9.0 {
		t.Errorf("config %v", c)
	}
	g := got["goodput"].(map[string]any)
	if g["good_requests"] != 2.0 || g["slo"].(map[string]any)["ttft_ms"] != 60.0 {
		t.Errorf("goodput %v", g)
	}
	recs := got["records"].([]any)
	if len(recs) != 6 || recs[3].(map[string]any)["error"] != "Unavailable" || recs[3].(map[string]any)["ttft_ms"] != nil {
		t.Errorf("records %v", recs)
	}
	// The JSON reads back into a Report (e.g. to plot it again).
	var back Report
	if err := json.Unmarshal(b, &back); err != nil || back.Completed != 3 || !math.IsInf(float64(back.Config.Rate), 1) || *back.Config.InputLen != in {
		t.Fatalf("read back: %v %+v", err, back.Config)
	}
}

func TestWriteText(t *testing.T) {
	slo := SLO{TTFT: 60 * msec, E2E: time.Second}
	var b strings.Builder
	if err := Summarize(Config{}, run(), 2*time.Second, &slo).WriteText(&b); err != nil {
		t.Fatal(err)
	}
	out := b.String()
	for _, want := range []string{
		"============ Serving Benchmark Result ============\n",
		"Successful requests:                     3\n",
		"Failed requests:                         2\n",
		"  Internal:                              1\n",
		"  Unavailable:                           1\n",
		"Interrupted requests:                    1\n",
		"Benchmark duration (s):                  2.00\n",
		"Request goodput (req/s):                 1.00\n",
		"Good requests:                           2 (SLO ttft=60ms,e2e=1s)\n",
		"---------------Time to First Token----------------\n",
		"Median TTFT (ms):                        50.00\n",
		"P99 E2EL (ms):                           198.00\n",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in\n%s", want, out)
		}
	}
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		if strings.Trim(l, "=-") != l && len(l) != 50 {
			t.Errorf("rule %q is %d wide", l, len(l))
		}
	}
}
