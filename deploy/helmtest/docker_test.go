package helmtest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/bench"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	"github.com/qwenfleet/qwenfleet/pkg/server"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/util/intstr"
)

// The label on every container and network the test makes.
const dockerLabel = "qwenfleet-helmtest"

// nodeName is the node every pod runs on (spec.nodeName): one docker host, one node.
const nodeName = "helmtest-node-0"

// TestCPUDemoInDocker runs the cpu-demo preset, rendered by helm with real certificates
// and API keys, as docker containers: what a kubelet would run (init containers, then
// the containers, with their args, env including fieldRefs, ports, Secrets, emptyDirs
// and security contexts), on a network whose aliases are the names the Services and
// StatefulSets give; a ClusterIP Service is a proxy on the network's gateway to the
// ready pods it selects (the test probes readiness as the kubelet would). Then a first
// Generate through the coordinator Service from a qwenctl container, and a steady load
// while the worker StatefulSet is scaled by one: the next ordinal joins, forms a
// replica, takes requests, and no request fails.
func TestCPUDemoInDocker(t *testing.T) {
	if testing.Short() {
		t.Skip("-short: the chart's docker run takes about 2 minutes")
	}
	if out, err := exec.Command("docker", "info", "--format", "{{.ServerVersion}}").CombinedOutput(); err != nil {
		t.Skipf("no Docker engine answers (docker info: %v: %s)", err, strings.TrimSpace(string(out)))
	}
	ensureImages(t)

	const release, ns = "qfd", "demo"
	demo := presets(t)["cpu-demo"]
	if demo == "" {
		t.Fatal("no cpu-demo preset")
	}
	// Certificates with the names the chart says they need (its Certificates' names).
	hosts := chartCertHosts(t, Render(t, release, ns, "-f", demo, "--set", "tls.source=certManager", "--set", "tls.certManager.issuerRef.name=ca"))
	tlsDir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(tlsDir, hosts, false); err != nil {
		t.Fatal(err)
	}
	keys := filepath.Join(tlsDir, "keys.jsonl")
	adminKey, err := security.AddAPIKey(keys, "admin", security.APIRoleAdmin)
	if err != nil {
		t.Fatal(err)
	}
	userKey, err := security.AddAPIKey(keys, "bench", security.APIRoleUser)
	if err != nil {
		t.Fatal(err)
	}
	m := Render(t, release, ns, append(append([]string{"-f", demo}, certFileArgs(tlsDir)...), "--set-file", "apiKeys.file="+keys)...)

	c := newDockerCluster(t, m, ns)
	etcd, workers, coord := workload(t, m, "etcd"), workload(t, m, "worker"), workload(t, m, "coordinator")
	svc := coord.name // the coordinator Service has the Deployment's name
	start := time.Now()
	for i := 0; i < int(*etcd.replicas); i++ {
		c.startPod(etcd, fmt.Sprintf("%s-%d", etcd.name, i))
	}
	for i := 0; i < int(*workers.replicas); i++ {
		c.startPod(workers, fmt.Sprintf("%s-%d", workers.name, i))
	}
	for i := 0; i < int(*coord.replicas); i++ {
		c.startPod(coord, fmt.Sprintf("%s-%s-%s", coord.name, randomHex(5), randomHex(3)))
	}
	c.waitReady(t, "etcd", 90*time.Second)
	c.waitReady(t, "coordinator", 180*time.Second)
	t.Logf("a coordinator leads with a ready replica %.1fs after the pods started; ready: %s", time.Since(start).Seconds(), c.readySummary())

	// The first Generate, NOTES.txt's kubectl run: qwenctl on the network, the Service's
	// name, ca.pem of the TLS Secret, an API key.
	first := FirstCall(t, Notes(t, release, ns, append(append([]string{"-f", demo}, certFileArgs(tlsDir)...), "--set-file", "apiKeys.file="+keys)...), userKey)
	caDir := c.hostDir("client-ca", 0o755)
	copyFile(t, filepath.Join(tlsDir, security.CAFile), filepath.Join(caDir, security.CAFile), 0o644)
	fc := first.Spec.Containers[0]
	out, err := c.runClient(2*time.Minute, "qwenctl-first", nil, []string{"--mount", "type=bind,src=" + caDir + ",dst=" + fc.VolumeMounts[0].MountPath + ",readonly"},
		append(fc.Args, "--json")...)
	if err != nil {
		t.Fatalf("NOTES.txt's first call (qwenctl %s): %v\n%s", strings.Join(fc.Args, " "), err, out)
	}
	var gen struct {
		IDs          []int  `json:"ids"`
		FinishReason string `json:"finish_reason"`
	}
	if err := json.Unmarshal([]byte(lastJSONLine(out)), &gen); err != nil || len(gen.IDs) == 0 {
		t.Fatalf("qwenctl generate printed %q (%v)", out, err)
	}
	t.Logf("NOTES.txt's first call, qwenctl %s: %d tokens (%s)", strings.ReplaceAll(strings.Join(fc.Args, " "), userKey, "$KEY"), len(gen.IDs), gen.FinishReason)
	if ready := len(c.endpoints(coord.meta.Labels, intstr.FromString("grpc"))); ready != 1 {
		t.Errorf("%d coordinators ready, want 1: the leader (the Service routes to it alone)", ready)
	}

	info := c.infoClient(t, svc, tlsDir, adminKey)
	before, err := info()
	if err != nil {
		t.Fatal(err)
	}
	replicas0 := len(before.GetPlacement().GetReplicas())
	if replicas0 != int(*workers.replicas) {
		t.Fatalf("%d replicas on %d workers before the scale-up, want one each (tp 1)", replicas0, *workers.replicas)
	}
	c.checkAddresses(t, before, coord, workers)

	// The kubelet makes a pod's sandbox anew (a node restarts, the sandbox dies): the init
	// containers run again over the emptyDir they filled, and must leave the model alone.
	w0 := c.pod(workers.name + "-0")
	if out, err := w0.rerunInit(); err != nil || !strings.Contains(out, "already holds a model") {
		t.Errorf("pod %s's init containers run again over its volume: %v\n%s", w0.name, err, lastLines(out, 5))
	} else {
		t.Logf("pod %s's init containers run again over its volume: %s", w0.name, strings.TrimSpace(lastLines(out, 1)))
	}

	// A steady load through the Service's full name; the StatefulSet scaled by one
	// (`kubectl scale --replicas N+1`: the next ordinal starts) while it runs.
	outDir := c.hostDir("bench-out", 0o777)
	const benchFor = 40 * time.Second
	benchDone := make(chan error, 1)
	benchStart := time.Now()
	go func() {
		// The key from a file, as a mounted Secret gives it.
		keyFile := filepath.Join(caDir, "bench.key")
		if err := os.WriteFile(keyFile, []byte(userKey+"\n"), 0o644); err != nil {
			benchDone <- err
			return
		}
		out, err := c.runClient(benchFor+2*time.Minute, "bench", nil, []string{"--mount", "type=bind,src=" + caDir + ",dst=/tls,readonly", "--mount", "type=bind,src=" + outDir + ",dst=/out"},
			"bench", "--addr", svc+"."+ns+".svc.cluster.local:50051", "--tls-dir", "/tls", "--api-key-file", "/tls/bench.key",
			"--rate", "3", "--duration", benchFor.String(), "--input-len", "uniform:8-48", "--output-len", "24", "--seed", "7", "--quiet", "--json", "/out/bench.json")
		if err != nil {
			err = fmt.Errorf("%v\n%s", err, lastLines(out, 15))
		}
		benchDone <- err
	}()
	time.Sleep(8 * time.Second)
	newPod := fmt.Sprintf("%s-%d", workers.name, *workers.replicas)
	scaled := time.Now()
	c.startPod(workers, newPod)
	var joined time.Time
	var steps0 float64
	for deadline := time.Now().Add(benchFor); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		si, err := info()
		if err != nil {
			continue
		}
		for _, r := range si.GetPlacement().GetReplicas() {
			if slices.Contains(r.GetWorkers(), newPod) && len(si.GetPlacement().GetReplicas()) == replicas0+1 && si.GetReady() {
				joined = time.Now()
			}
		}
		if !joined.IsZero() {
			steps0, _ = c.workerSteps(newPod, tlsDir, svc)
			break
		}
	}
	if joined.IsZero() {
		t.Errorf("worker %s did not join a replica within %v of starting", newPod, benchFor)
	} else {
		t.Logf("%s started %.1fs into the load; in a replica of its own %.1fs later", newPod, scaled.Sub(benchStart).Seconds(), joined.Sub(scaled).Seconds())
	}
	select {
	case err := <-benchDone:
		if err != nil {
			// It exits 1 when a request failed: its report says which.
			t.Errorf("qwenctl bench: %v", err)
		}
	case <-time.After(benchFor + 2*time.Minute):
		t.Fatal("qwenctl bench did not end")
	}
	raw, err := os.ReadFile(filepath.Join(outDir, "bench.json"))
	if err != nil {
		t.Fatal(err)
	}
	var rep bench.Report
	if err := json.Unmarshal(raw, &rep); err != nil {
		t.Fatalf("bench.json: %v", err)
	}
	after := 0
	if !joined.IsZero() {
		for _, r := range rep.Records {
			if benchStart.Add(time.Duration(r.StartS * float64(time.Second))).After(joined) {
				after++
			}
		}
	}
	t.Logf("bench under the scale-up: %d sent, %d completed, %d failed (%v), %d interrupted; %d started after the new replica served; %.2f req/s",
		len(rep.Records), rep.Completed, rep.Failed, rep.Failures, rep.Interrupted, after, rep.RequestThroughput)
	if rep.Failed != 0 || rep.Completed == 0 || rep.Completed != len(rep.Records) {
		t.Errorf("bench: %d completed, %d failed %v of %d: want every request to complete", rep.Completed, rep.Failed, rep.Failures, len(rep.Records))
	}
	final, err := info()
	if err != nil {
		t.Fatal(err)
	}
	if n := len(final.GetPlacement().GetReplicas()); n != replicas0+1 {
		t.Errorf("%d replicas after the scale-up, want %d", n, replicas0+1)
	}
	c.checkProbes(t)
	// Nobody left or failed: gossip (every member on its fixed port) stayed quiet.
	if trouble := c.gossipTrouble(); len(trouble) > 0 {
		t.Errorf("gossip trouble in the logs (%d lines):\n%s", len(trouble), strings.Join(trouble[:min(len(trouble), 12)], "\n"))
	}
	if !joined.IsZero() {
		steps1, err := c.workerSteps(newPod, tlsDir, svc)
		if err != nil {
			t.Errorf("%s /metrics: %v", newPod, err)
		} else if steps1 <= steps0 {
			t.Errorf("%s ran %v steps after it joined: the new replica took no request", newPod, steps1-steps0)
		} else {
			t.Logf("%s ran %.0f steps after it joined (worker_steps_total over HTTPS with the client certificate)", newPod, steps1-steps0)
		}
	}
}

