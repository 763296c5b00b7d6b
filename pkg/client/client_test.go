package client

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// fake is a coordinator test double on a real gRPC server on 127.0.0.1.
// As leader, Generate streams the tokens 1..max_tokens one per chunk
// (token i's text is tokText(i)), continuing after a resume's tokens (which
// it checks: they must be 1..k and text_bytes their text's length). Each
// Generate call takes the next of breaks, if any, and breaks its stream
// that way after sending that many tokens. As standby it answers Generate
// like the real one, naming leaderAddr.
type fake struct {
	pb.UnimplementedGeneratorServer
	name string
	addr string
	srv  *grpc.Server

	mu         sync.Mutex
	leader     bool
	leaderAddr string
	breaks     []breakPlan
	refuse     error // Generate's status, at once
	unaryFails int   // GetModelInfo and Tokenize fail with UNAVAILABLE this many times first
	reqs       []*pb.GenerateRequest
	infos      int // GetServerInfo calls
}

type breakPlan struct {
	after  int
	how    string // "status", "error" (a GenerateError), "internal" (a GenerateError), "stop" (grpc.Server.Stop)
	before func() // runs just before the break
}

func tokText(i int) string { return fmt.Sprintf("t%d·", i) } // "·" is 2 bytes

func textOf(n int) string {
	var b strings.Builder
	for i := 1; i <= n; i++ {
		b.WriteString(tokText(i))
	}
	return b.String()
}

func seq(a, b int) []int32 {
	var out []int32
	for i := a; i <= b; i++ {
		out = append(out, int32(i))
	}
	return out
}

func startFake(t *testing.T, name string, leader bool) *fake {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f := &fake{name: name, addr: lis.Addr().String(), srv: grpc.NewServer(), leader: leader}
	pb.RegisterGeneratorServer(f.srv, f)
	go f.srv.Serve(lis)
	t.Cleanup(f.srv.Stop)
	return f
}

func (f *fake) set(leader bool, leaderAddr string) {
	f.mu.Lock()
	f.leader, f.leaderAddr = leader, leaderAddr
	f.mu.Unlock()
}

func (f *fake) requests() []*pb.GenerateRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.reqs)
}

func (f *fake) GetServerInfo(context.Context, *pb.GetServerInfoRequest) (*pb.ServerInfo, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.infos++
	la := f.leaderAddr
	if f.leader {
		la = f.addr
	}
	return &pb.ServerInfo{CoordinatorId: f.name, Leader: f.leader, LeaderAddress: la}, nil
}

func (f *fake) unary() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if !f.leader {
		return status.Errorf(codes.Unavailable, "this coordinator is a standby; the leader is at %q", f.leaderAddr)
	}
	if f.unaryFails > 0 {
		f.unaryFails--
		return status.Error(codes.Unavailable, "not yet")
	}
	return nil
}

func (f *fake) GetModelInfo(context.Context, *pb.GetModelInfoRequest) (*pb.ModelInfo, error) {
	if err := f.unary(); err != nil {
		return nil, err
	}
	return &pb.ModelInfo{Name: "fake-" + f.name}, nil
}

func (f *fake) Tokenize(_ context.Context, req *pb.TokenizeRequest) (*pb.TokenizeResponse, error) {
	if err := f.unary(); err != nil {
		return nil, err
	}
	return &pb.TokenizeResponse{Ids: []int32{int32(len(req.GetText()))}}, nil
}

