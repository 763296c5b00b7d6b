package security

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestIsLoopback(t *testing.T) {
	for addr, want := range map[string]bool{
		"127.0.0.1:50051": true, "127.3.2.1:1": true, "[::1]:80": true, "localhost:9090": true, "localhost": true,
		":50051": false, "0.0.0.0:50051": false, "[::]:1": false, "10.0.0.5:50051": false, "example.com:1": false,
	} {
		if got := IsLoopback(addr); got != want {
			t.Errorf("IsLoopback(%q) = %v, want %v", addr, got, want)
		}
	}
}

func TestCheckListeners(t *testing.T) {
	ls := []Listener{{"--listen", "127.0.0.1:50051"}, {"--metrics-listen", ""}}
	if err := CheckListeners("", false, ls...); err != nil {
		t.Fatalf("loopback only: %v", err)
	}
	ls = append(ls, Listener{"--metrics-listen", "0.0.0.0:9090"})
	err := CheckListeners("", false, ls...)
	if err == nil || !strings.Contains(err.Error(), "--metrics-listen 0.0.0.0:9090") || !strings.Contains(err.Error(), "--insecure") {
		t.Fatalf("beyond loopback without TLS: %v", err)
	}
	if CheckListeners("/certs", false, ls...) != nil || CheckListeners("", true, ls...) != nil {
		t.Fatal("--tls-dir or --insecure must allow it")
	}
}

func TestPrepareDataDir(t *testing.T) {
	base := t.TempDir()
	dir := filepath.Join(base, "a", "b")
	if err := PrepareDataDir(dir); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("made with %v", fi.Mode().Perm())
	}
	os.Chmod(dir, 0o777)
	if err := PrepareDataDir(dir); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(dir); fi.Mode().Perm() != 0o700 {
		t.Fatalf("not narrowed: %v", fi.Mode().Perm())
	}
	f := filepath.Join(base, "file")
	os.WriteFile(f, nil, 0o600)
	if err := PrepareDataDir(f); err == nil {
		t.Fatal("a file taken for a data dir")
	}
	if os.Getuid() == 0 { // root: a directory of another user
		other := filepath.Join(base, "other")
		os.Mkdir(other, 0o700)
		os.Chown(other, 12345, 12345)
		if err := PrepareDataDir(other); err == nil || !strings.Contains(err.Error(), "owned by uid 12345") {
			t.Fatalf("another user's directory: %v", err)
		}
	}
}

func TestDefaultDataDirNoFallback(t *testing.T) {
	t.Setenv("XDG_CACHE_HOME", "")
	t.Setenv("HOME", "")
	if d, err := DefaultDataDir(); err == nil || !strings.Contains(err.Error(), "--data-dir") {
		t.Fatalf("DefaultDataDir() = %q, %v; want an error asking for --data-dir", d, err)
	}
}

func TestTighten(t *testing.T) {
	dir := t.TempDir()
	os.MkdirAll(filepath.Join(dir, "m"), 0o755)
	os.WriteFile(filepath.Join(dir, "m", "config.json"), []byte("{}"), 0o644)
	outside := filepath.Join(t.TempDir(), "outside")
	os.WriteFile(outside, nil, 0o644)
	os.Symlink(outside, filepath.Join(dir, "link"))
	if err := Tighten(dir); err != nil {
		t.Fatal(err)
	}
	for p, want := range map[string]os.FileMode{"m": 0o700, "m/config.json": 0o600} {
		if fi, _ := os.Stat(filepath.Join(dir, p)); fi.Mode().Perm() != want {
			t.Errorf("%s: %v, want %v", p, fi.Mode().Perm(), want)
		}
	}
	if fi, _ := os.Stat(outside); fi.Mode().Perm() != 0o644 {
		t.Error("a symbolic link was followed")
	}
}
