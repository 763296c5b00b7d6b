package server

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/reflection"
	reflectionpb "google.golang.org/grpc/reflection/grpc_reflection_v1"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/qwenfleet/qwenfleet/pkg/client"
	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

func authPtr[T any](v T) *T { return &v }

func authIDsReq(ids []int32, n int) *pb.GenerateRequest {
	return &pb.GenerateRequest{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: ids}}, MaxTokens: authPtr(int32(n)),
		Temperature: authPtr(float32(0)), IgnoreEos: true}
}

// authResult is what a Generate received.
type authResult struct {
	ids    []int32
	finish string
}

func authGenerate(ctx context.Context, gc pb.GeneratorClient, req *pb.GenerateRequest) (*authResult, error) {
	stream, err := gc.Generate(ctx, req)
	if err != nil {
		return nil, err
	}
	r := &authResult{}
	for {
		resp, err := stream.Recv()
		switch {
		case err == io.EOF:
			return nil, errors.New("stream ended without complete")
		case err != nil:
			return nil, err
		case resp.GetChunk() != nil:
			r.ids = append(r.ids, resp.GetChunk().TokenIds...)
		case resp.GetComplete() != nil:
			r.finish = resp.GetComplete().FinishReason
			return r, nil
		case resp.GetError() != nil:
			return nil, errors.New(resp.GetError().Message)
		}
	}
}

// authWaitFor polls cond until it returns nil, failing t after d.
func authWaitFor(t testing.TB, d time.Duration, what string, cond func() error) {
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
		time.Sleep(20 * time.Millisecond)
	}
}

// tickExec answers every step after a short pause with token 7 for every
// sampled sequence: a replica whose requests run long enough to be seen
// (and aborted) while they run.
type tickExec struct{ pause time.Duration }

func (x tickExec) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	select {
	case <-time.After(x.pause):
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	res := &steps.Result{Seqs: make([]steps.SeqResult, len(b.Seqs))}
	for i, s := range b.Seqs {
		if s.Sample {
			res.Seqs[i].Candidates = []steps.Candidate{{ID: 7}}
		}
	}
	return res, nil
}

// The test keys: name → key.
var testKeys = map[string]string{"alice": "qf_alice-key", "bob": "qf_bob-key", "root": "qf_root-key", "limited": "qf_limited-key"}

