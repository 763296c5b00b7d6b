// End-to-end tests: real coordinator and worker processes (the binaries of
// cmd/coordinator and cmd/worker, built once by TestMain), real gRPC on
// 127.0.0.1, embedded etcd (inside the coordinator, or inside the test for
// the failover test), or etcd processes (cmd/etcd, for the etcd fault
// tests of ha_test.go).
//
// Every test or benchmark that starts a coordinator or worker process
// calls needE2E first (start calls it too, for one that forgets): such
// tests are skipped under -short and when QWENFLEET_SKIP_E2E is set to
// anything but "", and TestMain then builds no binaries. So
//
//	go test -short ./pkg/server
//	QWENFLEET_SKIP_E2E=1 go test ./pkg/server
//
// both run only the in-process tests (a few seconds), and a plain
// go test runs everything.
package server_test

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"math"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	reflectpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// binDir holds the binaries TestMain built ("" when e2eSkipped).
var binDir string

// e2eSkipped says why the tests that start processes are skipped, or ""
// when they run (see the package comment).
func e2eSkipped() string {
	switch {
	case testing.Short():
		return "-short"
	case os.Getenv("QWENFLEET_SKIP_E2E") != "":
		return "QWENFLEET_SKIP_E2E is set"
	}
	return ""
}

// needE2E skips t, a test or benchmark that starts coordinator or worker
// processes, under -short or QWENFLEET_SKIP_E2E.
func needE2E(t testing.TB) {
	t.Helper()
	if why := e2eSkipped(); why != "" {
		t.Skip("starts processes: skipped (" + why + ")")
	}
}

func TestMain(m *testing.M) {
	flag.Parse() // testing.Short needs the flags
	if e2eSkipped() != "" {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "qwenfleet-e2e-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	if err := setupTestTLS(dir); err != nil {
		fmt.Fprintln(os.Stderr, "certificates for the tests:", err)
		os.Exit(1)
	}
	cmd := exec.Command("go", "build", "-o", dir+string(os.PathSeparator), "./cmd/coordinator", "./cmd/worker", "./cmd/etcd")
	cmd.Dir = repoRoot()
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "building the binaries:", err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// waitFor polls cond every 50ms until it returns nil, and fails the test
// after d with what it waited for and cond's last error (what is still
// missing).
func waitFor(t testing.TB, d time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %v", d, what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func repoRoot() string {
	_, f, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(f), "..", "..")
}

func refDir(name string) string { return filepath.Join(repoRoot(), "testdata", "qwen2-ref", name) }

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// proc is a process started by a test, in its own process group, stopped
// (with its children) at cleanup.
type proc struct {
	cmd  *exec.Cmd
	log  *os.File
	done chan struct{}
}

func start(t testing.TB, bin string, args ...string) *proc {
	t.Helper()
	return startCmd(t, exec.Command(filepath.Join(binDir, bin), args...))
}

// startCmd starts cmd (a project binary, maybe wrapped) as a proc: its
// output goes to a log shown when the test fails.
func startCmd(t testing.TB, cmd *exec.Cmd) *proc {
	t.Helper()
	needE2E(t) // every test that gets here should have called it first
	bin := filepath.Base(cmd.Args[0])
	at := 0
	for i, a := range cmd.Args {
		if strings.HasPrefix(a, binDir) {
			bin, at = filepath.Base(a), i
		}
	}
	// The binary's own arguments follow it (a wrapper's come before).
	cmd.Args = append(cmd.Args[:at+1:at+1], withTestTLS(bin, cmd.Args[at+1:])...)
	logf, err := os.CreateTemp(t.TempDir(), bin+"-*.log")
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &proc{cmd: cmd, log: logf, done: make(chan struct{})}
	go func() { cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM)
		if t.Failed() || os.Getenv("QWENFLEET_TEST_LOGS") != "" {
			raw, _ := os.ReadFile(logf.Name())
			t.Logf("%s log:\n%s", bin, tail(string(raw), 3000))
		}
	})
	return p
}

func tail(s string, n int) string {
	if len(s) > n {
		return s[len(s)-n:]
	}
	return s
}

// stop signals the whole process group and waits.
func (p *proc) stop(sig syscall.Signal) {
	syscall.Kill(-p.cmd.Process.Pid, sig)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
		<-p.done
	}
	syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL) // stragglers of the group
}

type clusterT struct {
	addr   string
	client pb.GeneratorClient
	conn   *grpc.ClientConn
	coord  *proc
}

