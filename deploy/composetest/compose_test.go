// Package composetest tests the docker-compose cluster (docker-compose.yml at
// the repository root) for real: it builds the images (scripts/build-images.sh),
// brings the cluster up under a project name of its own, and puts it through
// one fault after another under a steady load from the Go client library,
// checking that no request fails and every greedy output is the one a run
// before the faults gave.
//
//	go test -count=1 -v -run TestCompose ./deploy/composetest/
//
// It runs in the ordinary `go test ./...` wherever a Docker engine answers
// (`docker info`) and Compose does (`docker compose`, or docker-compose 1.29);
// it skips, saying why, elsewhere and under -short. About 1.5 minutes on 2
// cores with the Go build cache warm; the images' static -trimpath build is
// a build of its own, about 4 minutes more when that cache is cold.
//
// The faults, in turn, each while 3 client goroutines send requests
// back to back (48 greedy tokens each, ignore_eos, one of 8 prompts):
//
//	worker-kill     docker kill worker-0 (SIGKILL); docker start it 3 s later
//	worker-stop     docker kill -s STOP worker-1; CONT 6 s later
//	worker-cut      docker network disconnect worker-2 (no RST); connect again 6 s later
//	leader-kill     docker kill the leading coordinator; docker start it 5 s later (a standby then)
//	etcd-stop       docker stop etcd-0 (one of three members); docker start it 10 s later
//
// Before the faults, every worker must have registered its container's IP on the
// fixed gossip port (--gossip-port) as its gossip address, and no coordinator or worker
// may have logged gossip trouble (a join that failed, memberlist's warnings).
//
// After each fault is undone the test waits (90 s at most) until the cluster
// is whole again (a leader that is ready and reaches etcd, three workers
// ready, three replicas), then 2 s more. Measured per fault: the requests
// sent in its window (fault to the next fault) and how they ended
// (completed with the reference tokens, failed, wrong tokens, lost), the
// pause (fault → the next token of each stream in flight at the fault: the
// longest, and how many waited over 250 ms; the fault's instant is when the
// docker command that made it returned), the stall (the longest token gap
// of any stream between the fault and whole again: what a stream served by
// the victim paid), the streams that broke in the window (the client
// library resumed them: a dead leader's), and the times to whole again from
// the fault and from its undoing. The report goes to the test log; the test fails on any failed, wrong or
// lost request, or on a fault window with no completed request.
package composetest

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/client"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

const (
	numWorkers  = 3
	loadClients = 3  // goroutines sending requests back to back
	maxTokens   = 48 // per request, greedy, ignore_eos
	numPrompts  = 8
	wholeWait   = 90 * time.Second // bound on each wait for the cluster to be whole
	settle      = 2 * time.Second  // after whole again, before the next fault
	affectedGap = 250 * time.Millisecond
)

// compose runs Compose for one project.
type compose struct {
	t       *testing.T
	root    string   // repository root (the compose file's dir)
	cmd     []string // docker compose, or docker-compose
	project string
	env     []string
}

func (c *compose) run(ctx context.Context, args ...string) (string, error) {
	full := append(append(slices.Clone(c.cmd[1:]), "-p", c.project, "-f", filepath.Join(c.root, "docker-compose.yml")), args...)
	cmd := exec.CommandContext(ctx, c.cmd[0], full...)
	cmd.Dir, cmd.Env = c.root, c.env
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("%s %s: %w\n%s", strings.Join(c.cmd, " "), strings.Join(full[len(c.cmd)-1:], " "), err, tail(string(out), 30))
	}
	return string(out), nil
}

// container is the id of a service's container (running or not).
func (c *compose) container(ctx context.Context, service string) (string, error) {
	out, err := docker(ctx, "ps", "-aq", "--filter", "label=com.docker.compose.project="+c.project,
		"--filter", "label=com.docker.compose.service="+service)
	if err != nil {
		return "", err
	}
	ids := strings.Fields(out)
	if len(ids) != 1 {
		return "", fmt.Errorf("service %s: %d containers (%q)", service, len(ids), out)
	}
	return ids[0], nil
}

func docker(ctx context.Context, args ...string) (string, error) {
	out, err := exec.CommandContext(ctx, "docker", args...).CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(tail(string(out), 5)))
	}
	return string(out), nil
}