// writeTestKeys writes the API keys file of testKeys: alice and bob users,
// root an admin, limited a user with max_streams 1.
func writeTestKeys(t testing.TB) *security.APIKeys {
	t.Helper()
	var b strings.Builder
	for _, k := range []struct {
		name, role string
		max        int
	}{{"alice", "user", 0}, {"bob", "user", 0}, {"root", "admin", 0}, {"limited", "user", 1}} {
		sum := sha256.Sum256([]byte(testKeys[k.name]))
		fmt.Fprintf(&b, `{"sha256":%q,"name":%q,"role":%q,"max_streams":%d}`+"\n", hex.EncodeToString(sum[:]), k.name, k.role, k.max)
	}
	file := filepath.Join(t.TempDir(), "api-keys.jsonl")
	if err := os.WriteFile(file, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := security.LoadAPIKeys(file)
	if err != nil {
		t.Fatal(err)
	}
	return keys
}

// What the test coordinator knows that a user key must not see.
const (
	secretWorkerID   = "gpu-host-7-4242"
	secretWorkerAddr = "10.77.0.5:7070"
	secretMetrics    = "10.77.0.5:9464"
	secretHost       = "gpu-host-7"
	secretEtcd       = "http://10.66.0.9:2379"
)

// authCoordinator is a leading Coordinator that started nothing (no etcd,
// no worker process): one replica over tickExec, one registered worker and
// a placement naming it.
func authCoordinator(t testing.TB) *Coordinator {
	t.Helper()
	c, err := NewCoordinator(CoordinatorOptions{ID: "coordinator-127.0.0.1:50051", Addr: "127.0.0.1:50051", ModelDir: fuzzRefDir("dense-gqa-f32"),
		EtcdEndpoints: []string{secretEtcd}, Security: "tls"})
	if err != nil {
		t.Fatal(err)
	}
	eng := routing.NewEngine(tickExec{pause: 2 * time.Millisecond}, routing.SchedulerConfig{MaxBatchTokens: 256, MaxRunning: 16, MaxWaiting: 16}, 512, 16)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { eng.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	c.router.AddReplica("r1", eng)
	c.mu.Lock()
	c.leader = true
	c.lastList = []cluster.WorkerInfo{{ID: secretWorkerID, Addr: secretWorkerAddr, MetricsAddr: secretMetrics, PID: 4242, Host: secretHost,
		State: "ready", Backend: "cpu", MemoryBytes: 1 << 30}}
	c.placement = schema.Placement{Version: 3, Model: c.opts.ModelDir, Replicas: []schema.Replica{{Index: 0, Generation: 1, TP: 1, PP: 1,
		Workers: []string{secretWorkerID}, LayersEnd: 2, Stages: []schema.Stage{{Index: 0, LayersEnd: 2, Ranks: []schema.Rank{{Worker: secretWorkerID, Addr: secretWorkerAddr}}}}}}}
	c.mu.Unlock()
	return c
}

// serveAuth serves a GeneratorService of c (with the health service and
// reflection, as the coordinator does) on 127.0.0.1 with auth and, when
// creds is not nil, TLS.
func serveAuth(t testing.TB, c *Coordinator, auth *PublicAuth, creds credentials.TransportCredentials) string {
	t.Helper()
	opts := PublicServerOptionsWith(Limits{}, auth)
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	gs := grpc.NewServer(opts...)
	pb.RegisterGeneratorServer(gs, NewGeneratorService(c))
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	return l.Addr().String()
}

// as is ctx carrying key as "authorization: Bearer <key>" ("" : none).
func as(ctx context.Context, key string) context.Context {
	if key == "" {
		return ctx
	}
	return metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
}

func plainConn(t testing.TB, addr string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func wantCode(t testing.TB, what string, err error, code codes.Code, contains ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("%s: %v, want %v", what, err, code)
	}
	for _, s := range contains {
		if !strings.Contains(status.Convert(err).Message(), s) {
			t.Fatalf("%s: %q does not say %q", what, status.Convert(err).Message(), s)
		}
	}
}

// longReq is a request that runs until aborted (about 4 s at most).
func longReq(id string) *pb.GenerateRequest {
	return &pb.GenerateRequest{RequestId: id, Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{1, 2, 3}}},
		MaxTokens: authPtr(int32(2000)), IgnoreEos: true, Temperature: authPtr(float32(0))}
}

// running is a Generate stream that has received its first chunk.
type running struct {
	stream grpc.ServerStreamingClient[pb.GenerateResponse]
	cancel context.CancelFunc
}

func startRunning(t *testing.T, gc pb.GeneratorClient, key string, req *pb.GenerateRequest) *running {
	t.Helper()
	ctx, cancel := context.WithTimeout(as(context.Background(), key), 30*time.Second)
	stream, err := gc.Generate(ctx, req)
	if err == nil {
		var resp *pb.GenerateResponse
		if resp, err = stream.Recv(); err == nil && resp.GetChunk() == nil {
			err = fmt.Errorf("first message is not a chunk: %v", resp)
		}
	}
	if err != nil {
		cancel()
		t.Fatalf("Generate %s as %q: %v", req.RequestId, key, err)
	}
	t.Cleanup(cancel)
	return &running{stream: stream, cancel: cancel}
}

// finish reads the stream to its end and returns the finish reason.
func (r *running) finish() (string, error) {
	for {
		resp, err := r.stream.Recv()
		if err != nil {
			return "", err
		}
		if c := resp.GetComplete(); c != nil {
			if _, err := r.stream.Recv(); err != io.EOF {
				return "", fmt.Errorf("after complete: %v", err)
			}
			return c.FinishReason, nil
		}
		if e := resp.GetError(); e != nil {
			return "", errors.New(e.Message)
		}
	}
}

