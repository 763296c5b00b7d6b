package security

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// Listener names a listening address by the flag that set it, for
// CheckListeners.
type Listener struct {
	Flag string // e.g. "--listen"
	Addr string // host:port; "" when the listener is off
}

// IsLoopback reports whether addr (host:port, or a bare host) listens on
// loopback only: 127.0.0.0/8, ::1 or "localhost". An empty host (":50051")
// or an unspecified one (0.0.0.0, ::) listens on every interface.
func IsLoopback(addr string) bool {
	host := addr
	if h, _, err := net.SplitHostPort(addr); err == nil {
		host = h
	}
	if host == "localhost" {
		return true
	}
	ip := net.ParseIP(strings.Trim(host, "[]"))
	return ip != nil && ip.IsLoopback()
}

// CheckListeners is the rule "secure by default": a process whose every
// listener is on loopback may serve without TLS (the single-machine
// cluster); one that listens beyond loopback needs tlsDir, or insecure
// given on purpose. The error names the first listener beyond loopback and
// both ways out.
func CheckListeners(tlsDir string, insecure bool, ls ...Listener) error {
	if tlsDir != "" || insecure {
		return nil
	}
	for _, l := range ls {
		if l.Addr != "" && !IsLoopback(l.Addr) {
			return fmt.Errorf("%s %s listens beyond loopback: give --tls-dir DIR (certificates from `qwenctl certs --out DIR`), or --insecure to serve plaintext and unauthenticated on purpose", l.Flag, l.Addr)
		}
	}
	return nil
}

// DefaultDataDir is the user's cache directory + "/qwenfleet". There is no
// fallback to a shared temporary directory (another user could have made
// it first and planted a model or an etcd data dir there): without a cache
// directory it is an error that asks for --data-dir.
func DefaultDataDir() (string, error) {
	base, err := os.UserCacheDir()
	if err != nil {
		return "", fmt.Errorf("--data-dir: none given and no user cache directory (%v); give --data-dir (a shared temporary directory is not used: another user could have planted it)", err)
	}
	return filepath.Join(base, "qwenfleet"), nil
}

// PrepareDataDir makes dir (mode 0700) or checks the one there: it must be
// a directory owned by this user (following a symbolic link, whose target
// is checked the same way); a mode that lets others in is narrowed to
// 0700. The error says why a directory is refused.
func PrepareDataDir(dir string) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("--data-dir: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("--data-dir: %s is not a directory", dir)
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
		return fmt.Errorf("--data-dir: %s is owned by uid %d, not by this user (uid %d): refusing a directory another user could have planted; give a --data-dir of your own", dir, st.Uid, os.Getuid())
	}
	if fi.Mode().Perm()&0o077 != 0 {
		if err := os.Chmod(dir, 0o700); err != nil {
			return fmt.Errorf("--data-dir: narrowing %s to 0700: %w", dir, err)
		}
	}
	return nil
}

// Tighten narrows everything under dir that this user owns to 0700
// (directories) and 0600 (files), for trees written with wider modes
// (a checkpoint written by a library). Symbolic links are not followed.
func Tighten(dir string) error {
	return filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		want := fs.FileMode(0o600)
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			return nil
		case d.IsDir():
			want = 0o700
		}
		fi, err := d.Info()
		if err != nil {
			return nil // gone meanwhile
		}
		if fi.Mode().Perm()&^want == 0 {
			return nil
		}
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Getuid() {
			return nil
		}
		return os.Chmod(path, fi.Mode().Perm()&want)
	})
}
