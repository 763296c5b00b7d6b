package server_test

import (
	"context"
	"fmt"
	"io"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// overloadRSSBound is the coordinator's RSS bound under the 10× overload
// of TestOverload (embedded etcd included).
const overloadRSSBound = 128 << 20

// rssOf reads a process's resident set (VmRSS) in bytes.
func rssOf(pid int) (int64, error) {
	raw, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(raw), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("no VmRSS in /proc/%d/status", pid)
}

// outcome is what became of one request of the load.
type outcome struct {
	sent  time.Time
	first time.Duration // to the first chunk (0: none)
	took  time.Duration // to the end of the call
	code  codes.Code    // OK for a completed request
	msg   string
}

// oneRequest runs a request, timing its first chunk and its end.
func oneRequest(ctx context.Context, client pb.GeneratorClient, req *pb.GenerateRequest) outcome {
	o := outcome{sent: time.Now()}
	end := func(err error) outcome {
		o.took = time.Since(o.sent)
		o.code, o.msg = status.Code(err), status.Convert(err).Message()
		return o
	}
	stream, err := client.Generate(ctx, req)
	if err != nil {
		return end(err)
	}
	for {
		resp, err := stream.Recv()
		if err == io.EOF {
			return end(status.Error(codes.Internal, "stream ended without complete"))
		}
		if err != nil {
			return end(err)
		}
		switch x := resp.Response.(type) {
		case *pb.GenerateResponse_Chunk:
			if o.first == 0 {
				o.first = time.Since(o.sent)
			}
		case *pb.GenerateResponse_Complete:
			return end(nil)
		case *pb.GenerateResponse_Error:
			return end(status.Error(codes.Internal, x.Error.Code+": "+x.Error.Message))
		}
	}
}

func pct(ds []time.Duration, p float64) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := slices.Clone(ds)
	slices.Sort(s)
	return s[min(int(p*float64(len(s))), len(s)-1)]
}

func distribution(ds []time.Duration) string {
	return fmt.Sprintf("n=%d p50=%v p90=%v p99=%v max=%v", len(ds), pct(ds, 0.5).Round(time.Microsecond),
		pct(ds, 0.9).Round(time.Microsecond), pct(ds, 0.99).Round(time.Microsecond), pct(ds, 1).Round(time.Microsecond))
}

