package security

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func writeCerts(t *testing.T, hosts ...string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "tls")
	if err := WriteCerts(dir, hosts, false); err != nil {
		t.Fatal(err)
	}
	return dir
}

func newTLS(t *testing.T, dir string, role Role) *TLS {
	t.Helper()
	tl, err := NewTLS(dir, role)
	if err != nil {
		t.Fatal(err)
	}
	return tl
}

func readCert(t *testing.T, file string) *x509.Certificate {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		t.Fatalf("%s: no PEM", file)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestWriteCerts(t *testing.T) {
	dir := writeCerts(t, "node1.example.com", "10.0.0.7", " ", "::1")
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Fatalf("dir: %v %v", fi.Mode(), err)
	}
	for _, f := range CertFiles() {
		fi, err := os.Stat(filepath.Join(dir, f))
		if err != nil {
			t.Fatal(err)
		}
		secret := strings.HasSuffix(f, "-key.pem") || f == GossipKeyFile
		if secret && fi.Mode().Perm() != 0o600 {
			t.Errorf("%s: mode %v, want 0600", f, fi.Mode().Perm())
		}
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != len(CertFiles()) {
		t.Errorf("%d files in the dir, want %d (temporary files left?)", len(ents), len(CertFiles()))
	}
	for _, r := range Roles {
		c := readCert(t, filepath.Join(dir, r.certFile()))
		if got, ok := RoleOf(c); !ok || got != r {
			t.Errorf("RoleOf(%s) = %q %v", r.certFile(), got, ok)
		}
		if err := c.VerifyHostname("node1.example.com"); err != nil {
			t.Errorf("%s: %v", r, err)
		}
		for _, h := range []string{"10.0.0.7", "127.0.0.1", "::1", "localhost"} {
			if err := c.VerifyHostname(h); err != nil {
				t.Errorf("%s: %v", r, err)
			}
		}
		hasServer := false
		for _, u := range c.ExtKeyUsage {
			hasServer = hasServer || u == x509.ExtKeyUsageServerAuth
		}
		if hasServer != (r != RoleClient) {
			t.Errorf("%s: server auth %v", r, hasServer)
		}
	}
	if _, ok := RoleOf(readCert(t, filepath.Join(dir, CAFile))); ok {
		t.Error("the CA has a role")
	}
	if k, err := LoadGossipKey(filepath.Join(dir, GossipKeyFile)); err != nil || len(k) != 32 {
		t.Errorf("gossip key: %d bytes, %v", len(k), err)
	}

	err := WriteCerts(dir, nil, false)
	if err == nil || !strings.Contains(err.Error(), filepath.Join(dir, CAKeyFile)) {
		t.Errorf("rewrite without overwrite: %v", err)
	}
	if err := WriteCerts(t.TempDir(), []string{"bad host"}, false); err == nil {
		t.Error("a bad host was accepted")
	}
}

func TestNewTLSErrorsNameTheFile(t *testing.T) {
	dir := writeCerts(t)
	os.Remove(filepath.Join(dir, "worker-key.pem"))
	if _, err := NewTLS(dir, RoleWorker); err == nil || !strings.Contains(err.Error(), "worker-key.pem") {
		t.Errorf("missing key: %v", err)
	}
	os.WriteFile(filepath.Join(dir, CAFile), []byte("junk"), 0o644)
	if _, err := NewTLS(dir, RoleCoordinator); err == nil || !strings.Contains(err.Error(), CAFile) {
		t.Errorf("bad CA: %v", err)
	}
	if _, err := NewTLS(dir, "root"); err == nil {
		t.Error("unknown role accepted")
	}
	// A pair of the wrong role.
	dir = writeCerts(t)
	b, _ := os.ReadFile(filepath.Join(dir, "client.pem"))
	k, _ := os.ReadFile(filepath.Join(dir, "client-key.pem"))
	os.WriteFile(filepath.Join(dir, "worker.pem"), b, 0o644)
	os.WriteFile(filepath.Join(dir, "worker-key.pem"), k, 0o600)
	_, err := NewTLS(dir, RoleWorker)
	if err == nil || !strings.Contains(err.Error(), "worker.pem") {
		t.Errorf("client pair as worker: %v", err)
	}
	if err != nil && strings.Contains(err.Error(), "PRIVATE KEY") {
		t.Errorf("error quotes key material: %v", err)
	}
}

// serve runs a TLS server on 127.0.0.1 that writes the verified client
// role (or "none") on each connection; it stops at the test's end.
func serve(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := tls.Listen("tcp", "127.0.0.1:0", cfg)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() { ln.Close(); <-done })
	go func() {
		defer close(done)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func(c net.Conn) {
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				tc := c.(*tls.Conn)
				if err := tc.Handshake(); err != nil {
					return
				}
				role := "none"
				if ch := tc.ConnectionState().VerifiedChains; len(ch) > 0 {
					if r, ok := RoleOf(ch[0][0]); ok {
						role = string(r)
					}
				}
				io.WriteString(tc, role+"\n")
			}(c)
		}
	}()
	return ln.Addr().String()
}

