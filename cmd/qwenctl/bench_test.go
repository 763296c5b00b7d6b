package main

import (
	"encoding/json"
	"fmt"
	"image/png"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/bench"
)

func readReport(t *testing.T, path string) bench.Report {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	return rep
}

// TestBench drives `qwenctl bench` closed loop and open loop against a real
// cluster serving the tiny reference model (vocabulary of 512, no tokenizer).
func TestBench(t *testing.T) {
	addr := startCluster(t, filepath.Join(refDir, "dense-gqa-f32"))
	tmp := t.TempDir()

	t.Run("closed loop", func(t *testing.T) {
		js, plot := filepath.Join(tmp, "closed.json"), filepath.Join(tmp, "closed.png")
		out, errs, code := qwenctl(t, "bench", "--addr", addr, "--concurrency", "4", "--requests", "24",
			"--input-len", "16", "--output-len", "8", "--slo", "ttft=30s,tpot=30s", "--json", js, "--plot", plot)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errs)
		}
		// stderr is not a terminal: no progress bar.
		if errs != "" {
			t.Errorf("stderr %q", errs)
		}
		for _, want := range []string{"Serving Benchmark Result", "Successful requests:                     24\n",
			"Total generated tokens:                  192\n", "Good requests:                           24 (SLO ttft=30s,tpot=30s)\n", "Median TPOT (ms):"} {
			if !strings.Contains(out, want) {
				t.Errorf("no %q in\n%s", want, out)
			}
		}
		rep := readReport(t, js)
		if rep.Completed != 24 || rep.Failed != 0 || rep.TotalOutputTokens != 24*8 || rep.TotalInputTokens != 24*16 || len(rep.Records) != 24 {
			t.Fatalf("completed %d failed %d (%v) output %d input %d records %d",
				rep.Completed, rep.Failed, rep.Failures, rep.TotalOutputTokens, rep.TotalInputTokens, len(rep.Records))
		}
		for i, r := range rep.Records {
			if r.Index != i || r.Error != "" || r.OutputTokens != 8 || r.PromptTokens != 16 || r.TTFTMs == nil || r.TPOTMs == nil || !(r.E2EMs >= *r.TTFTMs) {
				t.Fatalf("record %d: %+v", i, r)
			}
		}
		if rep.ITL.Count < 24 || rep.TTFT.Count != 24 || rep.E2E.Count != 24 || !(rep.TTFT.P99 >= rep.TTFT.Median) {
			t.Fatalf("summaries: ttft %+v itl %+v", rep.TTFT, rep.ITL)
		}
		if rep.Goodput == nil || rep.Goodput.Good != 24 {
			t.Fatalf("goodput %+v", rep.Goodput)
		}
		c := rep.Config
		if c.Addr != addr || c.Concurrency != 4 || c.Rate != 0 || c.Requests != 24 || c.InputLen.String() != "16" || c.OutputLen.String() != "8" || !c.IgnoreEOS {
			t.Fatalf("config %+v", c)
		}
		f, err := os.Open(plot)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		img, err := png.Decode(f)
		if err != nil {
			t.Fatal(err)
		}
		if b := img.Bounds(); b.Dx() != bench.PlotWidth || b.Dy() != bench.PlotHeight {
			t.Fatalf("plot is %v", b)
		}
	})

	t.Run("open loop", func(t *testing.T) {
		js := filepath.Join(tmp, "open.json")
		_, errs, code := qwenctl(t, "bench", "--addr", addr, "--rate", "40", "--duration", "1s", "--seed", "3",
			"--input-len", "uniform:4-12", "--output-len", "4", "--json", js)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errs)
		}
		rep := readReport(t, js)
		// About 40 arrivals in the second; all finish, none after the second.
		if rep.Completed < 10 || rep.Failed != 0 || len(rep.Records) != rep.Completed || rep.TotalOutputTokens != 4*rep.Completed {
			t.Fatalf("completed %d failed %d (%v) records %d output %d", rep.Completed, rep.Failed, rep.Failures, len(rep.Records), rep.TotalOutputTokens)
		}
		for _, r := range rep.Records {
			if r.StartS >= 1 || r.PromptTokens < 4 || r.PromptTokens > 12 {
				t.Fatalf("record %+v", r)
			}
		}
		if c := rep.Config; c.Rate != 40 || c.Concurrency != 0 || c.Requests != 0 || c.DurationS != 1 {
			t.Fatalf("config %+v", c)
		}
	})

	t.Run("failures are counted", func(t *testing.T) {
		// 40000 tokens is beyond the model's context: every request is
		// refused with InvalidArgument; the run still reports, writes its
		// JSON, then exits 1 saying so in one line.
		js := filepath.Join(tmp, "fail.json")
		out, errs, code := qwenctl(t, "bench", "--addr", addr, "--requests", "3", "--input-len", "4", "--output-len", "40000", "--json", js)
		if code != 1 || !strings.Contains(out, "Failed requests:                         3\n") || !strings.Contains(out, "  InvalidArgument:                       3\n") {
			t.Fatalf("exit %d: %s\n%s", code, errs, out)
		}
		if errs != "qwenctl bench: 3 of 3 requests failed (InvalidArgument 3)\n" {
			t.Fatalf("stderr %q", errs)
		}
		rep := readReport(t, js)
		if rep.Completed != 0 || rep.Failed != 3 || rep.Failures["InvalidArgument"] != 3 || rep.Records[2].Error != "InvalidArgument" {
			t.Fatalf("completed %d failed %d %v", rep.Completed, rep.Failed, rep.Failures)
		}
	})

	t.Run("shared prefix", func(t *testing.T) {
		// 3 prefixes of 40 tokens, then the default user turn of 32.
		js := filepath.Join(tmp, "prefix.json")
		out, errs, code := qwenctl(t, "bench", "--addr", addr, "--concurrency", "2", "--requests", "12", "--shared-prefix", "3:40",
			"--output-len", "6", "--seed", "5", "--json", js)
		if code != 0 {
			t.Fatalf("exit %d: %s", code, errs)
		}
		for _, want := range []string{"Workload:                                shared prefix 3:40, user turn 32\n", "Prefixes used:",
			"Median TTFT, prefix first use (ms):", "Median TTFT, prefix reuse (ms):"} {
			if !strings.Contains(out, want) {
				t.Errorf("no %q in\n%s", want, out)
			}
		}
		rep := readReport(t, js)
		if c := rep.Config; c.SharedPrefix == nil || *c.SharedPrefix != (bench.SharedPrefix{N: 3, L: 40}) || c.InputLen.String() != "32" || !c.IgnoreEOS {
			t.Fatalf("config %+v", c)
		}
		used := map[int]bool{}
		for i, r := range rep.Records {
			if r.Error != "" || r.PrefixIndex == nil || *r.PrefixIndex < 0 || *r.PrefixIndex > 2 || r.PromptTokens != 72 || len(r.OutputTokenIDs) != 6 {
				t.Fatalf("record %d: %+v", i, r)
			}
			used[*r.PrefixIndex] = true
		}
		if p := rep.SharedPrefix; p == nil || p.Used != len(used) || p.FirstTTFT.Count != len(used) || p.ReuseTTFT.Count != 12-len(used) {
			t.Fatalf("shared prefix stats %+v, prefixes used %v", p, used)
		}
		// A prefix as long as the context leaves no room: one line, exit 1.
		_, errs, code = qwenctl(t, "bench", "--addr", addr, "--requests", "1", "--shared-prefix", "1:40000")
		if code != 1 || !strings.Contains(errs, "--shared-prefix 1:40000: prefixes of 40000 tokens leave no room for a user turn") ||
			strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Fatalf("exit %d: %q", code, errs)
		}
	})

	t.Run("text dataset without a tokenizer", func(t *testing.T) {
		ds := filepath.Join(tmp, "prompts.jsonl")
		os.WriteFile(ds, []byte(`{"prompt": "Hello"}`+"\n"), 0o644)
		_, errs, code := qwenctl(t, "bench", "--addr", addr, "--dataset", ds, "--requests", "1")
		if code != 1 || !strings.Contains(errs, "no tokenizer") || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Fatalf("exit %d: %q", code, errs)
		}
	})
}