func (f *fake) Generate(req *pb.GenerateRequest, out pb.Generator_GenerateServer) error {
	f.mu.Lock()
	f.reqs = append(f.reqs, proto.Clone(req).(*pb.GenerateRequest))
	leader, hint, refuse := f.leader, f.leaderAddr, f.refuse
	var plan *breakPlan
	if leader && refuse == nil && len(f.breaks) > 0 {
		plan = &f.breaks[0]
		f.breaks = f.breaks[1:]
	}
	f.mu.Unlock()
	if !leader {
		return status.Errorf(codes.Unavailable, "this coordinator is a standby; the leader is at %q", hint)
	}
	if refuse != nil {
		return refuse
	}
	start := 0
	if rs := req.Resume; rs != nil {
		start = len(rs.TokenIds)
		if !slices.Equal(rs.TokenIds, seq(1, start)) {
			return status.Errorf(codes.InvalidArgument, "resume.token_ids: %v is not 1..%d", rs.TokenIds, start)
		}
		if rs.TextBytes == nil || *rs.TextBytes != int64(len(textOf(start))) {
			return status.Errorf(codes.InvalidArgument, "resume.text_bytes: %v, want %d", rs.TextBytes, len(textOf(start)))
		}
	}
	n := int(req.GetMaxTokens())
	for i := start + 1; i <= n; i++ {
		if plan != nil && i-start-1 == plan.after {
			if plan.before != nil {
				plan.before()
			}
			switch plan.how {
			case "status":
				return status.Error(codes.Unavailable, "leadership lost")
			case "error", "internal":
				code := map[string]string{"error": "Unavailable", "internal": "Internal"}[plan.how]
				return out.Send(&pb.GenerateResponse{RequestId: req.RequestId, Response: &pb.GenerateResponse_Error{
					Error: &pb.GenerateError{Code: code, Message: "replica lost"}}})
			case "stop":
				go f.srv.Stop()
				<-out.Context().Done()
				return out.Context().Err()
			}
		}
		usage := &pb.Usage{CompletionTokens: int32(i)}
		if err := out.Send(&pb.GenerateResponse{RequestId: req.RequestId, Response: &pb.GenerateResponse_Chunk{Chunk: &pb.GenerateChunk{
			TokenIds: []int32{int32(i)}, Text: tokText(i), Usage: usage,
			Logprobs: []*pb.TokenLogprob{{TokenId: int32(i), Logprob: -float32(i)}}}}}); err != nil {
			return err
		}
	}
	return out.Send(&pb.GenerateResponse{RequestId: req.RequestId, Response: &pb.GenerateResponse_Complete{Complete: &pb.GenerateComplete{
		FinishReason: "length", Usage: &pb.Usage{CompletionTokens: int32(n)}}}})
}

// fastConfig retries quickly: the tests stay well under a second each.
func fastConfig(addrs ...string) Config {
	return Config{Addrs: addrs, RetryTimeout: 2 * time.Second, MinBackoff: 5 * time.Millisecond, MaxBackoff: 20 * time.Millisecond}
}

func newClient(t *testing.T, cfg Config) *Client {
	t.Helper()
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func request(n int) *pb.GenerateRequest {
	return &pb.GenerateRequest{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{7, 8}}}, MaxTokens: proto.Int32(int32(n))}
}

// generate runs req and checks the invariants of every successful call:
// the chunks onChunk saw and the Result hold tokens 1..n and their text,
// each once, in order.
func generate(t *testing.T, c *Client, req *pb.GenerateRequest) *Result {
	t.Helper()
	return generateTap(t, c, req, nil)
}

