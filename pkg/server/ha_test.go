package server_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"

	"github.com/qwenfleet/qwenfleet/pkg/client"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// Coordinator and etcd faults, with real processes: etcd (cmd/etcd)
// stopped and killed under load, a member of a three-member etcd killed
// under load, and the leading coordinator killed under streams that
// pkg/client resumes on the standby. Each asserts that no request fails,
// no token changes and no coordinator or worker exits; the times they log
// (fault to the next token, the standby's time to serve) are what
// docs/failure-model.md reports.

// etcdMember is one etcd process (cmd/etcd) on 127.0.0.1 that a test can
// stop (SIGSTOP), continue, kill and start again on the same data dir and
// ports.
type etcdMember struct {
	name, dir          string
	clientURL, peerURL string
	cluster            string // --initial-cluster
	p                  *proc
}

// freePorts are n distinct ports free on 127.0.0.1 now.
func freePorts(t *testing.T, n int) []int {
	t.Helper()
	var ports []int
	for range n {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		ports = append(ports, l.Addr().(*net.TCPAddr).Port)
	}
	return ports
}

// startEtcd runs an etcd cluster of n members (processes) and waits until
// every member answers.
func startEtcd(t *testing.T, n int) []*etcdMember {
	t.Helper()
	ports := freePorts(t, 2*n)
	ms := make([]*etcdMember, n)
	var peers []string
	for i := range ms {
		ms[i] = &etcdMember{name: fmt.Sprintf("e%d", i), dir: filepath.Join(t.TempDir(), "etcd"),
			clientURL: fmt.Sprintf("%s://127.0.0.1:%d", etcdScheme(), ports[2*i]), peerURL: fmt.Sprintf("%s://127.0.0.1:%d", etcdScheme(), ports[2*i+1])}
		peers = append(peers, ms[i].name+"="+ms[i].peerURL)
	}
	for _, m := range ms {
		m.cluster = strings.Join(peers, ",")
		m.start(t)
	}
	for _, m := range ms {
		m.waitUp(t)
	}
	return ms
}

// endpoints are the members' client URLs, comma separated.
func endpoints(ms []*etcdMember) string {
	var eps []string
	for _, m := range ms {
		eps = append(eps, m.clientURL)
	}
	return strings.Join(eps, ",")
}

// start runs the member's process (again, after kill: on its data dir,
// whose membership overrides --initial-cluster).
func (m *etcdMember) start(t *testing.T) {
	t.Helper()
	p := start(t, "etcd", "--name", m.name, "--data-dir", m.dir,
		"--listen-client-urls", m.clientURL, "--advertise-client-urls", m.clientURL,
		"--listen-peer-urls", m.peerURL, "--initial-advertise-peer-urls", m.peerURL,
		"--initial-cluster", m.cluster, "--initial-cluster-token", "qwenfleet-ha-test", "--log-level", "warn")
	// Cleanups run last first: a stopped member is continued before
	// start's cleanup signals it to end.
	t.Cleanup(func() { syscall.Kill(p.cmd.Process.Pid, syscall.SIGCONT) })
	m.p = p
}

func (m *etcdMember) signal(t *testing.T, sig syscall.Signal) {
	t.Helper()
	if err := syscall.Kill(m.p.cmd.Process.Pid, sig); err != nil {
		t.Fatalf("%v to etcd %s: %v", sig, m.name, err)
	}
}

// kill is kill -9; it returns once the process is gone.
func (m *etcdMember) kill(t *testing.T) {
	t.Helper()
	m.signal(t, syscall.SIGKILL)
	<-m.p.done
}

// status is the member's etcd Status.
func (m *etcdMember) status(ctx context.Context) (*clientv3.StatusResponse, error) {
	cli, err := etcdClientTLS([]string{m.clientURL}, testEtcdTLS(nil, []string{m.clientURL}))
	if err != nil {
		return nil, err
	}
	defer cli.Close()
	return cli.Status(ctx, m.clientURL)
}