// TestBenchBadFlags: bad flags are usage errors naming the flag (exit 2), a
// server that is not there is one clear line (exit 1); neither leaves an
// output file behind.
func TestBenchBadFlags(t *testing.T) {
	dir := t.TempDir()
	badDataset := filepath.Join(dir, "bad.jsonl")
	os.WriteFile(badDataset, []byte(`{"prompt": "a"}`+"\n"+`{"prompt": "b", "max_tokens": -1}`+"\n"), 0o644)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	gone := l.Addr().String()
	l.Close()
	js := filepath.Join(dir, "out.json")
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--concurrency", "0"}, 2, "--concurrency"},
		{[]string{"--rate", "0"}, 2, "--rate"},
		{[]string{"--rate", "-2"}, 2, "--rate"},
		{[]string{"--rate", "fast"}, 2, "-rate"},
		{[]string{"--rate", "inf", "--duration", "1s"}, 2, "--rate inf"},
		{[]string{"--requests", "0"}, 2, "--requests"},
		{[]string{"--duration", "0s"}, 2, "--duration"},
		{[]string{"--input-len", "uniform:9-3"}, 2, "--input-len"},
		{[]string{"--output-len", "normal:x"}, 2, "--output-len"},
		{[]string{"--dataset", badDataset, "--input-len", "5"}, 2, "--input-len"},
		{[]string{"--shared-prefix", "8"}, 2, `--shared-prefix: bad shared prefix "8": want N:L`},
		{[]string{"--shared-prefix", "8:x"}, 2, `--shared-prefix: bad shared prefix "8:x": want N:L`},
		{[]string{"--shared-prefix", "8:1.5"}, 2, `--shared-prefix: bad shared prefix "8:1.5": want N:L`},
		{[]string{"--shared-prefix", "0:512"}, 2, "--shared-prefix: bad shared prefix \"0:512\": N (the number of prefixes) must be >= 1"},
		{[]string{"--shared-prefix", "8:0"}, 2, "--shared-prefix: bad shared prefix \"8:0\": L (the tokens of a prefix) must be >= 1"},
		{[]string{"--shared-prefix", "100000:100000"}, 2, "--shared-prefix: bad shared prefix \"100000:100000\": N×L must be at most"},
		{[]string{"--shared-prefix", "2:16", "--dataset", badDataset}, 2, "--shared-prefix: not with --dataset"},
		{[]string{"--shared-prefix", "2:16", "--input-len", "uniform:9-3"}, 2, "--input-len"},
		{[]string{"--shared-prefix", "2:16", "extra"}, 2, `unexpected argument "extra"`},
		{[]string{"--slo", "ttft=soon"}, 2, "--slo"},
		{[]string{"--slo", "latency=1s"}, 2, "--slo"},
		{[]string{"--temperature", "-1"}, 2, "--temperature"},
		{[]string{"--bogus"}, 2, "bogus"},
		{[]string{"--dataset", filepath.Join(dir, "missing.jsonl")}, 1, "missing.jsonl"},
		{[]string{"--dataset", badDataset}, 1, "line 2: max_tokens"},
		{[]string{"--json", filepath.Join(dir, "no", "such", "dir.json")}, 1, "--json"},
		{[]string{"--json", js, "--plot", filepath.Join(dir, "no", "such", "dir.png")}, 1, "--plot"},
		{[]string{"--addr", gone, "--requests", "2", "--json", js}, 1, "cannot reach the coordinator at " + gone + ": Unavailable"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			args := append([]string{"bench"}, tc.args...)
			if !strings.Contains(strings.Join(tc.args, " "), "--addr") {
				args = append(args, "--addr", gone)
			}
			_, errs, code := qwenctl(t, args...)
			if code != tc.code || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
				t.Fatalf("exit %d, stderr %q; want %d naming %q", code, errs, tc.code, tc.want)
			}
			if _, err := os.Stat(js); err == nil {
				t.Fatalf("%s left behind", js)
			}
		})
	}
}