// genErr is the status of a Generate call (sent on the first Recv).
func genErr(ctx context.Context, gc pb.GeneratorClient, req *pb.GenerateRequest) error {
	stream, err := gc.Generate(ctx, req)
	if err != nil {
		return err
	}
	for {
		if _, err := stream.Recv(); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

// TestAPIKeyAuthentication: with keys, a call without a key, with an
// unknown key or with a malformed authorization is UNAUTHENTICATED (the
// message never repeats the key); the health service answers without a
// key; reflection, and every Generator method, need one.
func TestAPIKeyAuthentication(t *testing.T) {
	addr := serveAuth(t, authCoordinator(t), &PublicAuth{Keys: writeTestKeys(t)}, nil)
	conn := plainConn(t, addr)
	gc := pb.NewGeneratorClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, tc := range []struct {
		name string
		ctx  context.Context
		want string
	}{
		{"no key", ctx, "requires an API key"},
		{"unknown key", as(ctx, "qf_not-a-key"), "not valid"},
		{"malformed", metadata.AppendToOutgoingContext(ctx, "authorization", "Basic qf_alice-key"), "malformed"},
		{"two keys", metadata.AppendToOutgoingContext(as(ctx, testKeys["alice"]), "authorization", "Bearer qf_bob-key"), "malformed"},
	} {
		_, err := gc.GetModelInfo(tc.ctx, &pb.GetModelInfoRequest{})
		wantCode(t, tc.name+": GetModelInfo", err, codes.Unauthenticated, tc.want)
		if strings.Contains(err.Error(), "qf_") {
			t.Fatalf("%s: the error repeats the key: %v", tc.name, err)
		}
		wantCode(t, tc.name+": Generate", genErr(tc.ctx, gc, authIDsReq([]int32{1, 2}, 2)), codes.Unauthenticated, tc.want)
		_, err = gc.Drain(tc.ctx, &pb.DrainRequest{WorkerId: "x"})
		wantCode(t, tc.name+": Drain", err, codes.Unauthenticated)
		_, err = gc.Abort(tc.ctx, &pb.AbortRequest{RequestId: "x"})
		wantCode(t, tc.name+": Abort", err, codes.Unauthenticated)
	}
	h, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	if err != nil || h.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health without a key: %v %v", h, err)
	}
	list := func(ctx context.Context) error {
		rc, err := reflectionpb.NewServerReflectionClient(conn).ServerReflectionInfo(ctx)
		if err != nil {
			return err
		}
		// A Send to a stream the server ended is io.EOF: Recv has the status.
		rc.Send(&reflectionpb.ServerReflectionRequest{MessageRequest: &reflectionpb.ServerReflectionRequest_ListServices{}})
		_, err = rc.Recv()
		return err
	}
	wantCode(t, "reflection without a key", list(ctx), codes.Unauthenticated)
	if err := list(as(ctx, testKeys["alice"])); err != nil {
		t.Fatalf("reflection with a user key: %v", err)
	}
}

// TestAPIKeyUserRole: a user key generates and calls the read-only
// methods; ExpertLoad and Drain are PERMISSION_DENIED naming the method
// and the role; an admin key reaches them.
func TestAPIKeyUserRole(t *testing.T) {
	addr := serveAuth(t, authCoordinator(t), &PublicAuth{Keys: writeTestKeys(t)}, nil)
	gc := pb.NewGeneratorClient(plainConn(t, addr))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	user, admin := as(ctx, testKeys["alice"]), as(ctx, testKeys["root"])
	res, err := authGenerate(user, gc, authIDsReq([]int32{1, 2, 3}, 5))
	if err != nil || len(res.ids) != 5 || res.finish != "length" {
		t.Fatalf("user Generate: %+v %v", res, err)
	}
	if mi, err := gc.GetModelInfo(user, &pb.GetModelInfoRequest{}); err != nil || mi.VocabSize == 0 {
		t.Fatalf("user GetModelInfo: %v %v", mi, err)
	}
	if h, err := gc.HealthCheck(user, &pb.HealthCheckRequest{}); err != nil || !h.Healthy {
		t.Fatalf("user HealthCheck: %v %v", h, err)
	}
	// This model has no tokenizer: refused by the method, not by auth.
	_, err = gc.Tokenize(user, &pb.TokenizeRequest{Input: &pb.TokenizeRequest_Text{Text: "hi"}})
	wantCode(t, "user Tokenize", err, codes.FailedPrecondition)
	if a, err := gc.Abort(user, &pb.AbortRequest{RequestId: "none"}); err != nil || a.Found {
		t.Fatalf("user Abort of nothing: %v %v", a, err)
	}
	_, err = gc.Drain(user, &pb.DrainRequest{WorkerId: secretWorkerID})
	wantCode(t, "user Drain", err, codes.PermissionDenied, pb.Generator_Drain_FullMethodName, "admin", `"alice"`)
	_, err = gc.ExpertLoad(user, &pb.ExpertLoadRequest{Rebalance: true})
	wantCode(t, "user ExpertLoad rebalance", err, codes.PermissionDenied, pb.Generator_ExpertLoad_FullMethodName, "admin")
	_, err = gc.ExpertLoad(user, &pb.ExpertLoadRequest{})
	wantCode(t, "user ExpertLoad", err, codes.PermissionDenied, "admin")
	// An admin gets past auth: the methods' own checks answer.
	_, err = gc.Drain(admin, &pb.DrainRequest{})
	wantCode(t, "admin Drain", err, codes.InvalidArgument, "worker_id")
	_, err = gc.ExpertLoad(admin, &pb.ExpertLoadRequest{})
	wantCode(t, "admin ExpertLoad", err, codes.FailedPrecondition, "no experts")
	if _, err := authGenerate(admin, gc, authIDsReq([]int32{1, 2, 3}, 2)); err != nil {
		t.Fatalf("admin Generate: %v", err)
	}
}

// TestAPIKeyRequestOwnership: a user key aborts (and resumes) only its own
// requests; another user's is PERMISSION_DENIED, and its id cannot be
// taken; an admin aborts any.
func TestAPIKeyRequestOwnership(t *testing.T) {
	addr := serveAuth(t, authCoordinator(t), &PublicAuth{Keys: writeTestKeys(t)}, nil)
	gc := pb.NewGeneratorClient(plainConn(t, addr))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	alice, bob, root := as(ctx, testKeys["alice"]), as(ctx, testKeys["bob"]), as(ctx, testKeys["root"])

	a1 := startRunning(t, gc, testKeys["alice"], longReq("alice-1"))
	_, err := gc.Abort(bob, &pb.AbortRequest{RequestId: "alice-1"})
	wantCode(t, "bob aborts alice's", err, codes.PermissionDenied, "alice-1", "own requests")
	resume := longReq("alice-1")
	resume.Resume = &pb.Resume{TokenIds: []int32{7, 7}}
	wantCode(t, "bob resumes alice's", genErr(bob, gc, resume), codes.PermissionDenied, "alice-1")
	wantCode(t, "bob reuses alice's id", genErr(bob, gc, longReq("alice-1")), codes.AlreadyExists)
	// Alice's request ran on through all that, and an admin aborts it.
	if ab, err := gc.Abort(root, &pb.AbortRequest{RequestId: "alice-1"}); err != nil || !ab.Found {
		t.Fatalf("admin aborts alice's: %v %v", ab, err)
	}
	if f, err := a1.finish(); err != nil || f != "abort" {
		t.Fatalf("alice's stream after the admin's abort: %q %v", f, err)
	}
	// Alice aborts her own.
	a2 := startRunning(t, gc, testKeys["alice"], longReq("alice-2"))
	if ab, err := gc.Abort(alice, &pb.AbortRequest{RequestId: "alice-2"}); err != nil || !ab.Found {
		t.Fatalf("alice aborts her own: %v %v", ab, err)
	}
	if f, err := a2.finish(); err != nil || f != "abort" {
		t.Fatalf("alice's own abort: %q %v", f, err)
	}
	// An id that ended is free for anyone.
	authWaitFor(t, 5*time.Second, "alice-2 released", func() error {
		_, err := authGenerate(bob, gc, &pb.GenerateRequest{RequestId: "alice-2", Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: []int32{1}}},
			MaxTokens: authPtr(int32(2)), IgnoreEos: true})
		return err
	})
	// Alice resumes her own running request: it replaces the old stream.
	a3 := startRunning(t, gc, testKeys["alice"], longReq("alice-3"))
	resume = longReq("alice-3")
	resume.MaxTokens = authPtr(int32(4))
	resume.Resume = &pb.Resume{TokenIds: []int32{7}}
	if res, err := authGenerate(alice, gc, resume); err != nil || len(res.ids) != 3 {
		t.Fatalf("alice resumes her own: %+v %v", res, err)
	}
	if f, err := a3.finish(); err != nil || f != "abort" {
		t.Fatalf("the resumed stream: %q %v", f, err)
	}
}