// dial connects, reads the server's line and returns it with the server's
// leaf certificate.
func dial(addr string, cfg *tls.Config) (string, *x509.Certificate, error) {
	d := &net.Dialer{Timeout: 5 * time.Second}
	c, err := tls.DialWithDialer(d, "tcp", addr, cfg)
	if err != nil {
		return "", nil, err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c) // a refused client certificate shows here in TLS 1.3
	if err != nil {
		return "", nil, err
	}
	if len(b) == 0 {
		return "", nil, errors.New("no answer")
	}
	return strings.TrimSpace(string(b)), c.ConnectionState().PeerCertificates[0], nil
}

func TestHandshakes(t *testing.T) {
	dir := writeCerts(t)
	other := writeCerts(t)
	addr := serve(t, newTLS(t, dir, RoleCoordinator).ServerConfig(true))

	for _, r := range Roles {
		got, _, err := dial(addr, newTLS(t, dir, r).ClientConfig(""))
		if err != nil || got != string(r) {
			t.Errorf("%s: %q %v", r, got, err)
		}
	}
	// A client that trusts the CA but has no certificate.
	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, filepath.Join(dir, CAFile)))
	if got, _, err := dial(addr, &tls.Config{RootCAs: pool, ServerName: "localhost"}); err == nil {
		t.Errorf("no client certificate: accepted (%q)", got)
	}
	// A certificate from another CA, with a client that trusts both.
	cfg := newTLS(t, other, RoleWorker).ClientConfig("")
	cfg.InsecureSkipVerify, cfg.VerifyConnection = true, nil
	if got, _, err := dial(addr, cfg); err == nil {
		t.Errorf("certificate from another CA: accepted (%q)", got)
	}
	// A server of another CA is refused by our client.
	otherAddr := serve(t, newTLS(t, other, RoleCoordinator).ServerConfig(true))
	if _, _, err := dial(otherAddr, newTLS(t, dir, RoleWorker).ClientConfig("")); err == nil {
		t.Error("a server of another CA was accepted")
	}
	// A server with a client certificate (no server auth) is refused.
	clientAsServer := serve(t, newTLS(t, dir, RoleClient).ServerConfig(true))
	if _, _, err := dial(clientAsServer, newTLS(t, dir, RoleWorker).ClientConfig("")); err == nil {
		t.Error("a client certificate was accepted as a server's")
	}
	// A name not in the certificate is refused.
	wrongName := newTLS(t, dir, RoleWorker).ClientConfig("")
	wrongName.ServerName = "elsewhere.example.com"
	if _, _, err := dial(addr, wrongName); err == nil {
		t.Error("a server name outside the SANs was accepted")
	}
	// Without requireClientCert: no certificate is fine, a given one is verified.
	optional := serve(t, newTLS(t, dir, RoleCoordinator).ServerConfig(false))
	if got, _, err := dial(optional, &tls.Config{RootCAs: pool, ServerName: "localhost"}); err != nil || got != "none" {
		t.Errorf("optional, no certificate: %q %v", got, err)
	}
	if got, _, err := dial(optional, newTLS(t, dir, RoleClient).ClientConfig("")); err != nil || got != "client" {
		t.Errorf("optional, client certificate: %q %v", got, err)
	}
	if _, _, err := dial(optional, cfg); err == nil {
		t.Error("optional: a certificate from another CA was accepted")
	}
}

func TestRotation(t *testing.T) {
	dir := writeCerts(t)
	srv := newTLS(t, dir, RoleCoordinator)
	cli := newTLS(t, dir, RoleWorker)
	srv.interval, cli.interval = 0, 0 // check on every handshake
	addr := serve(t, srv.ServerConfig(true))
	clientCfg := cli.ClientConfig("")

	_, first, err := dial(addr, clientCfg)
	if err != nil {
		t.Fatal(err)
	}
	if !first.Equal(readCert(t, filepath.Join(dir, "coordinator.pem"))) {
		t.Fatal("the server presented another certificate than coordinator.pem")
	}
	if err := WriteCerts(dir, nil, true); err != nil {
		t.Fatal(err)
	}
	got, second, err := dial(addr, clientCfg)
	if err != nil || got != "worker" {
		t.Fatalf("after rotation: %q %v", got, err)
	}
	if second.Equal(first) || !second.Equal(readCert(t, filepath.Join(dir, "coordinator.pem"))) {
		t.Error("after rotation the server did not present the new coordinator.pem")
	}
	if srv.Err() != nil || cli.Err() != nil {
		t.Errorf("reload errors: %v, %v", srv.Err(), cli.Err())
	}

	// A broken file keeps the previous pair in use and is reported.
	os.WriteFile(filepath.Join(dir, "coordinator.pem"), []byte("junk"), 0o644)
	if _, third, err := dial(addr, clientCfg); err != nil || !third.Equal(second) {
		t.Errorf("with a broken file: %v (same certificate: %v)", err, third != nil && third.Equal(second))
	}
	if err := srv.Err(); err == nil || !strings.Contains(err.Error(), "coordinator.pem") {
		t.Errorf("Err with a broken file: %v", err)
	}

	// Within the interval a change is not looked for.
	slow := newTLS(t, dir, RoleWorker)
	slow.interval = time.Hour
	before := slow.Certificate()
	if err := WriteCerts(dir, nil, true); err != nil {
		t.Fatal(err)
	}
	if slow.Certificate() != before {
		t.Error("re-read within the interval")
	}
}

