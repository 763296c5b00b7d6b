package server

import (
	"io"
	"os"
	"strings"
	"testing"
)

// stderrOf runs f with os.Stderr captured.
func stderrOf(t *testing.T, f func() int) (int, string) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	old := os.Stderr
	os.Stderr = w
	code := f()
	os.Stderr = old
	w.Close()
	out, _ := io.ReadAll(r)
	return code, string(out)
}

// Bad flags of both commands exit 2 with one line naming the flag, before
// anything starts.
func TestBadFlags(t *testing.T) {
	for _, c := range []struct {
		main func([]string) int
		args []string
		want string
	}{
		{CoordinatorMain, []string{"--step-timeout", "1ms"}, "--step-timeout"},
		{CoordinatorMain, []string{"--step-timeout-factor", "0.5"}, "--step-timeout-factor"},
		{CoordinatorMain, []string{"--queue-timeout", "0s"}, "--queue-timeout"},
		{CoordinatorMain, []string{"--drain-timeout", "-1s"}, "--drain-timeout"},
		{CoordinatorMain, []string{"--gossip-probe-interval", "1ms"}, "--gossip-probe-interval"},
		{CoordinatorMain, []string{"--gossip-probe-timeout", "1s"}, "--gossip-probe-timeout"},
		{CoordinatorMain, []string{"--gossip-suspicion-mult", "0"}, "--gossip-suspicion-mult"},
		{CoordinatorMain, []string{"--max-queue-wait", "-1s"}, "--max-queue-wait"},
		{CoordinatorMain, []string{"--max-queue-wait", "1ms"}, "--max-queue-wait"},
		{CoordinatorMain, []string{"--send-timeout", "0s"}, "--send-timeout"},
		{CoordinatorMain, []string{"--max-concurrent-streams", "0"}, "--max-concurrent-streams"},
		{CoordinatorMain, []string{"--leader-ttl", "1s"}, "--leader-ttl"},
		{WorkerMain, []string{"--drain-timeout", "0s"}, "--drain-timeout"},
		{WorkerMain, []string{"--id", "rack/7"}, "--id"},
		{WorkerMain, []string{"--peer-window", "1KiB"}, "--peer-window"},
		{WorkerMain, []string{"--peer-window", "lots"}, "--peer-window"},
		{CoordinatorMain, []string{"--tls-dir", "/nonexistent/tls"}, "--tls-dir"},
		{CoordinatorMain, []string{"--tls-dir", os.TempDir(), "--insecure"}, "--insecure"},
		{CoordinatorMain, []string{"--etcd-cert", "c.pem"}, "--etcd-key"},
		{CoordinatorMain, []string{"--etcd-password-file", "/nonexistent/pw"}, "--etcd-password-file"},
		{CoordinatorMain, []string{"--max-streams-per-key", "-1"}, "--max-streams-per-key"},
		{WorkerMain, []string{"--model-root", "/nonexistent/models"}, "--model-root"},
		{WorkerMain, []string{"--tls-dir", "/nonexistent/tls"}, "--tls-dir"},
		{WorkerMain, []string{"--gossip-port", "70000"}, "--gossip-port"},
		{CoordinatorMain, []string{"--gossip-port", "-1"}, "--gossip-port"},
		{CoordinatorMain, []string{"--advertise", "0.0.0.0:50051"}, "--advertise"},
		{CoordinatorMain, []string{"--advertise", "coord-0"}, "--advertise"},
	} {
		code, out := stderrOf(t, func() int { return c.main(c.args) })
		if code != 2 || !strings.Contains(out, c.want) || strings.Count(strings.TrimSpace(out), "\n") != 0 {
			t.Errorf("%v: exit %d, %q; want 2 and one line naming %s", c.args, code, out, c.want)
		}
	}
}

// Secure by default: a listener beyond loopback without --tls-dir is
// refused before anything starts, naming the listener and both ways out.
func TestListenBeyondLoopbackNeedsTLS(t *testing.T) {
	for _, c := range []struct {
		main func([]string) int
		args []string
		want string
	}{
		{CoordinatorMain, []string{"--listen", "0.0.0.0:0"}, "--listen 0.0.0.0:0"},
		{CoordinatorMain, []string{"--metrics-listen", ":0"}, "--metrics-listen :0"},
		{WorkerMain, []string{"--listen", "0.0.0.0:0", "--etcd-endpoints", "http://127.0.0.1:1"}, "--listen 0.0.0.0:0"},
	} {
		code, out := stderrOf(t, func() int { return c.main(c.args) })
		if code == 0 || !strings.Contains(out, c.want) || !strings.Contains(out, "--tls-dir") || !strings.Contains(out, "--insecure") {
			t.Errorf("%v: exit %d, %q; want a refusal naming %s, --tls-dir and --insecure", c.args, code, out, c.want)
		}
	}
}

func TestGossipHosts(t *testing.T) {
	for _, c := range []struct{ bound, adv, bind, announce string }{
		{"127.0.0.1:7000", "127.0.0.1:7000", "127.0.0.1", ""},
		{"[::]:7000", "10.1.2.3:7000", "0.0.0.0", "10.1.2.3"},
		{"0.0.0.0:7000", "localhost:7000", "0.0.0.0", "127.0.0.1"},
		{"[::]:7000", "[::]:7000", "0.0.0.0", ""},
		{"[::]:7000", "no-such-host.invalid:7000", "0.0.0.0", ""},
		{"10.0.0.5:7000", "w0.example:7000", "10.0.0.5", ""},
	} {
		if b, a := gossipHosts(c.bound, c.adv); b != c.bind || a != c.announce {
			t.Errorf("gossipHosts(%q, %q) = %q, %q; want %q, %q", c.bound, c.adv, b, a, c.bind, c.announce)
		}
	}
}

func TestStateWord(t *testing.T) {
	for in, want := range map[string]string{"ready": "ready", "failed (load failed: load w-1: /srv/m)": "failed",
		"failed: dial tcp 10.0.0.1:7000": "failed", "": ""} {
		if got := stateWord(in); got != want {
			t.Errorf("stateWord(%q) = %q, want %q", in, got, want)
		}
	}
}

// Plaintext etcd beyond loopback is refused unless --insecure; on
// loopback it is the single-machine default.
func TestPlaintextEtcdBeyondLoopback(t *testing.T) {
	if _, err := (Security{}).etcdTLS([]string{"http://127.0.0.1:2379"}, nil); err != nil {
		t.Fatalf("loopback: %v", err)
	}
	_, err := (Security{}).etcdTLS([]string{"http://127.0.0.1:2379", "http://10.0.0.7:2379"}, nil)
	if err == nil || !strings.Contains(err.Error(), "http://10.0.0.7:2379") || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("beyond loopback: %v", err)
	}
	if _, err := (Security{Insecure: true}).etcdTLS([]string{"http://10.0.0.7:2379"}, nil); err != nil {
		t.Fatalf("--insecure: %v", err)
	}
}