func dial(t testing.TB, addr string) (*grpc.ClientConn, pb.GeneratorClient) {
	t.Helper()
	conn, err := grpc.NewClient(addr, publicDialOptions(addr)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn, pb.NewGeneratorClient(conn)
}

// startCluster runs a coordinator with embedded etcd and local workers.
func startCluster(t testing.TB, modelDir string, args ...string) *clusterT {
	t.Helper()
	addr := freeAddr(t)
	all := append([]string{"--listen", addr, "--data-dir", t.TempDir(), "--log-level", "warn", "--worker-threads", "2"}, args...)
	if modelDir != "" {
		all = append(all, "--model", modelDir)
	}
	if !slices.Contains(all, "--local-workers") {
		all = append(all, "--local-workers", "1")
	}
	c := &clusterT{addr: addr, coord: start(t, "coordinator", all...)}
	c.conn, c.client = dial(t, addr)
	waitReady(t, c.client, c.coord, 120*time.Second)
	return c
}

func waitReady(t testing.TB, client pb.GeneratorClient, p *proc, d time.Duration) *pb.ServerInfo {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		info, err := client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		cancel()
		if err == nil && info.Ready {
			return info
		}
		if p != nil {
			select {
			case <-p.done:
				t.Fatalf("coordinator exited before it was ready")
			default:
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("not ready after %v: %v %v", d, err, info.GetNotReadyReason())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

type result struct {
	ids    []int32
	text   string
	finish string
	plp    []*pb.PromptLogprob
	lps    []*pb.TokenLogprob
	usage  *pb.Usage
	chunks int
}

func generate(ctx context.Context, client pb.GeneratorClient, req *pb.GenerateRequest) (*result, error) {
	stream, err := client.Generate(ctx, req)
	if err != nil {
		return nil, err
	}
	r := &result{}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return nil, fmt.Errorf("stream ended without complete")
		}
		if err != nil {
			return nil, err
		}
		switch x := resp.Response.(type) {
		case *pb.GenerateResponse_Chunk:
			r.chunks++
			r.ids = append(r.ids, x.Chunk.TokenIds...)
			r.text += x.Chunk.Text
			r.lps = append(r.lps, x.Chunk.Logprobs...)
		case *pb.GenerateResponse_Complete:
			r.finish, r.plp, r.usage = x.Complete.FinishReason, x.Complete.PromptLogprobs, x.Complete.Usage
			return r, nil
		case *pb.GenerateResponse_Error:
			return nil, fmt.Errorf("%s: %s", x.Error.Code, x.Error.Message)
		}
	}
}

func mustGenerate(t testing.TB, client pb.GeneratorClient, req *pb.GenerateRequest) *result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	r, err := generate(ctx, client, req)
	if err != nil {
		t.Fatalf("generate: %v", err)
	}
	return r
}

func ptr[T any](v T) *T { return &v }

func idsReq(ids []int32, n int) *pb.GenerateRequest {
	return &pb.GenerateRequest{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: ids}}, MaxTokens: ptr(int32(n)),
		Temperature: ptr(float32(0)), IgnoreEos: true}
}

type reference struct {
	PromptIDs   []int32 `json:"prompt_ids"`
	GreedyIDs   []int32 `json:"greedy_ids"`
	MaxAbsLogit float64 `json:"max_abs_logit"`
	logits      []float32
	vocab       int
}

func loadRef(t *testing.T, dir string) *reference {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dir, "reference.json"))
	if err != nil {
		t.Fatal(err)
	}
	r := &reference{}
	if err := json.Unmarshal(raw, r); err != nil {
		t.Fatal(err)
	}
	st, err := safetensors.Open(filepath.Join(dir, "reference.safetensors"), safetensors.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer st.Close()
	if r.logits, err = st.ReadFloat32("logits"); err != nil {
		t.Fatal(err)
	}
	r.vocab = len(r.logits) / len(r.PromptIDs)
	return r
}

// TestGenerateMatchesReference: greedy ids and prompt logprobs of every
// reference case through a real cluster.
func TestGenerateMatchesReference(t *testing.T) {
	needE2E(t)
	dirs, _ := filepath.Glob(refDir("*"))
	for _, dir := range dirs {
		if _, err := os.Stat(filepath.Join(dir, "reference.json")); err != nil {
			continue
		}
		t.Run(filepath.Base(dir), func(t *testing.T) {
			ref := loadRef(t, dir)
			c := startCluster(t, dir)
			req := idsReq(ref.PromptIDs, len(ref.GreedyIDs))
			req.PromptLogprobs = true
			r := mustGenerate(t, c.client, req)
			if !slices.Equal(r.ids, ref.GreedyIDs) {
				t.Fatalf("ids %v, want %v", r.ids, ref.GreedyIDs)
			}
			if r.finish != "length" || r.usage.CompletionTokens != int32(len(ref.GreedyIDs)) || r.usage.PromptTokens != int32(len(ref.PromptIDs)) {
				t.Fatalf("finish %q usage %v", r.finish, r.usage)
			}
			if len(r.plp) != len(ref.PromptIDs) || r.plp[0].Logprob != nil {
				t.Fatalf("%d prompt logprobs for %d tokens (first %v)", len(r.plp), len(ref.PromptIDs), r.plp[0].Logprob)
			}
			tol := 1e-4 * math.Max(1, ref.MaxAbsLogit)
			for i := 1; i < len(ref.PromptIDs); i++ {
				row := ref.logits[(i-1)*ref.vocab : i*ref.vocab]
				want := logSoftmaxAt(row, int(ref.PromptIDs[i]))
				if r.plp[i].Logprob == nil || math.Abs(float64(*r.plp[i].Logprob)-want) > tol {
					t.Fatalf("prompt logprob %d: %v, want %.6f (tol %.2g)", i, r.plp[i].Logprob, want, tol)
				}
			}
		})
	}
}