// waitUp waits until the member answers Status, with a leader.
func (m *etcdMember) waitUp(t *testing.T) {
	t.Helper()
	waitFor(t, 30*time.Second, "etcd "+m.name+" to answer", func() error {
		select {
		case <-m.p.done:
			t.Fatalf("etcd %s exited", m.name)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		s, err := m.status(ctx)
		if err == nil && s.Leader == 0 {
			err = errors.New("no leader")
		}
		return err
	})
}

// etcdLeader is the member that leads the etcd cluster now.
func etcdLeader(t *testing.T, ms []*etcdMember) *etcdMember {
	t.Helper()
	var leader *etcdMember
	waitFor(t, 10*time.Second, "an etcd leader", func() error {
		for _, m := range ms {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			s, err := m.status(ctx)
			cancel()
			if err == nil && s.Leader != 0 && s.Leader == s.Header.MemberId {
				leader = m
				return nil
			}
		}
		return errors.New("no member says it leads")
	})
	return leader
}

// haCluster is etcd (processes), coordinators and workers, each a process
// of its own, the coordinators without local workers.
type haCluster struct {
	etcd    []*etcdMember
	eps     string
	coords  []*haCoord
	workers map[string]*proc
}

type haCoord struct {
	addr   string
	p      *proc
	client pb.GeneratorClient
}

// startHA starts etcd members, then the workers w0.. and the coordinators
// (the first leads; each other answers as a standby before the next
// starts), and waits until the leader has every worker ready. The model is
// dense-gqa-f32 with --tp 1: a replica per worker.
func startHA(t *testing.T, members, coords, workers int, coordArgs ...string) *haCluster {
	t.Helper()
	h := &haCluster{etcd: startEtcd(t, members), workers: map[string]*proc{}}
	h.eps = endpoints(h.etcd)
	for i := range workers {
		h.worker(t, fmt.Sprintf("w%d", i))
	}
	for i := range coords {
		addr := freeAddr(t)
		c := &haCoord{addr: addr, p: start(t, "coordinator", append([]string{"--listen", addr, "--data-dir", t.TempDir(),
			"--local-workers", "0", "--model", refDir("dense-gqa-f32"), "--tp", "1", "--etcd-endpoints", h.eps}, coordArgs...)...)}
		_, c.client = dial(t, addr)
		h.coords = append(h.coords, c)
		waitFor(t, 60*time.Second, fmt.Sprintf("coordinator %d to answer", i), func() error {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			info, err := c.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
			if err != nil {
				return err
			}
			if info.Leader != (i == 0) {
				t.Fatalf("coordinator %d: leader %v", i, info.Leader)
			}
			return nil
		})
	}
	waitReady(t, h.coords[0].client, h.coords[0].p, 90*time.Second)
	waitWorkers(t, h.coords[0].client, workers)
	t.Cleanup(h.stop)
	return h
}

// stop ends the workers (they drain), then the coordinators, while etcd
// still runs (cleanups run last first: a test that starts an etcd member
// again registers stop again after it).
func (h *haCluster) stop() {
	var wg sync.WaitGroup
	for _, w := range h.workers {
		wg.Go(func() { w.stop(syscall.SIGTERM) })
	}
	wg.Wait()
	for _, c := range h.coords {
		wg.Go(func() { c.p.stop(syscall.SIGTERM) })
	}
	wg.Wait()
}

func (h *haCluster) worker(t *testing.T, id string, args ...string) *proc {
	t.Helper()
	p := start(t, "worker", append([]string{"--etcd-endpoints", h.eps, "--id", id, "--threads", "1"}, args...)...)
	h.workers[id] = p
	return p
}

// noneExited fails the test when a coordinator or worker process exited.
func (h *haCluster) noneExited(t *testing.T, what string) {
	t.Helper()
	for i, c := range h.coords {
		if exited(c.p) {
			t.Fatalf("%s: coordinator %d (%s) exited: %v", what, i, c.addr, c.p.cmd.ProcessState)
		}
	}
	for id, w := range h.workers {
		if exited(w) {
			t.Fatalf("%s: worker %s exited: %v", what, id, w.cmd.ProcessState)
		}
	}
}

func exited(p *proc) bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// leader is the coordinator that says it leads (the test fails when none
// does within d).
func (h *haCluster) leader(t *testing.T, d time.Duration) *haCoord {
	t.Helper()
	var l *haCoord
	waitFor(t, d, "a leading coordinator", func() error {
		for _, c := range h.coords {
			ctx, cancel := context.WithTimeout(context.Background(), time.Second)
			info, err := c.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
			cancel()
			if err == nil && info.Leader {
				l = c
				return nil
			}
		}
		return errors.New("none leads")
	})
	return l
}

// waitEtcdSeen waits until the coordinator c reaches etcd again (no
// etcd_error) and has n ready workers, and returns how long it took.
func waitEtcdSeen(t *testing.T, c *haCoord, n int, d time.Duration) time.Duration {
	t.Helper()
	t0 := time.Now()
	waitFor(t, d, "the leader to reach etcd, with its workers ready", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		info, err := c.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		switch {
		case err != nil:
			return err
		case !info.Leader:
			return errors.New("it does not lead")
		case info.EtcdError != "":
			return errors.New(info.EtcdError)
		}
		ready := 0
		for _, w := range info.Workers {
			if w.State == "ready" {
				ready++
			}
		}
		if ready != n {
			return fmt.Errorf("%d ready workers", ready)
		}
		return nil
	})
	return time.Since(t0)
}

