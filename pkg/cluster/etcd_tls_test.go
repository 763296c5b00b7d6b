package cluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// logLines keeps the records logged through its handler as
// "LEVEL msg k=v ..." lines.
type logLines struct {
	mu    sync.Mutex
	lines []string
}

func (l *logLines) Enabled(context.Context, slog.Level) bool { return true }
func (l *logLines) Handle(_ context.Context, r slog.Record) error {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %s", r.Level, r.Message)
	r.Attrs(func(a slog.Attr) bool {
		fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
		return true
	})
	l.mu.Lock()
	l.lines = append(l.lines, b.String())
	l.mu.Unlock()
	return nil
}
func (l *logLines) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logLines) WithGroup(string) slog.Handler      { return l }

// matching returns the lines holding every one of subs.
func (l *logLines) matching(subs ...string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
next:
	for _, line := range l.lines {
		for _, s := range subs {
			if !strings.Contains(line, s) {
				continue next
			}
		}
		out = append(out, line)
	}
	return out
}

func (l *logLines) all() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

// waitMatching waits until some line holds every one of subs, then a little
// longer so that a second one would show, and returns them all.
func (l *logLines) waitMatching(subs ...string) []string {
	deadline := time.Now().Add(5 * time.Second)
	for len(l.matching(subs...)) == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	return l.matching(subs...)
}

func writeTestCerts(t *testing.T) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(dir, nil, false); err != nil {
		t.Fatal(err)
	}
	return dir
}

