package client

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/security"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// keyFake is a leading fake that records every call's authorization
// metadata and refuses calls without "Bearer good-key" UNAUTHENTICATED.
type keyFake struct {
	*fake
	mu    sync.Mutex
	auths []string
}

func startKeyFake(t *testing.T, creds credentials.TransportCredentials) *keyFake {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	k := &keyFake{}
	check := func(ctx context.Context) error {
		md, _ := metadata.FromIncomingContext(ctx)
		k.mu.Lock()
		k.auths = append(k.auths, strings.Join(md.Get("authorization"), "|"))
		k.mu.Unlock()
		if v := md.Get("authorization"); len(v) != 1 || v[0] != "Bearer good-key" {
			return status.Error(codes.Unauthenticated, "no good key")
		}
		return nil
	}
	opts := []grpc.ServerOption{
		grpc.UnaryInterceptor(func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, h grpc.UnaryHandler) (any, error) {
			if err := check(ctx); err != nil {
				return nil, err
			}
			return h(ctx, req)
		}),
		grpc.StreamInterceptor(func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			if err := check(ss.Context()); err != nil {
				return err
			}
			return h(srv, ss)
		}),
	}
	if creds != nil {
		opts = append(opts, grpc.Creds(creds))
	}
	k.fake = &fake{name: "keyed", addr: lis.Addr().String(), srv: grpc.NewServer(opts...), leader: true}
	pb.RegisterGeneratorServer(k.srv, k.fake)
	go k.srv.Serve(lis)
	t.Cleanup(k.srv.Stop)
	return k
}

// TestAPIKeyAndTLS: every call of a Client with APIKey and TLS carries
// the bearer key over a connection verified against the cluster CA (by IP
// address and by name); without the key the first call is refused at once
// (UNAUTHENTICATED, not retried); a server certificate of another role or
// another CA is refused; a key is also sent over plaintext when asked.
func TestAPIKeyAndTLS(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(dir, nil, false); err != nil {
		t.Fatal(err)
	}
	serverCreds := func(role security.Role) credentials.TransportCredentials {
		tl, err := security.NewTLS(dir, role)
		if err != nil {
			t.Fatal(err)
		}
		return credentials.NewTLS(tl.ServerConfig(false))
	}
	srv := startKeyFake(t, serverCreds(security.RoleCoordinator))
	tlsCfg, err := TLSConfigFromCA(filepath.Join(dir, security.CAFile))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	cfg := fastConfig(srv.addr)
	cfg.TLS, cfg.APIKey = tlsCfg, "good-key"
	c := newClient(t, cfg)
	generate(t, c, request(3))
	if _, err := c.ModelInfo(ctx); err != nil {
		t.Fatal(err)
	}
	byName := strings.Replace(srv.addr, "127.0.0.1", "localhost", 1)
	stub, err := c.Stub(byName)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stub.GetModelInfo(ctx, &pb.GetModelInfoRequest{}); err != nil {
		t.Fatalf("by name: %v", err)
	}
	srv.mu.Lock()
	for i, a := range srv.auths {
		if a != "Bearer good-key" {
			t.Fatalf("call %d carried %q", i, a)
		}
	}
	srv.mu.Unlock()

	cfg.APIKey = ""
	t0 := time.Now()
	_, err = newClient(t, cfg).ModelInfo(ctx)
	if status.Code(err) != codes.Unauthenticated || time.Since(t0) > time.Second {
		t.Fatalf("without the key: %v after %v, want UNAUTHENTICATED at once", err, time.Since(t0))
	}

	// A worker's certificate (same CA, server authentication) is not a
	// coordinator's.
	worker := startKeyFake(t, serverCreds(security.RoleWorker))
	wcfg := fastConfig(worker.addr)
	wcfg.TLS, wcfg.APIKey, wcfg.RetryTimeout = tlsCfg, "good-key", 200*time.Millisecond
	if _, err := newClient(t, wcfg).ModelInfo(ctx); err == nil || !strings.Contains(err.Error(), "not a coordinator's") {
		t.Fatalf("a worker's certificate: %v", err)
	}
	// Another CA.
	other := filepath.Join(t.TempDir(), "other")
	if err := security.WriteCerts(other, nil, false); err != nil {
		t.Fatal(err)
	}
	ocfg := fastConfig(srv.addr)
	if ocfg.TLS, err = TLSConfigFromCA(filepath.Join(other, security.CAFile)); err != nil {
		t.Fatal(err)
	}
	ocfg.APIKey, ocfg.RetryTimeout = "good-key", 200*time.Millisecond
	if _, err := newClient(t, ocfg).ModelInfo(ctx); status.Code(err) != codes.Unavailable {
		t.Fatalf("another CA: %v", err)
	}
	// Plaintext with a key.
	plain := startKeyFake(t, nil)
	pcfg := fastConfig(plain.addr)
	pcfg.APIKey = "good-key"
	if _, err := newClient(t, pcfg).ModelInfo(ctx); err != nil {
		t.Fatalf("plaintext with a key: %v", err)
	}
}

func TestTLSConfigFromCAErrors(t *testing.T) {
	dir := t.TempDir()
	missing := filepath.Join(dir, "ca.pem")
	if _, err := TLSConfigFromCA(missing); err == nil || !strings.Contains(err.Error(), missing) {
		t.Fatalf("missing file: %v", err)
	}
	bad := filepath.Join(dir, "bad.pem")
	os.WriteFile(bad, []byte("not a certificate\n"), 0o600)
	if _, err := TLSConfigFromCA(bad); err == nil || !strings.Contains(err.Error(), bad) || !strings.Contains(err.Error(), "no PEM certificate") {
		t.Fatalf("not PEM: %v", err)
	}
	for _, key := range []string{"two words", " lead", "nl\n"} {
		_, err := New(Config{Addrs: []string{"a:1"}, APIKey: key})
		if err == nil || !strings.Contains(err.Error(), "Config.APIKey") || strings.Contains(err.Error(), key) {
			t.Fatalf("APIKey %q: %v", key, err)
		}
	}
}