func (c *dockerCluster) pod(name string) *dockerPod {
	c.mu.Lock()
	defer c.mu.Unlock()
	p := c.pods[name]
	if p == nil {
		c.t.Fatalf("no pod %s", name)
	}
	return p
}

// checkAddresses: the coordinators and workers are known by the addresses the chart gives
// them. The leader by its pod's IP (--advertise $(POD_IP)), the workers by their peer
// names on their node (--host $(NODE_NAME)); every coordinator and worker gossips on the
// fixed --gossip-port of the pod's address, and a worker registers that address.
func (c *dockerCluster) checkAddresses(t *testing.T, info *pb.ServerInfo, coord, workers *wl) {
	t.Helper()
	var grpcPort int32
	for _, p := range container(t, coord.spec, "coordinator").Ports {
		if p.Name == "grpc" {
			grpcPort = p.ContainerPort
		}
	}
	if eps := c.endpoints(coord.meta.Labels, intstr.FromString("grpc")); len(eps) != 1 || info.GetLeaderAddress() != eps[0] || !strings.HasSuffix(eps[0], fmt.Sprintf(":%d", grpcPort)) {
		t.Errorf("the leader says it is at %q; the ready coordinator is at %v", info.GetLeaderAddress(), eps)
	} else {
		t.Logf("the leader is known at %s (--advertise: its pod's IP)", info.GetLeaderAddress())
	}
	peerDomain := workers.sts.Spec.ServiceName + "." + c.ns + ".svc.cluster.local"
	for _, w := range info.GetWorkers() {
		if w.GetHost() != nodeName || !strings.HasPrefix(w.GetAddress(), w.GetId()+"."+peerDomain+":") {
			t.Errorf("worker %s registered at %s on host %q, want its peer name on %s", w.GetId(), w.GetAddress(), w.GetHost(), nodeName)
		}
	}
	for _, w := range []*wl{coord, workers} {
		gossip := int32(0)
		for _, p := range w.spec.Containers[0].Ports {
			if p.Name == "gossip" {
				gossip = p.ContainerPort
			}
		}
		c.mu.Lock()
		var pods []*dockerPod
		for _, p := range c.pods {
			if p.component == w.component {
				pods = append(pods, p)
			}
		}
		c.mu.Unlock()
		for _, p := range pods {
			conn, err := net.DialTimeout("tcp", net.JoinHostPort(p.ip, strconv.Itoa(int(gossip))), 3*time.Second)
			if err != nil {
				t.Errorf("pod %s: no gossip on %s:%d: %v", p.name, p.ip, gossip, err)
				continue
			}
			conn.Close()
			// A worker registers the gossip address it announces: the pod's, on the port.
			if w.component == "worker" {
				want := net.JoinHostPort(p.ip, strconv.Itoa(int(gossip)))
				if got := registeredGossip(c.logs(p)); got != want {
					t.Errorf("pod %s: the worker registered gossip at %q, want %s (its log: worker registered ... gossip=)", p.name, got, want)
				}
			}
		}
	}
}

