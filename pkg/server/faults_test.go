package server_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// Worker faults beyond a crash, with real processes: a hung rank (SIGSTOP)
// while messages larger than the peer streams' flow-control window are in
// flight, a partition (network namespaces), drains, a worker joining under
// load, and requests left with no replica. Each asserts that no request
// fails and no token changes; the times it logs (fault to the next token)
// are what docs/failure-model.md reports.

// bareCluster is a coordinator (embedded etcd, no local workers) whose
// workers the test starts itself, so it sees their pids and exit codes.
type bareCluster struct {
	*clusterT
	etcd    string // the coordinator's etcd endpoints
	workers map[string]*proc
}

func startBare(t *testing.T, model string, args ...string) *bareCluster {
	t.Helper()
	addr := freeAddr(t)
	all := append([]string{"--listen", addr, "--data-dir", t.TempDir(), "--local-workers", "0", "--model", model}, args...)
	b := &bareCluster{clusterT: &clusterT{addr: addr, coord: start(t, "coordinator", all...)}, workers: map[string]*proc{}}
	b.conn, b.client = dial(t, addr)
	waitFor(t, 60*time.Second, "the coordinator to lead", func() error {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		info, err := b.client.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
		if err != nil {
			return err
		}
		if !info.Leader {
			return fmt.Errorf("not leader yet")
		}
		b.etcd = strings.Join(info.EtcdEndpoints, ",")
		return nil
	})
	return b
}

// worker starts a worker process registered with the cluster's etcd.
func (b *bareCluster) worker(t *testing.T, id string, args ...string) *proc {
	t.Helper()
	p := start(t, "worker", append([]string{"--etcd-endpoints", b.etcd, "--id", id, "--threads", "1"}, args...)...)
	b.workers[id] = p
	return p
}

// replicaWorkers returns the workers of the placement's replicas, by
// replica.
func replicaWorkers(t *testing.T, client pb.GeneratorClient) [][]string {
	t.Helper()
	var out [][]string
	for _, r := range serverInfo(t, client).GetPlacement().GetReplicas() {
		out = append(out, r.Workers)
	}
	return out
}

// waitWorkers waits until the ready workers are exactly n.
func waitWorkers(t *testing.T, client pb.GeneratorClient, n int) []*pb.WorkerStatus {
	t.Helper()
	var ws []*pb.WorkerStatus
	waitFor(t, 90*time.Second, fmt.Sprintf("%d ready workers", n), func() error {
		ws = readyWorkers(t, client)
		if len(ws) != n {
			return fmt.Errorf("%d ready", len(ws))
		}
		return nil
	})
	return ws
}

func workerPid(t *testing.T, client pb.GeneratorClient, id string) int {
	t.Helper()
	for _, w := range serverInfo(t, client).Workers {
		if w.Id == id {
			return int(w.Pid)
		}
	}
	t.Fatalf("worker %s is not registered", id)
	return 0
}

// longPrompts are n prompts of about length tokens each: their prefill
// chunks are max-batch-tokens long, so a tensor-parallel all-reduce part
// or a stage's hidden states are tokens × hidden × 4 bytes.
func longPrompts(n, length, vocab int) [][]int32 {
	out := make([][]int32, n)
	for i := range out {
		p := make([]int32, length+i*37)
		for j := range p {
			p[j] = int32((i*131 + j*17 + 3) % vocab)
		}
		out[i] = p
	}
	return out
}

// greedyAlone is what each prompt generates alone, before any fault.
func greedyAlone(t *testing.T, client pb.GeneratorClient, ps [][]int32, n int) [][]int32 {
	t.Helper()
	out := make([][]int32, len(ps))
	for i, p := range ps {
		out[i] = mustGenerate(t, client, idsReq(p, n)).ids
	}
	return out
}

