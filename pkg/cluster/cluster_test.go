package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
)

func startEtcd(t *testing.T) *EmbeddedEtcd {
	t.Helper()
	e, err := StartEmbeddedEtcd(t.TempDir())
	if err != nil {
		t.Fatalf("StartEmbeddedEtcd: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

func connect(t *testing.T, e *EmbeddedEtcd) *Store {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	s, err := Connect(ctx, e.Endpoints(), "/test/")
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func testCtx(t *testing.T, d time.Duration) context.Context {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// waitFor polls cond every 50ms until it is true or d passes.
func waitFor(t *testing.T, d time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(d)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", d, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func workerIDs(ws []WorkerInfo) string {
	s := ""
	for i, w := range ws {
		if i > 0 {
			s += ","
		}
		s += w.ID + ":" + w.State
	}
	return s
}

func TestEmbeddedEtcdEndpointsAndClose(t *testing.T) {
	e := startEtcd(t)
	eps := e.Endpoints()
	if len(eps) != 1 || len(eps[0]) < len("http://127.0.0.1:1") || eps[0][:17] != "http://127.0.0.1:" {
		t.Fatalf("Endpoints = %v", eps)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := e.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}

func TestWorkersRegisterListWatch(t *testing.T) {
	e := startEtcd(t)
	s := connect(t, e)
	ctx := testCtx(t, 15*time.Second)

	watch := s.WatchWorkers(ctx)
	next := func(want string) {
		t.Helper()
		select {
		case ws, ok := <-watch:
			if !ok {
				t.Fatal("watch closed")
			}
			if got := workerIDs(ws); got != want {
				t.Fatalf("watch sent %q, want %q", got, want)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no watch update (want %q)", want)
		}
	}
	next("")

	started := time.Now().UTC().Truncate(time.Second)
	wb := WorkerInfo{ID: "w-b", Addr: "127.0.0.1:9002", Backend: "cuda", MemoryBytes: 80 << 30, Devices: 1, PID: 42, Host: "h", State: "starting", Started: started}
	rb, err := s.RegisterWorker(ctx, wb, 5*time.Second)
	if err != nil {
		t.Fatalf("RegisterWorker: %v", err)
	}
	next("w-b:starting")
	ra, err := s.RegisterWorker(ctx, WorkerInfo{ID: "w-a", Addr: "127.0.0.1:9001", State: "ready"}, 5*time.Second)
	if err != nil {
		t.Fatalf("RegisterWorker: %v", err)
	}
	next("w-a:ready,w-b:starting")

	wb.State = "ready"
	if err := rb.Update(ctx, wb); err != nil {
		t.Fatalf("Update: %v", err)
	}
	next("w-a:ready,w-b:ready")

	ws, err := s.ListWorkers(ctx)
	if err != nil {
		t.Fatalf("ListWorkers: %v", err)
	}
	if len(ws) != 2 || ws[0].ID != "w-a" || ws[1].ID != "w-b" {
		t.Fatalf("ListWorkers = %+v", ws)
	}
	if got := ws[1]; got != wb {
		t.Fatalf("round trip: got %+v, want %+v", got, wb)
	}

	// Close revokes the lease: the key is gone at once.
	if err := ra.Close(); err != nil {
		t.Fatalf("Registration.Close: %v", err)
	}
	if err := ra.Close(); err != nil {
		t.Fatalf("second Registration.Close: %v", err)
	}
	next("w-b:ready")
	if ws, _ := s.ListWorkers(ctx); len(ws) != 1 || ws[0].ID != "w-b" {
		t.Fatalf("after Close ListWorkers = %+v", ws)
	}
	if err := ra.Update(ctx, WorkerInfo{ID: "w-a"}); err == nil {
		t.Fatal("Update after Close succeeded")
	}
	if err := rb.Update(ctx, WorkerInfo{ID: "other"}); err == nil {
		t.Fatal("Update with another id succeeded")
	}
	rb.Close()
	next("")
}

func TestWorkerLeaseExpires(t *testing.T) {
	e := startEtcd(t)
	s := connect(t, e)
	worker := connect(t, e) // the worker process's own connection
	ctx := testCtx(t, 15*time.Second)

	r, err := worker.RegisterWorker(ctx, WorkerInfo{ID: "doomed", State: "ready"}, time.Second)
	if err != nil {
		t.Fatalf("RegisterWorker: %v", err)
	}
	registered := time.Now() // the lease was granted before
	// Survives past its TTL while kept alive: the key stays until the lease
	// has lived longer than the TTL etcd granted (which etcd may have
	// raised to its minimum), and the lease is still live then.
	lease, err := s.client.TimeToLive(ctx, r.leaseID())
	if err != nil || lease.GrantedTTL <= 0 {
		t.Fatalf("TimeToLive: %v %+v", err, lease)
	}
	ttl := time.Duration(lease.GrantedTTL) * time.Second
	waitFor(t, ttl+5*time.Second, fmt.Sprintf("the kept-alive worker to outlive its %v lease", ttl), func() bool {
		if ws, err := s.ListWorkers(ctx); err != nil || len(ws) != 1 {
			t.Fatalf("kept-alive worker missing %v after it registered: %v %+v", time.Since(registered), err, ws)
		}
		return time.Since(registered) > ttl+500*time.Millisecond
	})
	if lease, err := s.client.TimeToLive(ctx, r.leaseID()); err != nil || lease.TTL <= 0 {
		t.Fatalf("lease after %v: %v %+v", time.Since(registered), err, lease)
	}
	// Simulate the worker dying: its connection goes away without a revoke.
	start := time.Now()
	worker.Close()
	waitFor(t, 6*time.Second, "expired worker to disappear", func() bool {
		ws, err := s.ListWorkers(ctx)
		return err == nil && len(ws) == 0
	})
	t.Logf("worker key expired %s after its keep-alive stopped", time.Since(start).Round(10*time.Millisecond))
}

func TestPlacementVersions(t *testing.T) {
	e := startEtcd(t)
	s := connect(t, e)
	ctx := testCtx(t, 15*time.Second)

	if _, _, err := s.GetPlacement(ctx); !errors.Is(err, ErrNoPlacement) {
		t.Fatalf("GetPlacement on empty store: err = %v, want ErrNoPlacement", err)
	}
	lead, err := s.Campaign(ctx, "me", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer lead.Resign(context.Background())
	if _, err := s.PutPlacement(ctx, []byte(`{"gen":0}`), Fence{}); !errors.Is(err, ErrFenced) {
		t.Fatalf("PutPlacement with no fence: err = %v, want ErrFenced", err)
	}
	for i := int64(1); i <= 3; i++ {
		val := fmt.Sprintf(`{"gen":%d}`, i)
		v, err := s.PutPlacement(ctx, []byte(val), lead.Fence())
		if err != nil || v != i {
			t.Fatalf("PutPlacement %d = %d, %v; want version %d", i, v, err, i)
		}
		got, ver, err := s.GetPlacement(ctx)
		if err != nil || ver != i || string(got) != val {
			t.Fatalf("GetPlacement = %q v%d, %v; want %s v%d", got, ver, err, val, i)
		}
	}
}

// TestDeposedLeaderWriteFenced deposes a leader (its session's lease is
// revoked, as when it expires while the process is stopped), lets a standby
// take over and write, and then has the deposed leader write late, as a
// drop it deferred would: the write is refused and the new leader's
// placement stays.
func TestDeposedLeaderWriteFenced(t *testing.T) {
	e := startEtcd(t)
	s1, s2 := connect(t, e), connect(t, e)
	ctx := testCtx(t, 20*time.Second)
	old, err := s1.Campaign(ctx, "old", 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s1.PutPlacement(ctx, []byte(`{"by":"old"}`), old.Fence()); err != nil {
		t.Fatal(err)
	}
	won := make(chan *Leadership, 1)
	go func() {
		l, err := s2.Campaign(ctx, "new", 5*time.Second)
		if err != nil {
			t.Errorf("standby campaign: %v", err)
		}
		won <- l
	}()
	if _, err := s1.client.Revoke(ctx, old.lease.ID()); err != nil {
		t.Fatal(err)
	}
	select { // etcd answers the next renewal: the lease is gone
	case <-old.Lost():
	case <-time.After(3 * time.Second):
		t.Fatal("Lost not closed after the lease was revoked")
	}
	var lead *Leadership
	select {
	case lead = <-won:
	case <-ctx.Done():
		t.Fatal("the standby did not take over")
	}
	if lead == nil {
		t.FailNow()
	}
	defer lead.Resign(context.Background())
	if old.Fence() == lead.Fence() {
		t.Fatalf("two terms share the fence %+v", old.Fence())
	}
	if _, err := s2.PutPlacement(ctx, []byte(`{"by":"new"}`), lead.Fence()); err != nil {
		t.Fatal(err)
	}
	if _, err := s1.PutPlacement(ctx, []byte(`{"by":"old, late"}`), old.Fence()); !errors.Is(err, ErrFenced) {
		t.Fatalf("deposed leader's write: err = %v, want ErrFenced", err)
	}
	val, ver, err := s1.GetPlacement(ctx)
	if err != nil || string(val) != `{"by":"new"}` || ver != 2 {
		t.Fatalf("placement = %q v%d, %v; want the new leader's, version 2", val, ver, err)
	}
}

// waitCandidates waits until the election's queue holds the candidates
// want, in order (the leader first).
func waitCandidates(t *testing.T, ctx context.Context, s *Store, want ...string) {
	t.Helper()
	waitFor(t, 5*time.Second, fmt.Sprintf("candidates %q", want), func() bool {
		resp, err := s.client.Get(ctx, s.electionPrefix()+"/", clientv3.WithPrefix(),
			clientv3.WithSort(clientv3.SortByCreateRevision, clientv3.SortAscend))
		if err != nil {
			t.Fatalf("listing the candidates: %v", err)
		}
		var got []string
		for _, kv := range resp.Kvs {
			got = append(got, string(kv.Value))
		}
		return slices.Equal(got, want)
	})
}

func TestLeaderElectionFailover(t *testing.T) {
	e := startEtcd(t)
	observer := connect(t, e)
	s1 := connect(t, e)
	s2 := connect(t, e)
	ctx := testCtx(t, 15*time.Second)

	if _, err := observer.Leader(ctx); !errors.Is(err, ErrNoLeader) {
		t.Fatalf("Leader with no candidates: err = %v, want ErrNoLeader", err)
	}
	l1, err := s1.Campaign(ctx, "coord-1:8080", 2*time.Second)
	if err != nil {
		t.Fatalf("Campaign 1: %v", err)
	}
	if got, err := observer.Leader(ctx); err != nil || got != "coord-1:8080" {
		t.Fatalf("Leader = %q, %v", got, err)
	}

	type result struct {
		l   *Leadership
		err error
	}
	second := make(chan result, 1)
	go func() {
		l, err := s2.Campaign(ctx, "coord-2:8080", 2*time.Second)
		second <- result{l, err}
	}()
	// Once its key is queued behind the leader's, the second candidate
	// must wait.
	waitCandidates(t, ctx, observer, "coord-1:8080", "coord-2:8080")
	select {
	case r := <-second:
		t.Fatalf("second candidate did not block: %+v", r)
	default:
	}
	if got, err := observer.Leader(ctx); err != nil || got != "coord-1:8080" {
		t.Fatalf("Leader with a second candidate queued = %q, %v", got, err)
	}

	// The leader dies: its connection goes away without resigning.
	start := time.Now()
	s1.Close()
	select {
	case <-l1.Lost():
	case <-time.After(2 * time.Second):
		t.Fatal("Lost not closed after the leader's store closed")
	}
	var l2 *Leadership
	select {
	case r := <-second:
		if r.err != nil {
			t.Fatalf("Campaign 2: %v", r.err)
		}
		l2 = r.l
	case <-time.After(8 * time.Second):
		t.Fatal("standby did not take over")
	}
	t.Logf("standby took over %s after the leader died", time.Since(start).Round(10*time.Millisecond))
	if got, err := observer.Leader(ctx); err != nil || got != "coord-2:8080" {
		t.Fatalf("Leader after failover = %q, %v", got, err)
	}

	// A third candidate takes over promptly when the leader resigns.
	third := make(chan result, 1)
	go func() {
		l, err := observer.Campaign(ctx, "coord-3:8080", 2*time.Second)
		third <- result{l, err}
	}()
	waitCandidates(t, ctx, observer, "coord-2:8080", "coord-3:8080") // it is queued
	start = time.Now()
	if err := l2.Resign(ctx); err != nil {
		t.Fatalf("Resign: %v", err)
	}
	if err := l2.Resign(ctx); err != nil {
		t.Fatalf("second Resign: %v", err)
	}
	select {
	case r := <-third:
		if r.err != nil {
			t.Fatalf("Campaign 3: %v", r.err)
		}
		t.Cleanup(func() { r.l.Resign(context.Background()) })
		if time.Since(start) > time.Second {
			t.Fatalf("takeover after resign took %s", time.Since(start))
		}
	case <-time.After(5 * time.Second):
		t.Fatal("third candidate did not take over after resign")
	}
	if got, err := observer.Leader(ctx); err != nil || got != "coord-3:8080" {
		t.Fatalf("Leader after resign = %q, %v", got, err)
	}

	// A campaign that cannot win gives up when its ctx ends.
	cctx, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel()
	if _, err := s2.Campaign(cctx, "coord-4", 2*time.Second); err == nil {
		t.Fatal("blocked Campaign returned without error after ctx ended")
	}
}

func TestConnectUnreachable(t *testing.T) {
	// A port that was free a moment ago: nothing listens there.
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()

	ctx, cancel := context.WithTimeout(context.Background(), time.Second)
	defer cancel()
	start := time.Now()
	s, err := Connect(ctx, []string{"http://" + addr}, "")
	if err == nil {
		s.Close()
		t.Fatal("Connect to an unreachable endpoint succeeded")
	}
	if el := time.Since(start); el > 2*time.Second {
		t.Fatalf("Connect took %s to fail", el)
	}
	t.Logf("Connect error: %v", err)
}

func startGossip(t *testing.T, name string, meta []byte, seeds ...string) *Gossip {
	t.Helper()
	g, err := JoinGossip(GossipConfig{Name: name, Seeds: seeds, Meta: meta, Fast: true})
	if err != nil {
		t.Fatalf("JoinGossip %s: %v", name, err)
	}
	t.Cleanup(func() { g.Close() })
	return g
}

// waitEvent waits for an event about name with the given liveness.
func waitEvent(t *testing.T, g *Gossip, name string, alive bool, d time.Duration) MemberEvent {
	t.Helper()
	return waitJoins(t, g, alive, d, name)[name]
}

// waitJoins waits for an event with the given liveness about each of
// names (in any order) and returns the first about each.
func waitJoins(t *testing.T, g *Gossip, alive bool, d time.Duration, names ...string) map[string]MemberEvent {
	t.Helper()
	got := map[string]MemberEvent{}
	timeout := time.After(d)
	for len(got) < len(names) {
		select {
		case ev, ok := <-g.Events():
			if !ok {
				t.Fatal("events channel closed")
			}
			if _, seen := got[ev.Name]; !seen && ev.Alive == alive && slices.Contains(names, ev.Name) {
				got[ev.Name] = ev
			}
		case <-timeout:
			t.Fatalf("no alive=%v event about each of %v within %s (got %v)", alive, names, d, got)
		}
	}
	return got
}

func TestGossipMembershipAndFailure(t *testing.T) {
	a := startGossip(t, "a", []byte(`{"role":"coordinator"}`))
	b := startGossip(t, "b", []byte(`{"role":"worker","id":"b"}`), a.Addr())
	c := startGossip(t, "c", []byte(`{"role":"worker","id":"c"}`), a.Addr())

	// Every node sees every node (itself included) join, with its address
	// and meta.
	addrs := map[string]string{"a": a.Addr(), "b": b.Addr(), "c": c.Addr()}
	metas := map[string]string{"a": `{"role":"coordinator"}`, "b": `{"role":"worker","id":"b"}`, "c": `{"role":"worker","id":"c"}`}
	for name, g := range map[string]*Gossip{"a": a, "b": b, "c": c} {
		for _, ev := range waitJoins(t, g, true, 3*time.Second, "a", "b", "c") {
			if ev.Addr != addrs[ev.Name] || string(ev.Meta) != metas[ev.Name] {
				t.Fatalf("%s saw %+v join, want addr %s meta %s", name, ev, addrs[ev.Name], metas[ev.Name])
			}
		}
	}

	// c crashes (no leave message): the failure detector must notice.
	start := time.Now()
	if err := c.stop(false); err != nil {
		t.Fatalf("shutdown: %v", err)
	}
	waitEvent(t, a, "c", false, 3*time.Second)
	waitEvent(t, b, "c", false, 3*time.Second)
	t.Logf("crash detected in %s", time.Since(start).Round(10*time.Millisecond))

	// b leaves gracefully.
	start = time.Now()
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
	waitEvent(t, a, "b", false, 3*time.Second)
	t.Logf("leave seen in %s", time.Since(start).Round(10*time.Millisecond))
	if _, ok := <-b.Events(); ok {
		// Drain: the channel must end up closed.
		for range b.Events() {
		}
	}
}

func TestGossipErrors(t *testing.T) {
	if _, err := JoinGossip(GossipConfig{Name: "big", Meta: make([]byte, MaxGossipMeta+1), Fast: true}); err == nil {
		t.Fatal("oversized meta accepted")
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dead := l.Addr().String()
	l.Close()
	start := time.Now()
	if g, err := JoinGossip(GossipConfig{Name: "lonely", Seeds: []string{dead}, Fast: true}); err == nil {
		g.Close()
		t.Fatal("join with unreachable seed succeeded")
	} else {
		t.Logf("join error after %s: %v", time.Since(start).Round(time.Millisecond), err)
	}
	g := startGossip(t, "solo", nil)
	if ev := waitEvent(t, g, "solo", true, 3*time.Second); ev.Addr != g.Addr() {
		t.Fatalf("solo's own join event: %+v, want addr %s", ev, g.Addr())
	}
}

// TestRegistrationOutlivesItsLease: a worker entry whose lease etcd lets
// expire (as after an outage longer than the TTL) is written again,
// unchanged, under a new lease.
func TestRegistrationOutlivesItsLease(t *testing.T) {
	e := startEtcd(t)
	s := connect(t, e)
	ctx := testCtx(t, 15*time.Second)
	w := WorkerInfo{ID: "w", Addr: "127.0.0.1:1", State: "ready", Started: time.Now().UTC().Truncate(time.Second)}
	r, err := s.RegisterWorker(ctx, w, 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	w.State = "serving"
	if err := r.Update(ctx, w); err != nil {
		t.Fatal(err)
	}
	old := r.leaseID()
	if _, err := s.client.Revoke(ctx, old); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 5*time.Second, "the entry written again under a new lease", func() bool {
		ws, err := s.ListWorkers(ctx)
		return err == nil && len(ws) == 1 && ws[0] == w && r.Renewals() == 1
	})
	if r.leaseID() == old {
		t.Fatal("the same lease")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if ws, _ := s.ListWorkers(ctx); len(ws) != 0 {
		t.Fatalf("after Close: %+v", ws)
	}
}

// TestLeaseValidUntil: a kept lease's ValidUntil moves on with each
// renewal and stays within a TTL of now.
func TestLeaseValidUntil(t *testing.T) {
	e := startEtcd(t)
	s := connect(t, e)
	ctx := testCtx(t, 10*time.Second)
	l, err := s.grantLease(ctx, 2)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close(ctx)
	first := l.ValidUntil()
	if until := time.Until(first); until <= 0 || until > 2*time.Second {
		t.Fatalf("valid for %v after the grant", until)
	}
	waitFor(t, 3*time.Second, "a renewal", func() bool { return l.ValidUntil().After(first) })
	select {
	case <-l.Expired():
		t.Fatal("expired while kept")
	default:
	}
}

// TestGossipFixedPortAdvertised: a node bound to every interface on a
// fixed port, announcing an address, announces that port (not 0), and a
// peer joins it there.
func TestGossipFixedPortAdvertised(t *testing.T) {
	l, err := net.ListenPacket("udp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := l.LocalAddr().(*net.UDPAddr).Port
	l.Close()
	a, err := JoinGossip(GossipConfig{Name: "a", BindAddr: "0.0.0.0", BindPort: port, AdvertiseAddr: "127.0.0.1", Fast: true})
	if err != nil {
		t.Fatal(err)
	}
	defer a.Close()
	if want := fmt.Sprintf("127.0.0.1:%d", port); a.Addr() != want {
		t.Fatalf("announced %s, want %s", a.Addr(), want)
	}
	b := startGossip(t, "b", nil, a.Addr())
	waitJoins(t, b, true, 3*time.Second, "a", "b")
}