// logs are the logs of a pod's containers (not its init containers).
func (c *dockerCluster) logs(p *dockerPod) string {
	c.mu.Lock()
	names := slices.Clone(p.main)
	c.mu.Unlock()
	var b strings.Builder
	for _, n := range names {
		out, _ := exec.Command("docker", "logs", n).CombinedOutput()
		b.Write(out)
	}
	return b.String()
}

// registeredGossip is the gossip address of a worker's "worker registered" log line.
func registeredGossip(logs string) string {
	for _, l := range strings.Split(logs, "\n") {
		if !strings.Contains(l, "worker registered") {
			continue
		}
		for _, f := range strings.Fields(l) {
			if v, ok := strings.CutPrefix(f, "gossip="); ok {
				return strings.Trim(v, `"`)
			}
		}
		if _, v, ok := strings.Cut(l, `"gossip":"`); ok { // --log-format json
			v, _, _ = strings.Cut(v, `"`)
			return v
		}
	}
	return ""
}

// gossipTrouble are the log lines of coordinators and workers that say gossip went wrong:
// a coordinator that could not join a worker's gossip address, memberlist's warnings
// (a member it could not reach, suspected or declared dead, or a refutation).
func (c *dockerCluster) gossipTrouble() []string {
	c.mu.Lock()
	var pods []*dockerPod
	for _, p := range c.pods {
		if p.component == "coordinator" || p.component == "worker" {
			pods = append(pods, p)
		}
	}
	c.mu.Unlock()
	var out []string
	for _, p := range pods {
		for _, l := range strings.Split(c.logs(p), "\n") {
			if gossipMisconfigured(l) {
				if len(l) > 300 {
					l = l[:300] + "…"
				}
				out = append(out, p.name+": "+l)
			}
		}
	}
	slices.Sort(out)
	return out
}

// checkProbes: every coordinator and worker passed its startup probe, and its liveness
// probe passed since and never failed: the standby coordinator too, alive and not ready.
func (c *dockerCluster) checkProbes(t *testing.T) {
	t.Helper()
	c.mu.Lock()
	pods := slices.Collect(maps.Values(c.pods))
	c.mu.Unlock()
	slices.SortFunc(pods, func(a, b *dockerPod) int { return strings.Compare(a.name, b.name) })
	var parts []string
	for _, p := range pods {
		if p.component != "coordinator" && p.component != "worker" {
			continue
		}
		started := time.Duration(p.startedIn.Load())
		ok, failed := p.liveOK.Load(), p.liveFailed.Load()
		parts = append(parts, fmt.Sprintf("%s: started %.0fs, live %d/%d, ready %v", p.name, started.Seconds(), ok, ok+failed, p.ready.Load()))
		if started == 0 || ok == 0 || failed > 0 {
			t.Errorf("pod %s: startup probe passed after %v, liveness probes %d passed and %d failed: want it started and live", p.name, started, ok, failed)
		}
	}
	t.Logf("probes (startup and liveness on %s, readiness on \"\"): %s", server.LivenessService, strings.Join(parts, "; "))
}

// ensureImages builds the images with scripts/build-images.sh, every run: the chart runs
// the flags of the code here, and images of an older tree would lack them (the build is
// quick when the Go build cache and docker's layer cache are warm; the script runs one
// build at a time, the compose test builds the same images).
func ensureImages(t *testing.T) {
	t.Helper()
	script := filepath.Join(repoRoot(t), "scripts", "build-images.sh")
	if _, err := os.Stat(script); err != nil {
		t.Fatalf("no scripts/build-images.sh to build the qwenfleet/* images")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	start := time.Now()
	cmd := exec.CommandContext(ctx, script)
	cmd.Dir = repoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("scripts/build-images.sh: %v\n%s", err, lastLines(string(out), 20))
	}
	for _, name := range []string{"coordinator", "worker", "qwenctl", "etcd"} {
		if exec.Command("docker", "image", "inspect", "qwenfleet/"+name+":"+server.Version).Run() != nil {
			t.Fatalf("scripts/build-images.sh made no qwenfleet/%s:%s", name, server.Version)
		}
	}
	t.Logf("images built in %.0fs", time.Since(start).Seconds())
}

// dockerCluster is the emulation: a network, the rendered objects, the pods started.
type dockerCluster struct {
	t      *testing.T
	m      Manifests
	ns     string
	run    string // this run's id (the label's value, the names' prefix)
	net    string
	prefix string // the network's first three octets
	gw     string
	root   string // host directories of the volumes
	nextIP atomic.Int32

	mu      sync.Mutex
	pods    map[string]*dockerPod
	proxies []net.Listener
	stop    chan struct{}
	wg      sync.WaitGroup
}