func testCAPool(t *testing.T, dir string) *x509.CertPool {
	t.Helper()
	p, err := security.LoadCAPool(filepath.Join(dir, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// etcdFrom is an etcd client dialling from the loopback source address ip
// (so that each kind of client is its own remote host to the server).
func etcdFrom(t *testing.T, endpoint, ip string, cfg *tls.Config) *clientv3.Client {
	t.Helper()
	d := &net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:   []string{endpoint},
		TLS:         cfg,
		DialTimeout: 2 * time.Second,
		Logger:      zap.NewNop(),
		DialOptions: []grpc.DialOption{grpc.WithContextDialer(func(ctx context.Context, addr string) (net.Conn, error) {
			return d.DialContext(ctx, "tcp", addr)
		})},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cli.Close() })
	return cli
}

// TestEmbeddedEtcdTLS: with TLSDir the embedded etcd serves https only: a
// client with worker.pem connects (ConnectWith) and reads and writes; a
// plaintext client, one without a certificate and one with another CA's
// cannot read or write (Connect/ConnectWith fail); each refused host is
// logged once with its reason, the peer port refuses plaintext too, and
// username/password reach etcd's auth.
func TestEmbeddedEtcdTLS(t *testing.T) {
	dir, other := writeTestCerts(t), writeTestCerts(t)
	rec := &logLines{}
	e, err := StartEmbeddedEtcdConfig(EmbeddedEtcdConfig{Dir: t.TempDir(), TLSDir: dir, Log: slog.New(rec)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.Close() })
	eps := e.Endpoints()
	if len(eps) != 1 || !strings.HasPrefix(eps[0], "https://") {
		t.Fatalf("Endpoints %v, want one https:// URL", eps)
	}
	plainEP := "http://" + strings.TrimPrefix(eps[0], "https://")

	worker, err := security.NewTLS(dir, security.RoleWorker)
	if err != nil {
		t.Fatal(err)
	}
	s, err := ConnectWith(testCtx(t, 5*time.Second), eps, "/tls/", ConnectConfig{TLS: worker.ClientConfig("")})
	if err != nil {
		t.Fatalf("ConnectWith worker.pem: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	if _, err := s.client.Put(testCtx(t, 5*time.Second), "/tls/k", "v"); err != nil {
		t.Fatalf("put: %v", err)
	}
	if r, err := s.client.Get(testCtx(t, 5*time.Second), "/tls/k"); err != nil || len(r.Kvs) != 1 || string(r.Kvs[0].Value) != "v" {
		t.Fatalf("get: %v %v", r, err)
	}

	// Refused, through Connect and ConnectWith (all from 127.0.0.1).
	pool := testCAPool(t, dir)
	otherPair, err := tls.LoadX509KeyPair(filepath.Join(other, "client.pem"), filepath.Join(other, "client-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	noCert := &tls.Config{RootCAs: pool}
	otherCA := &tls.Config{RootCAs: pool, Certificates: []tls.Certificate{otherPair}}
	// The three at once (each waits out its deadline).
	var wg sync.WaitGroup
	for _, c := range []struct {
		what string
		eps  []string
		cfg  ConnectConfig
	}{
		{"plaintext Connect", []string{plainEP}, ConnectConfig{}},
		{"ConnectWith without a client certificate", eps, ConnectConfig{TLS: noCert}},
		{"ConnectWith another CA's certificate", eps, ConnectConfig{TLS: otherCA}},
	} {
		wg.Go(func() {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
			defer cancel()
			if s, err := ConnectWith(ctx, c.eps, "/tls/", c.cfg); err == nil {
				s.Close()
				t.Errorf("%s succeeded", c.what)
			}
		})
	}
	wg.Wait()
	if lines := rec.waitMatching("remote=127.0.0.1:"); len(lines) != 1 || !strings.Contains(lines[0], "listener=etcd ") {
		t.Errorf("127.0.0.1 logged %d times, want once on etcd:\n%s", len(lines), rec.all())
	}

	// Each kind from its own host: neither read nor write, one line each
	// with its reason.
	kinds := []struct {
		ip, endpoint, reason string
		cfg                  *tls.Config
	}{
		{"127.0.0.2", plainEP, "not TLS", nil},
		{"127.0.0.3", eps[0], "no client certificate", noCert},
		{"127.0.0.4", eps[0], "not signed by the cluster CA", otherCA},
	}
	for _, c := range kinds {
		cli := etcdFrom(t, c.endpoint, c.ip, c.cfg)
		wg.Go(func() {
			if _, err := cli.Put(testCtx(t, time.Second), "/tls/k", "bad"); err == nil {
				t.Errorf("%s (%s) wrote", c.ip, c.reason)
			}
			if _, err := cli.Get(testCtx(t, time.Second), "/tls/k"); err == nil {
				t.Errorf("%s (%s) read", c.ip, c.reason)
			}
		})
	}
	wg.Wait()
	for _, c := range kinds {
		if lines := rec.waitMatching("remote="+c.ip+":", c.reason); len(lines) != 1 || len(rec.matching("remote="+c.ip+":")) != 1 {
			t.Errorf("%s (%s): logged %d times with the reason, want once:\n%s", c.ip, c.reason, len(lines), rec.all())
		}
	}

	// The peer port refuses plaintext too.
	peer := e.etcd.Peers[0].Addr().String()
	tr := &http.Transport{DialContext: (&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.5")}}).DialContext}
	if resp, err := (&http.Client{Transport: tr, Timeout: 3 * time.Second}).Get("http://" + peer + "/members"); err == nil {
		b, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Errorf("plaintext peer request served: %s", b)
		}
	}
	tr.CloseIdleConnections()
	if lines := rec.waitMatching("remote=127.0.0.5:", "listener=etcd-peer"); len(lines) != 1 {
		t.Errorf("peer refusal logged %d times:\n%s", len(lines), rec.all())
	}
	if got := rec.matching("remote=127.0.0.1:"); len(got) != 1 {
		t.Errorf("127.0.0.1 logged again: %v", got)
	}
	t.Logf("logged:\n%s", rec.all())

	// Username and password reach etcd's auth.
	ctx := testCtx(t, 10*time.Second)
	if _, err := s.client.UserAdd(ctx, "root", "s3cret"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.UserGrantRole(ctx, "root", "root"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.client.AuthEnable(ctx); err != nil {
		t.Fatal(err)
	}
	a, err := ConnectWith(testCtx(t, 5*time.Second), eps, "/tls/", ConnectConfig{TLS: worker.ClientConfig(""), Username: "root", Password: "s3cret"})
	if err != nil {
		t.Fatalf("ConnectWith root: %v", err)
	}
	a.Close()
	if _, err := ConnectWith(testCtx(t, 5*time.Second), eps, "/tls/", ConnectConfig{TLS: worker.ClientConfig(""), Username: "root", Password: "wrong"}); err == nil {
		t.Error("ConnectWith a wrong password succeeded")
	}
}

// TestConnectWithEndpointChecks: an endpoint whose scheme does not match
// the TLS configuration is refused before dialling, naming it; so is half
// of a username/password pair.
func TestConnectWithEndpointChecks(t *testing.T) {
	cfg := &tls.Config{}
	for _, c := range []struct {
		eps  []string
		cfg  ConnectConfig
		want string
	}{
		{[]string{"https://127.0.0.1:1", "http://127.0.0.1:2"}, ConnectConfig{TLS: cfg}, `"http://127.0.0.1:2" is not https://`},
		{[]string{"127.0.0.1:2"}, ConnectConfig{TLS: cfg}, `"127.0.0.1:2" is not https://`},
		{[]string{"https://127.0.0.1:3"}, ConnectConfig{}, `"https://127.0.0.1:3" is https:// but no TLS`},
		{[]string{"ftp://127.0.0.1:4"}, ConnectConfig{}, `unknown scheme "ftp"`},
		{[]string{"http://127.0.0.1:5"}, ConnectConfig{Username: "root"}, "both a username and a password"},
	} {
		start := time.Now()
		_, err := ConnectWith(context.Background(), c.eps, "", c.cfg)
		if err == nil || !strings.Contains(err.Error(), c.want) {
			t.Errorf("%v %+v: %v, want %q", c.eps, c.cfg, err, c.want)
		}
		if time.Since(start) > time.Second {
			t.Errorf("%v: the check took %v", c.eps, time.Since(start))
		}
	}
}

// TestEmbeddedEtcdTLSDirErrors: a TLS directory without the coordinator
// pair is refused, naming the file, before etcd starts.
func TestEmbeddedEtcdTLSDirErrors(t *testing.T) {
	dir := writeTestCerts(t)
	if err := os.Remove(filepath.Join(dir, "coordinator-key.pem")); err != nil {
		t.Fatal(err)
	}
	_, err := StartEmbeddedEtcdConfig(EmbeddedEtcdConfig{Dir: t.TempDir(), TLSDir: dir})
	if err == nil || !strings.Contains(err.Error(), "coordinator-key.pem") {
		t.Errorf("a TLS dir without coordinator-key.pem: %v", err)
	}
}

// TestEmbeddedEtcdRefusesClientRole: the client role's certificate (a
// metrics scraper's), of the cluster CA, cannot use the embedded etcd;
// a worker's can.
func TestEmbeddedEtcdRefusesClientRole(t *testing.T) {
	dir := writeTestCerts(t)
	e, err := StartEmbeddedEtcdConfig(EmbeddedEtcdConfig{Dir: t.TempDir(), TLSDir: dir})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	for role, ok := range map[security.Role]bool{security.RoleClient: false, security.RoleWorker: true} {
		tl, err := security.NewTLS(dir, role)
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		s, err := ConnectWith(ctx, e.Endpoints(), "/cn/", ConnectConfig{TLS: tl.ClientConfig("")})
		cancel()
		if (err == nil) != ok {
			t.Fatalf("role %s: connect error %v, want ok=%v", role, err, ok)
		}
		if s != nil {
			s.Close()
		}
	}
}