// generateTap is generate with tap called on every chunk.
func generateTap(t *testing.T, c *Client, req *pb.GenerateRequest, tap func(*pb.GenerateChunk)) *Result {
	t.Helper()
	var ids []int32
	var text strings.Builder
	res, err := c.Generate(context.Background(), req, func(ch *pb.GenerateChunk) error {
		ids = append(ids, ch.TokenIds...)
		text.WriteString(ch.Text)
		if tap != nil {
			tap(ch)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("Generate: %v", err)
	}
	n := int(req.GetMaxTokens())
	if want := seq(1, n); !slices.Equal(res.TokenIDs, want) || !slices.Equal(ids, want) {
		t.Fatalf("ids: result %v, chunks %v; want %v (no duplicate, no gap)", res.TokenIDs, ids, want)
	}
	if res.Text != textOf(n) || text.String() != textOf(n) {
		t.Fatalf("text: result %q, chunks %q; want %q", res.Text, text.String(), textOf(n))
	}
	if len(res.Logprobs) != n || res.Logprobs[n-1].TokenId != int32(n) {
		t.Fatalf("logprobs: %v", res.Logprobs)
	}
	if res.Complete.GetFinishReason() != "length" || res.Usage.GetCompletionTokens() != int32(n) {
		t.Fatalf("complete %v usage %v", res.Complete, res.Usage)
	}
	if len(res.RequestID) != 32 && req.RequestId == "" {
		t.Fatalf("request id %q", res.RequestID)
	}
	return res
}

func TestGenerateUndisturbed(t *testing.T) {
	l := startFake(t, "a", true)
	c := newClient(t, fastConfig(l.addr))
	req := request(5)
	res := generate(t, c, req)
	if res.Resumes != 0 || len(res.Breaks) != 0 || req.RequestId != "" || req.Resume != nil {
		t.Fatalf("resumes %d breaks %v; req changed: %v", res.Resumes, res.Breaks, req)
	}
	reqs := l.requests()
	if len(reqs) != 1 || reqs[0].RequestId != res.RequestID || reqs[0].Resume != nil {
		t.Fatalf("sent %v", reqs)
	}
	// A caller's id is kept.
	req.RequestId = "mine"
	if res := generate(t, c, req); res.RequestID != "mine" || l.requests()[1].RequestId != "mine" {
		t.Fatalf("request id %q", res.RequestID)
	}
}

// TestResumeSameLeader: the leader breaks the stream (a status, a
// GenerateError "Unavailable") and stays leader: the client resumes there
// with exactly what it received.
func TestResumeSameLeader(t *testing.T) {
	for _, how := range []string{"status", "error"} {
		t.Run(how, func(t *testing.T) {
			l := startFake(t, "a", true)
			l.breaks = []breakPlan{{after: 3, how: how}, {after: 0, how: how}, {after: 2, how: how}}
			c := newClient(t, fastConfig(l.addr))
			res := generate(t, c, request(8))
			reqs := l.requests()
			if len(reqs) != 4 || res.Resumes != 3 {
				t.Fatalf("%d requests, %d resumes", len(reqs), res.Resumes)
			}
			for i, want := range [][]int32{nil, seq(1, 3), seq(1, 3), seq(1, 5)} {
				r := reqs[i]
				if r.RequestId != res.RequestID || !slices.Equal(r.Resume.GetTokenIds(), want) || (i > 0) != (r.Resume != nil) {
					t.Fatalf("request %d: id %q resume %v, want %v", i, r.RequestId, r.Resume, want)
				}
				if i > 0 && r.Resume.GetTextBytes() != int64(len(textOf(len(want)))) {
					t.Fatalf("request %d: text_bytes %d", i, r.Resume.GetTextBytes())
				}
			}
			// Breaks: after 3 tokens (retried once: the second stream broke
			// before a token), after 5.
			if len(res.Breaks) != 2 || res.Breaks[0].Received != 3 || res.Breaks[0].Retries != 1 || res.Breaks[1].Received != 5 ||
				res.Breaks[0].Gap() <= 0 || res.Breaks[1].Gap() <= 0 || status.Code(res.Breaks[0].Err) != codes.Unavailable {
				t.Fatalf("breaks %+v", res.Breaks)
			}
			t.Logf("gaps %v %v", res.Breaks[0].Gap(), res.Breaks[1].Gap())
		})
	}
}

// TestFailover: the leader's server stops mid-stream (its listener and
// connections close) and the standby takes over; the client finds it (it
// was in Addrs) and resumes there.
func TestFailover(t *testing.T) {
	a := startFake(t, "a", true)
	b := startFake(t, "b", false)
	b.set(false, a.addr)
	// The stop waits until the client has the 4 tokens sent (grpc's Stop
	// drops what its connections have not written yet).
	got4 := make(chan struct{})
	a.breaks = []breakPlan{{after: 4, how: "stop", before: func() {
		select {
		case <-got4:
		case <-time.After(2 * time.Second):
		}
		b.set(true, "")
	}}}
	c := newClient(t, fastConfig(a.addr, b.addr))
	res := generateTap(t, c, request(10), func(ch *pb.GenerateChunk) {
		if ch.TokenIds[0] == 4 {
			close(got4)
		}
	})
	ra, rb := a.requests(), b.requests()
	if len(ra) != 1 || len(rb) != 1 || res.Resumes != 1 || len(res.Breaks) != 1 {
		t.Fatalf("requests a %d b %d, resumes %d, breaks %+v", len(ra), len(rb), res.Resumes, res.Breaks)
	}
	// What reached the client before the connection closed (the fake
	// checked the resume is a prefix of 1..10 with its text's length).
	k := res.Breaks[0].Received
	if k != 4 || len(rb[0].Resume.GetTokenIds()) != k || rb[0].RequestId != ra[0].RequestId {
		t.Fatalf("b got resume %v (received %d)", rb[0].Resume, k)
	}
	t.Logf("resumed after %d tokens, gap %v", k, res.Breaks[0].Gap())
}

// TestFollowsLeaderAddress: the only configured coordinator is a standby;
// GetServerInfo names the leader, which the client adds and uses.
func TestFollowsLeaderAddress(t *testing.T) {
	l := startFake(t, "l", true)
	s := startFake(t, "s", false)
	s.set(false, l.addr)
	c := newClient(t, fastConfig(s.addr))
	generate(t, c, request(3))
	if len(s.requests()) != 0 || len(l.requests()) != 1 {
		t.Fatalf("standby got %d, leader %d", len(s.requests()), len(l.requests()))
	}
	if got := c.Coordinators(); !slices.Equal(got, []string{s.addr, l.addr}) {
		t.Fatalf("coordinators %v", got)
	}
	if got, _ := c.Leader(context.Background()); got != l.addr {
		t.Fatalf("leader %q", got)
	}
	// The leader is cached: no more GetServerInfo.
	l.mu.Lock()
	before := l.infos
	l.mu.Unlock()
	generate(t, c, request(2))
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.infos != before {
		t.Fatalf("GetServerInfo sent again with a leader cached")
	}
}

// TestGivesUp: no leader anywhere (a standby that knows none, an address
// that refuses connections): UNAVAILABLE retried until RetryTimeout, then
// one clear error.
func TestGivesUp(t *testing.T) {
	s := startFake(t, "s", false)
	l, _ := net.Listen("tcp", "127.0.0.1:0")
	gone := l.Addr().String()
	l.Close()
	cfg := fastConfig(gone, s.addr)
	cfg.RetryTimeout = 300 * time.Millisecond
	c := newClient(t, cfg)
	start := time.Now()
	res, err := c.Generate(context.Background(), request(3), nil)
	el := time.Since(start)
	var gu *GaveUpError
	if !errors.Is(err, ErrGaveUp) || status.Code(err) != codes.Unavailable || !errors.As(err, &gu) || gu.Attempts < 3 {
		t.Fatalf("err %v (%T)", err, err)
	}
	if el < 250*time.Millisecond || el > 2*time.Second {
		t.Fatalf("gave up after %v, RetryTimeout 300ms", el)
	}
	for _, want := range []string{"gave up", "no leader", gone, "standby (leader unknown)"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not say %q", err, want)
		}
	}
	if res == nil || len(res.TokenIDs) != 0 || res.Complete != nil {
		t.Fatalf("result %+v", res)
	}
	if _, err := c.ModelInfo(context.Background()); !errors.Is(err, ErrGaveUp) {
		t.Fatalf("ModelInfo: %v", err)
	}
	// A ctx deadline before RetryTimeout: it gives up at the deadline.
	cfg.RetryTimeout = time.Minute
	c2 := newClient(t, cfg)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := c2.Generate(ctx, request(3), nil); !errors.Is(err, ErrGaveUp) && !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("with a deadline: %v", err)
	}
}