type dockerPod struct {
	name, ip, component string
	labels              map[string]string
	ready               atomic.Bool
	main                []string // its containers (not the init containers)
	// rerunInit runs the pod's init containers again over its volumes, as the kubelet
	// does when it makes the pod's sandbox anew; it returns their output.
	rerunInit func() (string, error)
	// The kubelet's other probes: when the startup probe first passed (after the
	// container started), and the liveness probes that passed and failed since.
	startedIn          atomic.Int64 // nanoseconds; 0: not yet
	liveOK, liveFailed atomic.Int64
}

func newDockerCluster(t *testing.T, m Manifests, ns string) *dockerCluster {
	c := &dockerCluster{t: t, m: m, ns: ns, run: "qfh" + randomHex(3), pods: map[string]*dockerPod{}, stop: make(chan struct{})}
	root, err := os.MkdirTemp("", "qwenfleet-helmtest-")
	if err != nil {
		t.Fatal(err)
	}
	c.root = root
	t.Cleanup(c.cleanup)
	c.createNetwork()
	c.startProxies()
	return c
}

func (c *dockerCluster) cleanup() {
	close(c.stop)
	c.mu.Lock()
	for _, l := range c.proxies {
		l.Close()
	}
	c.mu.Unlock()
	ids, _ := exec.Command("docker", "ps", "-aq", "--filter", "label="+dockerLabel+"="+c.run).Output()
	if c.t.Failed() {
		names, _ := exec.Command("docker", "ps", "-a", "--filter", "label="+dockerLabel+"="+c.run, "--format", "{{.Names}} {{.Status}}").Output()
		for _, line := range strings.Split(strings.TrimSpace(string(names)), "\n") {
			name, _, _ := strings.Cut(line, " ")
			if name == "" {
				continue
			}
			logs, _ := exec.Command("docker", "logs", "--tail", "12", name).CombinedOutput()
			var short []string
			for _, l := range strings.Split(strings.TrimRight(string(logs), "\n"), "\n") {
				if len(l) > 400 {
					l = l[:400] + "…"
				}
				short = append(short, l)
			}
			c.t.Logf("== %s\n%s", line, strings.Join(short, "\n"))
		}
	}
	if f := strings.Fields(string(ids)); len(f) > 0 {
		if out, err := exec.Command("docker", append([]string{"rm", "-f", "-v"}, f...)...).CombinedOutput(); err != nil {
			c.t.Errorf("docker rm: %v: %s", err, out)
		}
	}
	if c.net != "" {
		if out, err := exec.Command("docker", "network", "rm", c.net).CombinedOutput(); err != nil {
			c.t.Errorf("docker network rm %s: %v: %s", c.net, err, out)
		}
	}
	c.wg.Wait()
	if err := os.RemoveAll(c.root); err != nil {
		c.t.Logf("removing %s: %v", c.root, err)
	}
}

// createNetwork makes a bridge network on a /24 no local interface uses.
func (c *dockerCluster) createNetwork() {
	var used []*net.IPNet
	if addrs, err := net.InterfaceAddrs(); err == nil {
		for _, a := range addrs {
			if n, ok := a.(*net.IPNet); ok {
				used = append(used, n)
			}
		}
	}
	var b [2]byte
	for try := 0; try < 20; try++ {
		rand.Read(b[:])
		prefix := fmt.Sprintf("10.%d.%d", 200+int(b[0])%50, b[1])
		ip := net.ParseIP(prefix + ".1")
		clash := false
		for _, n := range used {
			if n.Contains(ip) {
				clash = true
			}
		}
		if clash {
			continue
		}
		name := c.run + "-net"
		out, err := exec.Command("docker", "network", "create", "--driver", "bridge", "--subnet", prefix+".0/24", "--gateway", prefix+".1",
			"--label", dockerLabel+"="+c.run, name).CombinedOutput()
		if err != nil {
			c.t.Logf("docker network create %s.0/24: %v: %s", prefix, err, strings.TrimSpace(string(out)))
			continue
		}
		c.net, c.prefix, c.gw = name, prefix, prefix+".1"
		c.nextIP.Store(10)
		return
	}
	c.t.Fatal("could not create a docker network")
}

func (c *dockerCluster) hostDir(name string, mode os.FileMode) string {
	d, err := os.MkdirTemp(c.root, name+"-")
	if err != nil {
		c.t.Fatal(err)
	}
	if err := os.Chmod(d, mode); err != nil {
		c.t.Fatal(err)
	}
	return d
}

// serviceNames are a Service's DNS names as pods resolve them.
func (c *dockerCluster) serviceNames(svc string) []string {
	return []string{svc, svc + "." + c.ns, svc + "." + c.ns + ".svc", svc + "." + c.ns + ".svc.cluster.local"}
}

// addHosts points every ClusterIP Service's names at the gateway, where its proxy listens.
func (c *dockerCluster) addHosts() []string {
	var args []string
	for _, s := range Of[corev1.Service](c.m) {
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			continue
		}
		for _, n := range c.serviceNames(s.Name) {
			args = append(args, "--add-host", n+":"+c.gw)
		}
	}
	return args
}

// startProxies listens on the gateway for every port of every ClusterIP Service and
// forwards each connection to a ready pod the Service selects (kube-proxy).
func (c *dockerCluster) startProxies() {
	for _, s := range Of[corev1.Service](c.m) {
		if s.Spec.ClusterIP == corev1.ClusterIPNone {
			continue
		}
		for _, p := range s.Spec.Ports {
			l, err := net.Listen("tcp", net.JoinHostPort(c.gw, strconv.Itoa(int(p.Port))))
			if err != nil {
				c.t.Fatalf("Service %s port %d: %v", s.Name, p.Port, err)
			}
			c.mu.Lock()
			c.proxies = append(c.proxies, l)
			c.mu.Unlock()
			sel, target := s.Spec.Selector, p.TargetPort
			c.wg.Add(1)
			go func() {
				defer c.wg.Done()
				var next atomic.Int64
				for {
					conn, err := l.Accept()
					if err != nil {
						return
					}
					eps := c.endpoints(sel, target)
					if len(eps) == 0 {
						conn.Close() // no ready endpoint: refused
						continue
					}
					ep := eps[int(next.Add(1))%len(eps)]
					go proxy(conn, ep)
				}
			}()
		}
	}
}