// TestBenchCompare: `qwenctl bench --compare A.json B.json` compares two
// reports' outputs request by request, exits 0 when they are identical and
// 1 (one line on stderr saying how) when not.
func TestBenchCompare(t *testing.T) {
	dir := t.TempDir()
	in := bench.LengthDist{Kind: bench.Fixed, N: 32}
	cfg := bench.Config{Concurrency: 2, InputLen: &in, OutputLen: bench.LengthDist{Kind: bench.Fixed, N: 3}, SharedPrefix: &bench.SharedPrefix{N: 2, L: 64}, Seed: 5}
	reqs := func(last []int32) []bench.Request {
		var out []bench.Request
		for i, ids := range [][]int32{{1, 2, 3}, {4, 5, 6}, last} {
			out = append(out, bench.Request{Index: i, Start: time.Duration(i) * time.Millisecond, End: time.Duration(i+5) * time.Millisecond,
				PromptTokens: 96, OutputTokens: len(ids), OutputIDs: ids, Prefix: &[]int{0, 1, 0}[i],
				Chunks: []bench.Chunk{{At: time.Duration(i+1) * time.Millisecond, Tokens: len(ids)}}})
		}
		return out
	}
	write := func(name string, cfg bench.Config, r []bench.Request) string {
		path := filepath.Join(dir, name)
		raw, err := json.Marshal(bench.Summarize(cfg, r, time.Second, nil))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, raw, 0o644); err != nil {
			t.Fatal(err)
		}
		return path
	}
	a := write("a.json", cfg, reqs([]int32{7, 8, 9}))
	httpCfg := cfg
	httpCfg.API, httpCfg.Concurrency = "http", 8
	b := write("b.json", httpCfg, reqs([]int32{7, 8, 9}))
	out, errs, code := qwenctl(t, "bench", "--compare", a, b)
	if code != 0 || errs != "" || out != "3 requests compared: 3 identical, 0 differ\n" {
		t.Fatalf("identical: exit %d %q %q", code, out, errs)
	}
	c := write("c.json", cfg, reqs([]int32{7, 10, 9}))
	out, errs, code = qwenctl(t, "bench", "--compare", a, c)
	if code != 1 || out != "request 2 (prefix 0): differs at output token 1: 8 vs 10 (3 and 3 tokens)\n3 requests compared: 2 identical, 1 differ\n" ||
		errs != "qwenctl bench: "+a+" and "+c+" are not identical: 1 of 3 outputs differ\n" {
		t.Fatalf("differing: exit %d %q %q", code, out, errs)
	}
	seeded := cfg
	seeded.Seed = 6
	d := write("d.json", seeded, reqs([]int32{7, 8, 9}))
	if _, errs, code := qwenctl(t, "bench", "--compare", a, d); code != 1 || !strings.Contains(errs, "the runs' configs differ (seed 5 vs 6)") {
		t.Fatalf("another seed: exit %d %q", code, errs)
	}
	notJSON := filepath.Join(dir, "not.json")
	os.WriteFile(notJSON, []byte("Serving Benchmark Result\n"), 0o644)
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--compare", a}, 2, "--compare: wants two --json reports"},
		{[]string{"--compare", a, b, c}, 2, "--compare: wants two --json reports"},
		{[]string{"--compare", a, b, "--requests", "3"}, 2, "--compare: wants two --json reports"},
		{[]string{"--compare", a, "--requests", "3", b}, 2, "--compare: compares two reports and runs nothing"},
		{[]string{"--requests", "3", "--compare", a, b}, 2, "--compare: compares two reports and runs nothing"},
		{[]string{"--compare", a, filepath.Join(dir, "missing.json")}, 1, "--compare: open " + filepath.Join(dir, "missing.json")},
		{[]string{"--compare", notJSON, a}, 1, "--compare: " + notJSON + " is not a qwenctl bench --json report"},
	} {
		t.Run(strings.Join(tc.args[1:], " "), func(t *testing.T) {
			_, errs, code := qwenctl(t, append([]string{"bench"}, tc.args...)...)
			if code != tc.code || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
				t.Fatalf("exit %d, stderr %q; want %d naming %q", code, errs, tc.code, tc.want)
			}
		})
	}
}