// genFunc runs one greedy request to the end: onChunk is called with each
// chunk that has tokens; it returns the generated ids and how often the
// request was resumed.
type genFunc func(ctx context.Context, req *pb.GenerateRequest, onChunk func()) (ids []int32, resumes int, err error)

// stubGen sends each request once, to one coordinator: a broken stream is a
// failure.
func stubGen(c pb.GeneratorClient) genFunc {
	return func(ctx context.Context, req *pb.GenerateRequest, onChunk func()) ([]int32, int, error) {
		stream, err := c.Generate(ctx, req)
		if err != nil {
			return nil, 0, err
		}
		var ids []int32
		for {
			resp, err := stream.Recv()
			if err != nil {
				return ids, 0, err
			}
			if ch := resp.GetChunk(); ch != nil && len(ch.TokenIds) > 0 {
				ids = append(ids, ch.TokenIds...)
				onChunk()
			}
			if e := resp.GetError(); e != nil {
				return ids, 0, fmt.Errorf("%s: %s", e.Code, e.Message)
			}
			if cp := resp.GetComplete(); cp != nil {
				if cp.FinishReason != "length" {
					return ids, 0, fmt.Errorf("finished with %s", cp.FinishReason)
				}
				return ids, 0, nil
			}
		}
	}
}

// clientGen sends each request through pkg/client (leader found, broken
// streams resumed).
func clientGen(c *client.Client) genFunc {
	return func(ctx context.Context, req *pb.GenerateRequest, onChunk func()) ([]int32, int, error) {
		res, err := c.Generate(ctx, req, func(ch *pb.GenerateChunk) error {
			if len(ch.TokenIds) > 0 {
				onChunk()
			}
			return nil
		})
		if err == nil && res.Complete.FinishReason != "length" {
			err = fmt.Errorf("finished with %s", res.Complete.FinishReason)
		}
		return res.TokenIDs, res.Resumes, err
	}
}

// load is a continuous greedy load: streams goroutines, each sending one
// request after another (prompts i, i+streams, ... of ps, round and
// round) until finish; every request's tokens must be want's.
type load struct {
	sent, completed, failed atomic.Int64
	changed, resumed        atomic.Int64
	stop                    chan struct{}
	wg                      sync.WaitGroup
	mu                      sync.Mutex
	errs                    []string
	chunks                  []time.Time // every chunk's arrival, all streams
	maxGap                  time.Duration
	maxGapAt                time.Time // when the longest pause within one request began
}

