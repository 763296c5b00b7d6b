package main

import (
	"net"
	"path/filepath"
	"strings"
	"testing"
)

// TestBenchHTTP drives `qwenctl bench --http` against the OpenAI-compatible
// API of a real cluster (the tiny reference model, token-id prompts): the
// report is the gRPC run's, request for request and token for token; a
// request the server refuses is a failure under its gRPC code's name.
func TestBenchHTTP(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	httpAddr := l.Addr().String()
	l.Close()
	addr := startCluster(t, filepath.Join(refDir, "dense-gqa-f32"), "--http-listen", httpAddr)
	tmp := t.TempDir()
	args := []string{"--concurrency", "4", "--requests", "12", "--input-len", "16", "--output-len", "8", "--seed", "3"}

	js := filepath.Join(tmp, "http.json")
	out, errs, code := qwenctl(t, append([]string{"bench", "--http", "--http-addr", httpAddr, "--json", js}, args...)...)
	if code != 0 {
		t.Fatalf("exit %d: %s\n%s", code, errs, out)
	}
	for _, want := range []string{"Serving Benchmark Result", "Successful requests:                     12\n", "Total generated tokens:                  96\n", "Median TTFT (ms):"} {
		if !strings.Contains(out, want) {
			t.Errorf("no %q in\n%s", want, out)
		}
	}
	rep := readReport(t, js)
	if rep.Completed != 12 || rep.Failed != 0 || rep.TotalOutputTokens != 96 || rep.TotalInputTokens != 12*16 || rep.TTFT.Count != 12 || rep.ITL.Count != 12*7 {
		t.Fatalf("completed %d failed %d (%v) output %d input %d ttft %d itl %d", rep.Completed, rep.Failed, rep.Failures, rep.TotalOutputTokens,
			rep.TotalInputTokens, rep.TTFT.Count, rep.ITL.Count)
	}
	for i, r := range rep.Records {
		if r.OutputTokens != 8 || r.PromptTokens != 16 || r.TTFTMs == nil || r.TPOTMs == nil || !strings.HasPrefix(r.ID, "cmpl-") {
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	if c := rep.Config; c.API != "http" || c.Addr != "http://"+httpAddr || c.Model != "dense-gqa-f32" {
		t.Fatalf("config %+v", c)
	}

	// The same run over gRPC: the same counts.
	gjs := filepath.Join(tmp, "grpc.json")
	if _, errs, code := qwenctl(t, append([]string{"bench", "--addr", addr, "--json", gjs}, args...)...); code != 0 {
		t.Fatalf("gRPC run: exit %d: %s", code, errs)
	}
	g := readReport(t, gjs)
	if g.Config.API != "grpc" || g.TotalInputTokens != rep.TotalInputTokens || g.TotalOutputTokens != rep.TotalOutputTokens || g.ITL.Count != rep.ITL.Count {
		t.Fatalf("gRPC report %+v, HTTP %+v", g.Config, rep.Config)
	}

	// A shared-prefix workload over HTTP and over gRPC, one request at a
	// time: the same prompts (token ids), so the same greedy outputs, and
	// --compare says so.
	spArgs := []string{"--concurrency", "1", "--requests", "6", "--shared-prefix", "2:24", "--input-len", "8", "--output-len", "6", "--seed", "9"}
	hsp, gsp := filepath.Join(tmp, "http-prefix.json"), filepath.Join(tmp, "grpc-prefix.json")
	if _, errs, code := qwenctl(t, append([]string{"bench", "--http", "--http-addr", httpAddr, "--json", hsp}, spArgs...)...); code != 0 {
		t.Fatalf("HTTP shared-prefix run: exit %d: %s", code, errs)
	}
	if _, errs, code := qwenctl(t, append([]string{"bench", "--addr", addr, "--json", gsp}, spArgs...)...); code != 0 {
		t.Fatalf("gRPC shared-prefix run: exit %d: %s", code, errs)
	}
	for _, r := range readReport(t, hsp).Records {
		if r.PrefixIndex == nil || r.PromptTokens != 32 || len(r.OutputTokenIDs) != 6 {
			t.Fatalf("HTTP record %+v", r)
		}
	}
	if out, errs, code := qwenctl(t, "bench", "--compare", hsp, gsp); code != 0 || out != "6 requests compared: 6 identical, 0 differ\n" {
		t.Fatalf("compare: exit %d %q %q", code, out, errs)
	}

	// Requests the server refuses (more tokens than the context) are
	// failures named by their gRPC code; the run exits 1.
	out, errs, code = qwenctl(t, "bench", "--http", "--http-addr", httpAddr, "--requests", "2", "--input-len", "16", "--output-len", "100000")
	if code != 1 || !strings.Contains(out, "InvalidArgument") || !strings.Contains(errs, "2 of 2 requests failed (InvalidArgument 2)") {
		t.Fatalf("refused requests: exit %d\n%s\n%s", code, out, errs)
	}
	if _, errs, code := qwenctl(t, "bench", "--http", "--addr", addr); code != 2 || !strings.Contains(errs, "--http") {
		t.Fatalf("--http with --addr: exit %d %s", code, errs)
	}
}