func proxy(in net.Conn, to string) {
	defer in.Close()
	out, err := net.DialTimeout("tcp", to, 5*time.Second)
	if err != nil {
		return
	}
	defer out.Close()
	done := make(chan struct{}, 2)
	go func() { io.Copy(out, in); out.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	go func() { io.Copy(in, out); in.(*net.TCPConn).CloseWrite(); done <- struct{}{} }()
	<-done
	<-done
}

// endpoints are the ready pods a selector picks, as ip:port of the target port.
func (c *dockerCluster) endpoints(sel map[string]string, target intstr.IntOrString) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []string
	for _, p := range c.pods {
		if !p.ready.Load() || !labels.SelectorFromSet(sel).Matches(labels.Set(p.labels)) {
			continue
		}
		port := target.IntVal
		if target.Type == intstr.String {
			w := findWorkload(c.m, p.component)
			port = 0
			for _, ct := range w.spec.Containers {
				for _, cp := range ct.Ports {
					if cp.Name == target.StrVal {
						port = cp.ContainerPort
					}
				}
			}
		}
		out = append(out, net.JoinHostPort(p.ip, strconv.Itoa(int(port))))
	}
	slices.Sort(out)
	return out
}

// startPod runs a pod of workload w: its volumes on the host, its init containers one
// after the other to completion, then its containers, and a prober of its readiness.
func (c *dockerCluster) startPod(w *wl, name string) {
	t := c.t
	ip := fmt.Sprintf("%s.%d", c.prefix, c.nextIP.Add(1))
	pod := &dockerPod{name: name, ip: ip, component: w.component, labels: maps.Clone(w.meta.Labels)}
	c.mu.Lock()
	c.pods[name] = pod
	c.mu.Unlock()
	spec := w.spec

	// Names: a StatefulSet pod's <pod>.<service>[.<ns>.svc.cluster.local], and the
	// headless Services' names (every pod they select).
	var aliases []string
	for _, s := range Of[corev1.Service](c.m) {
		if s.Spec.ClusterIP != corev1.ClusterIPNone || !labels.SelectorFromSet(s.Spec.Selector).Matches(labels.Set(pod.labels)) {
			continue
		}
		aliases = append(aliases, c.serviceNames(s.Name)...)
		if w.sts != nil && w.sts.Spec.ServiceName == s.Name {
			for _, n := range c.serviceNames(s.Name) {
				aliases = append(aliases, name+"."+n)
			}
		}
	}
	mounts := c.volumes(spec, name)

	// The pod's network: its IP, name and aliases. (A container run again while the pod's
	// containers run has none: docker gives an IP to one container only.)
	network := []string{"--network", c.net, "--ip", ip}
	for _, a := range aliases {
		network = append(network, "--network-alias", a)
	}
	network = append(network, c.addHosts()...)
	base := []string{"--hostname", name, "--label", dockerLabel + "=" + c.run, "--label", "qwenfleet-helmtest-pod=" + name}
	if sc := spec.SecurityContext; sc != nil {
		if sc.RunAsUser != nil {
			u := strconv.FormatInt(*sc.RunAsUser, 10)
			if sc.RunAsGroup != nil {
				u += ":" + strconv.FormatInt(*sc.RunAsGroup, 10)
			}
			base = append(base, "--user", u)
		}
		if sc.FSGroup != nil {
			base = append(base, "--group-add", strconv.FormatInt(*sc.FSGroup, 10))
		}
	}
	run := func(ct corev1.Container, detach bool, suffix string) (string, error) {
		cname := c.run + "-" + name + "-" + ct.Name + suffix
		args := []string{"run", "--name", cname}
		if detach {
			args = append(args, "-d")
		}
		if suffix == "" {
			args = append(args, network...)
		} else {
			args = append(args, "--network", "none")
		}
		args = append(args, base...)
		args = append(args, securityArgs(ct.SecurityContext)...)
		args = append(args, resourceArgs(ct.Resources)...)
		env := c.env(ct, pod)
		for _, k := range slices.Sorted(maps.Keys(env)) {
			args = append(args, "-e", k+"="+env[k])
		}
		for _, vm := range ct.VolumeMounts {
			src, ok := mounts[vm.Name]
			if !ok {
				t.Fatalf("pod %s: container %s mounts %s, a volume the test cannot make", name, ct.Name, vm.Name)
			}
			mnt := "type=bind,src=" + src.dir + ",dst=" + vm.MountPath
			if vm.ReadOnly || src.readOnly {
				mnt += ",readonly"
			}
			args = append(args, "--mount", mnt)
		}
		cmdline := expandAll(ct.Command, env)
		if len(cmdline) > 0 {
			args = append(args, "--entrypoint", cmdline[0])
		}
		args = append(args, ct.Image)
		if len(cmdline) > 1 {
			args = append(args, cmdline[1:]...)
		}
		args = append(args, expandAll(ct.Args, env)...)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		out, err := exec.CommandContext(ctx, "docker", args...).CombinedOutput()
		if detach {
			c.mu.Lock()
			pod.main = append(pod.main, cname)
			c.mu.Unlock()
		}
		return string(out), err
	}
	for _, ct := range spec.InitContainers {
		if out, err := run(ct, false, ""); err != nil {
			t.Fatalf("pod %s: init container %s: %v\n%s", name, ct.Name, err, lastLines(out, 20))
		}
	}
	var reruns atomic.Int32
	pod.rerunInit = func() (string, error) {
		suffix := fmt.Sprintf("-again%d", reruns.Add(1))
		var all strings.Builder
		for _, ct := range spec.InitContainers {
			out, err := run(ct, false, suffix)
			all.WriteString(out)
			if err != nil {
				return all.String(), fmt.Errorf("init container %s: %w", ct.Name, err)
			}
		}
		return all.String(), nil
	}
	for _, ct := range spec.Containers {
		if out, err := run(ct, true, ""); err != nil {
			t.Fatalf("pod %s: container %s: %v\n%s", name, ct.Name, err, lastLines(out, 20))
		}
		c.wg.Add(1)
		go c.probe(pod, ct)
	}
}

