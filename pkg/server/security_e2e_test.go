package server_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/hashicorp/memberlist"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// pairTLS is a client configuration presenting dir's pair of role (none
// for role "") and trusting caDir's CA.
func pairTLS(t *testing.T, caDir, dir string, role security.Role) *tls.Config {
	t.Helper()
	pool, err := security.LoadCAPool(filepath.Join(caDir, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	cfg := &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if role != "" {
		pair, err := tls.LoadX509KeyPair(filepath.Join(dir, string(role)+".pem"), filepath.Join(dir, string(role)+"-key.pem"))
		if err != nil {
			t.Fatal(err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg
}

// workerCall makes a Release call to the worker at addr over creds, with
// the given metadata, and returns its error.
func workerCall(t *testing.T, addr string, creds credentials.TransportCredentials, md ...string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if len(md) > 0 {
		ctx = metadata.AppendToOutgoingContext(ctx, md...)
	}
	_, err = workerv1.NewWorkerClient(conn).Release(ctx, &workerv1.ReleaseRequest{})
	return err
}

// workerLoad asks the worker at addr to load generation 1 (its current
// assignment) over creds, with the given metadata, and returns the error.
func workerLoad(t *testing.T, addr string, creds credentials.TransportCredentials, md ...string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), md...), 5*time.Second)
	defer cancel()
	s, err := workerv1.NewWorkerClient(conn).Load(ctx, &workerv1.LoadRequest{Version: 1})
	if err != nil {
		return err
	}
	for {
		if _, err := s.Recv(); err != nil {
			if err == io.EOF {
				return nil
			}
			return err
		}
	}
}

// countLines counts the lines of the log file at path matching re.
func countLines(t *testing.T, path string, re *regexp.Regexp) int {
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, l := range bytes.Split(raw, []byte("\n")) {
		if re.Match(l) {
			n++
		}
	}
	return n
}

// TestSecurityListeners: with certificates from the cluster CA, every
// listener refuses plaintext, certificate-less and other-CA connections
// (and logs each refusing host once); the public API wants an API key; a
// client certificate, or a coordinator certificate that does not claim the
// leader, cannot drive a worker; a worker of another CA cannot register;
// a gossip member with another key cannot join.
func TestSecurityListeners(t *testing.T) {
	needE2E(t)
	other := filepath.Join(t.TempDir(), "other-ca")
	if err := security.WriteCerts(other, nil, false); err != nil {
		t.Fatal(err)
	}
	haddr := freeAddr(t)
	c := startCluster(t, refDir("dense-gqa-f32"), "--metrics-listen", "127.0.0.1:0", "--health-listen", haddr)
	info := serverInfo(t, c.client)
	if info.Security != "tls" || len(info.Workers) != 1 || info.Workers[0].Address == "" || info.Workers[0].MetricsAddress == "" {
		t.Fatalf("admin server info: security %q, workers %v", info.Security, info.Workers)
	}
	waddr, maddr := info.Workers[0].Address, info.Workers[0].MetricsAddress
	eps := info.EtcdEndpoints
	if len(eps) == 0 || !strings.HasPrefix(eps[0], "https://") {
		t.Fatalf("embedded etcd endpoints %v: want https", eps)
	}

	// The health port (kubelet's gRPC probes: plaintext) tells the serving
	// status and nothing else.
	hconn, err := grpc.NewClient(haddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer hconn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	hr, err := healthpb.NewHealthClient(hconn).Check(ctx, &healthpb.HealthCheckRequest{})
	cancel()
	if err != nil || hr.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("health port: %v %v", hr, err)
	}
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	_, err = pb.NewGeneratorClient(hconn).GetServerInfo(ctx, &pb.GetServerInfoRequest{})
	cancel()
	if status.Code(err) != codes.Unimplemented {
		t.Fatalf("the health port served GetServerInfo: %v", err)
	}

	// The public port.
	pconn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer pconn.Close()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	_, err = pb.NewGeneratorClient(pconn).GetServerInfo(ctx, &pb.GetServerInfoRequest{})
	cancel()
	if err == nil {
		t.Fatal("the public port answered plaintext")
	}
	kconn, err := grpc.NewClient(c.addr, grpc.WithTransportCredentials(credentials.NewTLS(testClientTLS())))
	if err != nil {
		t.Fatal(err)
	}
	defer kconn.Close()
	ctx, cancel = context.WithTimeout(context.Background(), 5*time.Second)
	s, err := pb.NewGeneratorClient(kconn).Generate(ctx, idsReq([]int32{1, 2, 3}, 2))
	if err == nil {
		_, err = s.Recv()
	}
	cancel()
	if status.Code(err) != codes.Unauthenticated {
		t.Fatalf("a key-less Generate: %v, want Unauthenticated", err)
	}

	// The worker port: plaintext, no certificate, another CA, a client
	// certificate, a coordinator certificate not claiming the leader.
	refusedWorker := func(what string, creds credentials.TransportCredentials, md ...string) {
		t.Helper()
		for range 3 {
			err := workerCall(t, waddr, creds, md...)
			if err == nil {
				t.Fatalf("worker port, %s: a Release was accepted", what)
			}
			t.Logf("worker port, %s: %v", what, err)
		}
	}
	refusedWorker("plaintext", insecure.NewCredentials())
	refusedWorker("no client certificate", credentials.NewTLS(pairTLS(t, testTLS.dir, "", "")))
	refusedWorker("another CA", credentials.NewTLS(pairTLS(t, testTLS.dir, other, security.RoleCoordinator)))
	if err := workerCall(t, waddr, credentials.NewTLS(pairTLS(t, testTLS.dir, testTLS.dir, security.RoleClient))); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("a client certificate's Release: %v, want PermissionDenied", err)
	}
	if err := workerCall(t, waddr, credentials.NewTLS(pairTLS(t, testTLS.dir, testTLS.dir, security.RoleCoordinator)),
		"qwenfleet-leader", "127.0.0.1:1"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "leader") {
		t.Fatalf("a non-leader coordinator's Release: %v, want PermissionDenied naming the leader", err)
	}
	if err := workerLoad(t, waddr, credentials.NewTLS(pairTLS(t, testTLS.dir, testTLS.dir, security.RoleCoordinator)),
		"qwenfleet-leader", "127.0.0.1:1"); status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "leader") {
		t.Fatalf("a non-leader coordinator's Load: %v, want PermissionDenied naming the leader", err)
	}
	if err := workerCall(t, waddr, credentials.NewTLS(pairTLS(t, testTLS.dir, testTLS.dir, security.RoleCoordinator)),
		"qwenfleet-leader", info.LeaderAddress); err != nil {
		t.Fatalf("the leader's Release (nothing to release): %v", err)
	}

	// Metrics: a client certificate of the cluster CA, nothing else.
	get := func(url string, cfg *tls.Config) error {
		cl := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		resp, err := cl.Get(url)
		if err != nil {
			return err
		}
		defer resp.Body.Close()
		io.Copy(io.Discard, resp.Body)
		if resp.StatusCode != 200 {
			return fmt.Errorf("%s", resp.Status)
		}
		return nil
	}
	for i := range 3 {
		if get("http://"+maddr+"/metrics", nil) == nil {
			t.Fatal("metrics answered plain HTTP")
		}
		if get("https://"+maddr+"/metrics", pairTLS(t, testTLS.dir, "", "")) == nil {
			t.Fatal("metrics answered without a client certificate")
		}
		if get("https://"+maddr+"/metrics", pairTLS(t, testTLS.dir, other, security.RoleClient)) == nil {
			t.Fatal("metrics answered another CA's certificate")
		}
		if err := get("https://"+maddr+"/metrics", pairTLS(t, testTLS.dir, testTLS.dir, security.RoleClient)); err != nil {
			t.Fatalf("metrics with the client certificate (try %d): %v", i, err)
		}
	}

	// Embedded etcd: no certificate, another CA.
	for _, cfg := range []*tls.Config{pairTLS(t, testTLS.dir, "", ""), pairTLS(t, testTLS.dir, other, security.RoleWorker)} {
		cli, err := etcdClientTLS(eps, cfg)
		if err == nil {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
			_, err = cli.Put(ctx, "/qwenfleet/workers/intruder", "{}")
			cancel()
			cli.Close()
		}
		if err == nil {
			t.Fatal("etcd took a write without a cluster certificate")
		}
	}

	// A worker with another CA's certificates cannot register.
	start(t, "worker", "--etcd-endpoints", strings.Join(eps, ","), "--id", "intruder", "--threads", "1", "--tls-dir", other)
	time.Sleep(3 * time.Second)
	for _, w := range serverInfo(t, c.client).Workers {
		if w.Id == "intruder" {
			t.Fatal("a worker of another CA registered")
		}
	}

	// A gossip member with another key cannot join the worker's gossip.
	wgossip := ""
	store, err := connectStore(t, context.Background(), eps)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := store.ListWorkers(context.Background())
	store.Close()
	if err != nil {
		t.Fatal(err)
	}
	for _, w := range ws {
		wgossip = w.GossipAddr
	}
	otherKey, err := security.LoadGossipKey(filepath.Join(other, "gossip.key"))
	if err != nil {
		t.Fatal(err)
	}
	mc := memberlist.DefaultLocalConfig()
	mc.Name, mc.BindAddr, mc.BindPort, mc.AdvertisePort = "intruder", "127.0.0.1", 0, 0
	mc.SecretKey, mc.LogOutput = otherKey, io.Discard
	ml, err := memberlist.Create(mc)
	if err != nil {
		t.Fatal(err)
	}
	defer ml.Shutdown()
	for range 3 {
		if n, err := ml.Join([]string{wgossip}); err == nil && n > 0 {
			t.Fatal("a gossip member with another key joined")
		}
	}
	time.Sleep(2 * time.Second)
	if len(readyWorkers(t, c.client)) != 1 {
		t.Fatal("the worker is no longer ready after the intruder's gossip")
	}
	mustGenerate(t, c.client, idsReq([]int32{1, 2, 3}, 4))

	// Each refusing listener logged each refusing host once.
	log := c.coord.log.Name()
	for _, l := range []string{"public", "worker", "metrics", "etcd", "gossip"} {
		re := regexp.MustCompile(`"refused a connection" listener=` + l + ` `)
		if n := countLines(t, log, re); n != 1 {
			t.Errorf("listener %s: %d refusal lines in the log, want 1 (one refusing host)", l, n)
		}
	}
}

