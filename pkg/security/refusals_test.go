package security

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// logRecords keeps the records logged through its handler.
type logRecords struct {
	mu   sync.Mutex
	recs []slog.Record
}

func (l *logRecords) Enabled(context.Context, slog.Level) bool { return true }
func (l *logRecords) Handle(_ context.Context, r slog.Record) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.recs = append(l.recs, r.Clone())
	return nil
}
func (l *logRecords) WithAttrs([]slog.Attr) slog.Handler { return l }
func (l *logRecords) WithGroup(string) slog.Handler      { return l }

// lines returns the records as "level msg k=v ..." strings.
func (l *logRecords) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		var b strings.Builder
		fmt.Fprintf(&b, "%s %s", r.Level, r.Message)
		r.Attrs(func(a slog.Attr) bool {
			fmt.Fprintf(&b, " %s=%v", a.Key, a.Value)
			return true
		})
		out = append(out, b.String())
	}
	return out
}

// withAttr returns the lines whose attribute key has a value containing
// val.
func (l *logRecords) withAttr(key, val string) []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	var out []string
	for _, r := range l.recs {
		r.Attrs(func(a slog.Attr) bool {
			if a.Key == key && strings.Contains(a.Value.String(), val) {
				out = append(out, r.Message)
			}
			return true
		})
	}
	return out
}

// waitLines waits until the records hold at least n lines with attribute
// key containing val, then a little more so that extra ones would show.
func waitLines(t *testing.T, l *logRecords, key, val string, n int) []string {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for len(l.withAttr(key, val)) < n && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond)
	return l.withAttr(key, val)
}

// total is the refusals counted for (listener, host).
func (r *Refusals) total(listener, host string) int64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if st := r.hosts[refusalKey{listener, host}]; st != nil {
		return st.total
	}
	return 0
}

func newRecordedRefusals() (*Refusals, *logRecords) {
	rec := &logRecords{}
	return NewRefusals(slog.New(rec)), rec
}

// TestRefusalsOnce: one line per (listener, host), whatever the port; a
// summary at most once an hour; the new-host lines are bounded a minute;
// memory is bounded; a nil Refusals does nothing.
func TestRefusalsOnce(t *testing.T) {
	r, rec := newRecordedRefusals()
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	r.now = func() time.Time { return now }

	for i := range 5 {
		r.Refuse("grpc", fmt.Sprintf("10.0.0.1:%d", 4000+i), "no client certificate")
	}
	r.Refuse("grpc", "10.0.0.2:4000", "not TLS")
	r.Refuse("metrics", "10.0.0.1:5000", "not TLS")
	r.Refuse("gossip", "[fd00::1]:7946", "decrypt")
	r.Refuse("gossip", "[fd00::1]:7947", "decrypt")
	lines := rec.lines()
	if len(lines) != 4 {
		t.Fatalf("%d lines, want 4:\n%s", len(lines), strings.Join(lines, "\n"))
	}
	if want := "WARN refused a connection listener=grpc remote=10.0.0.1:4000 reason=no client certificate"; lines[0] != want {
		t.Errorf("first line %q, want %q", lines[0], want)
	}
	if st := r.hosts[refusalKey{"grpc", "10.0.0.1"}]; st == nil || st.total != 5 {
		t.Errorf("10.0.0.1 on grpc: %+v, want 5 refusals", st)
	}
	if st := r.hosts[refusalKey{"gossip", "fd00::1"}]; st == nil || st.total != 2 {
		t.Errorf("fd00::1 on gossip: %+v, want 2 refusals", st)
	}

	// Within the hour: counted only. After it: one summary line.
	now = now.Add(59 * time.Minute)
	r.Refuse("grpc", "10.0.0.1:4100", "no client certificate")
	if n := len(rec.lines()); n != 4 {
		t.Fatalf("a refusal within the hour logged (%d lines)", n)
	}
	now = now.Add(time.Minute)
	r.Refuse("grpc", "10.0.0.1:4101", "no client certificate")
	r.Refuse("grpc", "10.0.0.1:4102", "no client certificate")
	lines = rec.lines()
	if len(lines) != 5 || !strings.Contains(lines[4], "still refusing connections") || !strings.Contains(lines[4], "refused=6") {
		t.Fatalf("after an hour:\n%s", strings.Join(lines, "\n"))
	}

	// A flood of new hosts in one minute: 100 lines, then one that says
	// how many more there were.
	r2, rec2 := newRecordedRefusals()
	r2.now = func() time.Time { return now }
	for i := range 150 {
		r2.Refuse("grpc", fmt.Sprintf("10.1.%d.%d:1", i/256, i%256), "not TLS")
	}
	if n := len(rec2.lines()); n != refusalLinesPerMinute {
		t.Fatalf("%d lines for 150 new hosts in a minute, want %d", n, refusalLinesPerMinute)
	}
	now = now.Add(time.Minute)
	r2.Refuse("grpc", "10.2.0.1:1", "not TLS")
	lines = rec2.lines()
	if len(lines) != refusalLinesPerMinute+2 || !strings.Contains(lines[refusalLinesPerMinute], "hosts_not_logged=50") {
		t.Fatalf("after the minute: %d lines, the first new %q", len(lines), lines[min(refusalLinesPerMinute, len(lines)-1)])
	}

	// Memory: never more than refusalHostsMax pairs.
	r3 := NewRefusals(nil)
	r3.now = func() time.Time { now = now.Add(time.Millisecond); return now }
	for i := range refusalHostsMax + 500 {
		r3.Refuse("grpc", fmt.Sprintf("10.%d.%d.%d:1", i>>16&255, i>>8&255, i&255), "x")
	}
	if n := len(r3.hosts); n > refusalHostsMax || n < refusalHostsMax/2 {
		t.Errorf("%d pairs remembered", n)
	}
	// The latest are kept.
	if r3.hosts[refusalKey{"grpc", fmt.Sprintf("10.0.%d.%d", (refusalHostsMax+499)>>8&255, (refusalHostsMax+499)&255)}] == nil {
		t.Error("the latest host was forgotten")
	}

	var none *Refusals
	none.Refuse("grpc", "10.0.0.1:1", "x")
}