// TestOverload: an open-loop load at 10× what the cluster serves, for 30 s.
// Every request completes or is refused RESOURCE_EXHAUSTED; refusals come
// at once (within 1 s); no served request waits longer than
// --max-queue-wait for its first token; the coordinator's RSS stays under
// overloadRSSBound.
func TestOverload(t *testing.T) {
	needE2E(t)
	const maxWait = 3 * time.Second
	loadFor := 30 * time.Second
	if s := os.Getenv("QWENFLEET_OVERLOAD_SECONDS"); s != "" { // shorter runs by hand
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("QWENFLEET_OVERLOAD_SECONDS=%q", s)
		}
		loadFor = time.Duration(n) * time.Second
	}
	// One sequence at a time, 64 tokens each: a low, known capacity.
	c := startCluster(t, refDir("dense-gqa-f32"), "--max-running", "1", "--max-batch-tokens", "64",
		"--max-queue-wait", maxWait.String(), "--worker-threads", "1")
	pid := c.coord.cmd.Process.Pid
	req := func(i int) *pb.GenerateRequest {
		return idsReq([]int32{int32(1 + i%500), 2, 3, 4, 5, 6, 7, 8}, 64)
	}

	// Capacity: a closed loop with more clients than the cluster runs at
	// once (so it queues, and the admission estimate has a history).
	const closedFor = 4 * time.Second
	var mu sync.Mutex
	served := 0
	var wg sync.WaitGroup
	stop := time.Now().Add(closedFor)
	for w := range 4 {
		wg.Go(func() {
			for i := w; time.Now().Before(stop); i += 4 {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				o := oneRequest(ctx, c.client, req(i))
				cancel()
				if o.code != codes.OK {
					t.Errorf("closed loop: %v %s", o.code, o.msg)
					return
				}
				mu.Lock()
				served++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	if t.Failed() {
		return
	}
	capacity := float64(served) / closedFor.Seconds()
	rate := 10 * capacity
	base, err := rssOf(pid)
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("capacity %.1f requests/s (closed loop, 4 clients, %v); open loop at %.0f/s for %v; coordinator RSS before %d MiB",
		capacity, closedFor, rate, loadFor, base>>20)

	// RSS, sampled through the run.
	var rssMax int64
	sampling := make(chan struct{})
	sampled := make(chan struct{})
	go func() {
		defer close(sampled)
		tick := time.NewTicker(100 * time.Millisecond)
		defer tick.Stop()
		for {
			if r, err := rssOf(pid); err == nil {
				rssMax = max(rssMax, r)
			}
			select {
			case <-sampling:
				return
			case <-tick.C:
			}
		}
	}()

	// The open loop: requests at fixed times, whatever the answers.
	var outcomes []outcome
	ctx, cancel := context.WithTimeout(context.Background(), loadFor+20*time.Second)
	defer cancel()
	every := time.Duration(float64(time.Second) / rate)
	start := time.Now()
	for i := 0; ; i++ {
		at := start.Add(time.Duration(i) * every)
		if at.Sub(start) >= loadFor {
			break
		}
		time.Sleep(time.Until(at))
		wg.Go(func() {
			o := oneRequest(ctx, c.client, req(i))
			mu.Lock()
			outcomes = append(outcomes, o)
			mu.Unlock()
		})
	}
	wg.Wait()
	close(sampling)
	<-sampled

	var refused, expired, ttft []time.Duration
	completed, failed, lost := 0, 0, 0
	for _, o := range outcomes {
		switch {
		case o.code == codes.OK:
			completed++
			ttft = append(ttft, o.first)
			if o.first > maxWait+time.Second {
				t.Errorf("a served request waited %v for its first token (max queue wait %v)", o.first, maxWait)
			}
		case o.code == codes.ResourceExhausted && strings.Contains(o.msg, "without being scheduled"):
			expired = append(expired, o.took)
		case o.code == codes.ResourceExhausted:
			refused = append(refused, o.took)
			if o.took > time.Second {
				t.Errorf("refused after %v: %s", o.took, o.msg)
			}
		case o.code == codes.DeadlineExceeded:
			lost++
		default:
			failed++
			if failed <= 5 {
				t.Errorf("request failed: %v %s", o.code, o.msg)
			}
		}
	}
	t.Logf("sent %d, completed %d (%.1f/s), refused %d, expired in the queue %d, failed %d, lost %d",
		len(outcomes), completed, float64(completed)/loadFor.Seconds(), len(refused), len(expired), failed, lost)
	t.Logf("refusal latency: %s", distribution(refused))
	t.Logf("expired after: %s", distribution(expired))
	t.Logf("served, time to first token: %s", distribution(ttft))
	t.Logf("coordinator RSS: max %d MiB during the run (before %d MiB; bound %d MiB)", rssMax>>20, base>>20, overloadRSSBound>>20)
	if lost > 0 {
		t.Errorf("%d requests got no answer within the run and 20 s after", lost)
	}
	if rssMax > overloadRSSBound {
		t.Errorf("coordinator RSS %d MiB, over the bound of %d MiB", rssMax>>20, overloadRSSBound>>20)
	}
	if len(refused) < len(outcomes)/2 {
		t.Errorf("only %d of %d requests refused at 10× the capacity", len(refused), len(outcomes))
	}
	// Shed means refused at once: requests that expire in the queue are
	// the estimate's misses, kept rare.
	if len(expired) > max(len(outcomes)/50, 5) {
		t.Errorf("%d requests expired in the queue (refused late), more than 2%% of %d", len(expired), len(outcomes))
	}
	if completed < int(0.5*capacity*loadFor.Seconds()) {
		t.Errorf("completed %d under overload, less than half the capacity (%.0f in %v)", completed, capacity*loadFor.Seconds(), loadFor)
	}
}

// TestSlowReaderIsAborted: a client that opens a stream and never reads
// it holds nothing beyond the flow-control windows and --send-timeout:
// its request is aborted (its KV blocks freed) and the handler returns
// DEADLINE_EXCEEDED naming --send-timeout, which the client reads after
// the chunks that were in flight.
func TestSlowReaderIsAborted(t *testing.T) {
	needE2E(t)
	c := startCluster(t, refDir("dense-gqa-f32"), "--send-timeout", "1s")
	// Fixed 64 KiB windows (no BDP growth): the server's Sends block soon.
	conn, err := grpc.NewClient(c.addr, append(publicDialOptions(c.addr),
		grpc.WithInitialWindowSize(64<<10), grpc.WithInitialConnWindowSize(64<<10))...)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := pb.NewGeneratorClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const n = 30000
	stream, err := client.Generate(ctx, idsReq([]int32{1, 2, 3}, n))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, 30*time.Second, "the request to run", func() error {
		if s := schedulerStats(t, c.client); s.Running != 1 {
			return fmt.Errorf("scheduler %v", s)
		}
		return nil
	})
	t0 := time.Now()
	waitFor(t, 60*time.Second, "the request of the client that does not read to be aborted", func() error {
		if s := schedulerStats(t, c.client); s.Running != 0 || s.Waiting != 0 || s.KvBlocksFree != s.KvBlocksTotal {
			return fmt.Errorf("scheduler %v", s)
		}
		return nil
	})
	t.Logf("aborted %v after it started", time.Since(t0).Round(time.Millisecond))
	got := 0
	for {
		resp, err := stream.Recv()
		if err != nil {
			if status.Code(err) != codes.DeadlineExceeded || !strings.Contains(err.Error(), "--send-timeout") {
				t.Fatalf("after %d tokens: %v, want DEADLINE_EXCEEDED naming --send-timeout", got, err)
			}
			t.Logf("the client read %d tokens, then: %v", got, err)
			break
		}
		if resp.GetComplete() != nil {
			t.Fatalf("the request completed (%d tokens): it was not aborted", got)
		}
		got += len(resp.GetChunk().GetTokenIds())
	}
	if got >= n {
		t.Fatalf("read %d tokens", got)
	}
}

// TestInputCaps: text and chat contents are length-checked before they are
// tokenized (INVALID_ARGUMENT naming the field), and Tokenize has the
// same caps as Generate, the context's included.
func TestInputCaps(t *testing.T) {
	needE2E(t)
	c := startCluster(t, "")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	huge := strings.Repeat("a", 1<<20+1)
	long := strings.Repeat(" a", 200000) // 200000 tokens: more than the context
	chat := func(contents ...string) *pb.ChatInput {
		in := &pb.ChatInput{}
		for _, s := range contents {
			in.Messages = append(in.Messages, &pb.ChatMessage{Role: "user", Content: s})
		}
		return in
	}
	half := strings.Repeat("b", 600<<10)
	check := func(name string, err error, field string) {
		t.Helper()
		if status.Code(err) != codes.InvalidArgument || !strings.HasPrefix(status.Convert(err).Message(), field+":") {
			t.Errorf("%s: %v, want INVALID_ARGUMENT naming %s", name, err, field)
		}
	}
	for _, tc := range []struct {
		name  string
		gen   *pb.GenerateRequest
		tok   *pb.TokenizeRequest
		field string
	}{
		{"text over MaxInputBytes", &pb.GenerateRequest{Input: &pb.GenerateRequest_Text{Text: huge}},
			&pb.TokenizeRequest{Input: &pb.TokenizeRequest_Text{Text: huge}}, "text"},
		{"chat contents over MaxInputBytes together", &pb.GenerateRequest{Input: &pb.GenerateRequest_Chat{Chat: chat("hi", half, half)}},
			&pb.TokenizeRequest{Input: &pb.TokenizeRequest_Chat{Chat: chat("hi", half, half)}}, "chat.messages[2].content"},
		{"text beyond the context", &pb.GenerateRequest{Input: &pb.GenerateRequest_Text{Text: long}},
			&pb.TokenizeRequest{Input: &pb.TokenizeRequest_Text{Text: long}}, "prompt"},
	} {
		_, err := generate(ctx, c.client, tc.gen)
		check(tc.name+" (Generate)", err, tc.field)
		_, err = c.client.Tokenize(ctx, tc.tok)
		check(tc.name+" (Tokenize)", err, tc.field)
	}
}