func startLoad(gen genFunc, ps, want [][]int32, n, streams int) *load {
	l := &load{stop: make(chan struct{})}
	for s := range streams {
		l.wg.Go(func() {
			for k := 0; ; k++ {
				select {
				case <-l.stop:
					return
				default:
				}
				i := (s + k*streams) % len(ps)
				l.one(gen, ps[i], want[i], n)
			}
		})
	}
	return l
}

func (l *load) one(gen genFunc, p, want []int32, n int) {
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	l.sent.Add(1)
	last := time.Now()
	var gap time.Duration
	var gapAt time.Time
	ids, resumes, err := gen(ctx, idsReq(p, n), func() {
		now := time.Now()
		if d := now.Sub(last); d > gap {
			gap, gapAt = d, last
		}
		last = now
		l.mu.Lock()
		l.chunks = append(l.chunks, now)
		l.mu.Unlock()
	})
	l.resumed.Add(int64(resumes))
	l.mu.Lock()
	defer l.mu.Unlock()
	if gap > l.maxGap {
		l.maxGap, l.maxGapAt = gap, gapAt
	}
	switch {
	case err != nil:
		l.failed.Add(1)
		l.errs = append(l.errs, err.Error())
	case !slices.Equal(ids, want):
		l.changed.Add(1)
		l.errs = append(l.errs, fmt.Sprintf("tokens changed:\n got %v\nwant %v", ids, want))
	default:
		l.completed.Add(1)
	}
}

// finish lets every stream end its request and stops the load.
func (l *load) finish() {
	close(l.stop)
	l.wg.Wait()
}

// longestSilence is the longest time in [from, to] with no chunk from any
// stream.
func (l *load) longestSilence(from, to time.Time) (time.Duration, time.Time) {
	l.mu.Lock()
	ts := slices.Clone(l.chunks)
	l.mu.Unlock()
	sort.Slice(ts, func(i, j int) bool { return ts[i].Before(ts[j]) })
	prev := from
	var longest time.Duration
	var at time.Time
	for _, x := range append(ts, to) {
		if x.Before(from) || x.After(to) {
			continue
		}
		if d := x.Sub(prev); d > longest {
			longest, at = d, prev
		}
		prev = x
	}
	return longest, at
}

// report logs the load's counts and pauses (relative to the fault at t0)
// and fails the test when a request failed or changed.
func (l *load) report(t *testing.T, what string, t0, end time.Time) {
	t.Helper()
	silence, at := l.longestSilence(t0, end)
	t.Logf("%s: %d requests sent, %d completed, %d failed, %d with changed tokens, %d resumes; "+
		"longest pause of one stream %.2fs (from %+.2fs after the fault), longest time with no token from any stream %.2fs (from %+.2fs)",
		what, l.sent.Load(), l.completed.Load(), l.failed.Load(), l.changed.Load(), l.resumed.Load(),
		l.maxGap.Seconds(), l.maxGapAt.Sub(t0).Seconds(), silence.Seconds(), at.Sub(t0).Seconds())
	if n := l.failed.Load() + l.changed.Load(); n > 0 {
		t.Fatalf("%s: %d of %d requests failed or changed; first: %s", what, n, l.sent.Load(), l.errs[0])
	}
	if l.completed.Load() == 0 {
		t.Fatalf("%s: no request completed", what)
	}
}

// registered are the worker ids registered in etcd now.
func registered(t *testing.T, eps string) []string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	store, err := connectStore(t, ctx, strings.Split(eps, ","))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	ws, err := store.ListWorkers(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, w := range ws {
		ids = append(ids, w.ID)
	}
	return ids
}

