package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// waCerts writes a cluster CA and its role certificates into a fresh
// directory.
func waCerts(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(dir, nil, false); err != nil {
		t.Fatal(err)
	}
	return dir
}

func waTLS(t *testing.T, dir string, role security.Role) *security.TLS {
	t.Helper()
	st, err := security.NewTLS(dir, role)
	if err != nil {
		t.Fatal(err)
	}
	return st
}

// waServe serves w on 127.0.0.1 with the worker certificate of dir,
// client certificates required.
func waServe(t *testing.T, w *WorkerService, dir string) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	creds := credentials.NewTLS(waTLS(t, dir, security.RoleWorker).ServerConfig(true))
	gs := grpc.NewServer(append(PeerServerOptions(w.opts.Peer), grpc.Creds(creds), grpc.MaxRecvMsgSize(256<<20))...)
	workerv1.RegisterWorkerServer(gs, w)
	go gs.Serve(lis)
	t.Cleanup(gs.Stop)
	return lis.Addr().String()
}

// waDial is a client of the worker at addr with the certificate of role
// from dir; claim, when set, is put on every call as the leader claim.
func waDial(t *testing.T, dir string, role security.Role, addr, claim string) workerv1.WorkerClient {
	t.Helper()
	opts := []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(waTLS(t, dir, role).ClientConfig("")))}
	if claim != "" {
		opts = append(opts, leaderInterceptors(claim)...)
	}
	conn, err := grpc.NewClient(addr, opts...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return workerv1.NewWorkerClient(conn)
}

func waWant(t *testing.T, what string, err error, code codes.Code, msg string) {
	t.Helper()
	if status.Code(err) != code || !strings.Contains(fmt.Sprint(err), msg) {
		t.Fatalf("%s: %v; want %v containing %q", what, err, code, msg)
	}
}

// waLoad runs a Load call to its end.
func waLoad(ctx context.Context, c workerv1.WorkerClient, req *workerv1.LoadRequest) error {
	s, err := c.Load(ctx, req)
	if err != nil {
		return err
	}
	for {
		if _, err := s.Recv(); err == io.EOF {
			return nil
		} else if err != nil {
			return err
		}
	}
}