// TestNotRetried: statuses other than UNAVAILABLE come back at once, as
// themselves, from the call's status or from a GenerateError.
func TestNotRetried(t *testing.T) {
	l := startFake(t, "a", true)
	c := newClient(t, fastConfig(l.addr))
	for _, code := range []codes.Code{codes.InvalidArgument, codes.ResourceExhausted, codes.NotFound, codes.AlreadyExists} {
		l.mu.Lock()
		l.refuse, l.reqs = status.Error(code, "top_p: 1.5 is not in (0, 1]"), nil
		l.mu.Unlock()
		_, err := c.Generate(context.Background(), request(3), nil)
		if status.Code(err) != code || status.Convert(err).Message() != "top_p: 1.5 is not in (0, 1]" || len(l.requests()) != 1 {
			t.Fatalf("%v: err %v after %d requests", code, err, len(l.requests()))
		}
	}
	l.mu.Lock()
	l.refuse, l.reqs = nil, nil
	l.breaks = []breakPlan{{after: 2, how: "internal"}}
	l.mu.Unlock()
	res, err := c.Generate(context.Background(), request(5), nil)
	if status.Code(err) != codes.Internal || !strings.Contains(err.Error(), "replica lost") || len(l.requests()) != 1 {
		t.Fatalf("GenerateError Internal: %v after %d requests", err, len(l.requests()))
	}
	if !slices.Equal(res.TokenIDs, seq(1, 2)) || res.Text != textOf(2) {
		t.Fatalf("partial result %v %q", res.TokenIDs, res.Text)
	}
	// The caller's resume is refused: it is the library's.
	req := request(2)
	req.Resume = &pb.Resume{}
	if _, err := c.Generate(context.Background(), req, nil); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("caller's resume: %v", err)
	}
}