func tail(s string, n int) string {
	lines := strings.Split(strings.TrimRight(s, "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// composeCommand is `docker compose` when the v2 plugin answers, else
// docker-compose; nil when neither does.
func composeCommand() []string {
	if exec.Command("docker", "compose", "version").Run() == nil {
		return []string{"docker", "compose"}
	}
	if exec.Command("docker-compose", "version").Run() == nil {
		return []string{"docker-compose"}
	}
	return nil
}

func freePort(t *testing.T) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	_, port, _ := net.SplitHostPort(l.Addr().String())
	return port
}

// record is one request of the load.
type record struct {
	prompt     int
	start, end time.Time
	chunks     []time.Time // arrival of every chunk that carried tokens
	tokens     []int32
	finish     string
	err        error
	breaks     []client.Break // each time the stream broke and the client library resumed it
}

// load sends requests from loadClients goroutines until stopped.
type load struct {
	c       *client.Client
	prompts [][]int32
	ref     [][]int32
	mu      sync.Mutex
	recs    []*record
	stop    chan struct{}
	wg      sync.WaitGroup
}

func request(prompt []int32) *pb.GenerateRequest {
	temp, n := float32(0), int32(maxTokens)
	return &pb.GenerateRequest{Input: &pb.GenerateRequest_TokenIds{TokenIds: &pb.TokenIds{Ids: prompt}},
		Temperature: &temp, MaxTokens: &n, IgnoreEos: true}
}

// generate runs one request, recording every chunk's arrival.
func (l *load) generate(ctx context.Context, prompt int) *record {
	r := &record{prompt: prompt, start: time.Now()}
	l.mu.Lock()
	l.recs = append(l.recs, r)
	l.mu.Unlock()
	var chunks []time.Time
	res, err := l.c.Generate(ctx, request(l.prompts[prompt]), func(ch *pb.GenerateChunk) error {
		if len(ch.TokenIds) > 0 {
			chunks = append(chunks, time.Now())
		}
		return nil
	})
	l.mu.Lock()
	defer l.mu.Unlock()
	r.end, r.chunks, r.err = time.Now(), chunks, err
	if res != nil {
		r.tokens = res.TokenIDs
		r.breaks = res.Breaks
		if res.Complete != nil {
			r.finish = res.Complete.FinishReason
		}
	}
	return r
}

func (l *load) start(ctx context.Context) {
	l.stop = make(chan struct{})
	for g := 0; g < loadClients; g++ {
		l.wg.Go(func() {
			for i := g; ; i += loadClients {
				select {
				case <-l.stop:
					return
				default:
				}
				rctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
				l.generate(rctx, i%numPrompts)
				cancel()
			}
		})
	}
}

// outcome of a record: "ok", "failed", "wrong", "lost" (not ended).
func (l *load) outcome(r *record) string {
	switch {
	case r.end.IsZero():
		return "lost"
	case errors.Is(r.err, context.DeadlineExceeded) || errors.Is(r.err, context.Canceled):
		return "lost"
	case r.err != nil:
		return "failed"
	case r.finish != "length" || !slices.Equal(r.tokens, l.ref[r.prompt]):
		return "wrong"
	}
	return "ok"
}

// window is what happened from one fault to the next.
type window struct {
	name                          string
	begin, at, undone, whole, end time.Time // begin: the fault's command sent; at: it returned (the fault in effect)
	sent, ok, failed, wrong, lost int
	resumed                       int           // streams that broke in the window (and were resumed by the client library)
	inFlight, affected            int           // streams in flight at the fault; of them, next token > affectedGap later
	pause                         time.Duration // fault → next token, longest over the streams in flight
	stall                         time.Duration // longest token gap of any stream within fault → whole
	errs                          []string
	breaks                        []string // why and when (from the fault) streams broke, then resumed
}

func (l *load) summarize(w *window) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for _, r := range l.recs {
		if !r.start.Before(w.begin) && r.start.Before(w.end) {
			w.sent++
			switch l.outcome(r) {
			case "ok":
				w.ok++
			case "failed":
				w.failed++
				w.errs = append(w.errs, fmt.Sprintf("prompt %d: %v", r.prompt, r.err))
			case "wrong":
				w.wrong++
				w.errs = append(w.errs, fmt.Sprintf("prompt %d: %d tokens, finish %q, not the reference's %d", r.prompt, len(r.tokens), r.finish, len(l.ref[r.prompt])))
			case "lost":
				w.lost++
				w.errs = append(w.errs, fmt.Sprintf("prompt %d: lost (%v)", r.prompt, r.err))
			}
		}
		// Breaks by when they happened (a request sent before a fault
		// breaks in its window).
		for _, b := range r.breaks {
			if !b.At.Before(w.begin) && b.At.Before(w.end) {
				w.resumed++
				w.breaks = append(w.breaks, fmt.Sprintf("%+.2fs: %v", b.At.Sub(w.at).Seconds(), b.Err))
			}
		}
		// Streams in flight at the fault: sent before, not all tokens yet.
		if r.start.Before(w.at) && (r.end.IsZero() || r.end.After(w.at)) {
			n := 0
			for _, c := range r.chunks {
				if c.Before(w.at) {
					n++
				}
			}
			if n < maxTokens && n < len(r.chunks) {
				w.inFlight++
				d := r.chunks[n].Sub(w.at)
				w.pause = max(w.pause, d)
				if d > affectedGap {
					w.affected++
				}
			}
		}
		// The longest gap between tokens (or the start and the first)
		// inside fault → whole.
		prev := r.start
		for _, c := range r.chunks {
			if c.After(w.begin) && prev.Before(w.whole) {
				w.stall = max(w.stall, c.Sub(prev))
			}
			prev = c
		}
	}
}

// whole reports whether the cluster is whole: a ready leader that reaches
// etcd, numWorkers workers ready, numWorkers replicas.
func whole(ctx context.Context, c *client.Client) (bool, string) {
	ictx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	info, err := c.ServerInfo(ictx)
	if err != nil {
		return false, err.Error()
	}
	ready := 0
	for _, w := range info.Workers {
		if w.State == "ready" {
			ready++
		}
	}
	replicas := len(info.GetPlacement().GetReplicas())
	switch {
	case !info.Leader || !info.Ready:
		return false, "not ready: " + info.NotReadyReason
	case info.EtcdError != "":
		return false, "etcd: " + info.EtcdError
	case ready != numWorkers || replicas != numWorkers:
		return false, fmt.Sprintf("%d workers ready, %d replicas", ready, replicas)
	}
	return true, ""
}

func waitWhole(ctx context.Context, t *testing.T, c *client.Client, bound time.Duration) time.Time {
	t.Helper()
	deadline := time.Now().Add(bound)
	why := ""
	for time.Now().Before(deadline) {
		ok, w := whole(ctx, c)
		if ok {
			return time.Now()
		}
		why = w
		time.Sleep(200 * time.Millisecond)
	}
	t.Fatalf("the cluster was not whole again within %v: %s", bound, why)
	return time.Time{}
}

// gossipPort is docker-compose.yml's --gossip-port of every coordinator and worker.
const gossipPort = "7946"

// checkGossip: every worker registered, as its gossip address, its container's IP on the
// fixed gossip port, and no coordinator or worker logged gossip trouble (a worker's gossip
// it could not join, an address in conflict, refused or not assignable) while the cluster
// came up; probe timeouts under load are not trouble.
func checkGossip(ctx context.Context, t *testing.T, c *compose) {
	t.Helper()
	services := []string{"coordinator-0", "coordinator-1"}
	for i := 0; i < numWorkers; i++ {
		services = append(services, fmt.Sprintf("worker-%d", i))
	}
	var trouble []string
	for _, svc := range services {
		id, err := c.container(ctx, svc)
		if err != nil {
			t.Fatal(err)
		}
		logs, err := docker(ctx, "logs", id)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(logs, "\n") {
			if gossipMisconfigured(l) {
				trouble = append(trouble, svc+": "+l)
			}
		}
		if !strings.HasPrefix(svc, "worker-") {
			continue
		}
		ip, err := docker(ctx, "inspect", "-f", "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}", id)
		if err != nil {
			t.Fatal(err)
		}
		want, got := net.JoinHostPort(strings.TrimSpace(ip), gossipPort), ""
		for _, l := range strings.Split(logs, "\n") {
			if _, v, ok := strings.Cut(l, "worker registered"); ok {
				if _, v, ok = strings.Cut(v, " gossip="); ok {
					got = strings.Fields(v + " ")[0]
				}
			}
		}
		if got != want {
			t.Errorf("%s registered gossip at %q, want %s (its container's IP, --gossip-port)", svc, got, want)
		}
	}
	if len(trouble) > 0 {
		t.Errorf("gossip trouble while the cluster came up (%d lines):\n%s", len(trouble), strings.Join(trouble[:min(len(trouble), 12)], "\n"))
	}
}

func TestCompose(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the compose test builds images and runs a cluster in containers")
	}
	if out, err := exec.Command("docker", "info").CombinedOutput(); err != nil {
		t.Skipf("no Docker engine answers (docker info: %v: %s)", err, tail(string(out), 1))
	}
	cc := composeCommand()
	if cc == nil {
		t.Skip("neither `docker compose` nor docker-compose answers")
	}
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "docker-compose.yml")); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	begin := time.Now()

	// The images.
	bctx, bcancel := context.WithTimeout(ctx, 15*time.Minute)
	build := exec.CommandContext(bctx, filepath.Join(root, "scripts", "build-images.sh"))
	build.Dir = root
	out, err := build.CombinedOutput()
	bcancel()
	if err != nil {
		t.Fatalf("scripts/build-images.sh: %v\n%s", err, tail(string(out), 30))
	}
	t.Logf("images built in %.0fs", time.Since(begin).Seconds())

	// The cluster: a project, ports and a client folder of its own.
	var rnd [4]byte
	rand.Read(rnd[:])
	clientDir := t.TempDir()
	port0, port1 := freePort(t), freePort(t)
	c := &compose{t: t, root: root, cmd: cc, project: "qwenfleettest" + hex.EncodeToString(rnd[:]),
		env: append(os.Environ(), "QWENFLEET_PORT0="+port0, "QWENFLEET_PORT1="+port1, "QWENFLEET_BIND=127.0.0.1",
			"QWENFLEET_CLIENT_DIR="+clientDir, "QWENFLEET_TAG=latest")}
	down := func() {
		dctx, dcancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer dcancel()
		if _, err := c.run(dctx, "--profile", "bench", "down", "-v", "--remove-orphans", "-t", "2"); err != nil {
			t.Errorf("compose down: %v", err)
		}
	}
	t.Cleanup(func() {
		if t.Failed() {
			lctx, lcancel := context.WithTimeout(context.Background(), time.Minute)
			logs, _ := c.run(lctx, "logs", "--no-color", "--tail", "40")
			lcancel()
			t.Logf("compose logs (the last lines of each service):\n%s", logs)
		}
		down()
	})
	down()
	upAt := time.Now()
	if _, err := c.run(ctx, "up", "-d"); err != nil {
		t.Fatal(err)
	}

	// The client: both published ports, the cluster CA and the admin key
	// that the certs job put in the client folder.
	var key string
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(200 * time.Millisecond) {
		b, err := os.ReadFile(filepath.Join(clientDir, "api-key"))
		if err == nil {
			key = strings.TrimSpace(string(b))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no api-key in the client folder a minute after compose up: %v", err)
		}
	}
	tlsCfg, err := client.TLSConfigFromCA(filepath.Join(clientDir, "ca.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cl, err := client.New(client.Config{Addrs: []string{"127.0.0.1:" + port0, "127.0.0.1:" + port1}, TLS: tlsCfg, APIKey: key,
		RetryTimeout: 90 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	readyAt := waitWhole(ctx, t, cl, 3*time.Minute)
	t.Logf("compose up → whole (leader ready, %d workers, %d replicas): %.1fs", numWorkers, numWorkers, readyAt.Sub(upAt).Seconds())
	checkGossip(ctx, t, c)

	// The reference outputs, one request at a time, before any fault.
	l := &load{c: cl}
	for i := 0; i < numPrompts; i++ {
		p := make([]int32, 6+i)
		for j := range p {
			p[j] = int32(1000 + (i*7919+j*104729)%100000)
		}
		l.prompts = append(l.prompts, p)
	}
	for i := range l.prompts {
		r := l.generate(ctx, i)
		if r.err != nil || len(r.tokens) != maxTokens {
			t.Fatalf("reference run of prompt %d: %d tokens, %v", i, len(r.tokens), r.err)
		}
		l.ref = append(l.ref, r.tokens)
	}
	l.recs = nil
	if slices.Equal(l.ref[0], l.ref[1]) {
		t.Fatalf("two prompts gave the same output: the check would prove little")
	}

	network := func(id string) (string, []string) {
		out, err := docker(ctx, "inspect", "-f", "{{json .NetworkSettings.Networks}}", id)
		if err != nil {
			t.Fatal(err)
		}
		var nets map[string]struct{ Aliases []string }
		if err := json.Unmarshal([]byte(out), &nets); err != nil || len(nets) != 1 {
			t.Fatalf("the networks of %s: %v (%s)", id, err, out)
		}
		for name, n := range nets {
			return name, n.Aliases
		}
		return "", nil
	}
	must := func(out string, err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	leader := func() string {
		ictx, icancel := context.WithTimeout(ctx, 10*time.Second)
		defer icancel()
		info, err := cl.ServerInfo(ictx)
		if err != nil || !info.Leader {
			t.Fatalf("finding the leader: %v", err)
		}
		return info.CoordinatorId // coordinator-0 or coordinator-1: the service's name (--id)
	}
	type fault struct {
		name string
		do   func() (victim string, undo func())
		hold time.Duration
	}
	faults := []fault{
		{"worker-kill", func() (string, func()) {
			id, err := c.container(ctx, "worker-0")
			must("", err)
			must(docker(ctx, "kill", id))
			return "worker-0", func() { must(docker(ctx, "start", id)) }
		}, 3 * time.Second},
		{"worker-stop", func() (string, func()) {
			id, err := c.container(ctx, "worker-1")
			must("", err)
			must(docker(ctx, "kill", "-s", "STOP", id))
			return "worker-1", func() { must(docker(ctx, "kill", "-s", "CONT", id)) }
		}, 6 * time.Second},
		{"worker-cut", func() (string, func()) {
			id, err := c.container(ctx, "worker-2")
			must("", err)
			nw, aliases := network(id)
			must(docker(ctx, "network", "disconnect", nw, id))
			return "worker-2", func() {
				args := []string{"network", "connect"}
				for _, a := range aliases {
					if !strings.HasPrefix(id, a) { // the container's short id comes back by itself
						args = append(args, "--alias", a)
					}
				}
				must(docker(ctx, append(args, nw, id)...))
			}
		}, 6 * time.Second},
		{"leader-kill", func() (string, func()) {
			victim := leader()
			id, err := c.container(ctx, victim)
			must("", err)
			must(docker(ctx, "kill", id))
			return victim, func() { must(docker(ctx, "start", id)) }
		}, 5 * time.Second},
		{"etcd-stop", func() (string, func()) {
			id, err := c.container(ctx, "etcd-0")
			must("", err)
			must(docker(ctx, "stop", "-t", "5", id))
			return "etcd-0", func() { must(docker(ctx, "start", id)) }
		}, 10 * time.Second},
	}

	loadAt := time.Now()
	l.start(ctx)
	stopped := false
	stopLoad := func() {
		if !stopped {
			stopped = true
			close(l.stop)
		}
	}
	defer func() { stopLoad(); cancel(); l.wg.Wait() }()
	time.Sleep(5 * time.Second) // steady state first
	var windows []*window
	for _, f := range faults {
		begin := time.Now()
		victim, undo := f.do()
		w := &window{name: f.name + " (" + victim + ")", begin: begin, at: time.Now()}
		time.Sleep(f.hold)
		undo()
		w.undone = time.Now()
		w.whole = waitWhole(ctx, t, cl, wholeWait)
		time.Sleep(settle)
		windows = append(windows, w)
		t.Logf("%s: whole again %.1fs after the fault, %.1fs after it was undone", w.name, w.whole.Sub(w.at).Seconds(), w.whole.Sub(w.undone).Seconds())
	}
	stopLoad()
	waited := make(chan struct{})
	go func() { l.wg.Wait(); close(waited) }()
	select {
	case <-waited:
	case <-time.After(2 * time.Minute):
		cancel() // the requests still running are lost
		<-waited
	}
	for i, w := range windows {
		w.end = time.Now().Add(time.Hour)
		if i+1 < len(windows) {
			w.end = windows[i+1].begin
		}
		l.summarize(w)
	}

	// The report.
	var b strings.Builder
	fmt.Fprintf(&b, "compose cluster (%s), %d load clients, %d greedy tokens a request; load ran %.0fs\n",
		strings.Join(cc, " "), loadClients, maxTokens, time.Since(loadAt).Seconds())
	fmt.Fprintf(&b, "%-28s %5s %5s %6s %5s %4s %7s %14s %8s %8s %7s %7s\n", "fault", "sent", "done", "failed", "wrong", "lost", "resumed", "in flight", "pause", "stall", "whole", "undo→")
	total := window{}
	for _, w := range windows {
		fmt.Fprintf(&b, "%-28s %5d %5d %6d %5d %4d %7d %3d (%2d>%s) %7.2fs %7.2fs %6.1fs %6.1fs\n", w.name, w.sent, w.ok, w.failed, w.wrong, w.lost, w.resumed,
			w.inFlight, w.affected, affectedGap, w.pause.Seconds(), w.stall.Seconds(), w.whole.Sub(w.at).Seconds(), w.whole.Sub(w.undone).Seconds())
		total.sent += w.sent
		total.ok += w.ok
		total.failed += w.failed
		total.wrong += w.wrong
		total.lost += w.lost
	}
	fmt.Fprintf(&b, "%-28s %5d %5d %6d %5d %4d\n", "all", total.sent, total.ok, total.failed, total.wrong, total.lost)
	for _, w := range windows {
		for _, br := range w.breaks {
			fmt.Fprintf(&b, "%s: a stream broke at fault %s (resumed)\n", w.name, br)
		}
	}
	fmt.Fprintf(&b, "(in flight: streams in flight at the fault, and how many waited over %v for their next token; pause: fault → next token, the longest of them;\n"+
		" stall: the longest token gap of any stream within fault → whole; whole: fault → leader ready, %d workers ready, %d replicas; undo→: the fault undone → whole;\n"+
		" resumed: streams that broke in the window, which the client library sent again with resume)\n", affectedGap, numWorkers, numWorkers)
	t.Logf("%s", b.String())
	for _, w := range windows {
		for _, e := range w.errs {
			t.Errorf("%s: %s", w.name, e)
		}
		if w.ok == 0 {
			t.Errorf("%s: no request completed in its window", w.name)
		}
	}
	if total.sent == 0 {
		t.Errorf("no request was sent")
	}
	t.Logf("the whole test took %.0fs", time.Since(begin).Seconds())
}

// TestComposeConfig: every Compose here (docker-compose 1.29, and the
// `docker compose` plugin where it is installed) accepts the file, with
// and without the bench profile. It needs no engine.
func TestComposeConfig(t *testing.T) {
	root, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		t.Fatal(err)
	}
	file := filepath.Join(root, "docker-compose.yml")
	var ran int
	for _, cmd := range [][]string{{"docker", "compose"}, {"docker-compose"}} {
		if exec.Command(cmd[0], append(cmd[1:], "version")...).Run() != nil {
			continue
		}
		ran++
		for _, extra := range [][]string{nil, {"--profile", "bench"}} {
			args := append(append(slices.Clone(cmd[1:]), "-f", file), extra...)
			if out, err := exec.Command(cmd[0], append(args, "config", "-q")...).CombinedOutput(); err != nil {
				t.Errorf("%s %v config: %v: %s", strings.Join(cmd, " "), extra, err, tail(string(out), 500))
			}
		}
	}
	if ran == 0 {
		t.Skip("neither `docker compose` nor docker-compose is installed")
	}
}

// gossipMisconfigured says whether a log line shows gossip set up wrong (a join that
// failed, an address in conflict, refused or not assignable), not the probe timeouts and
// suspicions that a saturated 2-core machine gives and the cluster rides out.
func gossipMisconfigured(l string) bool {
	if !strings.Contains(l, "level=WARN") && !strings.Contains(l, `"level":"WARN"`) {
		return false
	}
	for _, s := range []string{"gossip join", "Conflicting address", "cannot assign requested address", "connection refused"} {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}
