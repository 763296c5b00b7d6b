package main

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"
)

// TestGenerateAndStatus drives `qwenctl status --wait` and `qwenctl
// generate --json` against a real coordinator process (embedded etcd, one
// local worker) serving a reference case.
func TestGenerateAndStatus(t *testing.T) {
	dir := filepath.Join(refDir, "dense-gqa-f32")
	addr := startCluster(t, dir)
	out, errs, code := qwenctl(t, "status", "--addr", addr, "--wait", "60s")
	if code != 0 || !strings.Contains(out, "ready") || !strings.Contains(out, "replica 0") {
		t.Fatalf("status: %d %q %q", code, out, errs)
	}
	var ref struct {
		PromptIDs []int32 `json:"prompt_ids"`
		GreedyIDs []int32 `json:"greedy_ids"`
	}
	raw, _ := os.ReadFile(filepath.Join(dir, "reference.json"))
	json.Unmarshal(raw, &ref)
	ids := strings.Trim(jsonOf(ref.PromptIDs), "[]")
	out, errs, code = qwenctl(t, "generate", "--addr", addr, "--ids", ids, "--max-tokens", "16", "--temperature", "0",
		"--ignore-eos", "--prompt-logprobs", "--logprobs", "2", "--json")
	if code != 0 {
		t.Fatalf("generate: %d %s", code, errs)
	}
	var got struct {
		IDs            []int32 `json:"ids"`
		FinishReason   string  `json:"finish_reason"`
		Usage          struct{ PromptTokens, CompletionTokens int }
		Logprobs       []lpJSON   `json:"logprobs"`
		PromptLogprobs []*float64 `json:"prompt_logprobs"`
	}
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !slices.Equal(got.IDs, ref.GreedyIDs[:16]) || got.FinishReason != "length" || len(got.Logprobs) != 16 || len(got.Logprobs[0].Top) != 2 {
		t.Fatalf("generate: %s", out)
	}
	if len(got.PromptLogprobs) != len(ref.PromptIDs) || got.PromptLogprobs[0] != nil || got.PromptLogprobs[1] == nil {
		t.Fatalf("prompt_logprobs: %s", out)
	}
	// Bad requests: one line each, the field named, exit 1 (server) or 2 (usage).
	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"generate", "--addr", addr, "--ids", "1,2", "--top-p", "1.5"}, 1, "top_p"},
		{[]string{"generate", "--addr", addr, "--ids", "1,99999"}, 1, "token_ids[1]"},
		{[]string{"generate", "--addr", addr, "--ids", "1,2", "--max-tokens", "-3"}, 1, "max_tokens"},
		{[]string{"generate", "--addr", addr, "--prompt", "hi"}, 1, "tokenizer"},
		{[]string{"generate", "--addr", addr}, 2, "exactly one of"},
		{[]string{"generate", "--addr", addr, "--ids", "1", "--prompt", "x"}, 2, "exactly one of"},
		{[]string{"status", "--addr", addr, "--wait", "-1s"}, 2, "--wait"},
	} {
		_, errs, code := qwenctl(t, tc.args...)
		if code != tc.code || !strings.Contains(errs, tc.want) || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("%v: exit %d, stderr %q (want %d naming %q)", tc.args, code, errs, tc.code, tc.want)
		}
	}
}

// TestStatusUnreachable: a coordinator that is not there is an error, not a hang.
func TestStatusUnreachable(t *testing.T) {
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	addr := l.Addr().String()
	l.Close()
	start := time.Now()
	_, errs, code := qwenctl(t, "status", "--addr", addr, "--wait", "1s")
	if code != 1 || !strings.Contains(errs, "Unavailable") || time.Since(start) > 30*time.Second {
		t.Fatalf("exit %d %q after %v", code, errs, time.Since(start))
	}
}

// startCluster runs a real coordinator (embedded etcd, one local worker
// process) serving the model in dir on a free loopback port, waits until it
// can serve, and stops it when the test ends. It returns the address.
func startCluster(t *testing.T, dir string) string {
	t.Helper()
	bin := filepath.Join(t.TempDir(), "coordinator")
	if out, err := exec.Command("go", "build", "-o", bin, "../coordinator").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	coord := exec.Command(bin, "--listen", addr, "--model", dir, "--data-dir", t.TempDir(), "--log-level", "warn", "--worker-threads", "1")
	coord.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	coord.Stderr = os.Stderr
	if err := coord.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		syscall.Kill(-coord.Process.Pid, syscall.SIGTERM)
		done := make(chan struct{})
		go func() { coord.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			syscall.Kill(-coord.Process.Pid, syscall.SIGKILL)
			<-done
		}
	})
	if out, errs, code := qwenctl(t, "status", "--addr", addr, "--wait", "60s"); code != 0 {
		t.Fatalf("status: %d %q %q", code, out, errs)
	}
	return addr
}