// loopbackDialer dials from the source address ip (any of 127.0.0.0/8), so
// that each kind of client is its own remote host.
func loopbackDialer(ip string) *net.Dialer {
	return &net.Dialer{Timeout: 5 * time.Second, LocalAddr: &net.TCPAddr{IP: net.ParseIP(ip)}}
}

func checkFrom(addr, ip string, creds credentials.TransportCredentials) error {
	d := loopbackDialer(ip)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds),
		grpc.WithContextDialer(func(ctx context.Context, a string) (net.Conn, error) { return d.DialContext(ctx, "tcp", a) }))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// TestServerCredentialsRefusals: a gRPC server with ServerCredentials
// refuses a plaintext client, one without a certificate and one of another
// CA, each from its own loopback address and three times, and logs each
// host once with its reason; a client of the cluster CA is served and
// PeerRole gives its role.
func TestServerCredentialsRefusals(t *testing.T) {
	dir := writeCerts(t)
	other := writeCerts(t)
	r, rec := newRecordedRefusals()

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var roles []string
	srv := grpc.NewServer(grpc.Creds(ServerCredentials(newTLS(t, dir, RoleWorker).ServerConfig(true), "worker-grpc", r)),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			role, ok := PeerRole(ctx)
			mu.Lock()
			roles = append(roles, fmt.Sprintf("%s %v", role, ok))
			mu.Unlock()
			return h(ctx, req)
		}))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	addr := ln.Addr().String()

	if err := checkFrom(addr, "127.0.0.1", ClientCredentials(newTLS(t, dir, RoleCoordinator).ClientConfig(""))); err != nil {
		t.Fatalf("coordinator: %v", err)
	}
	mu.Lock()
	if len(roles) != 1 || roles[0] != "coordinator true" {
		t.Errorf("PeerRole: %v", roles)
	}
	mu.Unlock()

	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, filepath.Join(dir, CAFile)))
	otherCfg := newTLS(t, other, RoleCoordinator).ClientConfig("")
	otherCfg.VerifyConnection = nil // trusts any server
	for _, c := range []struct {
		ip, reason string
		creds      credentials.TransportCredentials
	}{
		{"127.0.0.2", "not TLS", insecure.NewCredentials()},
		{"127.0.0.3", "no client certificate", credentials.NewTLS(&tls.Config{RootCAs: pool})},
		{"127.0.0.4", "not signed by the cluster CA", credentials.NewTLS(otherCfg)},
	} {
		for range 3 {
			if err := checkFrom(addr, c.ip, c.creds); err == nil {
				t.Errorf("%s (%s) served", c.ip, c.reason)
			}
		}
		lines := waitLines(t, rec, "remote", c.ip+":", 1)
		if len(lines) != 1 {
			t.Errorf("%s: %d lines, want 1: %v", c.ip, len(lines), lines)
		}
		if got := rec.withAttr("reason", c.reason); len(got) != 1 {
			t.Errorf("%s: %d lines with reason %q; all:\n%s", c.ip, len(got), c.reason, strings.Join(rec.lines(), "\n"))
		}
	}
	if n := r.total("worker-grpc", "127.0.0.4"); n < 3 {
		t.Errorf("127.0.0.4: %d refusals counted, want at least 3", n)
	}
	if got := rec.withAttr("remote", "127.0.0.1:"); len(got) != 0 {
		t.Errorf("the good client was reported: %v", got)
	}
	t.Logf("logged:\n%s", strings.Join(rec.lines(), "\n"))
	for _, l := range rec.lines() {
		if !strings.Contains(l, "listener=worker-grpc") {
			t.Errorf("line without the listener: %s", l)
		}
	}
}

