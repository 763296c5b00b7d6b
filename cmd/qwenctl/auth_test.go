package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/qwenfleet/qwenfleet/pkg/security"
	"github.com/qwenfleet/qwenfleet/pkg/server"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
)

// The worker address only an admin may see.
const fakeWorkerAddr = "10.42.0.7:7070"

// authFake is a coordinator double behind the real public-server auth
// (server.PublicServerOptionsWith): GetServerInfo answers the full view to
// an admin and the redacted one (as GeneratorService makes it) to a user,
// with the security mode given; Generate streams tokens 1..max_tokens.
type authFake struct {
	pb.UnimplementedGeneratorServer
	security string
}

func (f *authFake) GetServerInfo(ctx context.Context, _ *pb.GetServerInfoRequest) (*pb.ServerInfo, error) {
	info := &pb.ServerInfo{CoordinatorId: "c1", Leader: true, Ready: true, Security: f.security,
		Workers:   []*pb.WorkerStatus{{Id: "host-7-4242", Address: fakeWorkerAddr, Pid: 4242, Host: "host-7", State: "ready", MetricsAddress: "10.42.0.7:9464"}},
		Placement: &pb.Placement{Version: 1, Model: "/models/m", Replicas: []*pb.Placement_Replica{{Workers: []string{"host-7-4242"}}}}}
	if c, ok := server.CallerFrom(ctx); ok && !c.Admin() {
		info.Workers = []*pb.WorkerStatus{{Id: "w-0a1b2c3d", State: "ready"}}
		info.Placement = &pb.Placement{Version: 1, Model: "m", Replicas: []*pb.Placement_Replica{{Workers: []string{"w-0a1b2c3d"}}}}
	}
	return info, nil
}

func (f *authFake) HealthCheck(context.Context, *pb.HealthCheckRequest) (*pb.HealthCheckResponse, error) {
	return &pb.HealthCheckResponse{Healthy: true, Message: "ok"}, nil
}

func (f *authFake) GetModelInfo(context.Context, *pb.GetModelInfoRequest) (*pb.ModelInfo, error) {
	return &pb.ModelInfo{Name: "m", VocabSize: 100, MaxContext: 1024}, nil
}

func (f *authFake) Generate(req *pb.GenerateRequest, out pb.Generator_GenerateServer) error {
	n := req.GetMaxTokens()
	for i := int32(1); i <= n; i++ {
		if err := out.Send(&pb.GenerateResponse{RequestId: req.RequestId, Response: &pb.GenerateResponse_Chunk{Chunk: &pb.GenerateChunk{TokenIds: []int32{i}}}}); err != nil {
			return err
		}
	}
	return out.Send(&pb.GenerateResponse{RequestId: req.RequestId, Response: &pb.GenerateResponse_Complete{Complete: &pb.GenerateComplete{
		FinishReason: "length", Usage: &pb.Usage{CompletionTokens: n}}}})
}

func (f *authFake) Drain(context.Context, *pb.DrainRequest) (*pb.DrainResponse, error) {
	return &pb.DrainResponse{State: "drained"}, nil
}

func (f *authFake) ExpertLoad(context.Context, *pb.ExpertLoadRequest) (*pb.ExpertLoadResponse, error) {
	return &pb.ExpertLoadResponse{}, nil
}