func TestProgressLine(t *testing.T) {
	r := &benchRunner{cfg: bench.Config{Requests: 10}, t0: time.Now().Add(-2 * time.Second)}
	r.sent.Store(8)
	r.done.Store(4)
	r.failed.Store(1)
	line := (&progressBar{r: r}).line()
	if !strings.HasPrefix(line, "[###############...............] 4/10 done, 1 failed, 3 in flight  2.0s  2.00 req/s") {
		t.Fatalf("%q", line)
	}
	// Only a duration: the bar follows the clock.
	r.cfg = bench.Config{DurationS: 4}
	if line := (&progressBar{r: r}).line(); !strings.HasPrefix(line, "[###############...............] 4/? done") {
		t.Fatalf("%q", line)
	}
}

func TestBenchOutcome(t *testing.T) {
	for _, tc := range []struct {
		rep         bench.Report
		interrupted bool
		want        string
	}{
		{bench.Report{Completed: 5, Records: make([]bench.Record, 5)}, false, ""},
		{bench.Report{Completed: 3, Failed: 2, Failures: map[string]int{"Unavailable": 1, "Internal": 1}, Records: make([]bench.Record, 5)}, false,
			"2 of 5 requests failed (Internal 1, Unavailable 1)"},
		{bench.Report{Completed: 3, Interrupted: 2, Records: make([]bench.Record, 5)}, true, "interrupted with 2 requests in flight"},
		{bench.Report{Completed: 3, Records: make([]bench.Record, 3)}, true, "interrupted with 0 requests in flight"},
		{bench.Report{Completed: 1, Failed: 1, Interrupted: 1, Failures: map[string]int{"Unavailable": 1}, Records: make([]bench.Record, 3)}, true,
			"1 of 3 requests failed (Unavailable 1); interrupted with 1 request in flight"},
		{bench.Report{Failed: 1, Failures: map[string]int{"Unavailable": 1}, Records: make([]bench.Record, 1)}, false, "1 of 1 request failed (Unavailable 1)"},
	} {
		err := benchOutcome(&tc.rep, tc.interrupted)
		if got := fmt.Sprint(err); (tc.want == "" && err != nil) || (tc.want != "" && got != tc.want) {
			t.Errorf("benchOutcome(%+v, %v) = %v, want %q", tc.rep, tc.interrupted, err, tc.want)
		}
	}
}