// faultLoad runs one greedy stream per prompt, calls fault once every
// stream's call is made (fault waits as it likes, makes the fault and
// returns its time), and waits for every stream. It fails the test when a
// stream fails or its tokens differ from want; it returns, per stream that
// was still running at the fault, the time from the fault to its next
// token.
func faultLoad(t *testing.T, client pb.GeneratorClient, ps, want [][]int32, n int, fault func() time.Time) []time.Duration {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 240*time.Second)
	defer cancel()
	type run struct {
		ids   []int32
		times []time.Time
		err   error
	}
	runs := make([]run, len(ps))
	var called sync.WaitGroup
	var wg sync.WaitGroup
	for i, p := range ps {
		called.Add(1)
		wg.Go(func() {
			r := &runs[i]
			stream, err := client.Generate(ctx, idsReq(p, n))
			called.Done()
			if err != nil {
				r.err = err
				return
			}
			for {
				resp, err := stream.Recv()
				if err != nil {
					r.err = err
					return
				}
				if ch := resp.GetChunk(); ch != nil {
					r.ids = append(r.ids, ch.TokenIds...)
					r.times = append(r.times, time.Now())
				}
				if e := resp.GetError(); e != nil {
					r.err = fmt.Errorf("%s: %s", e.Code, e.Message)
					return
				}
				if cp := resp.GetComplete(); cp != nil {
					if cp.FinishReason != "length" {
						r.err = fmt.Errorf("finished with %s", cp.FinishReason)
					}
					return
				}
			}
		})
	}
	called.Wait()
	t0 := fault()
	wg.Wait()
	var resume []time.Duration
	for i, r := range runs {
		if r.err != nil {
			t.Fatalf("stream %d: %v (sent %d, %d failed)", i, r.err, len(ps), countErrs(runs, func(r run) error { return r.err }))
		}
		if !slices.Equal(r.ids, want[i]) {
			t.Fatalf("stream %d: tokens changed by the fault:\n got %v\nwant %v", i, r.ids, want[i])
		}
		for _, at := range r.times {
			if at.After(t0) {
				resume = append(resume, at.Sub(t0))
				break
			}
		}
	}
	return resume
}

func countErrs[T any](xs []T, f func(T) error) int {
	n := 0
	for _, x := range xs {
		if f(x) != nil {
			n++
		}
	}
	return n
}

// spread is "median m, max x over n streams".
func spread(ds []time.Duration) string {
	if len(ds) == 0 {
		return "no stream was running at the fault"
	}
	s := slices.Clone(ds)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return fmt.Sprintf("median %.2fs, max %.2fs over %d streams", s[len(s)/2].Seconds(), s[len(s)-1].Seconds(), len(s))
}

// A hung rank (SIGSTOP) while the replica's messages are larger than the
// peer streams' flow-control window (--peer-window 64KiB; prefill chunks
// of 512 tokens × 64 × 4 bytes): the healthy peer's sends block on the
// window, and must end with the step so that it can load its slice of the
// re-formed replica. Every stream completes with its tokens; the stopped
// worker, continued, rejoins clean.
func TestHungTensorParallelPeer(t *testing.T) {
	needE2E(t)
	testHungMember(t, []string{"--tp", "2"}, func(rs [][]string) string { return rs[0][1] })
}

// The same with the last stage of a pp=2 replica: the first stage's
// hidden-state sends block.
func TestHungLastStage(t *testing.T) {
	needE2E(t)
	testHungMember(t, []string{"--pp", "2"}, func(rs [][]string) string { return rs[0][len(rs[0])-1] })
}

func testHungMember(t *testing.T, layout []string, victimOf func([][]string) string) {
	// No prefix cache: greedyAlone's runs would leave every prompt
	// cached, and the load then skips the prefill chunks the fault must
	// hit (it may even end before the fault).
	b := startBare(t, refDir("dense-gqa-f32"), append(layout, "--max-batch-tokens", "512", "--no-prefix-cache")...)
	for i := range 3 { // a replica of two, and a spare
		b.worker(t, fmt.Sprintf("w%d", i), "--peer-window", "64KiB")
	}
	waitReady(t, b.client, b.coord, 120*time.Second)
	ps := longPrompts(8, 2000, 512)
	want := greedyAlone(t, b.client, ps, 24)
	victim := victimOf(replicaWorkers(t, b.client))
	pid := workerPid(t, b.client, victim)
	resume := faultLoad(t, b.client, ps, want, 24, func() time.Time {
		time.Sleep(300 * time.Millisecond) // into the prefill chunks
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		return time.Now()
	})
	t.Logf("SIGSTOP of %s (layout %v) during 512-token prefill chunks: fault to next token %s", victim, layout, spread(resume))
	if err := syscall.Kill(pid, syscall.SIGCONT); err != nil {
		t.Fatal(err)
	}
	// Continued, it finds its generation stale: it serves again, or waits
	// as a spare, with a fresh state; nothing it held changes a token.
	waitWorkers(t, b.client, 2)
	select {
	case <-b.workers[victim].done:
		t.Fatalf("the stopped worker exited after SIGCONT")
	default:
	}
	if got := mustGenerate(t, b.client, idsReq(ps[0], 24)).ids; !slices.Equal(got, want[0]) {
		t.Fatalf("after SIGCONT: %v, want %v", got, want[0])
	}
	waitFor(t, 30*time.Second, victim+" registered again with a fresh state", func() error {
		raw, _ := os.ReadFile(b.workers[victim].log.Name())
		if !strings.Contains(string(raw), "registering again with a fresh state") {
			return fmt.Errorf("not in its log")
		}
		return nil
	})
}