// TestAPIKeyStreamLimit: a key's max_streams bounds its open Generate
// streams (RESOURCE_EXHAUSTED naming the limit); other keys are not
// counted against it; a resume of its own running request takes that
// request's slot; a slot frees when its stream ends.
func TestAPIKeyStreamLimit(t *testing.T) {
	addr := serveAuth(t, authCoordinator(t), &PublicAuth{Keys: writeTestKeys(t), MaxStreamsPerKey: 2}, nil)
	gc := pb.NewGeneratorClient(plainConn(t, addr))
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	lim := as(ctx, testKeys["limited"])
	r1 := startRunning(t, gc, testKeys["limited"], longReq("lim-1"))
	wantCode(t, "second stream", genErr(lim, gc, longReq("lim-2")), codes.ResourceExhausted, `"limited"`, "max_streams 1")
	// Alice has the default limit of 2.
	startRunning(t, gc, testKeys["alice"], longReq("al-1"))
	a2 := startRunning(t, gc, testKeys["alice"], longReq("al-2"))
	wantCode(t, "alice's third stream", genErr(as(ctx, testKeys["alice"]), gc, longReq("al-3")), codes.ResourceExhausted, "max_streams 2")
	a2.cancel()
	// A resume of lim-1 replaces it, within the limit.
	resume := longReq("lim-1")
	resume.MaxTokens = authPtr(int32(3))
	resume.Resume = &pb.Resume{TokenIds: []int32{7}}
	if res, err := authGenerate(lim, gc, resume); err != nil || len(res.ids) != 2 {
		t.Fatalf("resume at the limit: %+v %v", res, err)
	}
	if f, err := r1.finish(); err != nil || f != "abort" {
		t.Fatalf("the resumed stream: %q %v", f, err)
	}
	authWaitFor(t, 5*time.Second, "a free slot", func() error {
		_, err := authGenerate(lim, gc, authIDsReq([]int32{1, 2}, 2))
		return err
	})
	authWaitFor(t, 5*time.Second, "alice's slot back", func() error {
		_, err := authGenerate(as(ctx, testKeys["alice"]), gc, authIDsReq([]int32{1, 2}, 2))
		return err
	})
}