func logSoftmaxAt(row []float32, i int) float64 {
	mx := math.Inf(-1)
	for _, x := range row {
		mx = math.Max(mx, float64(x))
	}
	s := 0.0
	for _, x := range row {
		s += math.Exp(float64(x) - mx)
	}
	return float64(row[i]) - mx - math.Log(s)
}

func testPrompts(n, vocab int) [][]int32 {
	out := make([][]int32, n)
	for i := range out {
		p := make([]int32, 2+(i*11)%37)
		for j := range p {
			p[j] = int32((i*193 + j*29 + 7) % vocab)
		}
		out[i] = p
	}
	return out
}

// TestConcurrentStreamsAndSeeds: 32 concurrent streams of different prompt
// and output lengths each produce exactly what they produce alone, and
// seeded sampling is reproducible (alone and under load).
func TestConcurrentStreamsAndSeeds(t *testing.T) {
	needE2E(t)
	c := startCluster(t, refDir("dense-tied-bf16"))
	ps := testPrompts(32, 512)
	n := func(i int) int { return 4 + (i*13)%40 }
	seeded := func(i int) *pb.GenerateRequest {
		r := idsReq(ps[i], n(i))
		r.Temperature, r.TopP, r.TopK, r.Seed = ptr(float32(0.9)), ptr(float32(0.9)), ptr(int32(40)), ptr(int64(1000+i))
		return r
	}
	alone := make([]*result, 32)
	aloneSeeded := make([]*result, 8)
	for i := range ps {
		alone[i] = mustGenerate(t, c.client, idsReq(ps[i], n(i)))
	}
	for i := range aloneSeeded {
		aloneSeeded[i] = mustGenerate(t, c.client, seeded(i))
	}
	together := make([]*result, 32)
	togetherSeeded := make([]*result, 8)
	var wg sync.WaitGroup
	for i := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			r, err := generate(ctx, c.client, idsReq(ps[i], n(i)))
			if err != nil {
				t.Errorf("stream %d: %v", i, err)
			}
			together[i] = r
		}()
	}
	for i := range togetherSeeded {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			r, err := generate(ctx, c.client, seeded(i))
			if err != nil {
				t.Errorf("seeded stream %d: %v", i, err)
			}
			togetherSeeded[i] = r
		}()
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	for i := range ps {
		if !slices.Equal(alone[i].ids, together[i].ids) || len(alone[i].ids) != n(i) {
			t.Fatalf("stream %d: alone %v, together %v", i, alone[i].ids, together[i].ids)
		}
	}
	distinct := map[string]bool{}
	for i := range aloneSeeded {
		if !slices.Equal(aloneSeeded[i].ids, togetherSeeded[i].ids) {
			t.Fatalf("seeded stream %d: alone %v, together %v", i, aloneSeeded[i].ids, togetherSeeded[i].ids)
		}
		distinct[fmt.Sprint(aloneSeeded[i].ids)] = true
	}
	if len(distinct) < 2 {
		t.Fatal("seeded sampling gave the same tokens for every seed")
	}
	info, err := c.client.GetServerInfo(context.Background(), &pb.GetServerInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if s := info.Scheduler; s.KvBlocksFree != s.KvBlocksTotal || s.Running != 0 || s.Waiting != 0 {
		t.Fatalf("after all streams: %v", s)
	}
}

// serverInfo is the coordinator's GetServerInfo (the test fails without it).
func serverInfo(t testing.TB, client pb.GeneratorClient) *pb.ServerInfo {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	return info
}

func schedulerStats(t testing.TB, client pb.GeneratorClient) *pb.SchedulerStats {
	t.Helper()
	return serverInfo(t, client).Scheduler
}