// A worker cut off by the network (its namespace's link down: packets
// vanish, no RST) is found by gossip, its replica re-formed from the
// others; when the link comes back it registers again as a new member.
func TestPartitionedTensorParallelPeer(t *testing.T) {
	needE2E(t)
	h := newNetHosts(t, 3)
	// etcd and the coordinator listen on the bridge; each worker in its
	// own namespace.
	etcdPort, coordPort := freePortOn(t, h.HostIP()), freePortOn(t, h.HostIP())
	addr := fmt.Sprintf("%s:%d", h.HostIP(), coordPort)
	c := &clusterT{addr: addr}
	etcd := startEtcdOn(t, h.HostIP(), etcdPort)
	c.coord = start(t, "coordinator", "--listen", addr, "--data-dir", t.TempDir(), "--local-workers", "0",
		"--model", refDir("dense-gqa-f32"), "--tp", "2", "--etcd-endpoints", etcd)
	c.conn, c.client = dial(t, addr)
	procs := map[string]*proc{}
	for i := range 3 {
		id := fmt.Sprintf("w%d", i)
		procs[id] = startCmd(t, h.Command(i, binDir+"/worker", "--etcd-endpoints", etcd, "--id", id, "--threads", "1",
			"--listen", h.IP(i)+":0"))
	}
	waitReady(t, c.client, c.coord, 120*time.Second)
	ps := testPrompts(8, 512)
	want := greedyAlone(t, c.client, ps, 200)
	victim := replicaWorkers(t, c.client)[0][1]
	host := int(victim[1] - '0')
	var cut time.Time
	resume := faultLoad(t, c.client, ps, want, 200, func() time.Time {
		time.Sleep(300 * time.Millisecond)
		h.Cut(host)
		cut = time.Now()
		return cut
	})
	t.Logf("partition of %s: fault to next token %s", victim, spread(resume))
	h.Heal(host)
	// Its lease expired while it was cut off: it registers again, fresh.
	waitFor(t, 60*time.Second, victim+" registered again", func() error {
		for _, w := range serverInfo(t, c.client).Workers {
			if w.Id == victim && !strings.Contains(w.State, "dead") {
				return nil
			}
		}
		return fmt.Errorf("%s not registered, or still reported dead", victim)
	})
	t.Logf("%s registered again %.1fs after the cut", victim, time.Since(cut).Seconds())
	if got := mustGenerate(t, c.client, idsReq(ps[0], 200)).ids; !slices.Equal(got, want[0]) {
		t.Fatalf("after the partition healed: %v, want %v", got, want[0])
	}
}

