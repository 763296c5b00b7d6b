package server_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// The multi-process tests run with TLS on: TestMain makes one cluster CA
// and certificate set (qwenctl certs' code) and an admin API key; start
// gives every coordinator and worker --tls-dir (and coordinators
// --api-keys), every etcd process its TLS flags, and dial/testClient use
// the CA and the key. A test that starts a process with plainFlag among
// its arguments gets it plaintext (the single-machine default, no flags).
var testTLS struct {
	dir      string // certificates (ca.pem, coordinator.pem, ...)
	keys     string // API keys file
	adminKey string

	mu    sync.Mutex
	plain map[string]bool // --listen addresses of processes started plaintext
}

// plainFlag, among a process's arguments, starts it without the test TLS
// (it is removed before the process starts).
const plainFlag = "--test-plaintext"

func setupTestTLS(root string) error {
	dir := filepath.Join(root, "tls")
	if err := security.WriteCerts(dir, nil, false); err != nil {
		return err
	}
	keys := filepath.Join(root, "keys.jsonl")
	key, err := security.AddAPIKey(keys, "test-admin", security.APIRoleAdmin)
	if err != nil {
		return err
	}
	testTLS.dir, testTLS.keys, testTLS.adminKey = dir, keys, key
	testTLS.plain = map[string]bool{}
	return nil
}

// withTestTLS returns the arguments of a project binary (bin: its base
// name) with the test's TLS flags added.
func withTestTLS(bin string, args []string) []string {
	if i := slices.Index(args, plainFlag); i >= 0 {
		args = slices.Delete(slices.Clone(args), i, i+1)
		if j := slices.Index(args, "--listen"); j >= 0 && j+1 < len(args) {
			testTLS.mu.Lock()
			testTLS.plain[args[j+1]] = true
			testTLS.mu.Unlock()
		}
		return args
	}
	if testTLS.dir == "" || slices.Contains(args, "--tls-dir") || slices.Contains(args, "--insecure") {
		return args
	}
	d := testTLS.dir
	switch bin {
	case "coordinator":
		args = append(args, "--tls-dir", d)
		if !slices.Contains(args, "--api-keys") {
			args = append(args, "--api-keys", testTLS.keys)
		}
	case "worker":
		args = append(args, "--tls-dir", d)
	case "etcd":
		args = append(args, etcdTLSFlags(d)...)
	}
	return args
}

// etcdTLSFlags serve an etcd process's client and peer URLs (https://)
// with the coordinator pair, requiring certificates of the test CA.
func etcdTLSFlags(d string) []string {
	cert, key, ca := filepath.Join(d, "coordinator.pem"), filepath.Join(d, "coordinator-key.pem"), filepath.Join(d, security.CAFile)
	return []string{"--cert-file", cert, "--key-file", key, "--trusted-ca-file", ca, "--client-cert-auth",
		"--peer-cert-file", cert, "--peer-key-file", key, "--peer-trusted-ca-file", ca, "--peer-client-cert-auth"}
}

// etcdScheme is the scheme of the URLs of etcd processes tests start.
func etcdScheme() string {
	if testTLS.dir != "" {
		return "https"
	}
	return "http"
}

// testClientTLS verifies the cluster's servers against the test CA (any
// address: the name checked is localhost, which every certificate has).
func testClientTLS() *tls.Config {
	pool, err := security.LoadCAPool(filepath.Join(testTLS.dir, security.CAFile))
	if err != nil {
		panic(err)
	}
	return &tls.Config{RootCAs: pool, ServerName: "localhost", MinVersion: tls.VersionTLS12}
}

type bearer string

func (b bearer) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{"authorization": "Bearer " + string(b)}, nil
}
func (bearer) RequireTransportSecurity() bool { return false }

// publicDialOptions are how a test reaches the public API at addr: TLS
// and the admin key, unless the process there was started plaintext.
func publicDialOptions(addr string) []grpc.DialOption {
	testTLS.mu.Lock()
	plain := testTLS.dir == "" || testTLS.plain[addr]
	testTLS.mu.Unlock()
	if plain {
		return []grpc.DialOption{grpc.WithTransportCredentials(insecure.NewCredentials())}
	}
	return []grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(testClientTLS())),
		grpc.WithPerRPCCredentials(bearer(testTLS.adminKey))}
}

// testEtcdTLS is a worker's client configuration for the test's etcd
// (nil for http:// endpoints).
func testEtcdTLS(t testing.TB, endpoints []string) *tls.Config {
	if len(endpoints) == 0 || !strings.HasPrefix(endpoints[0], "https://") {
		return nil
	}
	tl, err := security.NewTLS(testTLS.dir, security.RoleWorker)
	if err != nil {
		t.Fatal(err)
	}
	return tl.ClientConfig("")
}

// connectStore connects to the test cluster's etcd as a worker would.
func connectStore(t testing.TB, ctx context.Context, endpoints []string) (*cluster.Store, error) {
	return cluster.ConnectWith(ctx, endpoints, "/qwenfleet/", cluster.ConnectConfig{TLS: testEtcdTLS(t, endpoints)})
}

// etcdClient is a raw etcd client for the test's etcd.
func etcdClient(t testing.TB, endpoints []string) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 2 * time.Second, TLS: testEtcdTLS(t, endpoints)})
}

// etcdClientTLS is a raw etcd client with the given TLS configuration.
func etcdClientTLS(endpoints []string, cfg *tls.Config) (*clientv3.Client, error) {
	return clientv3.New(clientv3.Config{Endpoints: endpoints, DialTimeout: 2 * time.Second, TLS: cfg})
}

// metricsClient is how a test scrapes the metrics listener at addr: HTTPS
// with the client certificate (a Prometheus scraper's) under the test TLS.
func metricsClient(t testing.TB, addr string) (*http.Client, string) {
	if testTLS.dir == "" {
		return http.DefaultClient, "http://" + addr + "/metrics"
	}
	cfg := testClientTLS()
	pair, err := tls.LoadX509KeyPair(filepath.Join(testTLS.dir, "client.pem"), filepath.Join(testTLS.dir, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Certificates = []tls.Certificate{pair}
	return &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}, "https://" + addr + "/metrics"
}
