package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// TestCerts: certs makes the cluster's secrets once (no CA key kept), the keys in files
// of their own that the keys file accepts with their roles, the client folder's ca.pem and
// admin key; run again, it leaves every secret as it is.
func TestCerts(t *testing.T) {
	root := t.TempDir()
	dir := func(name string) string { return filepath.Join(root, name) }
	args := []string{"--tls", dir("tls"), "--keys", dir("keys"), "--client-keys", dir("client-keys"), "--client", dir("client"),
		"--hosts", "coordinator-0,worker-0", "--owner", ""}
	if err := runCerts(args); err != nil {
		t.Fatal(err)
	}
	read := func(path string) []byte {
		t.Helper()
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if _, err := os.Stat(filepath.Join(dir("tls"), security.CAKeyFile)); err == nil {
		t.Errorf("the CA's key was kept")
	}
	tl, err := security.NewTLS(dir("tls"), security.RoleWorker)
	if err != nil {
		t.Fatal(err)
	}
	if err := tl.Certificate().Leaf.VerifyHostname("worker-0"); err != nil {
		t.Error(err)
	}
	keys, err := security.LoadAPIKeys(filepath.Join(dir("keys"), keysFile))
	if err != nil {
		t.Fatal(err)
	}
	for file, role := range map[string]string{adminKeyFile: security.APIRoleAdmin, benchKeyFile: security.APIRoleUser} {
		key := strings.TrimSpace(string(read(filepath.Join(dir("client-keys"), file))))
		if k, ok := keys.Lookup(key); !ok || k.Role != role {
			t.Errorf("%s: the keys file gives %+v %v, want role %s", file, k, ok, role)
		}
	}
	if !bytes.Equal(read(filepath.Join(dir("client"), clientKeyFile)), read(filepath.Join(dir("client-keys"), adminKeyFile))) ||
		!bytes.Equal(read(filepath.Join(dir("client"), security.CAFile)), read(filepath.Join(dir("tls"), security.CAFile))) {
		t.Errorf("the client folder does not hold the cluster's ca.pem and the admin key")
	}

	// Again (a compose up of a cluster that exists): nothing changes.
	before := map[string][]byte{}
	for _, p := range []string{filepath.Join(dir("tls"), security.CAFile), filepath.Join(dir("tls"), "worker-key.pem"), filepath.Join(dir("keys"), keysFile),
		filepath.Join(dir("client-keys"), benchKeyFile), filepath.Join(dir("client"), clientKeyFile)} {
		before[p] = read(p)
	}
	if err := runCerts(args); err != nil {
		t.Fatal(err)
	}
	for p, b := range before {
		if !bytes.Equal(read(p), b) {
			t.Errorf("%s changed on the second run", p)
		}
	}
}