// waModelRoot copies the tiny dense model into root/<name>.
func waModelRoot(t *testing.T, name string) (root, dir string) {
	t.Helper()
	root = t.TempDir()
	dir = filepath.Join(root, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	src := fuzzRefDir("dense-gqa-f32")
	for _, f := range []string{"config.json", "model.safetensors"} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err == nil {
			err = os.WriteFile(filepath.Join(dir, f), b, 0o644)
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	return root, dir
}

func waLeader(v string) *LeaderView {
	lv := NewLeaderView(nil)
	lv.Observe(v, 1)
	return lv
}

// TestWorkerAuthRoles: a client certificate may call nothing (Release,
// Info, Health); a worker certificate no coordinator call; a coordinator
// certificate the informational calls, and the leader's calls only with
// the leader's claim; a certificate of another CA does not connect.
func TestWorkerAuthRoles(t *testing.T) {
	dir, other := waCerts(t), waCerts(t)
	w := NewWorkerService(WorkerOptions{ID: "w", Auth: &WorkerAuth{RequireCerts: true, Leader: waLeader("leader:1"), StoredOnly: true}})
	addr := waServe(t, w, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	client := waDial(t, dir, security.RoleClient, addr, "leader:1")
	_, err := client.Release(ctx, &workerv1.ReleaseRequest{SeqIds: []uint64{1}})
	waWant(t, "client Release", err, codes.PermissionDenied, "Release needs a coordinator certificate (the caller presents a client certificate)")
	_, err = client.Info(ctx, &workerv1.InfoRequest{})
	waWant(t, "client Info", err, codes.PermissionDenied, "needs a coordinator certificate")
	_, err = client.Health(ctx, &workerv1.HealthRequest{})
	waWant(t, "client Health", err, codes.PermissionDenied, "needs a coordinator certificate")

	peer := waDial(t, dir, security.RoleWorker, addr, "leader:1")
	err = waLoad(ctx, peer, &workerv1.LoadRequest{Version: 1})
	waWant(t, "worker Load", err, codes.PermissionDenied, "Load needs a coordinator certificate")
	_, err = peer.Step(ctx, &workerv1.StepRequest{})
	waWant(t, "worker Step", err, codes.PermissionDenied, "Step needs a coordinator certificate")

	noClaim := waDial(t, dir, security.RoleCoordinator, addr, "")
	if _, err := noClaim.Info(ctx, &workerv1.InfoRequest{}); err != nil {
		t.Fatalf("coordinator Info: %v", err)
	}
	if _, err := noClaim.Health(ctx, &workerv1.HealthRequest{}); err != nil {
		t.Fatalf("coordinator Health: %v", err)
	}
	_, err = noClaim.ExpertLoad(ctx, &workerv1.ExpertLoadRequest{})
	waWant(t, "coordinator ExpertLoad", err, codes.FailedPrecondition, "no model loaded") // past the check
	_, err = noClaim.Release(ctx, &workerv1.ReleaseRequest{})
	waWant(t, "Release without a claim", err, codes.PermissionDenied, "not the leader: the Release call claims no leadership")

	// A coordinator's own client (dialWorker) claims its address.
	co := &Coordinator{opts: CoordinatorOptions{Addr: "leader:1", WorkerCreds: credentials.NewTLS(waTLS(t, dir, security.RoleCoordinator).ClientConfig(""))}}
	conn, err := co.dialWorker(addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	_, err = workerv1.NewWorkerClient(conn).Release(ctx, &workerv1.ReleaseRequest{})
	waWant(t, "the leader's Release", err, codes.FailedPrecondition, "no model loaded")
	for _, m := range []func(workerv1.WorkerClient) error{
		func(c workerv1.WorkerClient) error { _, err := c.Drain(ctx, &workerv1.DrainRequest{}); return err },
		func(c workerv1.WorkerClient) error { _, err := c.Leave(ctx, &workerv1.LeaveRequest{}); return err },
		func(c workerv1.WorkerClient) error { _, err := c.Warmup(ctx, &workerv1.WarmupRequest{}); return err },
		func(c workerv1.WorkerClient) error {
			_, err := c.SetExperts(ctx, &workerv1.SetExpertsRequest{})
			return err
		},
	} {
		waWant(t, "a leader call without a claim", m(noClaim), codes.PermissionDenied, "not the leader")
		if err := m(workerv1.NewWorkerClient(conn)); status.Code(err) == codes.PermissionDenied {
			t.Fatalf("a leader call of the leader: %v", err)
		}
	}

	stranger := waDial(t, other, security.RoleCoordinator, addr, "leader:1")
	_, err = stranger.Info(ctx, &workerv1.InfoRequest{})
	waWant(t, "another CA's coordinator", err, codes.Unavailable, "")
}

// TestWorkerAuthLeader: a coordinator that is not the leader the worker
// knows has its Load refused "not the leader"; the leader's Load loads
// its assignment from the store. A leader the view does not know yet is
// accepted once a refresh (one for many calls) reads it; while etcd does
// not answer the view stands.
func TestWorkerAuthLeader(t *testing.T) {
	dir := waCerts(t)
	root, model := waModelRoot(t, "m")
	var refreshes atomic.Int32
	var current atomic.Pointer[string]
	cur := "leader:1"
	current.Store(&cur)
	etcdDown := atomic.Bool{}
	lv := NewLeaderView(func(ctx context.Context) (string, int64, error) {
		refreshes.Add(1)
		if etcdDown.Load() {
			return "", 0, errors.New("etcd: unavailable")
		}
		return *current.Load(), 100 + int64(refreshes.Load()), nil
	})
	lv.Observe("leader:1", 1)
	w := NewWorkerService(WorkerOptions{ID: "w", Threads: 1, Auth: &WorkerAuth{RequireCerts: true, Leader: lv, ModelRoot: root, StoredOnly: true},
		Assignments: func(ctx context.Context, version int64) (*workerv1.Assignment, error) {
			return &workerv1.Assignment{Version: version, Model: model}, nil
		}})
	defer w.Close()
	addr := waServe(t, w, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()

	old := waDial(t, dir, security.RoleCoordinator, addr, "standby:2")
	err := waLoad(ctx, old, &workerv1.LoadRequest{Version: 1})
	waWant(t, "a standby's Load", err, codes.PermissionDenied, "not the leader: Load is refused to standby:2; this worker's leader is leader:1")
	leader := waDial(t, dir, security.RoleCoordinator, addr, "leader:1")
	if err := waLoad(ctx, leader, &workerv1.LoadRequest{Version: 1}); err != nil {
		t.Fatalf("the leader's Load: %v", err)
	}
	if info, err := leader.Info(ctx, &workerv1.InfoRequest{}); err != nil || info.AssignmentVersion != 1 {
		t.Fatalf("Info after the leader's Load: %v, %v", info, err)
	}

	// A new leader, not yet seen by the watch: one refresh for the calls
	// that wait on it, and it is accepted.
	n0 := refreshes.Load()
	next := "leader:3"
	current.Store(&next)
	newLeader := waDial(t, dir, security.RoleCoordinator, addr, "leader:3")
	errs := make(chan error, 8)
	for range 8 {
		go func() {
			_, err := newLeader.Release(ctx, &workerv1.ReleaseRequest{})
			errs <- err
		}()
	}
	for range 8 {
		if err := <-errs; err != nil {
			t.Fatalf("the new leader's Release: %v", err)
		}
	}
	if n := refreshes.Load() - n0; n < 1 || n > 2 {
		t.Fatalf("%d refreshes for 8 calls of a new leader", n)
	}
	// The deposed one is refused now, with no refresh of its own beyond
	// the rate limit.
	deposed := leader
	t0 := time.Now()
	n0 = refreshes.Load()
	for range 5 {
		_, err := deposed.Release(ctx, &workerv1.ReleaseRequest{})
		waWant(t, "the deposed leader's Release", err, codes.PermissionDenied, "not the leader")
	}
	if n, most := refreshes.Load()-n0, int32(time.Since(t0)/leaderRefreshEvery)+1; n > most {
		t.Fatalf("%d refreshes in %v: more than one per %v", n, time.Since(t0), leaderRefreshEvery)
	}
	// etcd away: the view stands (the new leader is accepted, the old
	// refused).
	etcdDown.Store(true)
	_, err = deposed.Release(ctx, &workerv1.ReleaseRequest{})
	waWant(t, "the deposed leader's Release in an outage", err, codes.PermissionDenied, "not the leader")
	if _, err := newLeader.Release(ctx, &workerv1.ReleaseRequest{}); err != nil {
		t.Fatalf("the leader's Release in an outage: %v", err)
	}
	// An older watch report does not undo what a refresh read.
	lv.Observe("leader:1", 2)
	if got := lv.Leader(); got != "leader:3" {
		t.Fatalf("an old report replaced the leader: %q", got)
	}
}

// TestWorkerModelRoot: a model path outside --model-root is refused
// (naming assignment.model), the same way whether it exists or not, also
// through a symbolic link under the root; a LoadRequest carrying its
// assignment is refused when assignments come from etcd only.
func TestWorkerModelRoot(t *testing.T) {
	root, _ := waModelRoot(t, "m")
	_, outside := waModelRoot(t, "elsewhere")
	if err := os.Symlink(outside, filepath.Join(root, "link")); err != nil {
		t.Fatal(err)
	}
	var path string
	w := NewWorkerService(WorkerOptions{ID: "w", Threads: 1, Auth: &WorkerAuth{ModelRoot: root, StoredOnly: true},
		Assignments: func(ctx context.Context, version int64) (*workerv1.Assignment, error) {
			return &workerv1.Assignment{Version: version, Model: path}, nil
		}})
	defer w.Close()
	ctx := context.Background()
	refusal := func(p string) string {
		path = p
		err := w.Load(&workerv1.LoadRequest{Version: 1}, loadSink{ctx: ctx})
		waWant(t, "Load of "+p, err, codes.PermissionDenied, "assignment.model: ")
		return strings.Replace(status.Convert(err).Message(), fmt.Sprintf("%q", p), "PATH", 1)
	}
	exists := refusal(outside)
	for _, p := range []string{filepath.Join(outside, "nope"), filepath.Join(root, "link"), filepath.Join(root, "..", filepath.Base(filepath.Dir(outside))),
		filepath.Join(root, "nope"), "/etc", "relative/nope"} {
		if got := refusal(p); got != exists {
			t.Fatalf("refusals differ: %q for %s, %q for an existing path outside", got, p, exists)
		}
	}
	path = filepath.Join(root, "m", ".", "..", "m")
	if err := w.Load(&workerv1.LoadRequest{Version: 1}, loadSink{ctx: ctx}); err != nil {
		t.Fatalf("Load of a model under the root: %v", err)
	}
	err := w.Load(&workerv1.LoadRequest{Assignment: &workerv1.Assignment{Version: 2, Model: filepath.Join(root, "m")}}, loadSink{ctx: ctx})
	waWant(t, "Load with an assignment", err, codes.PermissionDenied, "from the placement in etcd only")
}

// TestExchangeSecret: Exchange takes streams of worker certificates
// presenting the secret of the generation the worker holds; no secret, a
// wrong one, a coordinator certificate, or a worker without an assignment
// is refused.
func TestExchangeSecret(t *testing.T) {
	dir := waCerts(t)
	w := NewWorkerService(WorkerOptions{ID: "w", Auth: &WorkerAuth{RequireCerts: true, Leader: waLeader("leader:1")}})
	addr := waServe(t, w, dir)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	secret := newSecret()
	workerCreds := credentials.NewTLS(waTLS(t, dir, security.RoleWorker).ClientConfig(""))
	send := func(creds credentials.TransportCredentials, secret string) error {
		p, err := dialPeers(&workerv1.Assignment{Version: 7, TpRank: 1, TpSize: 2, TpPeers: []string{addr, addr}, Secret: secret}, PeerConfig{Creds: creds})
		if err != nil {
			t.Fatal(err)
		}
		defer p.close()
		req := &workerv1.ExchangeRequest{Version: 7, StepId: 1, Kind: kindAllReduce, FromRank: 1, Data: make([]byte, 8)}
		for range 3 { // the refusal shows on a later send, or on closing
			if err := p.tp[0].send(ctx, req); err != nil {
				return err
			}
			req.Index++
		}
		_, err = p.tp[0].stream.CloseAndRecv()
		return err
	}
	waWant(t, "Exchange to a worker without an assignment", send(workerCreds, secret), codes.PermissionDenied, "holds no assignment")

	w.mu.Lock()
	w.assign, w.version = &workerv1.Assignment{Version: 7, TpRank: 0, TpSize: 2, TpPeers: []string{addr, addr}, Secret: secret}, 7
	w.mu.Unlock()
	waWant(t, "Exchange without the secret", send(workerCreds, ""), codes.PermissionDenied, "does not present the secret of generation 7")
	waWant(t, "Exchange with another secret", send(workerCreds, newSecret()), codes.PermissionDenied, "does not present the secret")
	coordCreds := credentials.NewTLS(waTLS(t, dir, security.RoleCoordinator).ClientConfig(""))
	waWant(t, "Exchange of a coordinator", send(coordCreds, secret), codes.PermissionDenied, "Exchange needs a worker certificate")
	if err := send(workerCreds, secret); err != nil {
		t.Fatalf("Exchange with the secret: %v", err)
	}
	for i := range int32(3) {
		b, err := w.box.take(ctx, mailKey{7, 1, kindAllReduce, i, 1})
		if err != nil || len(b) != 8 {
			t.Fatalf("message %d: %d bytes, %v", i, len(b), err)
		}
	}
	// A rank the assignment does not have.
	p, err := dialPeers(&workerv1.Assignment{Version: 7, TpRank: 1, TpSize: 2, TpPeers: []string{addr, addr}, Secret: secret}, PeerConfig{Creds: workerCreds})
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	err = p.tp[0].send(ctx, &workerv1.ExchangeRequest{Version: 7, StepId: 1, Kind: kindAllReduce, FromRank: 5, Data: make([]byte, 8)})
	if err == nil {
		_, err = p.tp[0].stream.CloseAndRecv()
	}
	waWant(t, "a message from rank 5", err, codes.InvalidArgument, "from_rank")
}

// TestMailboxBounds: one sender's messages past its bound (entries or
// bytes) are refused RESOURCE_EXHAUSTED and dropped, while another
// sender's still land; taking a message frees its room. The bounds sized
// from an assignment hold what the coordinator's traffic leaves waiting.
func TestMailboxBounds(t *testing.T) {
	var box mailbox
	box.setLimit(mailLimit{bytes: 100, entries: 3})
	put := func(from int32, idx int32, n int) error {
		return box.put(mailKey{1, 1, kindAllReduce, idx, from}, make([]byte, n))
	}
	for i := range int32(3) {
		if err := put(1, i, 8); err != nil {
			t.Fatal(err)
		}
	}
	if err := put(1, 3, 8); !errors.Is(err, errMailFull) {
		t.Fatalf("a 4th message of rank 1: %v", err)
	}
	if err := put(2, 0, 96); err != nil {
		t.Fatalf("rank 2 held up by rank 1: %v", err)
	}
	if err := put(2, 1, 8); !errors.Is(err, errMailFull) {
		t.Fatalf("rank 2 past 100 bytes: %v", err)
	}
	if len(box.boxes) != 4 {
		t.Fatalf("%d letters kept; refused messages must leave none", len(box.boxes))
	}
	if _, err := box.take(context.Background(), mailKey{1, 1, kindAllReduce, 0, 1}); err != nil {
		t.Fatal(err)
	}
	if err := put(1, 3, 8); err != nil {
		t.Fatalf("after a take: %v", err)
	}
	box.keepOnly(2)
	if len(box.used) != 0 || len(box.boxes) != 0 {
		t.Fatalf("after keepOnly: %d senders charged, %d letters", len(box.used), len(box.boxes))
	}

	// Sized from an assignment: pp stages in flight plus the slack, of a
	// step of 512 tokens of width 896.
	l := mailLimits(2, 512, 896, PeerConfig{})
	msg := int64(4 * (512*897 + 1))
	if l.bytes != 10*msg || l.entries != 40 {
		t.Fatalf("mailLimits = %+v", l)
	}
	if l := mailLimits(1, 0, 0, PeerConfig{MailBytes: 5, MailEntries: 6}); l != (mailLimit{5, 6}) {
		t.Fatalf("configured mailLimits = %+v", l)
	}

	// Over gRPC: the sender is told, and its stream ends.
	dir := waCerts(t)
	w := NewWorkerService(WorkerOptions{ID: "w", Peer: PeerConfig{MailEntries: 2}, Auth: &WorkerAuth{RequireCerts: true}})
	addr := waServe(t, w, dir)
	secret := newSecret()
	w.mu.Lock()
	w.setPeers(&workerv1.Assignment{Version: 3, TpSize: 2, TpPeers: []string{addr, addr}, Secret: secret}) //nolint:errcheck
	w.version = 3
	w.mu.Unlock()
	defer w.closePeers()
	p, err := dialPeers(&workerv1.Assignment{Version: 3, TpRank: 1, TpSize: 2, TpPeers: []string{addr, addr}, Secret: secret},
		PeerConfig{Creds: credentials.NewTLS(waTLS(t, dir, security.RoleWorker).ClientConfig(""))})
	if err != nil {
		t.Fatal(err)
	}
	defer p.close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for i := range int32(4) {
		if err = p.tp[0].send(ctx, &workerv1.ExchangeRequest{Version: 3, StepId: 1, Index: i, FromRank: 1, Data: make([]byte, 4)}); err != nil {
			break
		}
	}
	if err == nil {
		_, err = p.tp[0].stream.CloseAndRecv()
	}
	waWant(t, "a third message waiting", err, codes.ResourceExhausted, "past the bound of 2 messages")
}

// TestStepBounds: Warmup refuses a pool beyond the worker's memory
// (naming num_blocks or kv_cache_bytes); Step refuses more tokens than the
// warm-up's max_step_tokens (or pool), a block table longer than the pool,
// a step id taken already or outside the window of expected ids.
func TestStepBounds(t *testing.T) {
	_, dir := waModelRoot(t, "m")
	w := NewWorkerService(WorkerOptions{ID: "w", Threads: 1, MemoryBytes: 64 << 20})
	defer w.Close()
	ctx := context.Background()
	if err := w.Load(&workerv1.LoadRequest{Assignment: &workerv1.Assignment{Version: 1, Model: dir}}, loadSink{ctx: ctx}); err != nil {
		t.Fatal(err)
	}
	_, err := w.Warmup(ctx, &workerv1.WarmupRequest{BlockSize: 4, NumBlocks: 1 << 40})
	waWant(t, "Warmup of 2^40 blocks", err, codes.InvalidArgument, "num_blocks: ")
	_, err = w.Warmup(ctx, &workerv1.WarmupRequest{BlockSize: 4, KvCacheBytes: 1 << 40})
	waWant(t, "Warmup of 1 TiB", err, codes.InvalidArgument, "kv_cache_bytes: ")
	if _, err := w.Warmup(ctx, &workerv1.WarmupRequest{BlockSize: 4, NumBlocks: 16, MaxStepTokens: 8}); err != nil {
		t.Fatal(err)
	}
	seq := func(id uint64, n int, blocks int) *workerv1.SeqStep {
		s := &workerv1.SeqStep{SeqId: id, Tokens: make([]int32, n), Sample: true, TopN: 1}
		for i := range blocks {
			s.BlockTable = append(s.BlockTable, int32(i))
		}
		return s
	}
	step := func(id uint64, seqs ...*workerv1.SeqStep) error {
		_, err := w.Step(ctx, &workerv1.StepRequest{StepId: id, AssignmentVersion: 1, Seqs: seqs})
		w.Release(ctx, &workerv1.ReleaseRequest{SeqIds: []uint64{1, 2, 3}}) //nolint:errcheck
		return err
	}
	if err := step(0, seq(1, 8, 2)); err != nil {
		t.Fatalf("a step of 8 tokens: %v", err)
	}
	waWant(t, "9 tokens", step(0, seq(1, 5, 2), seq(2, 4, 1)), codes.InvalidArgument, "seqs: 9 tokens in one step; this worker takes at most 8")
	waWant(t, "a long block table", step(0, seq(1, 1, 17)), codes.InvalidArgument, "seqs[0].block_table: 17 blocks; the KV pool holds 16")
	for id := uint64(1); id <= 3; id++ {
		if err := step(id, seq(1, 1, 1)); err != nil {
			t.Fatalf("step %d: %v", id, err)
		}
	}
	waWant(t, "step 2 again", step(2, seq(1, 1, 1)), codes.InvalidArgument, "step_id: step 2 ran here already")
	waWant(t, "a step far ahead", step(3+stepIDWindow+1, seq(1, 1, 1)), codes.InvalidArgument, "step_id: 260 is outside [1, 259]")
	// A warm-up starts the ids over.
	if _, err := w.Warmup(ctx, &workerv1.WarmupRequest{BlockSize: 4, NumBlocks: 16}); err != nil {
		t.Fatal(err)
	}
	if err := step(1, seq(1, 16, 4)); err != nil {
		t.Fatalf("step 1 after a warm-up (16 tokens: the pool bounds them): %v", err)
	}
	var sw stepWindow
	for id := uint64(1); id <= 1000; id++ {
		if err := sw.take(id); err != nil {
			t.Fatal(err)
		}
	}
	if err := sw.take(1000 - stepIDWindow); err == nil {
		t.Fatal("a step older than the window was taken")
	}
	if err := sw.take(1000 - stepIDWindow + 1); err == nil {
		t.Fatal("a step taken already (within the window) was taken again")
	}
}

// TestPlacementSecrets: the placement writer gives each generation a
// random secret, keeps it in later writes, adopts the stored ones, and
// forgets those of dropped generations; the worker's assignment carries
// it.
func TestPlacementSecrets(t *testing.T) {
	w := &placementWriter{}
	w.adopt(map[int64]string{3: "stored"})
	doc := schema.Placement{Model: "/m", Replicas: []schema.Replica{
		{Generation: 3, Stages: []schema.Stage{{Ranks: []schema.Rank{{Worker: "a", Addr: "a:1"}}}}},
		{Generation: 4, Stages: []schema.Stage{{Ranks: []schema.Rank{{Worker: "b", Addr: "b:1"}, {Worker: "c", Addr: "c:1"}}}}},
	}}
	d1 := w.withSecrets(doc)
	if doc.Replicas[1].Secret != "" {
		t.Fatal("withSecrets changed the machine's document")
	}
	if d1.Replicas[0].Secret != "stored" || len(d1.Replicas[1].Secret) != 64 {
		t.Fatalf("secrets %q, %q", d1.Replicas[0].Secret, d1.Replicas[1].Secret)
	}
	d2 := w.withSecrets(doc)
	if d2.Replicas[1].Secret != d1.Replicas[1].Secret {
		t.Fatal("a generation's secret changed between writes")
	}
	doc.Replicas = doc.Replicas[1:]
	w.withSecrets(doc)
	if _, ok := w.secrets[3]; ok {
		t.Fatal("a dropped generation's secret kept")
	}
	if s := newSecret(); s == d1.Replicas[1].Secret || len(s) != 64 {
		t.Fatalf("newSecret %q", s)
	}
	a, err := assignmentOf(d2.Encode(), 9, "c", 4)
	if err != nil || a.Secret != d2.Replicas[1].Secret || a.TpRank != 1 {
		t.Fatalf("assignmentOf: %v, %v", a, err)
	}
}

// TestNotTheLeaderRecognised: a worker's "not the leader" refusal, as the
// replica's executor wraps it, is recognised (the coordinator then asks
// etcd who leads: checkLeadership), and a certificate refusal is not it.
func TestNotTheLeaderRecognised(t *testing.T) {
	err := fmt.Errorf("worker w: %w", status.Error(codes.PermissionDenied, "not the leader: Step is refused to a:1; this worker's leader is b:1"))
	if !notTheLeader(err) {
		t.Fatal("not recognised")
	}
	if notTheLeader(status.Error(codes.PermissionDenied, "Step needs a coordinator certificate")) {
		t.Fatal("a certificate refusal taken for another leader")
	}
}

// TestLeaderViewWatch: a view following a real election knows no leader
// before it watches, then the leader; a new leader's claim is accepted as
// soon as it is elected (by the watch or a refresh), the old one's refused.
func TestLeaderViewWatch(t *testing.T) {
	e, err := cluster.StartEmbeddedEtcd(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	store, err := cluster.Connect(ctx, e.Endpoints(), "/wa/")
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	a, err := store.Campaign(ctx, "a:1", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	lv := NewLeaderView(nil)
	if lv.is(ctx, "a:1") {
		t.Fatal("a view that does not watch accepted a claim")
	}
	lv.Watch(ctx, store)
	if !lv.is(ctx, "a:1") || lv.is(ctx, "b:2") {
		t.Fatalf("leader a: the view says %q", lv.Leader())
	}
	if err := a.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	b, err := store.Campaign(ctx, "b:2", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer b.Resign(ctx) //nolint:errcheck
	if !lv.is(ctx, "b:2") || lv.is(ctx, "a:1") {
		t.Fatalf("leader b: the view says %q", lv.Leader())
	}
}

// TestTLSReplica: a tensor-parallel replica of two workers with every
// check on (TLS with client certificates, leader claims, assignments from
// the placement only, a model root, Exchange secrets): the coordinator's
// own client loads it from the stored placement, warms it up and runs
// numbered steps whose tokens are a whole model's; a standby coordinator's
// step is refused "not the leader", which the coordinator takes for
// another leader's proof.
func TestTLSReplica(t *testing.T) {
	dir := waCerts(t)
	root, model := waModelRoot(t, "m")
	workerCreds := credentials.NewTLS(waTLS(t, dir, security.RoleWorker).ClientConfig(""))
	var doc schema.Placement
	var svcs []*WorkerService
	var addrs []string
	for i := range 2 {
		id := fmt.Sprintf("w%d", i)
		w := NewWorkerService(WorkerOptions{ID: id, Threads: 1, Peer: PeerConfig{Creds: workerCreds},
			Auth: &WorkerAuth{RequireCerts: true, Leader: waLeader("co:1"), ModelRoot: root, StoredOnly: true},
			Assignments: func(ctx context.Context, version int64) (*workerv1.Assignment, error) {
				return assignmentOf(doc.Encode(), 1, id, version)
			}})
		t.Cleanup(w.Close)
		t.Cleanup(w.closePeers)
		svcs = append(svcs, w)
		addrs = append(addrs, waServe(t, w, dir))
	}
	pw := &placementWriter{}
	doc = pw.withSecrets(schema.Placement{Model: model, LastGeneration: 1, Replicas: []schema.Replica{{Generation: 1, TP: 2, PP: 1, LayersEnd: 3,
		Workers: []string{"w0", "w1"}, Stages: []schema.Stage{{LayersEnd: 3, Ranks: []schema.Rank{{Worker: "w0", Addr: addrs[0]}, {Worker: "w1", Addr: addrs[1]}}}}}}})

	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	coordinator := func(addr string) (*Coordinator, *replicaRT) {
		co := &Coordinator{log: slog.New(slog.DiscardHandler), opts: CoordinatorOptions{Addr: addr, BlockSize: 4,
			Scheduler:   routing.SchedulerConfig{MaxBatchTokens: 16, MaxRunning: 4},
			WorkerCreds: credentials.NewTLS(waTLS(t, dir, security.RoleCoordinator).ClientConfig(""))}}
		rt := &replicaRT{gen: 1, tp: 2, pp: 1, ctx: ctx}
		for i, a := range addrs {
			conn, err := co.dialWorker(a)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { conn.Close() })
			rt.members = append(rt.members, &member{id: fmt.Sprintf("w%d", i), addr: a, rank: i, conn: conn, client: workerv1.NewWorkerClient(conn)})
		}
		return co, rt
	}
	co, rt := coordinator("co:1")
	if err := forEach(rt.members, func(m *member) error { return co.load(ctx, rt, m) }); err != nil {
		t.Fatal(err)
	}
	blocks, err := co.warmup(rt)
	if err != nil || blocks < 8 {
		t.Fatalf("warmup: %d blocks, %v", blocks, err)
	}
	if svcs[0].stepTokens != 16 {
		t.Fatalf("the step bound is %d tokens, want the coordinator's batch budget 16", svcs[0].stepTokens)
	}
	exec := &replicaExecutor{members: rt.members, gen: 1, pp: 1, ranks: 2}

	whole := NewWorkerService(WorkerOptions{ID: "whole", Threads: 1})
	defer whole.Close()
	if err := whole.Load(&workerv1.LoadRequest{Assignment: &workerv1.Assignment{Version: 1, Model: model}}, loadSink{ctx: ctx}); err != nil {
		t.Fatal(err)
	}
	if _, err := whole.Warmup(ctx, &workerv1.WarmupRequest{BlockSize: 4, NumBlocks: 8}); err != nil {
		t.Fatal(err)
	}
	wholeExec := &replicaExecutor{members: []*member{{id: "whole", client: localWorker{w: whole}}}, gen: 1, pp: 1, ranks: 1}

	toks := []int32{5, 17, 300, 42, 7, 99}
	for id := uint64(1); id <= 4; id++ {
		b := &steps.Batch{ID: id, Seqs: []steps.Seq{{ID: 1, Tokens: toks, Start: 0, Blocks: []int32{0, 1, 2, 3}, Sample: true, TopN: 1}}}
		if id > 1 {
			b.Seqs[0].Start, b.Seqs[0].Tokens = len(toks)-1, toks[len(toks)-1:]
		}
		got, err := exec.Step(ctx, b)
		if err != nil {
			t.Fatalf("step %d over TLS: %v", id, err)
		}
		want, err := wholeExec.Step(ctx, b)
		if err != nil {
			t.Fatal(err)
		}
		if g, w := got.Seqs[0].Candidates[0].ID, want.Seqs[0].Candidates[0].ID; g != w {
			t.Fatalf("step %d: token %d, a whole model's %d", id, g, w)
		}
		toks = append(toks, got.Seqs[0].Candidates[0].ID)
	}

	_, standby := coordinator("standby:2")
	sexec := &replicaExecutor{members: standby.members, gen: 1, pp: 1, ranks: 2}
	_, err = sexec.Step(ctx, &steps.Batch{ID: 5, Seqs: []steps.Seq{{ID: 2, Tokens: []int32{1}, Blocks: []int32{4}, Sample: true, TopN: 1}}})
	if !notTheLeader(err) {
		t.Fatalf("a standby's step: %v, want a refusal \"not the leader\"", err)
	}
	if err := sexec.Release(ctx, []uint64{1}); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a standby's Release: %v", err)
	}
}

// localWorker is a WorkerClient calling a service in-process (Step only).
type localWorker struct {
	workerv1.WorkerClient
	w *WorkerService
}

func (l localWorker) Step(ctx context.Context, req *workerv1.StepRequest, _ ...grpc.CallOption) (*workerv1.StepResponse, error) {
	return l.w.Step(ctx, req)
}
func (l localWorker) Release(ctx context.Context, req *workerv1.ReleaseRequest, _ ...grpc.CallOption) (*workerv1.ReleaseResponse, error) {
	return l.w.Release(ctx, req)
}