// TestEtcdOutage: etcd (one process) stopped for 10 s, then killed and
// started again 10 s later on its data, under a continuous load on a
// leader and a standby with two workers: no request fails, no token
// changes, no process exits, the leader leads on, every worker is in etcd
// again; then a worker is killed while etcd is stopped (its requests
// move, a new process of it waits for etcd and re-forms its replica once
// etcd is back), and a new worker joins and serves.
func TestEtcdOutage(t *testing.T) {
	needE2E(t)
	h := startHA(t, 1, 2, 2)
	e := h.etcd[0]
	leader := h.coords[0]
	ps := testPrompts(8, 512)
	const n = 200
	want := greedyAlone(t, leader.client, ps, n)
	replicas := replicaWorkers(t, leader.client)
	outage := func(what string, fault, recover func()) {
		t.Helper()
		l := startLoad(stubGen(leader.client), ps, want, n, 8)
		time.Sleep(time.Second)
		t0 := time.Now()
		fault()
		// The leader says etcd does not answer, and serves on.
		var etcdErr string
		for etcdErr == "" && time.Since(t0) < 10*time.Second {
			// It waits up to 2s for etcd before it answers without.
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			info, err := leader.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
			cancel()
			if err != nil {
				t.Fatalf("%s: GetServerInfo of the leader: %v", what, err)
			}
			etcdErr = info.EtcdError
			time.Sleep(200 * time.Millisecond)
		}
		time.Sleep(time.Until(t0.Add(10 * time.Second)))
		t1 := time.Now()
		recover()
		seen := waitEtcdSeen(t, leader, 2, 30*time.Second)
		time.Sleep(2 * time.Second) // the load goes on a while with etcd back
		l.finish()
		t.Logf("%s: etcd back %.1fs after the fault; the leader reached it again %.1fs later; it reported meanwhile: %q",
			what, t1.Sub(t0).Seconds(), seen.Seconds(), etcdErr)
		if etcdErr == "" {
			t.Fatalf("%s: the leader never reported etcd away", what)
		}
		l.report(t, what, t0, time.Now())
		h.noneExited(t, what)
		if l := h.leader(t, 10*time.Second); l != leader {
			t.Fatalf("%s: the leader changed to %s", what, l.addr)
		}
		if got := replicaWorkers(t, leader.client); !slices.EqualFunc(got, replicas, slices.Equal) {
			t.Fatalf("%s: the replicas changed from %v to %v", what, replicas, got)
		}
		waitFor(t, 20*time.Second, "w0 and w1 in etcd again", func() error {
			if ids := registered(t, h.eps); !slices.Equal(ids, []string{"w0", "w1"}) {
				return fmt.Errorf("registered: %v", ids)
			}
			return nil
		})
	}
	outage("etcd stopped (SIGSTOP)", func() { e.signal(t, syscall.SIGSTOP) }, func() { e.signal(t, syscall.SIGCONT) })
	outage("etcd killed (-9), started again on its data", func() { e.kill(t) }, func() {
		e.start(t)
		t.Cleanup(h.stop)
		e.waitUp(t)
	})

	// A worker dies while etcd is stopped: gossip and the failed steps find
	// it and its requests move to the other replica; a new process of it,
	// started while etcd is still away, waits for etcd (it does not exit),
	// and once etcd is back its replica re-forms (a fenced placement write).
	{
		const what = "a worker killed while etcd is stopped"
		l := startLoad(stubGen(leader.client), ps, want, n, 8)
		time.Sleep(time.Second)
		t0 := time.Now()
		e.signal(t, syscall.SIGSTOP)
		time.Sleep(time.Second)
		h.workers["w1"].stop(syscall.SIGKILL)
		time.Sleep(2 * time.Second)
		nw := h.worker(t, "w1")
		time.Sleep(time.Until(t0.Add(10 * time.Second)))
		t1 := time.Now()
		e.signal(t, syscall.SIGCONT)
		waitFor(t, 60*time.Second, "the new w1 ready in a replica", func() error {
			for _, w := range readyWorkers(t, leader.client) {
				if w.Id == "w1" && int(w.Pid) == nw.cmd.Process.Pid {
					return nil
				}
			}
			return fmt.Errorf("ready: %v", readyWorkers(t, leader.client))
		})
		reformed := time.Since(t1)
		time.Sleep(time.Second)
		l.finish()
		t.Logf("%s: its replica re-formed with the new w1 %.1fs after etcd came back", what, reformed.Seconds())
		l.report(t, what, t0, time.Now())
		h.noneExited(t, what)
		if l := h.leader(t, 10*time.Second); l != leader {
			t.Fatalf("%s: the leader changed to %s", what, l.addr)
		}
	}

	// A new worker joins, becomes a replica and runs steps.
	t0 := time.Now()
	h.worker(t, "w2", "--metrics-listen", "127.0.0.1:0")
	waitWorkers(t, leader.client, 3)
	ready := time.Since(t0)
	inPlacement := false
	for _, ws := range replicaWorkers(t, leader.client) {
		inPlacement = inPlacement || slices.Contains(ws, "w2")
	}
	if !inPlacement {
		t.Fatalf("w2 is ready but in no replica: %v", replicaWorkers(t, leader.client))
	}
	var maddr string
	for _, w := range serverInfo(t, leader.client).Workers {
		if w.Id == "w2" {
			maddr = w.MetricsAddress
		}
	}
	faultLoad(t, leader.client, ps, want, n, time.Now)
	steps := sum(scrape(t, maddr), "qwenfleet:worker_steps_total")
	if steps == 0 {
		t.Fatalf("w2 ran no step")
	}
	t.Logf("after the outages a new worker w2 was ready in a replica %.1fs after it started, and ran %.0f steps", ready.Seconds(), steps)
	h.noneExited(t, "after the outages")
}

