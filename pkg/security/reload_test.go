package security

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

func TestWriteCertsWithTime(t *testing.T) {
	now := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	dir := filepath.Join(t.TempDir(), "tls")
	if err := WriteCertsWith(dir, nil, CertOptions{Now: now}); err != nil {
		t.Fatal(err)
	}
	ca := readCert(t, filepath.Join(dir, CAFile))
	if !ca.NotBefore.Equal(now.Add(-time.Hour)) || !ca.NotAfter.Equal(now.Add(caValidity)) {
		t.Errorf("CA validity %v..%v", ca.NotBefore, ca.NotAfter)
	}
	for _, r := range Roles {
		c := readCert(t, filepath.Join(dir, r.certFile()))
		if !c.NotBefore.Equal(now.Add(-time.Hour)) || !c.NotAfter.Equal(now.Add(leafValidity)) {
			t.Errorf("%s validity %v..%v", r, c.NotBefore, c.NotAfter)
		}
		if ou := c.Subject.OrganizationalUnit; len(ou) != 1 || ou[0] != "qwenfleet:"+string(r) {
			t.Errorf("%s: OU %q", r, ou)
		}
	}
	// Not yet valid today: refused, naming the file.
	if _, err := NewTLS(dir, RoleWorker); err == nil || !strings.Contains(err.Error(), "worker.pem") {
		t.Errorf("certificates from 2030: %v", err)
	}
	// Expired.
	old := filepath.Join(t.TempDir(), "tls")
	if err := WriteCertsWith(old, nil, CertOptions{Now: time.Now().AddDate(-3, 0, 0)}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewTLS(old, RoleCoordinator); err == nil || !strings.Contains(err.Error(), "coordinator.pem") || !strings.Contains(err.Error(), "expired") {
		t.Errorf("expired certificates: %v", err)
	}
	// Overwrite is an option; without it nothing is written.
	before, _ := os.ReadFile(filepath.Join(old, CAFile))
	if err := WriteCertsWith(old, nil, CertOptions{}); err == nil {
		t.Error("rewrite without Overwrite accepted")
	}
	if after, _ := os.ReadFile(filepath.Join(old, CAFile)); string(after) != string(before) {
		t.Error("a refused rewrite changed ca.pem")
	}
	if err := WriteCertsWith(old, nil, CertOptions{Overwrite: true}); err != nil {
		t.Fatal(err)
	}
	if _, err := NewTLS(old, RoleCoordinator); err != nil {
		t.Errorf("after Overwrite: %v", err)
	}
}

// serveGRPC runs a gRPC health server on 127.0.0.1 with cfg; it stops at the
// test's end.
func serveGRPC(t *testing.T, cfg *tls.Config) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(cfg)))
	healthpb.RegisterHealthServer(srv, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); srv.Serve(ln) }()
	t.Cleanup(func() { srv.Stop(); <-done })
	return ln.Addr().String()
}

func check(addr string, creds credentials.TransportCredentials) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

func TestGRPCRefusals(t *testing.T) {
	dir := writeCerts(t)
	other := writeCerts(t)
	addr := serveGRPC(t, newTLS(t, dir, RoleWorker).ServerConfig(true))

	if err := check(addr, credentials.NewTLS(newTLS(t, dir, RoleCoordinator).ClientConfig(""))); err != nil {
		t.Fatalf("coordinator: %v", err)
	}
	if err := check(addr, insecure.NewCredentials()); err == nil {
		t.Error("plaintext accepted")
	}
	pool := x509.NewCertPool()
	pool.AddCert(readCert(t, filepath.Join(dir, CAFile)))
	if err := check(addr, credentials.NewTLS(&tls.Config{RootCAs: pool})); err == nil {
		t.Error("no client certificate accepted")
	}
	// The same plain configuration with the client pair is accepted: the
	// refusal above is the missing certificate's.
	pair := newTLS(t, dir, RoleClient).Certificate()
	if err := check(addr, credentials.NewTLS(&tls.Config{RootCAs: pool, Certificates: []tls.Certificate{*pair}})); err != nil {
		t.Errorf("a plain configuration with the client pair: %v", err)
	}
	// A client of another CA, made to trust any server.
	cfg := newTLS(t, other, RoleCoordinator).ClientConfig("")
	cfg.VerifyConnection = nil
	if err := check(addr, credentials.NewTLS(cfg)); err == nil {
		t.Error("a certificate from another CA accepted")
	}

	// Raw bytes (an HTTP/1 request) get no answer but a TLS alert.
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	io.WriteString(c, "GET / HTTP/1.1\r\nHost: x\r\n\r\n")
	b, _ := io.ReadAll(c)
	if strings.Contains(string(b), "HTTP/") || strings.Contains(string(b), "grpc") {
		t.Errorf("plaintext got an answer: %q", b)
	}
}

func TestClientConfigServerName(t *testing.T) {
	dir := writeCerts(t, "node1.example.com", "10.0.0.7")
	addr := serve(t, newTLS(t, dir, RoleCoordinator).ServerConfig(true))
	cli := newTLS(t, dir, RoleClient)
	for _, name := range []string{"127.0.0.1", "::1", "localhost", "node1.example.com", "10.0.0.7"} {
		if got, _, err := dial(addr, cli.ClientConfig(name)); err != nil || got != "client" {
			t.Errorf("%s: %q %v", name, got, err)
		}
	}
	for _, name := range []string{"10.0.0.8", "node2.example.com"} {
		if _, _, err := dial(addr, cli.ClientConfig(name)); err == nil {
			t.Errorf("%s: a name outside the SANs accepted", name)
		}
	}
}