// TestDisconnectFreesBlocksAndPreemption: a client that goes away (and one
// that calls Abort) frees its KV blocks at once; a pool too small for the
// load preempts and still completes every request with the right tokens.
func TestDisconnectFreesBlocksAndPreemption(t *testing.T) {
	needE2E(t)
	// 10 blocks of 4 tokens: 40 slots.
	c := startCluster(t, refDir("dense-gqa-f32"), "--kv-blocks", "10", "--block-size", "4", "--max-batch-tokens", "32")
	s := schedulerStats(t, c.client)
	if s.KvBlocksTotal != 10 || s.KvBlocksFree != 10 {
		t.Fatalf("pool: %v", s)
	}
	// Disconnect.
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := c.client.Generate(ctx, idsReq([]int32{1, 2, 3}, 30))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	if s := schedulerStats(t, c.client); s.KvBlocksFree == s.KvBlocksTotal && s.Running == 0 {
		// It may have finished already; only a running request proves anything.
		t.Logf("request finished before the disconnect: %v", s)
	}
	cancel()
	waitFreed(t, c.client)
	// Abort by id.
	req := idsReq([]int32{4, 5}, 35)
	req.RequestId = "to-abort"
	actx, acancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer acancel()
	astream, err := c.client.Generate(actx, req)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := astream.Recv(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.client.Abort(actx, &pb.AbortRequest{RequestId: "to-abort"}); err != nil {
		t.Fatal(err)
	}
	for {
		resp, err := astream.Recv()
		if err != nil {
			t.Fatalf("aborted stream: %v", err)
		}
		if cp := resp.GetComplete(); cp != nil {
			if cp.FinishReason != "abort" && cp.FinishReason != "length" {
				t.Fatalf("aborted request finished with %q", cp.FinishReason)
			}
			break
		}
	}
	waitFreed(t, c.client)

	// Preemption: 6 requests of up to 5+25 = 30 tokens (8 blocks each) in 10 blocks.
	ps := testPrompts(6, 512)
	for i := range ps {
		ps[i] = ps[i][:min(len(ps[i]), 5)]
	}
	alone := make([][]int32, len(ps))
	for i, p := range ps {
		alone[i] = mustGenerate(t, c.client, idsReq(p, 25)).ids
	}
	var wg sync.WaitGroup
	got := make([][]int32, len(ps))
	for i, p := range ps {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
			defer cancel()
			r, err := generate(ctx, c.client, idsReq(p, 25))
			if err != nil {
				t.Errorf("request %d: %v", i, err)
				return
			}
			got[i] = r.ids
		}()
	}
	wg.Wait()
	for i := range ps {
		if !slices.Equal(got[i], alone[i]) {
			t.Fatalf("request %d under preemption %v, alone %v", i, got[i], alone[i])
		}
	}
	s = schedulerStats(t, c.client)
	if s.Preemptions == 0 {
		t.Fatalf("no preemption: %v", s)
	}
	if s.KvBlocksFree != s.KvBlocksTotal {
		t.Fatalf("blocks leaked: %v", s)
	}
	t.Logf("%d preemptions", s.Preemptions)
	// A request longer than the whole pool is refused up front, naming
	// max_tokens, or the prompt when the prompt alone does not fit.
	_, err = generate(context.Background(), c.client, idsReq([]int32{1, 2}, 50))
	if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), "max_tokens: 50 + 2 prompt tokens") {
		t.Fatalf("request beyond the pool: %v", err)
	}
	_, err = generate(context.Background(), c.client, idsReq(make([]int32, 40), 1))
	if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), "prompt: 40 tokens") {
		t.Fatalf("prompt beyond the pool: %v", err)
	}
}

func waitFreed(t *testing.T, client pb.GeneratorClient) {
	t.Helper()
	waitFor(t, 5*time.Second, "every KV block free and no request left", func() error {
		if s := schedulerStats(t, client); s.KvBlocksFree != s.KvBlocksTotal || s.Running != 0 || s.Waiting != 0 {
			return fmt.Errorf("scheduler %v", s)
		}
		return nil
	})
}