// startAuthFake serves an authFake with TLS (the cluster CA's coordinator
// certificate of tlsDir) and API keys: "qf_user" (user) and "qf_admin"
// (admin). It returns the address.
func startAuthFake(t *testing.T, tlsDir, mode string) string {
	t.Helper()
	var lines bytes.Buffer
	for _, k := range [][2]string{{"qf_user", "user"}, {"qf_admin", "admin"}} {
		sum := sha256.Sum256([]byte(k[0]))
		fmt.Fprintf(&lines, `{"sha256":%q,"name":%q,"role":%q}`+"\n", hex.EncodeToString(sum[:]), k[1]+"-key", k[1])
	}
	file := filepath.Join(t.TempDir(), "keys.jsonl")
	if err := os.WriteFile(file, lines.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	keys, err := security.LoadAPIKeys(file)
	if err != nil {
		t.Fatal(err)
	}
	tl, err := security.NewTLS(tlsDir, security.RoleCoordinator)
	if err != nil {
		t.Fatal(err)
	}
	gs := grpc.NewServer(append(server.PublicServerOptionsWith(server.Limits{}, &server.PublicAuth{Keys: keys}),
		grpc.Creds(credentials.NewTLS(tl.ServerConfig(false))))...)
	pb.RegisterGeneratorServer(gs, &authFake{security: mode})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go gs.Serve(l)
	t.Cleanup(gs.Stop)
	return l.Addr().String()
}

// qwenctlEnv is qwenctl with env added to the environment (and
// QWENFLEET_API_KEY unset unless env sets it).
func qwenctlEnv(t *testing.T, env []string, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	for _, e := range os.Environ() {
		if !strings.HasPrefix(e, APIKeyEnv+"=") {
			cmd.Env = append(cmd.Env, e)
		}
	}
	cmd.Env = append(append(cmd.Env, "QWENCTL_MAIN=1"), env...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

// TestTLSAndAPIKeyFlags: the commands that talk to a coordinator connect
// with --tls-dir (verified against its ca.pem) and send --api-key or
// $QWENFLEET_API_KEY; a user key's status --json shows no worker address;
// an insecure cluster's status warns; no key, a user key where an admin's
// is needed, and a --tls-dir without ca.pem fail with one clear line.
func TestTLSAndAPIKeyFlags(t *testing.T) {
	tlsDir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(tlsDir, nil, false); err != nil {
		t.Fatal(err)
	}
	addr := startAuthFake(t, tlsDir, "tls")
	sec := []string{"--addr", addr, "--tls-dir", tlsDir}
	run := func(env []string, args ...string) (string, string, int) { return qwenctlEnv(t, env, args...) }

	out, errs, code := run(nil, append([]string{"status", "--json", "--api-key", "qf_user"}, sec...)...)
	if code != 0 || strings.Contains(out, "10.42.") || strings.Contains(out, "4242") || strings.Contains(out, "/models/") {
		t.Fatalf("user status --json: %d %s %s", code, out, errs)
	}
	var info struct {
		Workers []struct{ ID, Address string }
	}
	if err := json.Unmarshal([]byte(out), &info); err != nil || len(info.Workers) != 1 {
		t.Fatalf("user status --json is not the info: %v %s", err, out)
	}
	if strings.Contains(errs, "warning") {
		t.Fatalf("a TLS cluster's status warns: %s", errs)
	}
	out, errs, code = run(nil, append([]string{"status", "--api-key", "qf_user"}, sec...)...)
	if code != 0 || strings.Contains(out, "10.42.") || strings.Contains(out, "pid") || !strings.Contains(out, "w-0a1b2c3d") {
		t.Fatalf("user status: %d %s %s", code, out, errs)
	}
	out, errs, code = run([]string{APIKeyEnv + "=qf_admin"}, append([]string{"status"}, sec...)...)
	if code != 0 || !strings.Contains(out, fakeWorkerAddr) {
		t.Fatalf("admin status (key from the environment): %d %s %s", code, out, errs)
	}
	out, errs, code = run(nil, append([]string{"generate", "--ids", "1,2", "--max-tokens", "3", "--json", "--api-key", "qf_user", "--retry-timeout", "2s"}, sec...)...)
	if code != 0 || !strings.Contains(out, `"ids":[1,2,3]`) {
		t.Fatalf("user generate: %d %s %s", code, out, errs)
	}
	if out, errs, code = run([]string{APIKeyEnv + "=qf_admin"}, append([]string{"drain", "--no-wait", "w1"}, sec...)...); code != 0 {
		t.Fatalf("admin drain: %d %s %s", code, out, errs)
	}
	if out, errs, code = run([]string{APIKeyEnv + "=qf_admin"}, append([]string{"experts"}, sec...)...); code != 0 {
		t.Fatalf("admin experts: %d %s %s", code, out, errs)
	}

	for _, tc := range []struct {
		name string
		env  []string
		args []string
		code int
		want []string
	}{
		{"no key", nil, []string{"status"}, 1, []string{"Unauthenticated", "API key"}},
		{"bad key", []string{APIKeyEnv + "=qf_nope"}, []string{"generate", "--ids", "1", "--retry-timeout", "2s"}, 1, []string{"Unauthenticated", "not valid"}},
		{"user drain", nil, []string{"drain", "--api-key", "qf_user", "w1"}, 1, []string{"PermissionDenied", "Drain", "admin"}},
		{"user experts", nil, []string{"experts", "--api-key", "qf_user", "--rebalance"}, 1, []string{"PermissionDenied", "ExpertLoad", "admin"}},
		{"key with a space", nil, []string{"status", "--api-key", "qf user"}, 2, []string{"--api-key", "white space"}},
	} {
		out, errs, code := run(tc.env, append(tc.args, sec...)...)
		if code != tc.code || strings.Count(strings.TrimSpace(errs), "\n") != 0 {
			t.Errorf("%s: exit %d (want %d) %q %q", tc.name, code, tc.code, out, errs)
		}
		for _, w := range tc.want {
			if !strings.Contains(errs, w) {
				t.Errorf("%s: %q does not say %q", tc.name, errs, w)
			}
		}
		if strings.Contains(errs, "qf_") {
			t.Errorf("%s: the error repeats the key: %q", tc.name, errs)
		}
	}
	// --tls-dir without ca.pem: every command names the flag and the file.
	empty := t.TempDir()
	for _, cmd := range [][]string{{"status"}, {"generate", "--ids", "1"}, {"drain", "w1"}, {"experts"}, {"bench", "--requests", "1"}} {
		_, errs, code := run(nil, append(cmd, "--addr", addr, "--tls-dir", empty, "--api-key", "qf_user")...)
		if code != 2 || !strings.Contains(errs, "--tls-dir") || !strings.Contains(errs, "ca.pem") {
			t.Errorf("%s with an empty --tls-dir: exit %d %q", cmd[0], code, errs)
		}
	}
	// Plaintext against the TLS server fails.
	if _, errs, code := run(nil, "status", "--addr", addr, "--api-key", "qf_user"); code == 0 {
		t.Errorf("plaintext status to a TLS server: exit 0 %s", errs)
	}
}

// TestStatusWarnsInsecure: status warns, on stderr, when the coordinator
// reports its public API insecure (--json's stdout stays JSON).
func TestStatusWarnsInsecure(t *testing.T) {
	tlsDir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(tlsDir, nil, false); err != nil {
		t.Fatal(err)
	}
	addr := startAuthFake(t, tlsDir, "insecure")
	for _, args := range [][]string{{"status"}, {"status", "--json"}} {
		out, errs, code := qwenctlEnv(t, []string{APIKeyEnv + "=qf_user"}, append(args, "--addr", addr, "--tls-dir", tlsDir)...)
		if code != 0 || !strings.HasPrefix(errs, "warning: ") || !strings.Contains(errs, "insecure") {
			t.Fatalf("%v: %d %q %q", args, code, out, errs)
		}
		if len(args) == 2 && !json.Valid([]byte(out)) {
			t.Fatalf("status --json of an insecure cluster: %s", out)
		}
	}
}

// TestAPIKeyFile: every command that takes --api-key takes --api-key-file
// (the key read from the file, white space around it ignored), which wins
// over $QWENFLEET_API_KEY; giving both flags, a missing or empty file, or a
// key with white space inside is a usage error naming the flag and never
// the key.
func TestAPIKeyFile(t *testing.T) {
	tlsDir := filepath.Join(t.TempDir(), "tls")
	if err := security.WriteCerts(tlsDir, nil, false); err != nil {
		t.Fatal(err)
	}
	addr := startAuthFake(t, tlsDir, "tls")
	sec := []string{"--addr", addr, "--tls-dir", tlsDir}
	dir := t.TempDir()
	file := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	admin, user := file("admin.key", "qf_admin\n"), file("user.key", "  qf_user \r\n")
	for _, tc := range []struct {
		env  []string
		args []string
		want string // on stdout
	}{
		{nil, []string{"status", "--api-key-file", admin}, fakeWorkerAddr},
		{nil, []string{"status", "--api-key-file", user}, "w-0a1b2c3d"},
		{nil, []string{"generate", "--ids", "1,2", "--max-tokens", "3", "--json", "--api-key-file", user}, `"ids":[1,2,3]`},
		{[]string{APIKeyEnv + "=qf_user"}, []string{"drain", "--no-wait", "--api-key-file", admin, "w1"}, ""},
		{[]string{APIKeyEnv + "=qf_user"}, []string{"experts", "--api-key-file", admin}, ""},
		{nil, []string{"bench", "--requests", "2", "--input-len", "4", "--output-len", "3", "--api-key-file", user}, "Successful requests:                     2\n"},
	} {
		out, errs, code := qwenctlEnv(t, tc.env, append(tc.args, sec...)...)
		if code != 0 || !strings.Contains(out, tc.want) {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", tc.args, code, out, errs)
		}
	}
	for _, tc := range []struct {
		name string
		args []string
		want []string
	}{
		{"both flags", []string{"status", "--api-key", "qf_user", "--api-key-file", user}, []string{"--api-key and --api-key-file"}},
		{"no such file", []string{"generate", "--ids", "1", "--api-key-file", filepath.Join(dir, "missing.key")}, []string{"--api-key-file", "missing.key"}},
		{"empty file", []string{"bench", "--requests", "1", "--api-key-file", file("empty.key", " \n")}, []string{"--api-key-file", "empty.key", "no key"}},
		{"white space inside", []string{"drain", "w1", "--api-key-file", file("two.key", "qf_admin qf_user\n")}, []string{"--api-key-file", "two.key", "white space"}},
	} {
		out, errs, code := qwenctlEnv(t, nil, append(tc.args, sec...)...)
		if code != 2 || strings.Count(strings.TrimSpace(errs), "\n") != 0 || strings.Contains(errs, "qf_") {
			t.Errorf("%s: exit %d (want 2) %q %q", tc.name, code, out, errs)
		}
		for _, w := range tc.want {
			if !strings.Contains(errs, w) {
				t.Errorf("%s: %q does not say %q", tc.name, errs, w)
			}
		}
	}
}