func TestPeerRoleGRPC(t *testing.T) {
	dir := writeCerts(t)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	roles := make(chan string, 4)
	srv := grpc.NewServer(
		grpc.Creds(credentials.NewTLS(newTLS(t, dir, RoleWorker).ServerConfig(true))),
		grpc.UnaryInterceptor(func(ctx context.Context, req any, info *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			r, ok := PeerRole(ctx)
			if !ok {
				r = "none"
			}
			roles <- string(r)
			return h(ctx, req)
		}))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	go srv.Serve(ln)
	defer srv.Stop()

	for _, r := range []Role{RoleCoordinator, RoleWorker} {
		conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(newTLS(t, dir, r).ClientConfig(""))))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
		cancel()
		conn.Close()
		if err != nil {
			t.Fatalf("%s: %v", r, err)
		}
		if got := <-roles; got != string(r) {
			t.Errorf("PeerRole = %q, want %q", got, r)
		}
	}
	if _, ok := PeerRole(context.Background()); ok {
		t.Error("PeerRole without a peer")
	}
}

func TestAPIKeys(t *testing.T) {
	file := filepath.Join(t.TempDir(), "keys.jsonl")
	alice, err := AddAPIKey(file, "alice", APIRoleUser)
	if err != nil {
		t.Fatal(err)
	}
	root, err := AddAPIKey(file, "root", APIRoleAdmin)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(alice, "qf_") || len(alice) != 3+43 || alice == root {
		t.Errorf("keys %q %q", alice, root)
	}
	if fi, err := os.Stat(file); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("mode %v %v", fi.Mode().Perm(), err)
	}
	b, _ := os.ReadFile(file)
	if bytes.Contains(b, []byte(alice)) || bytes.Contains(b, []byte(alice[3:])) {
		t.Error("the file holds a key in clear")
	}
	if _, err := AddAPIKey(file, "alice", APIRoleAdmin); err == nil || !strings.Contains(err.Error(), "alice") {
		t.Errorf("duplicate name: %v", err)
	}
	if _, err := AddAPIKey(file, "bob", "root"); err == nil {
		t.Error("bad role accepted")
	}
	if _, err := AddAPIKey(file, "", APIRoleUser); err == nil {
		t.Error("empty name accepted")
	}
	ks, err := LoadAPIKeys(file)
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := ks.Lookup(alice); !ok || k.Name != "alice" || k.Role != APIRoleUser {
		t.Errorf("alice: %+v %v", k, ok)
	}
	if k, ok := ks.Lookup(root); !ok || k.Name != "root" || k.Role != APIRoleAdmin {
		t.Errorf("root: %+v %v", k, ok)
	}
	for _, bad := range []string{"", "qf_", alice + "x", alice[:len(alice)-1]} {
		if _, ok := ks.Lookup(bad); ok {
			t.Errorf("Lookup(%q) found a key", bad)
		}
	}
	if ks.Len() != 2 {
		t.Errorf("Len %d", ks.Len())
	}

	// An existing wider file is narrowed to 0600.
	wide := filepath.Join(t.TempDir(), "wide.jsonl")
	os.WriteFile(wide, nil, 0o644)
	if _, err := AddAPIKey(wide, "x", APIRoleUser); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(wide); fi.Mode().Perm() != 0o600 {
		t.Errorf("wide file mode %v", fi.Mode().Perm())
	}

	// Errors name the file and line.
	bad := filepath.Join(t.TempDir(), "bad.jsonl")
	os.WriteFile(bad, append(b, []byte("\n{\"sha256\":\"zz\",\"name\":\"c\",\"role\":\"user\"}\n")...), 0o600)
	if _, err := LoadAPIKeys(bad); err == nil || !strings.Contains(err.Error(), bad+":4") {
		t.Errorf("bad hash: %v", err)
	}
	if _, err := AddAPIKey(bad, "d", APIRoleUser); err == nil || !strings.Contains(err.Error(), bad+":4") {
		t.Errorf("adding to a bad file: %v", err)
	}
	os.WriteFile(bad, append(b, b...), 0o600)
	if _, err := LoadAPIKeys(bad); err == nil || !strings.Contains(err.Error(), bad+":3") {
		t.Errorf("repeated entry: %v", err)
	}
	if _, err := LoadAPIKeys(filepath.Join(t.TempDir(), "missing")); err == nil || !strings.Contains(err.Error(), "missing") {
		t.Errorf("missing file: %v", err)
	}
}