// TestBadRequests: every bad field is INVALID_ARGUMENT naming it; an
// unknown model NOT_FOUND; a full queue RESOURCE_EXHAUSTED, quickly.
func TestBadRequests(t *testing.T) {
	needE2E(t)
	c := startCluster(t, refDir("dense-gqa-f32"), "--max-running", "1", "--max-waiting", "1")
	ok := func() *pb.GenerateRequest { return idsReq([]int32{1, 2, 3}, 4) }
	cases := []struct {
		name  string
		edit  func(r *pb.GenerateRequest)
		code  codes.Code
		field string
	}{
		{"negative max_tokens", func(r *pb.GenerateRequest) { r.MaxTokens = ptr(int32(-1)) }, codes.InvalidArgument, "max_tokens"},
		{"zero max_tokens", func(r *pb.GenerateRequest) { r.MaxTokens = ptr(int32(0)) }, codes.InvalidArgument, "max_tokens"},
		{"top_p above 1", func(r *pb.GenerateRequest) { r.TopP = ptr(float32(1.5)) }, codes.InvalidArgument, "top_p"},
		{"top_p zero", func(r *pb.GenerateRequest) { r.TopP = ptr(float32(0)) }, codes.InvalidArgument, "top_p"},
		{"negative temperature", func(r *pb.GenerateRequest) { r.Temperature = ptr(float32(-1)) }, codes.InvalidArgument, "temperature"},
		{"NaN temperature", func(r *pb.GenerateRequest) { r.Temperature = ptr(float32(math.NaN())) }, codes.InvalidArgument, "temperature"},
		{"bad top_k", func(r *pb.GenerateRequest) { r.TopK = ptr(int32(-5)) }, codes.InvalidArgument, "top_k"},
		{"bad min_p", func(r *pb.GenerateRequest) { r.MinP = ptr(float32(2)) }, codes.InvalidArgument, "min_p"},
		{"bad repetition_penalty", func(r *pb.GenerateRequest) { r.RepetitionPenalty = ptr(float32(-1)) }, codes.InvalidArgument, "repetition_penalty"},
		{"bad presence_penalty", func(r *pb.GenerateRequest) { r.PresencePenalty = ptr(float32(3)) }, codes.InvalidArgument, "presence_penalty"},
		{"unknown token id", func(r *pb.GenerateRequest) { r.GetTokenIds().Ids[1] = 99999 }, codes.InvalidArgument, "token_ids[1]"},
		{"negative token id", func(r *pb.GenerateRequest) { r.GetTokenIds().Ids[0] = -1 }, codes.InvalidArgument, "token_ids[0]"},
		{"empty ids", func(r *pb.GenerateRequest) { r.GetTokenIds().Ids = nil }, codes.InvalidArgument, "token_ids"},
		{"no input", func(r *pb.GenerateRequest) { r.Input = nil }, codes.InvalidArgument, "input"},
		{"text without tokenizer", func(r *pb.GenerateRequest) { r.Input = &pb.GenerateRequest_Text{Text: "hi"} }, codes.FailedPrecondition, "tokenizer"},
		{"prompt longer than the context", func(r *pb.GenerateRequest) { r.GetTokenIds().Ids = make([]int32, 40000) }, codes.InvalidArgument, "prompt"},
		{"max_tokens beyond the context", func(r *pb.GenerateRequest) { r.MaxTokens = ptr(int32(1 << 30)) }, codes.InvalidArgument, "max_tokens"},
		{"too many stop strings", func(r *pb.GenerateRequest) { r.Stop = make([]string, 17) }, codes.InvalidArgument, "stop"},
		{"empty stop string", func(r *pb.GenerateRequest) { r.Stop = []string{""} }, codes.InvalidArgument, "stop[0]"},
		{"bad stop token id", func(r *pb.GenerateRequest) { r.StopTokenIds = []int32{600} }, codes.InvalidArgument, "stop_token_ids[0]"},
		{"min_tokens above max_tokens", func(r *pb.GenerateRequest) { r.MinTokens = ptr(int32(9)) }, codes.InvalidArgument, "min_tokens"},
		{"logprobs too many", func(r *pb.GenerateRequest) { r.Logprobs = ptr(int32(21)) }, codes.InvalidArgument, "logprobs"},
		{"unknown model", func(r *pb.GenerateRequest) { r.Model = "qwen2-72b" }, codes.NotFound, "model"},
		{"resume without request_id", func(r *pb.GenerateRequest) { r.Resume = &pb.Resume{TokenIds: []int32{1}} }, codes.InvalidArgument, "request_id"},
		{"resume with an unknown id", func(r *pb.GenerateRequest) {
			r.RequestId, r.Resume = "r", &pb.Resume{TokenIds: []int32{1, 99999}}
		}, codes.InvalidArgument, "resume.token_ids[1]"},
		{"resume beyond max_tokens", func(r *pb.GenerateRequest) {
			r.RequestId, r.Resume = "r", &pb.Resume{TokenIds: make([]int32, 9)}
		}, codes.InvalidArgument, "resume.token_ids"},
		{"resume with more text than its tokens", func(r *pb.GenerateRequest) {
			r.RequestId, r.Resume = "r", &pb.Resume{TokenIds: []int32{1}, TextBytes: ptr(int64(1000))}
		}, codes.InvalidArgument, "resume.text_bytes"},
	}
	for _, tc := range cases {
		r := ok()
		tc.edit(r)
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err := generate(ctx, c.client, r)
		cancel()
		if status.Code(err) != tc.code || !strings.Contains(status.Convert(err).Message(), tc.field) {
			t.Errorf("%s: got %v, want %v naming %q", tc.name, err, tc.code, tc.field)
		}
	}
	// The good request still works, and names the served model.
	r := ok()
	r.Model = "dense-gqa-f32"
	if res := mustGenerate(t, c.client, r); len(res.ids) != 4 {
		t.Fatalf("good request: %v", res.ids)
	}
	// A full queue: one running, one waiting, the rest refused at once.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	first, err := c.client.Generate(ctx, idsReq([]int32{1, 2, 3}, 30000))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := first.Recv(); err != nil { // running
		t.Fatal(err)
	}
	if _, err := c.client.Generate(ctx, idsReq([]int32{1, 2, 3}, 30000)); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 10*time.Second, "the second request to queue", func() error {
		if s := schedulerStats(t, c.client); s.Waiting != 1 {
			return fmt.Errorf("scheduler %v", s)
		}
		return nil
	})
	deadline := time.Now().Add(10 * time.Second)
	for {
		qctx, qcancel := context.WithTimeout(context.Background(), 5*time.Second)
		t0 := time.Now()
		_, err := generate(qctx, c.client, ok())
		qcancel()
		if status.Code(err) == codes.ResourceExhausted {
			t.Logf("RESOURCE_EXHAUSTED after %v: %v", time.Since(t0), err)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("queue never full: %v", err)
		}
	}
}