// TestServerInfoRedaction: a user key's GetServerInfo has no worker
// address, metrics address, pid, host, worker id, model path or etcd
// endpoint, and names each worker by the same alias in the workers and the
// placement; an admin's has them all. Both say the security mode.
func TestServerInfoRedaction(t *testing.T) {
	c := authCoordinator(t)
	addr := serveAuth(t, c, &PublicAuth{Keys: writeTestKeys(t)}, nil)
	gc := pb.NewGeneratorClient(plainConn(t, addr))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	secrets := []string{secretWorkerID, secretWorkerAddr, secretMetrics, secretHost, "4242", secretEtcd, "10.77", "10.66", c.opts.ModelDir}
	info, err := gc.GetServerInfo(as(ctx, testKeys["alice"]), &pb.GetServerInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	js := protojson.Format(info)
	for _, s := range secrets {
		if strings.Contains(js, s) {
			t.Errorf("the user's ServerInfo shows %q:\n%s", s, js)
		}
	}
	if len(info.Workers) != 1 || info.Workers[0].State != "ready" || info.Workers[0].Backend != "cpu" || !strings.HasPrefix(info.Workers[0].Id, "w-") {
		t.Fatalf("user's workers: %v", info.Workers)
	}
	alias := info.Workers[0].Id
	if r := info.Placement.GetReplicas(); len(r) != 1 || r[0].Workers[0] != alias || r[0].Stages[0].Workers[0] != alias || info.Placement.Model != c.opts.ModelName {
		t.Fatalf("user's placement: %v (worker alias %s)", info.Placement, alias)
	}
	if info.Security != "tls" || !info.Ready || info.Scheduler == nil || !info.Leader {
		t.Fatalf("user's info: %v", info)
	}
	again, _ := gc.GetServerInfo(as(ctx, testKeys["bob"]), &pb.GetServerInfoRequest{})
	if again.GetWorkers()[0].Id != alias {
		t.Fatalf("alias not stable: %s then %s", alias, again.GetWorkers()[0].Id)
	}
	full, err := gc.GetServerInfo(as(ctx, testKeys["root"]), &pb.GetServerInfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	js = protojson.Format(full)
	for _, s := range secrets {
		if !strings.Contains(js, s) {
			t.Errorf("the admin's ServerInfo lacks %q:\n%s", s, js)
		}
	}
	// The redaction did not touch the coordinator's own placement.
	if c.placement.Replicas[0].Workers[0] != secretWorkerID {
		t.Fatalf("the coordinator's placement was changed: %v", c.placement.Replicas[0].Workers)
	}
}

// TestNoAuthUnchanged: without keys nothing is asked for, every caller is
// an admin: the full ServerInfo, Drain reaches its handler, any request
// can be aborted.
func TestNoAuthUnchanged(t *testing.T) {
	if opts := AuthServerOptions(nil); opts != nil {
		t.Fatalf("AuthServerOptions(nil): %d options", len(opts))
	}
	if opts := AuthServerOptions(&PublicAuth{}); opts != nil {
		t.Fatalf("AuthServerOptions without keys: %d options", len(opts))
	}
	addr := serveAuth(t, authCoordinator(t), nil, nil)
	gc := pb.NewGeneratorClient(plainConn(t, addr))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	info, err := gc.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
	if err != nil || info.GetWorkers()[0].Address != secretWorkerAddr || info.Security != "tls" {
		t.Fatalf("GetServerInfo without auth: %v %v", info, err)
	}
	_, err = gc.Drain(ctx, &pb.DrainRequest{})
	wantCode(t, "Drain without auth", err, codes.InvalidArgument)
	r := startRunning(t, gc, "", longReq("anon-1"))
	if ab, err := gc.Abort(ctx, &pb.AbortRequest{RequestId: "anon-1"}); err != nil || !ab.Found {
		t.Fatalf("Abort without auth: %v %v", ab, err)
	}
	if f, err := r.finish(); err != nil || f != "abort" {
		t.Fatalf("aborted: %q %v", f, err)
	}
}

// TestAuthDefaults: the caller's limit is the key's max_streams, else
// PublicAuth's default; AdminOnly lists the cluster-changing methods.
func TestAuthDefaults(t *testing.T) {
	a := &PublicAuth{Keys: writeTestKeys(t), MaxStreamsPerKey: 5}
	for name, want := range map[string]Caller{
		"alice":   {Name: "alice", Role: "user", MaxStreams: 5},
		"root":    {Name: "root", Role: "admin", MaxStreams: 5},
		"limited": {Name: "limited", Role: "user", MaxStreams: 1},
	} {
		ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("authorization", "bearer "+testKeys[name]))
		ctx, err := a.authenticate(ctx, pb.Generator_Generate_FullMethodName)
		if err != nil {
			t.Fatal(err)
		}
		if got, ok := CallerFrom(ctx); !ok || got != want {
			t.Fatalf("%s: caller %+v, want %+v", name, got, want)
		}
	}
	var admin []string
	for _, m := range pb.Generator_ServiceDesc.Methods {
		if AdminOnly("/" + pb.Generator_ServiceDesc.ServiceName + "/" + m.MethodName) {
			admin = append(admin, m.MethodName)
		}
	}
	if strings.Join(admin, ",") != "ExpertLoad,Drain" || AdminOnly(pb.Generator_Generate_FullMethodName) || AdminOnly("/grpc.health.v1.Health/Check") ||
		!AdminOnly("/qwenfleet.v1.Generator/SomethingNew") {
		t.Fatalf("admin-only methods: %v", admin)
	}
}

// TestClientTLSAndAPIKey: pkg/client over TLS (the cluster CA's
// coordinator certificate, verified against ca.pem) with an API key
// generates; without the key it is refused UNAUTHENTICATED; a client
// trusting another CA does not connect.
func TestClientTLSAndAPIKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(dir, nil, false); err != nil {
		t.Fatal(err)
	}
	tl, err := security.NewTLS(dir, security.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	addr := serveAuth(t, authCoordinator(t), &PublicAuth{Keys: writeTestKeys(t)}, credentials.NewTLS(tl.ServerConfig(false)))
	tlsCfg, err := client.TLSConfigFromCA(filepath.Join(dir, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	newClient := func(cfg client.Config) *client.Client {
		cfg.Addrs, cfg.RetryTimeout, cfg.MinBackoff, cfg.MaxBackoff = []string{addr}, 300*time.Millisecond, 10*time.Millisecond, 50*time.Millisecond
		c, err := client.New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		return c
	}
	c := newClient(client.Config{TLS: tlsCfg, APIKey: testKeys["alice"]})
	res, err := c.Generate(ctx, authIDsReq([]int32{1, 2, 3}, 4), nil)
	if err != nil || len(res.TokenIDs) != 4 {
		t.Fatalf("Generate over TLS with a key: %v %v", res, err)
	}
	info, err := c.ServerInfo(ctx)
	if err != nil || info.Workers[0].Address != "" {
		t.Fatalf("ServerInfo over TLS as a user: %v %v", info, err)
	}
	// By name too: the certificate is for localhost.
	cl := newClient(client.Config{TLS: tlsCfg, APIKey: testKeys["root"]})
	stub, err := cl.Stub(strings.Replace(addr, "127.0.0.1", "localhost", 1))
	if err != nil {
		t.Fatal(err)
	}
	if info, err := stub.GetServerInfo(ctx, &pb.GetServerInfoRequest{}); err != nil || info.Workers[0].Address != secretWorkerAddr {
		t.Fatalf("ServerInfo over TLS to localhost as an admin: %v %v", info, err)
	}
	_, err = newClient(client.Config{TLS: tlsCfg}).Generate(ctx, authIDsReq([]int32{1, 2, 3}, 4), nil)
	wantCode(t, "Generate over TLS without a key", err, codes.Unauthenticated)
	// Another CA: the handshake fails (UNAVAILABLE, given up).
	other := filepath.Join(t.TempDir(), "other")
	if err := security.WriteCerts(other, nil, false); err != nil {
		t.Fatal(err)
	}
	otherCfg, err := client.TLSConfigFromCA(filepath.Join(other, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	_, err = newClient(client.Config{TLS: otherCfg, APIKey: testKeys["alice"]}).ModelInfo(ctx)
	wantCode(t, "a client trusting another CA", err, codes.Unavailable)
	// Plaintext to a TLS server fails too.
	_, err = newClient(client.Config{APIKey: testKeys["alice"]}).ModelInfo(ctx)
	if err == nil {
		t.Fatal("a plaintext client reached a TLS server")
	}
}

// TestAuthConcurrentAdmits: the ownership and stream counts stay
// consistent under concurrent Generates of one key (run with -race).
func TestAuthConcurrentAdmits(t *testing.T) {
	var o owners
	caller := Caller{Name: "k", Role: "user", MaxStreams: 4}
	var wg sync.WaitGroup
	var mu sync.Mutex
	admitted := 0
	for i := range 32 {
		wg.Go(func() {
			release, err := o.admit(caller, fmt.Sprintf("r%d", i%8), false)
			if err != nil {
				return
			}
			mu.Lock()
			admitted++
			mu.Unlock()
			time.Sleep(time.Millisecond)
			release()
		})
	}
	wg.Wait()
	if len(o.reqs) != 0 || len(o.streams) != 0 || admitted == 0 {
		t.Fatalf("after all released: %d reqs, %d keys counted, %d admitted", len(o.reqs), len(o.streams), admitted)
	}
}