func TestCallerEnds(t *testing.T) {
	l := startFake(t, "a", true)
	c := newClient(t, fastConfig(l.addr))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	_, err := c.Generate(ctx, request(100), func(ch *pb.GenerateChunk) error {
		if ch.TokenIds[0] == 3 {
			cancel()
		}
		return nil
	})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled: %v", err)
	}
	stop := errors.New("enough")
	res, err := c.Generate(context.Background(), request(100), func(ch *pb.GenerateChunk) error {
		if ch.TokenIds[0] == 4 {
			return stop
		}
		return nil
	})
	if err != stop || len(res.TokenIDs) != 4 || len(l.requests()) != 2 {
		t.Fatalf("onChunk's error: %v, %d tokens, %d requests", err, len(res.TokenIDs), len(l.requests()))
	}
	// A standby only: ctx's deadline ends the retries with ctx's error
	// (or a give-up just before it).
	s := startFake(t, "s", false)
	c2 := newClient(t, fastConfig(s.addr))
	ctx2, cancel2 := context.WithCancel(context.Background())
	time.AfterFunc(50*time.Millisecond, cancel2)
	if _, err := c2.Tokenize(ctx2, &pb.TokenizeRequest{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("canceled during retries: %v", err)
	}
}

func TestUnaryCalls(t *testing.T) {
	l := startFake(t, "l", true)
	s := startFake(t, "s", false)
	s.set(false, l.addr)
	l.unaryFails = 2
	c := newClient(t, fastConfig(s.addr))
	mi, err := c.ModelInfo(context.Background())
	if err != nil || mi.Name != "fake-l" {
		t.Fatalf("ModelInfo %v %v", mi, err)
	}
	tr, err := c.Tokenize(context.Background(), &pb.TokenizeRequest{Input: &pb.TokenizeRequest_Text{Text: "abc"}})
	if err != nil || !slices.Equal(tr.Ids, []int32{3}) {
		t.Fatalf("Tokenize %v %v", tr, err)
	}
	si, err := c.ServerInfo(context.Background())
	if err != nil || si.CoordinatorId != "l" {
		t.Fatalf("ServerInfo %v %v", si, err)
	}
	// No leader: ServerInfo is any coordinator's that answers.
	l.srv.Stop()
	s.set(false, "")
	c2 := newClient(t, fastConfig(l.addr, s.addr))
	si, err = c2.ServerInfo(context.Background())
	if err != nil || si.CoordinatorId != "s" || si.Leader {
		t.Fatalf("ServerInfo without a leader: %v %v", si, err)
	}
}