// TestLeaderFailover: two coordinators on one (test-embedded) etcd and an
// independent worker process; the standby refuses to serve until the
// leader is killed, then takes over and serves the same tokens.
func TestLeaderFailover(t *testing.T) {
	needE2E(t)
	e, err := cluster.StartEmbeddedEtcd(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	eps := strings.Join(e.Endpoints(), ",")
	dir := refDir("dense-gqa-f32")
	ref := loadRef(t, dir)
	start(t, "worker", "--etcd-endpoints", eps, "--threads", "2", "--log-level", "warn")
	coord := func() (*proc, pb.GeneratorClient) {
		addr := freeAddr(t)
		p := start(t, "coordinator", "--listen", addr, "--model", dir, "--etcd-endpoints", eps, "--local-workers", "0",
			"--leader-ttl", "2s", "--data-dir", t.TempDir(), "--log-level", "warn")
		_, client := dial(t, addr)
		return p, client
	}
	a, ca := coord()
	waitReady(t, ca, a, 60*time.Second)
	b, cb := coord()
	// b answers as a standby.
	waitFor(t, 30*time.Second, "the second coordinator to answer", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		info, err := cb.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		if err == nil && (info.Leader || info.Ready) {
			t.Fatalf("second coordinator leads: %v", info)
		}
		return err
	})
	if _, err := generate(context.Background(), cb, idsReq(ref.PromptIDs, 2)); status.Code(err) != codes.Unavailable {
		t.Fatalf("standby Generate: %v", err)
	}
	if r := mustGenerate(t, ca, idsReq(ref.PromptIDs, len(ref.GreedyIDs))); !slices.Equal(r.ids, ref.GreedyIDs) {
		t.Fatalf("leader: %v", r.ids)
	}
	t0 := time.Now()
	a.stop(syscall.SIGKILL)
	info := waitReady(t, cb, b, 60*time.Second)
	t.Logf("standby took over in %v", time.Since(t0))
	if !info.Leader {
		t.Fatalf("ready but not leader: %v", info)
	}
	if r := mustGenerate(t, cb, idsReq(ref.PromptIDs, len(ref.GreedyIDs))); !slices.Equal(r.ids, ref.GreedyIDs) {
		t.Fatalf("new leader: %v, want %v", r.ids, ref.GreedyIDs)
	}
}