func TestAPIKeysReload(t *testing.T) {
	file := filepath.Join(t.TempDir(), "keys.jsonl")
	alice, err := AddAPIKey(file, "alice", APIRoleUser)
	if err != nil {
		t.Fatal(err)
	}
	ks, err := LoadAPIKeys(file)
	if err != nil {
		t.Fatal(err)
	}
	ks.interval = 0 // check on every lookup

	bob, err := AddAPIKey(file, "bob", APIRoleAdmin)
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := ks.Lookup(bob); !ok || k.Name != "bob" || k.Role != APIRoleAdmin {
		t.Errorf("bob after a reload: %+v %v", k, ok)
	}
	if ks.Len() != 2 {
		t.Errorf("Len %d", ks.Len())
	}

	// Revoking alice: her line removed, a max_streams given to bob.
	lines := strings.Split(strings.TrimSpace(readFile(t, file)), "\n")
	bobLine := strings.Replace(lines[1], `"role":"admin"`, `"role":"admin","max_streams":4`, 1)
	writeFile(t, file, bobLine+"\n")
	if _, ok := ks.Lookup(alice); ok {
		t.Error("alice still found after her line was removed")
	}
	if k, ok := ks.Lookup(bob); !ok || k.MaxStreams != 4 {
		t.Errorf("bob: %+v %v", k, ok)
	}

	// A broken file keeps the keys in use; Err names the file and line.
	writeFile(t, file, bobLine+"\n{\"sha256\":\"00\",\"name\":\"x\",\"role\":\"user\"}\n")
	if _, ok := ks.Lookup(bob); !ok {
		t.Error("bob lost to a broken file")
	}
	if err := ks.Err(); err == nil || !strings.Contains(err.Error(), file+":2") {
		t.Errorf("Err: %v", err)
	}
	if err := ks.Err(); err != nil && strings.Contains(err.Error(), bob) {
		t.Error("Err quotes a key")
	}
	os.Remove(file)
	if _, ok := ks.Lookup(bob); !ok {
		t.Error("bob lost to a removed file")
	}
	if err := ks.Err(); err == nil || !strings.Contains(err.Error(), file) {
		t.Errorf("Err of a removed file: %v", err)
	}
	writeFile(t, file, bobLine+"\n")
	if _, ok := ks.Lookup(bob); !ok || ks.Err() != nil {
		t.Errorf("after the fix: %v %v", ok, ks.Err())
	}

	// Within the interval the file is not looked at.
	ks.interval = time.Hour
	ks.Lookup(bob)
	writeFile(t, file, "")
	if _, ok := ks.Lookup(bob); !ok {
		t.Error("re-read within the interval")
	}
}

func TestAPIKeysFileErrors(t *testing.T) {
	const sum = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
	for _, tc := range []struct {
		name, text, want string
	}{
		{"ok with max_streams", `{"sha256":"` + sum + `","name":"a","role":"user","max_streams":2}`, ""},
		{"negative max_streams", `{"sha256":"` + sum + `","name":"a","role":"user","max_streams":-1}`, ":1: max_streams"},
		{"unknown field", "\n" + `{"sha256":"` + sum + `","name":"a","role":"user","key":"x"}`, ":2: "},
		{"bad role", `{"sha256":"` + sum + `","name":"a","role":"root"}`, `:1: role "root"`},
		{"no name", `{"sha256":"` + sum + `","role":"user"}`, ":1: no name"},
		{"not JSON", `sha256=` + sum, ":1: "},
	} {
		t.Run(tc.name, func(t *testing.T) {
			file := filepath.Join(t.TempDir(), "keys.jsonl")
			writeFile(t, file, tc.text+"\n")
			ks, err := LoadAPIKeys(file)
			if tc.want == "" {
				if err != nil || ks.Len() != 1 {
					t.Fatalf("%v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), file+tc.want) {
				t.Errorf("got %v, want %q", err, file+tc.want)
			}
		})
	}
}

func readFile(t *testing.T, file string) string {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// writeFile replaces file by a rename, as an editor or a Secret update does,
// so the new version has a new inode whatever its size and time.
func writeFile(t *testing.T, file, text string) {
	t.Helper()
	if err := writeFileAtomic(file, []byte(text), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTwoCAs is the gapless CA rotation of the package comment: with the old
// and the new CA both in ca.pem, a pair of either CA is accepted.
func TestTwoCAs(t *testing.T) {
	oldDir, newDir := writeCerts(t), writeCerts(t)
	dir := filepath.Join(t.TempDir(), "tls")
	if err := os.Mkdir(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	copyFile := func(from, name string) {
		writeFile(t, filepath.Join(dir, name), readFile(t, filepath.Join(from, name)))
	}
	writeFile(t, filepath.Join(dir, CAFile), readFile(t, filepath.Join(oldDir, CAFile))+readFile(t, filepath.Join(newDir, CAFile)))
	copyFile(oldDir, "coordinator.pem")
	copyFile(oldDir, "coordinator-key.pem")
	copyFile(newDir, "worker.pem")
	copyFile(newDir, "worker-key.pem")

	addr := serve(t, newTLS(t, dir, RoleCoordinator).ServerConfig(true))
	if got, _, err := dial(addr, newTLS(t, dir, RoleWorker).ClientConfig("localhost")); err != nil || got != "worker" {
		t.Errorf("new worker pair to an old coordinator pair: %q %v", got, err)
	}
	// A client that has only the new CA refuses the old server pair.
	if _, _, err := dial(addr, newTLS(t, newDir, RoleWorker).ClientConfig("localhost")); err == nil {
		t.Error("a client of the new CA only accepted the old server pair")
	}
}
