package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

func TestCertsAndAPIKey(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	out, errOut, code := qwenctl(t, "certs", "--out", dir, "--hosts", "node1,10.1.2.3")
	if code != 0 {
		t.Fatalf("certs: exit %d: %s", code, errOut)
	}
	if n := len(strings.Fields(out)); n != len(security.CertFiles()) {
		t.Errorf("certs printed %d paths: %q", n, out)
	}
	for _, r := range security.Roles {
		tl, err := security.NewTLS(dir, r)
		if err != nil {
			t.Fatal(err)
		}
		if err := tl.Certificate().Leaf.VerifyHostname("10.1.2.3"); err != nil {
			t.Errorf("%s: %v", r, err)
		}
	}
	// Again without --force: refused, naming a file; with it: replaced.
	_, errOut, code = qwenctl(t, "certs", "--out", dir)
	if code != 1 || !strings.Contains(errOut, filepath.Join(dir, "ca-key.pem")) {
		t.Errorf("certs twice: exit %d: %q", code, errOut)
	}
	if _, errOut, code = qwenctl(t, "certs", "--out", dir, "--force"); code != 0 {
		t.Errorf("certs --force: exit %d: %q", code, errOut)
	}

	keys := filepath.Join(t.TempDir(), "keys.jsonl")
	out, errOut, code = qwenctl(t, "apikey", "--file", keys, "--name", "ci", "--role", "admin")
	if code != 0 {
		t.Fatalf("apikey: exit %d: %s", code, errOut)
	}
	key := strings.TrimSuffix(out, "\n")
	if !strings.HasPrefix(key, "qf_") || strings.ContainsAny(key, " \n") {
		t.Errorf("apikey printed %q", out)
	}
	ks, err := security.LoadAPIKeys(keys)
	if err != nil {
		t.Fatal(err)
	}
	if k, ok := ks.Lookup(key); !ok || k.Name != "ci" || k.Role != "admin" {
		t.Errorf("Lookup: %+v %v", k, ok)
	}
	if fi, err := os.Stat(keys); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("keys file mode: %v %v", fi.Mode(), err)
	}
	_, errOut, code = qwenctl(t, "apikey", "--file", keys, "--name", "ci", "--role", "user")
	if code != 1 || !strings.Contains(errOut, `"ci"`) {
		t.Errorf("duplicate name: exit %d: %q", code, errOut)
	}
}

func TestCertsAndAPIKeyUsage(t *testing.T) {
	for _, c := range []struct {
		args []string
		flag string
	}{
		{[]string{"certs"}, "--out"},
		{[]string{"apikey", "--name", "a", "--role", "user"}, "--file"},
		{[]string{"apikey", "--file", "k", "--role", "user"}, "--name"},
		{[]string{"apikey", "--file", "k", "--name", "a", "--role", "root"}, "--role"},
	} {
		out, errOut, code := qwenctl(t, c.args...)
		if code != 2 || out != "" || !strings.Contains(errOut, c.flag) || strings.Count(errOut, "\n") != 1 {
			t.Errorf("%v: exit %d, stdout %q, stderr %q", c.args, code, out, errOut)
		}
	}
}

// TestCertsIfMissing: --if-missing makes a set where there is none, leaves a
// complete one (the CA's key may be gone) as it is, refuses an incomplete
// one or one that does not name a --hosts entry, and with --force replaces
// those.
func TestCertsIfMissing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "tls")
	ca := func() string {
		b, err := os.ReadFile(filepath.Join(dir, security.CAFile))
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	certs := func(args ...string) (string, string, int) {
		return qwenctl(t, append([]string{"certs", "--out", dir, "--if-missing"}, args...)...)
	}
	out, errOut, code := certs("--hosts", "node1,10.1.2.3")
	if code != 0 || len(strings.Fields(out)) != len(security.CertFiles()) {
		t.Fatalf("certs --if-missing into nothing: exit %d %q %q", code, out, errOut)
	}
	first := ca()
	// Complete, and naming the hosts (a subset too): left as it is.
	for _, hosts := range []string{"node1,10.1.2.3", "10.1.2.3", ""} {
		out, errOut, code = certs("--hosts", hosts)
		if code != 0 || out != "" || !strings.Contains(errOut, "left as they are") || ca() != first {
			t.Fatalf("certs --if-missing --hosts %q over a complete set: exit %d %q %q", hosts, code, out, errOut)
		}
	}
	// The CA's key moved away (what a cluster should do): still complete.
	if err := os.Remove(filepath.Join(dir, security.CAKeyFile)); err != nil {
		t.Fatal(err)
	}
	if _, errOut, code = certs("--hosts", "node1"); code != 0 || ca() != first {
		t.Fatalf("certs --if-missing without ca-key.pem: exit %d %q", code, errOut)
	}
	// A host the certificates do not name: refused, then replaced with --force.
	_, errOut, code = certs("--hosts", "node2")
	if code != 1 || !strings.Contains(errOut, "does not name node2") || !strings.Contains(errOut, "--force") || ca() != first {
		t.Fatalf("certs --if-missing --hosts node2: exit %d %q", code, errOut)
	}
	if _, errOut, code = certs("--hosts", "node2", "--force"); code != 0 || ca() == first {
		t.Fatalf("certs --if-missing --force --hosts node2: exit %d %q", code, errOut)
	}
	second := ca()
	tl, err := security.NewTLS(dir, security.RoleWorker)
	if err != nil {
		t.Fatal(err)
	}
	if err := tl.Certificate().Leaf.VerifyHostname("node2"); err != nil {
		t.Fatal(err)
	}
	// An incomplete set (a run cut short): refused naming the file, then
	// replaced with --force.
	if err := os.Remove(filepath.Join(dir, security.GossipKeyFile)); err != nil {
		t.Fatal(err)
	}
	_, errOut, code = certs()
	if code != 1 || !strings.Contains(errOut, "no "+security.GossipKeyFile) || ca() != second {
		t.Fatalf("certs --if-missing over an incomplete set: exit %d %q", code, errOut)
	}
	if _, errOut, code = certs("--force"); code != 0 || ca() == second {
		t.Fatalf("certs --if-missing --force over an incomplete set: exit %d %q", code, errOut)
	}
	if _, err := os.Stat(filepath.Join(dir, security.GossipKeyFile)); err != nil {
		t.Fatal(err)
	}
}