// TestEtcdMemberLoss: a three-member etcd whose leader is killed (-9)
// under a continuous load on a leader and a standby with two workers, all
// given the three endpoints: no request fails, no token changes, no
// process exits, the leader leads on.
func TestEtcdMemberLoss(t *testing.T) {
	needE2E(t)
	h := startHA(t, 3, 2, 2)
	leader := h.coords[0]
	ps := testPrompts(8, 512)
	const n = 200
	want := greedyAlone(t, leader.client, ps, n)
	l := startLoad(stubGen(leader.client), ps, want, n, 8)
	time.Sleep(time.Second)
	victim := etcdLeader(t, h.etcd)
	t0 := time.Now()
	victim.kill(t)
	var rest []*etcdMember
	for _, m := range h.etcd {
		if m != victim {
			rest = append(rest, m)
		}
	}
	newLeader := etcdLeader(t, rest)
	elected := time.Since(t0)
	time.Sleep(8 * time.Second) // the load goes on
	waitEtcdSeen(t, leader, 2, 30*time.Second)
	l.finish()
	what := fmt.Sprintf("etcd leader %s killed (-9) of 3 members", victim.name)
	t.Logf("%s: %s elected %.1fs after the kill", what, newLeader.name, elected.Seconds())
	l.report(t, what, t0, time.Now())
	h.noneExited(t, what)
	if c := h.leader(t, 10*time.Second); c != leader {
		t.Fatalf("the leader changed to %s", c.addr)
	}
	if ids := registered(t, endpoints(rest)); !slices.Equal(ids, []string{"w0", "w1"}) {
		t.Fatalf("registered after the member loss: %v", ids)
	}
	// etcd takes writes with two members of three: a new worker (given
	// the three endpoints) registers and becomes a replica.
	h.worker(t, "w2")
	waitWorkers(t, leader.client, 3)
	waitFor(t, 10*time.Second, "w2 in a replica", func() error {
		for _, ws := range replicaWorkers(t, leader.client) {
			if slices.Contains(ws, "w2") {
				return nil
			}
		}
		return errors.New("in none")
	})
}