func TestConfig(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{}, "Config.Addrs"},
		{Config{Addrs: []string{"a:1", ""}}, "Config.Addrs[1]: empty"},
		{Config{EtcdEndpoints: []string{" "}}, "Config.EtcdEndpoints[0]"},
		{Config{Addrs: []string{"a:1"}, RetryTimeout: -1}, "Config.RetryTimeout"},
		{Config{Addrs: []string{"a:1"}, MinBackoff: time.Second, MaxBackoff: time.Millisecond}, "Config.MaxBackoff"},
		{Config{Addrs: []string{"a:1"}, KeepaliveTime: time.Second}, "Config.KeepaliveTime"},
	} {
		if _, err := New(tc.cfg); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: %v, want %q", tc.cfg, err, tc.want)
		}
	}
	cfg := Config{Addrs: []string{"a:1"}}
	if err := cfg.Validate(); err != nil || cfg.RetryTimeout != DefaultRetryTimeout || cfg.KeepaliveTime != DefaultKeepaliveTime ||
		cfg.InfoTimeout != DefaultInfoTimeout || cfg.MinBackoff != DefaultMinBackoff || cfg.MaxBackoff != DefaultMaxBackoff {
		t.Fatalf("defaults: %+v %v", cfg, err)
	}
}

func TestCodeOf(t *testing.T) {
	for name, want := range map[string]codes.Code{"Unavailable": codes.Unavailable, "ResourceExhausted": codes.ResourceExhausted,
		"OK": codes.Unknown, "": codes.Unknown, "bogus": codes.Unknown} {
		if got := codeOf(name); got != want {
			t.Errorf("codeOf(%q) = %v, want %v", name, got, want)
		}
	}
}

// TestEtcdFallback: no configured coordinator knows the leader (or none is
// configured at all); the election key in etcd names it. etcd serves TLS
// and wants a client certificate of the cluster CA (Config.EtcdTLS).
func TestEtcdFallback(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(dir, nil, false); err != nil {
		t.Fatal(err)
	}
	e, err := cluster.StartEmbeddedEtcdConfig(cluster.EmbeddedEtcdConfig{Dir: t.TempDir(), TLSDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	coordTLS, err := security.NewTLS(dir, security.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	clientTLS, err := security.NewTLS(dir, security.RoleWorker)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	store, err := cluster.ConnectWith(ctx, e.Endpoints(), "/ha/", cluster.ConnectConfig{TLS: coordTLS.ClientConfig("")})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	l := startFake(t, "l", true)
	s := startFake(t, "s", false) // knows no leader
	lead, err := store.Campaign(ctx, l.addr, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer lead.Resign(context.Background())
	for _, addrs := range [][]string{{s.addr}, nil} {
		cfg := fastConfig(addrs...)
		cfg.EtcdEndpoints, cfg.Prefix, cfg.EtcdTLS = e.Endpoints(), "/ha/", clientTLS.ClientConfig("")
		c := newClient(t, cfg)
		generate(t, c, request(3))
		if got := c.Coordinators(); !slices.Equal(got, append(addrs, l.addr)) {
			t.Fatalf("coordinators %v", got)
		}
	}
	// The wrong prefix names no leader: it gives up.
	cfg := fastConfig(s.addr)
	cfg.EtcdEndpoints, cfg.Prefix, cfg.RetryTimeout, cfg.EtcdTLS = e.Endpoints(), "/other/", 100*time.Millisecond, clientTLS.ClientConfig("")
	c := newClient(t, cfg)
	if _, err := c.Generate(context.Background(), request(3), nil); !errors.Is(err, ErrGaveUp) || !strings.Contains(err.Error(), "etcd") {
		t.Fatalf("wrong prefix: %v", err)
	}
}