// TestDemoClusterTextChatHealth: the no-model default (demo model made
// under --data-dir, one local worker), text and chat input, stop strings,
// logprobs, Tokenize, model info, HealthCheck, grpc.health.v1.
func TestDemoClusterTextChatHealth(t *testing.T) {
	needE2E(t)
	c := startCluster(t, "", plainFlag) // the single-machine default: no security flags
	ctx := context.Background()
	mi, err := c.client.GetModelInfo(ctx, &pb.GetModelInfoRequest{})
	if err != nil || !mi.HasTokenizer || mi.VocabSize != 151936 {
		t.Fatalf("model info %v %v", mi, err)
	}
	tk, err := c.client.Tokenize(ctx, &pb.TokenizeRequest{Input: &pb.TokenizeRequest_Text{Text: "Hello world"}})
	if err != nil || !slices.Equal(tk.Ids, []int32{9707, 1879}) {
		t.Fatalf("tokenize: %v %v", tk, err)
	}
	r := mustGenerate(t, c.client, &pb.GenerateRequest{Input: &pb.GenerateRequest_Text{Text: "Hello world"}, MaxTokens: ptr(int32(12)),
		Temperature: ptr(float32(0)), IgnoreEos: true, Logprobs: ptr(int32(3))})
	if len(r.ids) != 12 || len(r.lps) != 12 || len(r.lps[0].Top) != 3 || r.lps[0].Top[0].TokenId != r.ids[0] {
		t.Fatalf("text request: %d ids, logprobs %v", len(r.ids), r.lps)
	}
	if r.lps[0].Logprob > 0 || r.lps[0].Logprob != r.lps[0].Top[0].Logprob {
		t.Fatalf("logprob of a greedy token %v, top %v", r.lps[0].Logprob, r.lps[0].Top[0])
	}
	if r.text == "" {
		t.Fatal("no text")
	}
	// A stop string taken from the text: the output ends before it.
	full := []rune(r.text)
	if len(full) > 4 {
		stop := string(full[len(full)/2 : len(full)/2+2])
		s := mustGenerate(t, c.client, &pb.GenerateRequest{Input: &pb.GenerateRequest_Text{Text: "Hello world"}, MaxTokens: ptr(int32(12)),
			Temperature: ptr(float32(0)), IgnoreEos: true, Stop: []string{stop}})
		if s.finish != "stop" || strings.Contains(s.text, stop) || !strings.HasPrefix(r.text, s.text) {
			t.Fatalf("stop %q: %q (%s), full %q", stop, s.text, s.finish, r.text)
		}
	}
	// Resumed after any chunk (greedy with a stop string, seeded), a
	// request gives the rest of what the undisturbed run gave, and no more.
	hello := &pb.GenerateRequest{Input: &pb.GenerateRequest_Text{Text: "Hello world"}, MaxTokens: ptr(int32(12)),
		Temperature: ptr(float32(0)), IgnoreEos: true}
	if len(full) > 4 {
		hello.Stop = []string{string(full[len(full)/2 : len(full)/2+2])}
	}
	checkResumes(t, c.client, hello)
	checkResumes(t, c.client, &pb.GenerateRequest{Input: &pb.GenerateRequest_Text{Text: "Hello world"}, MaxTokens: ptr(int32(12)),
		Temperature: ptr(float32(1.2)), TopP: ptr(float32(0.95)), Seed: ptr(int64(5)), PresencePenalty: ptr(float32(0.5)), IgnoreEos: true})
	chat := mustGenerate(t, c.client, &pb.GenerateRequest{Input: &pb.GenerateRequest_Chat{Chat: &pb.ChatInput{
		Messages: []*pb.ChatMessage{{Role: "user", Content: "Hi"}}}}, MaxTokens: ptr(int32(3)), Temperature: ptr(float32(0)), IgnoreEos: true})
	if chat.usage.PromptTokens < 10 || len(chat.ids) != 3 {
		t.Fatalf("chat: %v", chat.usage)
	}
	h, err := c.client.HealthCheck(ctx, &pb.HealthCheckRequest{})
	if err != nil || !h.Healthy {
		t.Fatalf("health check %v %v", h, err)
	}
	hs, err := healthpb.NewHealthClient(c.conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || hs.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("grpc health %v %v", hs, err)
	}
	// Server reflection lists the services (what grpcurl and ghz use).
	rs, err := reflectpb.NewServerReflectionClient(c.conn).ServerReflectionInfo(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := rs.Send(&reflectpb.ServerReflectionRequest{MessageRequest: &reflectpb.ServerReflectionRequest_ListServices{}}); err != nil {
		t.Fatal(err)
	}
	rr, err := rs.Recv()
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, s := range rr.GetListServicesResponse().GetService() {
		names = append(names, s.Name)
	}
	rs.CloseSend()
	if !slices.Contains(names, "qwenfleet.v1.Generator") || !slices.Contains(names, "grpc.health.v1.Health") {
		t.Fatalf("reflection lists %v", names)
	}
}

// TestWorkerDeathLosesNoRequest: with two local workers (two replicas), a
// worker killed in the middle of generation loses no request: its streams
// finish on the other replica with the tokens they would have produced;
// the killed worker is restarted and becomes a replica again.
func TestWorkerDeathLosesNoRequest(t *testing.T) {
	needE2E(t)
	c := startCluster(t, refDir("dense-tied-bf16"), "--local-workers", "2", "--worker-threads", "1")
	waitFor(t, 60*time.Second, "two ready workers", func() error {
		if ws := readyWorkers(t, c.client); len(ws) < 2 {
			return fmt.Errorf("ready: %v", ws)
		}
		return nil
	})
	ps := testPrompts(8, 512)
	alone := make([][]int32, len(ps))
	for i, p := range ps {
		alone[i] = mustGenerate(t, c.client, idsReq(p, 400)).ids
	}
	victim := readyWorkers(t, c.client)[0]
	got := generateAround(t, c.client, ps, 400, func() {
		running := schedulerStats(t, c.client).Running
		if err := syscall.Kill(int(victim.Pid), syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if running < 5 {
			t.Fatalf("only %d requests running when the worker was killed", running)
		}
	})
	for i := range ps {
		if !slices.Equal(got[i], alone[i]) {
			t.Fatalf("request %d after the worker died: %v, alone %v", i, got[i], alone[i])
		}
	}
	// The supervisor restarts the worker; it becomes a replica again.
	waitFormedAgain(t, c, 2, victim.Pid)
}

// generateAround streams a greedy request of n tokens for each prompt,
// calls during once every request has streamed its first token, and
// returns each request's tokens (all must finish for length).
func generateAround(t *testing.T, client pb.GeneratorClient, ps [][]int32, n int, during func()) [][]int32 {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	got := make([][]int32, len(ps))
	errs := make([]error, len(ps))
	started := make(chan struct{}, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		wg.Go(func() {
			first := true
			defer func() {
				if first {
					started <- struct{}{}
				}
			}()
			stream, err := client.Generate(ctx, idsReq(p, n))
			if err != nil {
				errs[i] = err
				return
			}
			for {
				resp, err := stream.Recv()
				if err != nil {
					errs[i] = err
					return
				}
				if ch := resp.GetChunk(); ch != nil {
					got[i] = append(got[i], ch.TokenIds...)
					if first {
						first = false
						started <- struct{}{}
					}
				}
				if cp := resp.GetComplete(); cp != nil {
					if cp.FinishReason != "length" {
						errs[i] = fmt.Errorf("finished with %s", cp.FinishReason)
					}
					return
				}
			}
		})
	}
	for range ps {
		<-started
	}
	during()
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("request %d: %v", i, err)
		}
	}
	return got
}

func readyWorkers(t testing.TB, client pb.GeneratorClient) []*pb.WorkerStatus {
	t.Helper()
	info := serverInfo(t, client)
	var out []*pb.WorkerStatus
	for _, w := range info.Workers {
		if w.State == "ready" {
			out = append(out, w)
		}
	}
	return out
}