// TestLeaderKillResume: the leading coordinator killed (-9) under 8
// greedy streams that pkg/client, given both coordinators, resumes on the
// standby: all complete with the tokens of an undisturbed run. It reports
// the time from the kill to each stream's next token and the standby's
// time to serve (the targets with the defaults: leader TTL + 1 s to serve,
// the next token within 6 s).
func TestLeaderKillResume(t *testing.T) {
	needE2E(t)
	h := startHA(t, 1, 2, 2)
	a, b := h.coords[0], h.coords[1]
	ps := testPrompts(8, 512)
	const n = 200
	want := greedyAlone(t, a.client, ps, n)
	c, err := client.New(client.Config{Addrs: []string{a.addr, b.addr}, TLS: testClientTLS(), APIKey: testTLS.adminKey})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 120*time.Second)
	defer cancel()
	type run struct {
		res    *client.Result
		err    error
		mu     sync.Mutex
		times  []time.Time // of each chunk with tokens
		tokens int
	}
	runs := make([]*run, len(ps))
	first := make(chan int, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		r := &run{}
		runs[i] = r
		wg.Go(func() {
			sentFirst := false
			r.res, r.err = c.Generate(ctx, idsReq(p, n), func(ch *pb.GenerateChunk) error {
				if len(ch.TokenIds) > 0 {
					r.mu.Lock()
					r.times = append(r.times, time.Now())
					r.tokens += len(ch.TokenIds)
					r.mu.Unlock()
					if !sentFirst {
						sentFirst = true
						first <- i
					}
				}
				return nil
			})
			if !sentFirst {
				first <- -1 - i
			}
		})
	}
	for range ps {
		select {
		case i := <-first:
			if i < 0 {
				wg.Wait()
				t.Fatalf("stream %d ended before its first token: %v", -1-i, runs[-1-i].err)
			}
		case <-time.After(60 * time.Second):
			t.Fatal("no first token from every stream within 60s")
		}
	}
	running := 0
	wasRunning := make([]bool, len(runs))
	for i, r := range runs {
		r.mu.Lock()
		if r.tokens < n {
			running++
			wasRunning[i] = true
		}
		r.mu.Unlock()
	}
	t0 := time.Now()
	a.p.stop(syscall.SIGKILL)
	// The standby serves: it leads and is ready.
	serving := make(chan time.Duration, 1)
	go func() {
		for ctx.Err() == nil {
			ictx, icancel := context.WithTimeout(ctx, time.Second)
			info, err := b.client.GetServerInfo(ictx, &pb.GetServerInfoRequest{})
			icancel()
			if err == nil && info.Leader && info.Ready {
				serving <- time.Since(t0)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
		close(serving)
	}()
	wg.Wait()
	var gaps []time.Duration
	var parts []string
	for i, r := range runs {
		if r.err != nil {
			t.Fatalf("stream %d: %v (after %d tokens, %d resumes)", i, r.err, len(r.res.TokenIDs), r.res.Resumes)
		}
		if !slices.Equal(r.res.TokenIDs, want[i]) {
			t.Fatalf("stream %d: tokens changed by the leader's death (%d resumes):\n got %v\nwant %v", i, r.res.Resumes, r.res.TokenIDs, want[i])
		}
		if wasRunning[i] && r.res.Resumes == 0 {
			t.Fatalf("stream %d was running at the kill and was never resumed", i)
		}
		for _, at := range r.times {
			if at.After(t0) {
				gaps = append(gaps, at.Sub(t0))
				parts = append(parts, fmt.Sprintf("#%d %.2fs (%d resumes, %d retries)", i, at.Sub(t0).Seconds(), r.res.Resumes, retries(r.res)))
				break
			}
		}
	}
	serve, ok := <-serving
	if !ok {
		t.Fatal("the standby never served")
	}
	t.Logf("leader killed (-9) under %d streams (%d still running): the standby served %.2fs after the kill (target: leader TTL 3s + 1s); "+
		"kill to next token %s (target 6s): %s", len(ps), running, serve.Seconds(), spread(gaps), strings.Join(parts, ", "))
	for _, g := range gaps {
		if g > 30*time.Second {
			t.Fatalf("a stream's next token came %v after the kill", g)
		}
	}
	if serve > 30*time.Second {
		t.Fatalf("the standby served %v after the kill", serve)
	}
	if exited(b.p) {
		t.Fatal("the standby exited")
	}
	for id, w := range h.workers {
		if exited(w) {
			t.Fatalf("worker %s exited", id)
		}
	}
}

func retries(r *client.Result) int {
	n := 0
	for _, b := range r.Breaks {
		n += b.Retries
	}
	return n
}