// TestTLSListenerRefusals: an HTTP server on TLSListener serves a client of
// the cluster CA (and sees its role), refuses plaintext HTTP, no
// certificate, another CA's certificate and a client that never speaks
// (after the handshake deadline), each logged once for its host; a client
// that never speaks holds up no other.
func TestTLSListenerRefusals(t *testing.T) {
	dir := writeCerts(t)
	other := writeCerts(t)
	r, rec := newRecordedRefusals()

	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := newTLSListener(inner, newTLS(t, dir, RoleCoordinator).ServerConfig(true), "metrics", r, 2*time.Second)
	srv := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		role := "none"
		if req.TLS != nil && len(req.TLS.VerifiedChains) > 0 {
			if ro, ok := RoleOf(req.TLS.VerifiedChains[0][0]); ok {
				role = string(ro)
			}
		}
		io.WriteString(w, role)
	})}
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Close(); <-done })
	url := "https://" + inner.Addr().String() + "/"

	get := func(ip string, cfg *tls.Config, scheme string) (string, error) {
		tr := &http.Transport{DialContext: loopbackDialer(ip).DialContext, TLSClientConfig: cfg, DisableKeepAlives: true}
		defer tr.CloseIdleConnections()
		c := &http.Client{Transport: tr, Timeout: 5 * time.Second}
		resp, err := c.Get(strings.Replace(url, "https", scheme, 1))
		if err != nil {
			return "", err
		}
		defer resp.Body.Close()
		b, err := io.ReadAll(resp.Body)
		return string(b), err
	}

	// A client that never speaks, then a good one: served at once.
	idle, err := loopbackDialer("127.0.0.5").Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer idle.Close()
	time.Sleep(50 * time.Millisecond) // accepted first
	if got, err := get("127.0.0.1", newTLS(t, dir, RoleClient).ClientConfig(""), "https"); err != nil || got != "client" {
		t.Fatalf("client.pem: %q, %v", got, err)
	}
	// Served while the idle client's handshake still waits (handshakes
	// one at a time would have timed it out first).
	if got := rec.withAttr("reason", "timed out"); len(got) != 0 {
		t.Errorf("the good client was served after the idle one timed out")
	}

	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, filepath.Join(dir, CAFile)))
	otherCfg := newTLS(t, other, RoleClient).ClientConfig("")
	otherCfg.VerifyConnection = nil
	for _, c := range []struct {
		ip, reason, scheme string
		cfg                *tls.Config
	}{
		{"127.0.0.2", "not TLS", "http", nil},
		{"127.0.0.3", "no client certificate", "https", &tls.Config{RootCAs: pool}},
		{"127.0.0.4", "not signed by the cluster CA", "https", otherCfg},
	} {
		for range 3 {
			if got, err := get(c.ip, c.cfg, c.scheme); err == nil {
				t.Errorf("%s (%s) served: %q", c.ip, c.reason, got)
			}
		}
		if lines := waitLines(t, rec, "remote", c.ip+":", 1); len(lines) != 1 {
			t.Errorf("%s: %d lines, want 1: %v", c.ip, len(lines), lines)
		}
		if got := rec.withAttr("reason", c.reason); len(got) != 1 {
			t.Errorf("%s: %d lines with reason %q; all:\n%s", c.ip, len(got), c.reason, strings.Join(rec.lines(), "\n"))
		}
	}
	// The idle client's handshake ran out of time.
	if lines := waitLines(t, rec, "reason", "timed out", 1); len(lines) != 1 || len(rec.withAttr("remote", "127.0.0.5:")) != 1 {
		t.Errorf("idle client: %v; all:\n%s", lines, strings.Join(rec.lines(), "\n"))
	}
	if got := rec.withAttr("remote", "127.0.0.1:"); len(got) != 0 {
		t.Errorf("the good client was reported: %v", got)
	}
	t.Logf("logged:\n%s", strings.Join(rec.lines(), "\n"))
}

// TestTLSListenerClose: Close closes the connections in their handshake,
// reports none of them, and makes Accept fail.
func TestTLSListenerClose(t *testing.T) {
	dir := writeCerts(t)
	r, rec := newRecordedRefusals()
	inner, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ln := TLSListener(inner, newTLS(t, dir, RoleCoordinator).ServerConfig(true), "metrics", r)
	c, err := net.Dial("tcp", inner.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	time.Sleep(100 * time.Millisecond) // accepted, in its handshake
	closed := make(chan error, 1)
	go func() { closed <- ln.Close() }()
	select {
	case <-closed:
	case <-time.After(3 * time.Second):
		t.Fatal("Close waits for a handshake")
	}
	c.SetReadDeadline(time.Now().Add(3 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Error("a connection in its handshake stayed open")
	}
	if _, err := ln.Accept(); err == nil {
		t.Error("Accept after Close succeeded")
	}
	if lines := rec.lines(); len(lines) != 0 {
		t.Errorf("Close reported: %v", lines)
	}
}