// TestQuantizedCluster: --quantize q8 reaches the workers through their
// assignment; prompt logprobs stay near the bf16 ones.
func TestQuantizedCluster(t *testing.T) {
	needE2E(t)
	dir := refDir("dense-gqa-f32")
	ref := loadRef(t, dir)
	c := startCluster(t, dir, "--quantize", "q8")
	req := idsReq(ref.PromptIDs, 8)
	req.PromptLogprobs = true
	r := mustGenerate(t, c.client, req)
	if len(r.ids) != 8 || r.finish != "length" {
		t.Fatalf("q8 generation: %v %s", r.ids, r.finish)
	}
	checkPromptLogprobs(t, ref, r, 0.1, "q8")
	if _, err := generate(context.Background(), c.client, req); err != nil {
		t.Fatal(err)
	}
}

// checkPromptLogprobs: r's prompt logprobs are within tol of the
// reference's (computed from its float32 logits).
func checkPromptLogprobs(t *testing.T, ref *reference, r *result, tol float64, what string) {
	t.Helper()
	for i := 1; i < len(ref.PromptIDs); i++ {
		want := logSoftmaxAt(ref.logits[(i-1)*ref.vocab:i*ref.vocab], int(ref.PromptIDs[i]))
		if d := math.Abs(float64(*r.plp[i].Logprob) - want); d > tol {
			t.Fatalf("%s prompt logprob %d: %v, reference %v", what, i, *r.plp[i].Logprob, want)
		}
	}
}

// TestBF16ComputeCluster: --compute bf16 reaches the workers through
// their assignment (VDPBF16PS where it is the faster product, float32
// elsewhere); prompt logprobs stay near the float32 reference, and four
// concurrent copies of a greedy stream equal the lone run (the bf16 kernels
// are batch-invariant too).
func TestBF16ComputeCluster(t *testing.T) {
	needE2E(t)
	dir := refDir("dense-tied-bf16")
	ref := loadRef(t, dir)
	c := startCluster(t, dir, "--compute", "bf16")
	req := idsReq(ref.PromptIDs, 8)
	req.PromptLogprobs = true
	r := mustGenerate(t, c.client, req)
	if len(r.ids) != 8 || r.finish != "length" {
		t.Fatalf("bf16 generation: %v %s", r.ids, r.finish)
	}
	checkPromptLogprobs(t, ref, r, 0.05, "bf16-compute")
	lone := mustGenerate(t, c.client, idsReq(ref.PromptIDs, 8))
	var wg sync.WaitGroup
	got := make([][]int32, 4)
	for i := range got {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if g, err := generate(context.Background(), c.client, idsReq(ref.PromptIDs, 8)); err == nil {
				got[i] = g.ids
			}
		}()
	}
	wg.Wait()
	for i, g := range got {
		if !slices.Equal(g, lone.ids) {
			t.Fatalf("concurrent stream %d: %v, alone %v", i, g, lone.ids)
		}
	}
}

// checkResumes runs req undisturbed, then again resumed after each chunk
// the first run sent (as pkg/client resumes: the ids and the bytes of text
// received): every resumed run sends exactly the rest, with the same end.
func checkResumes(t *testing.T, client pb.GeneratorClient, req *pb.GenerateRequest) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stream, err := client.Generate(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	var chunks []*pb.GenerateChunk
	var end *pb.GenerateComplete
	for end == nil {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("undisturbed run: %v", err)
		}
		if ch := resp.GetChunk(); ch != nil {
			chunks = append(chunks, ch)
		}
		end = resp.GetComplete()
	}
	var ids []int32
	var text string
	for i := 0; i <= len(chunks); i++ {
		r := proto.Clone(req).(*pb.GenerateRequest)
		r.RequestId = fmt.Sprintf("resume-%d-%d", time.Now().UnixNano(), i)
		r.Resume = &pb.Resume{TokenIds: ids, TextBytes: ptr(int64(len(text)))}
		got, err := generate(ctx, client, r)
		if err != nil {
			t.Fatalf("resumed after chunk %d: %v", i, err)
		}
		var wantIDs []int32
		var wantText string
		for _, ch := range chunks[i:] {
			wantIDs, wantText = append(wantIDs, ch.TokenIds...), wantText+ch.Text
		}
		if !slices.Equal(got.ids, wantIDs) || got.text != wantText || got.finish != end.FinishReason ||
			got.usage.CompletionTokens != end.Usage.CompletionTokens {
			t.Fatalf("resumed after chunk %d of %d: ids %v text %q (%s, %d tokens), want %v %q (%s, %d tokens)", i, len(chunks),
				got.ids, got.text, got.finish, got.usage.CompletionTokens, wantIDs, wantText, end.FinishReason, end.Usage.CompletionTokens)
		}
		if i < len(chunks) {
			ids, text = append(ids, chunks[i].TokenIds...), text+chunks[i].Text
		}
	}
}