// Drains: a worker of one of two replicas drains under load (nothing
// fails, it exits 0 and leaves etcd); the last replica's drain is refused
// without force; SIGTERM drains the last worker (it is going away), and a
// request then waiting for a replica ends UNAVAILABLE after
// --queue-timeout.
func TestDrainUnderLoad(t *testing.T) {
	needE2E(t)
	metricsAddr := freeAddr(t)
	b := startBare(t, refDir("dense-gqa-f32"), "--tp", "1", "--queue-timeout", "3s", "--metrics-listen", metricsAddr)
	b.worker(t, "w0")
	b.worker(t, "w1")
	waitWorkers(t, b.client, 2)
	ps := testPrompts(8, 512)
	want := greedyAlone(t, b.client, ps, 600)
	store, err := connectStore(t, context.Background(), strings.Split(b.etcd, ","))
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	var t0 time.Time
	faultLoad(t, b.client, ps, want, 600, func() time.Time {
		time.Sleep(200 * time.Millisecond)
		t0 = time.Now()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp, err := b.client.Drain(ctx, &pb.DrainRequest{WorkerId: "w1", TimeoutSeconds: ptr(120.0)})
		if err != nil {
			t.Errorf("drain w1: %v", err)
			return t0
		} else if resp.State != "draining" || resp.Replica == "" {
			t.Errorf("drain w1: %v", resp)
		}
		// The drain shows in status, in etcd and in the metrics while
		// the replica finishes its requests.
		for _, w := range serverInfo(t, b.client).Workers {
			if w.Id == "w1" && w.State != "draining" {
				t.Errorf("status: w1 is %q while it drains", w.State)
			}
		}
		if v := sum(scrape(t, metricsAddr), "qwenfleet:worker_draining", `worker="w1"`); v != 1 {
			t.Errorf("qwenfleet:worker_draining{worker=\"w1\"} = %v while it drains", v)
		}
		waitFor(t, 2*time.Second, "w1 draining in etcd", func() error {
			ws, err := store.ListWorkers(ctx)
			if err != nil {
				return err
			}
			for _, w := range ws {
				if w.ID == "w1" && w.State != "draining" {
					return fmt.Errorf("its state is %q", w.State)
				}
			}
			return nil
		})
		return t0
	})
	exitsZero(t, b.workers["w1"], "w1")
	t.Logf("w1 drained under load and exited 0 %.1fs after the drain started", time.Since(t0).Seconds())
	waitFor(t, 10*time.Second, "w1 gone from etcd", func() error {
		for _, w := range serverInfo(t, b.client).Workers {
			if w.Id == "w1" {
				return fmt.Errorf("w1 still listed (%s)", w.State)
			}
		}
		return nil
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = b.client.Drain(ctx, &pb.DrainRequest{WorkerId: "w0"})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "only replica") {
		t.Fatalf("drain of the last replica without force: %v, want FailedPrecondition naming the only replica", err)
	}
	if _, err := b.client.Drain(ctx, &pb.DrainRequest{WorkerId: "nobody"}); status.Code(err) != codes.NotFound {
		t.Fatalf("drain of an unknown worker: %v, want NotFound", err)
	}
	if _, err := b.client.Drain(ctx, &pb.DrainRequest{WorkerId: "w0", TimeoutSeconds: ptr(-1.0)}); status.Code(err) != codes.InvalidArgument {
		t.Fatalf("drain with a negative timeout: %v, want InvalidArgument", err)
	}
	// SIGTERM: the worker asks to be drained (etcd state "draining").
	b.workers["w0"].cmd.Process.Signal(syscall.SIGTERM)
	exitsZero(t, b.workers["w0"], "w0")
	t1 := time.Now()
	_, err = generate(ctx, b.client, idsReq(ps[0], 4))
	waited := time.Since(t1)
	if status.Code(err) != codes.Unavailable || !strings.Contains(err.Error(), "waited") {
		t.Fatalf("with no replica left: %v, want UNAVAILABLE after --queue-timeout", err)
	}
	if waited < 2*time.Second {
		t.Fatalf("UNAVAILABLE after %v, before the queue timeout (3s)", waited)
	}
	t.Logf("no replica: UNAVAILABLE after %.1fs: %v", waited.Seconds(), err)
}

func exitsZero(t *testing.T, p *proc, name string) {
	t.Helper()
	select {
	case <-p.done:
	case <-time.After(90 * time.Second):
		t.Fatalf("%s did not exit after its drain", name)
	}
	if code := p.cmd.ProcessState.ExitCode(); code != 0 {
		t.Fatalf("%s exited %d after its drain, want 0", name, code)
	}
}

// A worker started by hand under a steady load becomes a replica: no
// request fails, and it serves requests soon after it joins.
func TestScaleOutUnderLoad(t *testing.T) {
	needE2E(t)
	b := startBare(t, refDir("dense-gqa-f32"), "--tp", "1")
	b.worker(t, "w0")
	waitWorkers(t, b.client, 1)
	ps := testPrompts(8, 512)
	want := greedyAlone(t, b.client, ps, 300)
	var joined time.Time
	faultLoad(t, b.client, ps, want, 300, func() time.Time {
		time.Sleep(200 * time.Millisecond)
		joined = time.Now()
		b.worker(t, "w1", "--metrics-listen", "127.0.0.1:0")
		return joined
	})
	waitWorkers(t, b.client, 2)
	ready := time.Since(joined)
	// New requests go to the least loaded replica: w1's gets some.
	var addr string
	for _, w := range serverInfo(t, b.client).Workers {
		if w.Id == "w1" {
			addr = w.MetricsAddress
		}
	}
	faultLoad(t, b.client, ps, want, 300, time.Now)
	steps := sum(scrape(t, addr), "qwenfleet:worker_steps_total")
	if steps == 0 {
		t.Fatalf("w1 ran no step")
	}
	if ready > 30*time.Second {
		t.Fatalf("w1 ready %v after it started", ready)
	}
	t.Logf("w1 joined under load: ready %.1fs after it started; then ran %.0f steps", ready.Seconds(), steps)
}

// freePortOn is a port free on host now.
func freePortOn(t *testing.T, host string) int {
	t.Helper()
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// startEtcdOn runs an embedded etcd in the test process on host:port and
// returns its client endpoint.
func startEtcdOn(t *testing.T, host string, port int) string {
	t.Helper()
	e, err := cluster.StartEmbeddedEtcdConfig(cluster.EmbeddedEtcdConfig{Dir: t.TempDir(), Host: host, ClientPort: port, TLSDir: testTLS.dir})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	return strings.Join(e.Endpoints(), ",")
}