// stopped reports whether the cluster is being taken down (probes fail then).
func (c *dockerCluster) stopped() bool {
	select {
	case <-c.stop:
		return true
	default:
		return false
	}
}

// sleep waits d, or returns false when the cluster is being taken down.
func (c *dockerCluster) sleep(d time.Duration) bool {
	select {
	case <-c.stop:
		return false
	case <-time.After(d):
		return true
	}
}

// probe runs a container's probes as the kubelet does: the startup probe until it
// passes (failureThreshold failures in a row: the kubelet would restart the container, a
// test error), then the liveness probe (the same) and the readiness probe, which marks
// the pod ready or not for the Services.
func (c *dockerCluster) probe(pod *dockerPod, ct corev1.Container) {
	defer c.wg.Done()
	ports := map[string]int32{}
	for _, cp := range ct.Ports {
		ports[cp.Name] = cp.ContainerPort
	}
	timing := func(p *corev1.Probe) (period, timeout time.Duration, threshold int) {
		return time.Duration(max(p.PeriodSeconds, 1)) * time.Second, time.Duration(max(p.TimeoutSeconds, 1)) * time.Second, int(max(p.FailureThreshold, 1))
	}
	begin := time.Now()
	if p := ct.StartupProbe; p != nil {
		period, timeout, threshold := timing(p)
		for fails := 0; !probeOnce(p, pod.ip, ports, timeout); {
			if fails++; fails >= threshold {
				if !c.stopped() {
					c.t.Errorf("pod %s container %s: the startup probe failed %d times in a row over %.0fs: the kubelet would restart it", pod.name, ct.Name, fails, time.Since(begin).Seconds())
				}
				return
			}
			if !c.sleep(period) {
				return
			}
		}
	}
	pod.startedIn.Store(int64(max(time.Since(begin), 1)))
	if p := ct.LivenessProbe; p != nil {
		c.wg.Go(func() {
			period, timeout, threshold := timing(p)
			for fails := 0; c.sleep(period); {
				if probeOnce(p, pod.ip, ports, timeout) {
					pod.liveOK.Add(1)
					fails = 0
					continue
				}
				pod.liveFailed.Add(1)
				if fails++; fails == threshold && !c.stopped() {
					c.t.Errorf("pod %s container %s: the liveness probe failed %d times in a row: the kubelet would restart it", pod.name, ct.Name, fails)
				}
			}
		})
	}
	p := ct.ReadinessProbe
	if p == nil {
		return
	}
	period := time.Duration(max(p.PeriodSeconds, 1)) * time.Second
	timeout := time.Duration(max(p.TimeoutSeconds, 1)) * time.Second
	fails, oks := 0, 0
	for {
		ok := probeOnce(p, pod.ip, ports, timeout)
		if ok {
			oks, fails = oks+1, 0
			if oks >= int(max(p.SuccessThreshold, 1)) {
				pod.ready.Store(true)
			}
		} else {
			fails, oks = fails+1, 0
			if fails >= int(max(p.FailureThreshold, 1)) {
				pod.ready.Store(false)
			}
		}
		select {
		case <-c.stop:
			return
		case <-time.After(period):
		}
	}
}

func probeOnce(p *corev1.Probe, ip string, ports map[string]int32, timeout time.Duration) bool {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	switch {
	case p.GRPC != nil:
		conn, err := grpc.NewClient(net.JoinHostPort(ip, strconv.Itoa(int(p.GRPC.Port))), grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			return false
		}
		defer conn.Close()
		svc := ""
		if p.GRPC.Service != nil {
			svc = *p.GRPC.Service
		}
		r, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		return err == nil && r.GetStatus() == healthpb.HealthCheckResponse_SERVING
	case p.HTTPGet != nil:
		req, _ := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+net.JoinHostPort(ip, strconv.Itoa(int(resolvePort(p.HTTPGet.Port, ports))))+p.HTTPGet.Path, nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return false
		}
		resp.Body.Close()
		return resp.StatusCode >= 200 && resp.StatusCode < 400
	case p.TCPSocket != nil:
		conn, err := (&net.Dialer{}).DialContext(ctx, "tcp", net.JoinHostPort(ip, strconv.Itoa(int(resolvePort(p.TCPSocket.Port, ports)))))
		if err != nil {
			return false
		}
		conn.Close()
		return true
	}
	return false
}

func (c *dockerCluster) waitReady(t *testing.T, component string, within time.Duration) {
	t.Helper()
	for deadline, check := time.Now().Add(within), time.Now(); time.Now().Before(deadline); time.Sleep(200 * time.Millisecond) {
		if time.Since(check) > 3*time.Second {
			check = time.Now()
			if dead := c.exited(component); dead != "" {
				t.Fatalf("%s pods not ready: %s exited", component, dead)
			}
		}
		c.mu.Lock()
		n, ready := 0, 0
		for _, p := range c.pods {
			if p.component == component {
				n++
				if p.ready.Load() {
					ready++
				}
			}
		}
		c.mu.Unlock()
		// etcd: every member; coordinators: one (the leader; the standby is not ready).
		if (component == "coordinator" && ready >= 1) || (n > 0 && ready == n) {
			return
		}
	}
	t.Fatalf("%s pods not ready within %v (%s)", component, within, c.readySummary())
}

// exited names a container of the component's pods (not an init container) that has
// stopped ("" when none has).
func (c *dockerCluster) exited(component string) string {
	c.mu.Lock()
	var mains []string
	for _, p := range c.pods {
		if p.component == component {
			mains = append(mains, p.main...)
		}
	}
	c.mu.Unlock()
	for _, name := range mains {
		out, err := exec.Command("docker", "inspect", "--format", "{{.State.Status}} {{.State.ExitCode}}", name).Output()
		if err == nil && !strings.HasPrefix(string(out), "running") {
			return name + " (" + strings.TrimSpace(string(out)) + ")"
		}
	}
	return ""
}

