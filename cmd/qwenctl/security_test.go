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