// TestModelRootRefusesLoad: a worker with --model-root refuses the
// placement's model outside it (the replica never forms, the coordinator
// says why); a worker whose root holds the model serves it.
func TestModelRootRefusesLoad(t *testing.T) {
	needE2E(t)
	b := startBare(t, refDir("dense-gqa-f32"), "--tp", "1")
	b.worker(t, "w-outside", "--model-root", t.TempDir())
	re := regexp.MustCompile(`not a path under this worker's --model-root`)
	waitFor(t, 60*time.Second, "the coordinator to log the worker's refusal", func() error {
		if countLines(t, b.coord.log.Name(), re) == 0 {
			return fmt.Errorf("not yet")
		}
		return nil
	})
	if info := serverInfo(t, b.client); info.Ready {
		t.Fatal("ready with the only worker refusing the model")
	}
	b.worker(t, "w-inside", "--model-root", filepath.Dir(refDir("dense-gqa-f32")))
	waitReady(t, b.client, b.coord, 90*time.Second)
	mustGenerate(t, b.client, idsReq([]int32{1, 2, 3}, 4))
}

// TestAdvertiseAndLiveness: a coordinator known by --advertise (not its
// bound address) leads under that name (the election, the workers' leader
// check and clients agree), gossip takes --gossip-port, and the liveness
// health service answers SERVING on the plaintext health port.
func TestAdvertiseAndLiveness(t *testing.T) {
	needE2E(t)
	addr, haddr := freeAddr(t), freeAddr(t)
	_, port, _ := net.SplitHostPort(addr)
	gp := freePorts(t, 1)[0]
	c := &clusterT{addr: addr, coord: start(t, "coordinator", "--listen", addr, "--advertise", "localhost:"+port, "--data-dir", t.TempDir(),
		"--log-level", "warn", "--worker-threads", "2", "--model", refDir("dense-gqa-f32"), "--local-workers", "1",
		"--gossip-port", strconv.Itoa(gp), "--health-listen", haddr)}
	c.conn, c.client = dial(t, addr)
	info := waitReady(t, c.client, c.coord, 120*time.Second)
	if info.LeaderAddress != "localhost:"+port || !info.Ready {
		t.Fatalf("leader address %q (ready %v), want localhost:%s", info.LeaderAddress, info.Ready, port)
	}
	mustGenerate(t, c.client, idsReq([]int32{1, 2, 3}, 4))
	if l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", gp)); err == nil {
		l.Close()
		t.Fatalf("nothing listens on --gossip-port %d", gp)
	}
	hconn, err := grpc.NewClient(haddr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer hconn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	hr, err := healthpb.NewHealthClient(hconn).Check(ctx, &healthpb.HealthCheckRequest{Service: "qwenfleet.live"})
	if err != nil || hr.Status != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("liveness: %v %v", hr, err)
	}
}