func (c *dockerCluster) readySummary() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var parts []string
	for _, name := range slices.Sorted(maps.Keys(c.pods)) {
		parts = append(parts, fmt.Sprintf("%s=%v", name, c.pods[name].ready.Load()))
	}
	return strings.Join(parts, " ")
}

type hostVolume struct {
	dir      string
	readOnly bool
}

// volumes makes a pod's volumes on the host: an emptyDir is an empty directory of mode
// 0777 (as the kubelet makes it), a Secret, ConfigMap or projected volume a directory of
// its files with the volume's modes, group-owned by the pod's fsGroup.
func (c *dockerCluster) volumes(spec *corev1.PodSpec, pod string) map[string]hostVolume {
	t := c.t
	out := map[string]hostVolume{}
	gid := -1
	if spec.SecurityContext != nil && spec.SecurityContext.FSGroup != nil && os.Getuid() == 0 {
		gid = int(*spec.SecurityContext.FSGroup)
	}
	secrets := map[string]*corev1.Secret{}
	for _, s := range Of[corev1.Secret](c.m) {
		secrets[s.Name] = s
	}
	configMaps := map[string]*corev1.ConfigMap{}
	for _, cm := range Of[corev1.ConfigMap](c.m) {
		configMaps[cm.Name] = cm
	}
	type file struct {
		data []byte
		mode int32
	}
	write := func(name string, files map[string]file) string {
		dir := c.hostDir(pod+"-"+name, 0o755)
		for path, f := range files {
			p := filepath.Join(dir, path)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			mode := os.FileMode(f.mode)
			if gid < 0 {
				mode |= 0o004 // no fsGroup to give: let the pod's user read it
			}
			if err := os.WriteFile(p, f.data, mode); err != nil {
				t.Fatal(err)
			}
			os.Chmod(p, mode)
			if gid >= 0 {
				os.Chown(p, 0, gid)
			}
		}
		return dir
	}
	items := func(data map[string][]byte, keys []corev1.KeyToPath, defMode int32, into map[string]file, what string) {
		if len(keys) == 0 {
			for k, v := range data {
				into[k] = file{v, defMode}
			}
			return
		}
		for _, k := range keys {
			v, ok := data[k.Key]
			if !ok {
				t.Fatalf("pod %s: %s has no key %s", pod, what, k.Key)
			}
			mode := defMode
			if k.Mode != nil {
				mode = *k.Mode
			}
			into[k.Path] = file{v, mode}
		}
	}
	secretData := func(name string) map[string][]byte {
		s, ok := secrets[name]
		if !ok {
			t.Fatalf("pod %s: Secret %s is not in the release (the test renders it with real certificates)", pod, name)
		}
		data := maps.Clone(s.Data)
		for k, v := range s.StringData {
			data[k] = []byte(v)
		}
		return data
	}
	cmData := func(name string) map[string][]byte {
		cm, ok := configMaps[name]
		if !ok {
			t.Fatalf("pod %s: ConfigMap %s is not in the release", pod, name)
		}
		data := map[string][]byte{}
		for k, v := range cm.Data {
			data[k] = []byte(v)
		}
		maps.Copy(data, cm.BinaryData)
		return data
	}
	mode := func(m *int32) int32 {
		if m == nil {
			return 0o644
		}
		return *m
	}
	for _, v := range spec.Volumes {
		switch {
		case v.EmptyDir != nil:
			out[v.Name] = hostVolume{dir: c.hostDir(pod+"-"+v.Name, 0o777)}
		case v.Secret != nil:
			files := map[string]file{}
			items(secretData(v.Secret.SecretName), v.Secret.Items, mode(v.Secret.DefaultMode), files, "Secret "+v.Secret.SecretName)
			out[v.Name] = hostVolume{dir: write(v.Name, files), readOnly: true}
		case v.ConfigMap != nil:
			files := map[string]file{}
			items(cmData(v.ConfigMap.Name), v.ConfigMap.Items, mode(v.ConfigMap.DefaultMode), files, "ConfigMap "+v.ConfigMap.Name)
			out[v.Name] = hostVolume{dir: write(v.Name, files), readOnly: true}
		case v.Projected != nil:
			files := map[string]file{}
			for _, src := range v.Projected.Sources {
				switch {
				case src.Secret != nil:
					items(secretData(src.Secret.Name), src.Secret.Items, mode(v.Projected.DefaultMode), files, "Secret "+src.Secret.Name)
				case src.ConfigMap != nil:
					items(cmData(src.ConfigMap.Name), src.ConfigMap.Items, mode(v.Projected.DefaultMode), files, "ConfigMap "+src.ConfigMap.Name)
				default:
					t.Fatalf("pod %s: projected volume %s: a source the test cannot make", pod, v.Name)
				}
			}
			out[v.Name] = hostVolume{dir: write(v.Name, files), readOnly: true}
		default:
			t.Fatalf("pod %s: volume %s is of a kind the test cannot make (cpu-demo uses emptyDirs, Secrets and projected volumes)", pod, v.Name)
		}
	}
	return out
}

// env resolves a container's environment as the kubelet does: literal values (with
// $(VAR) of earlier variables expanded), fieldRefs and resourceFieldRefs.
func (c *dockerCluster) env(ct corev1.Container, pod *dockerPod) map[string]string {
	env := map[string]string{}
	for _, e := range ct.Env {
		switch {
		case e.ValueFrom == nil:
			env[e.Name] = expand(e.Value, env)
		case e.ValueFrom.FieldRef != nil:
			switch e.ValueFrom.FieldRef.FieldPath {
			case "metadata.name":
				env[e.Name] = pod.name
			case "metadata.namespace":
				env[e.Name] = c.ns
			case "status.podIP":
				env[e.Name] = pod.ip
			case "spec.nodeName":
				env[e.Name] = nodeName
			default:
				c.t.Fatalf("env %s: fieldRef %s is not emulated", e.Name, e.ValueFrom.FieldRef.FieldPath)
			}
		case e.ValueFrom.ResourceFieldRef != nil:
			r := e.ValueFrom.ResourceFieldRef
			var q = ct.Resources.Limits[corev1.ResourceName(strings.TrimPrefix(r.Resource, "limits."))]
			if strings.HasPrefix(r.Resource, "requests.") {
				q = ct.Resources.Requests[corev1.ResourceName(strings.TrimPrefix(r.Resource, "requests."))]
			}
			if q.IsZero() {
				c.t.Fatalf("env %s: %s is not set (the kubelet would give the node's allocatable)", e.Name, r.Resource)
			}
			div := int64(1)
			if !r.Divisor.IsZero() {
				div = r.Divisor.Value()
			}
			env[e.Name] = strconv.FormatInt((q.Value()+div-1)/div, 10)
		default:
			c.t.Fatalf("env %s: a source the test cannot emulate", e.Name)
		}
	}
	return env
}

