package main

import (
	"context"
	"encoding/json"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/client"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
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
	// --addr is a list: an address that refuses connections is passed over.
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	gone := l.Addr().String()
	l.Close()
	out, errs, code = qwenctl(t, "generate", "--addr", gone+","+addr, "--ids", ids, "--max-tokens", "8", "--temperature", "0", "--ignore-eos", "--json")
	got.IDs = nil
	if err := json.Unmarshal([]byte(out), &got); code != 0 || err != nil || !slices.Equal(got.IDs, ref.GreedyIDs[:8]) {
		t.Fatalf("generate --addr BAD,GOOD: %d %q %q", code, out, errs)
	}
	if out, errs, code := qwenctl(t, "status", "--addr", gone+","+addr); code != 0 || !strings.Contains(out, "leader true") {
		t.Fatalf("status --addr BAD,GOOD: %d %q %q", code, out, errs)
	}
	t.Run("resume through a cut connection", func(t *testing.T) { testResume(t, addr, ref.PromptIDs, ref.GreedyIDs[:16]) })
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
		{[]string{"status", "--addr", addr + ",,"}, 2, "--addr"},
		{[]string{"generate", "--addr", "", "--ids", "1"}, 2, "--addr"},
		{[]string{"generate", "--addr", addr + ", ", "--ids", "1"}, 2, "--addr"},
		{[]string{"generate", "--addr", addr, "--ids", "1", "--retry-timeout", "0s"}, 2, "--retry-timeout"},
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
func startCluster(t *testing.T, dir string, args ...string) string {
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
	coord := exec.Command(bin, append([]string{"--listen", addr, "--model", dir, "--data-dir", t.TempDir(), "--log-level", "warn", "--worker-threads", "1"}, args...)...)
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

// testResume breaks a generation's stream by cutting its connection (a
// proxy between the client and the coordinator) after 5 tokens: the client
// library resumes it, and the tokens are those of an undisturbed greedy
// run, each once. It needs the coordinator's side of resume.
func testResume(t *testing.T, addr string, prompt, want []int32) {
	p := startProxy(t, addr)
	c, err := client.New(client.Config{Addrs: []string{p.addr}, RetryTimeout: 30 * time.Second, MinBackoff: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	temp, n := float32(0), int32(len(want))
	req := &pb.GenerateRequest{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: prompt}},
		Temperature: &temp, MaxTokens: &n, IgnoreEos: true}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	received, cut := 0, false
	res, err := c.Generate(ctx, req, func(ch *pb.GenerateChunk) error {
		received += len(ch.TokenIds)
		if received >= 5 && !cut {
			cut = true
			p.cut()
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Generate: %v (after %d tokens)", err, received)
	}
	if res.Resumes < 1 || len(res.Breaks) < 1 {
		t.Fatalf("no resume: %d resumes, breaks %+v", res.Resumes, res.Breaks)
	}
	if !slices.Equal(res.TokenIDs, want) || res.Complete.GetUsage().GetCompletionTokens() != n || res.Complete.FinishReason != "length" {
		t.Fatalf("resumed after %d tokens: got %v (usage %v, %s), want %v", res.Breaks[0].Received, res.TokenIDs, res.Complete.GetUsage(),
			res.Complete.GetFinishReason(), want)
	}
	t.Logf("resumed after %d tokens, gap %v", res.Breaks[0].Received, res.Breaks[0].Gap())
}

// cutProxy forwards TCP connections to a target until cut closes them all.
type cutProxy struct {
	addr string
	l    net.Listener
	wg   sync.WaitGroup

	mu    sync.Mutex
	conns []net.Conn
}

func startProxy(t *testing.T, target string) *cutProxy {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &cutProxy{addr: l.Addr().String(), l: l}
	p.wg.Go(func() {
		for {
			down, err := l.Accept()
			if err != nil {
				return
			}
			up, err := net.Dial("tcp", target)
			if err != nil {
				down.Close()
				continue
			}
			p.mu.Lock()
			p.conns = append(p.conns, down, up)
			p.mu.Unlock()
			p.wg.Go(func() { io.Copy(up, down); up.Close() })
			p.wg.Go(func() { io.Copy(down, up); down.Close() })
		}
	})
	t.Cleanup(func() {
		l.Close()
		p.cut()
		p.wg.Wait()
	})
	return p
}

// cut closes every connection through the proxy.
func (p *cutProxy) cut() {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, c := range p.conns {
		c.Close()
	}
	p.conns = nil
}