// expand replaces $(VAR) by VAR's value when defined ($$ is a literal $), as the kubelet
// expands command, args and env values.
func expand(s string, env map[string]string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '$' && i+1 < len(s) {
			if s[i+1] == '$' {
				b.WriteByte('$')
				i++
				continue
			}
			if s[i+1] == '(' {
				if j := strings.IndexByte(s[i:], ')'); j > 0 {
					if v, ok := env[s[i+2:i+j]]; ok {
						b.WriteString(v)
						i += j
						continue
					}
				}
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

func expandAll(ss []string, env map[string]string) []string {
	out := make([]string, len(ss))
	for i, s := range ss {
		out[i] = expand(s, env)
	}
	return out
}

// securityArgs are a container's securityContext as docker run flags.
func securityArgs(sc *corev1.SecurityContext) []string {
	if sc == nil {
		return nil
	}
	var a []string
	if sc.ReadOnlyRootFilesystem != nil && *sc.ReadOnlyRootFilesystem {
		a = append(a, "--read-only")
	}
	if sc.AllowPrivilegeEscalation != nil && !*sc.AllowPrivilegeEscalation {
		a = append(a, "--security-opt", "no-new-privileges")
	}
	if sc.Capabilities != nil {
		for _, c := range sc.Capabilities.Drop {
			a = append(a, "--cap-drop", string(c))
		}
		for _, c := range sc.Capabilities.Add {
			a = append(a, "--cap-add", string(c))
		}
	}
	if sc.RunAsUser != nil {
		u := strconv.FormatInt(*sc.RunAsUser, 10)
		if sc.RunAsGroup != nil {
			u += ":" + strconv.FormatInt(*sc.RunAsGroup, 10)
		}
		a = append(a, "--user", u)
	}
	return a
}

// resourceArgs are a container's limits as docker run flags.
func resourceArgs(r corev1.ResourceRequirements) []string {
	var a []string
	if q, ok := r.Limits[corev1.ResourceMemory]; ok {
		a = append(a, "--memory", strconv.FormatInt(q.Value(), 10))
	}
	if q, ok := r.Limits[corev1.ResourceCPU]; ok {
		a = append(a, "--cpus", strconv.FormatFloat(float64(q.MilliValue())/1000, 'f', 3, 64))
	}
	return a
}

// runClient runs a qwenctl container on the network (a pod labelled as a client) to
// completion and returns its output.
func (c *dockerCluster) runClient(timeout time.Duration, name string, env map[string]string, extra []string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	a := []string{"run", "--name", c.run + "-" + name, "--network", c.net, "--label", dockerLabel + "=" + c.run,
		"--user", "65532:65532", "--read-only", "--cap-drop", "ALL", "--security-opt", "no-new-privileges"}
	a = append(a, c.addHosts()...)
	for k, v := range env {
		a = append(a, "-e", k+"="+v)
	}
	a = append(a, extra...)
	a = append(a, "qwenfleet/qwenctl:"+server.Version)
	a = append(a, args...)
	cmd := exec.CommandContext(ctx, "docker", a...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	return out.String(), err
}

// infoClient returns a function that asks the leader, through the coordinator Service's
// proxy, for its GetServerInfo (admin key: the full answer).
func (c *dockerCluster) infoClient(t *testing.T, svc, tlsDir, key string) func() (*pb.ServerInfo, error) {
	pool, err := security.LoadCAPool(filepath.Join(tlsDir, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	creds := credentials.NewTLS(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: pool, ServerName: svc})
	conn, err := grpc.NewClient(net.JoinHostPort(c.gw, "50051"), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	stub := pb.NewGeneratorClient(conn)
	return func() (*pb.ServerInfo, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+key)
		return stub.GetServerInfo(ctx, &pb.GetServerInfoRequest{})
	}
}

// workerSteps reads qwenfleet:worker_steps_total from a worker's /metrics over HTTPS with
// the cluster's client certificate (what a Prometheus scraper holds).
func (c *dockerCluster) workerSteps(pod, tlsDir, serverName string) (float64, error) {
	c.mu.Lock()
	p := c.pods[pod]
	c.mu.Unlock()
	if p == nil {
		return 0, fmt.Errorf("no pod %s", pod)
	}
	pool, err := security.LoadCAPool(filepath.Join(tlsDir, security.CAFile))
	if err != nil {
		return 0, err
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(tlsDir, "client.pem"), filepath.Join(tlsDir, "client-key.pem"))
	if err != nil {
		return 0, err
	}
	port := 9091
	if w := findWorkload(c.m, "worker"); w != nil {
		for _, cp := range w.spec.Containers[0].Ports {
			if cp.Name == "metrics" {
				port = int(cp.ContainerPort)
			}
		}
	}
	hc := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{pair}, ServerName: serverName}}}
	resp, err := hc.Get("https://" + net.JoinHostPort(p.ip, strconv.Itoa(port)) + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return 0, fmt.Errorf("/metrics: %s", resp.Status)
	}
	var sum float64
	found := false
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "qwenfleet:worker_steps_total") {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
			found = true
		}
	}
	if !found {
		return 0, errors.New("no qwenfleet:worker_steps_total")
	}
	return sum, sc.Err()
}

func copyFile(t *testing.T, from, to string, mode os.FileMode) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(to, b, mode); err != nil {
		t.Fatal(err)
	}
}

func lastJSONLine(s string) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if strings.HasPrefix(strings.TrimSpace(lines[i]), "{") {
			return lines[i]
		}
	}
	return s
}

func randomHex(n int) string {
	b := make([]byte, (n+1)/2)
	rand.Read(b)
	return hex.EncodeToString(b)[:n]
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
