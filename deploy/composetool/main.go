// Command composetool is the one thing the docker-compose cluster
// (docker-compose.yml) needs done that qwenctl, in the same FROM-scratch
// image (/usr/local/bin/composetool), cannot do without a shell: the
// cluster's secrets, once, into files of their own, owned by whoever reads
// them.
//
//	composetool certs --tls /tls --keys /keys --client-keys /client-keys [--client /client] --hosts H1,H2,... [--owner 65532:65532]
//
// certs makes (once: a complete TLS dir is left alone) the cluster CA, the
// role certificates and the gossip key (pkg/security.WriteCerts, as `qwenctl
// certs`), then removes the CA's private key (nothing at run time needs it:
// a new cluster, `docker-compose down -v`, gets a new CA); it makes (once) an
// API keys file (the keys' hashes, in --keys, for the coordinators) with an
// admin key and a user key for the bench (as `qwenctl apikey`, which prints
// a key where no shell can redirect it), and writes the keys themselves to
// files of their own in --client-keys (admin.key, bench.key: the bench reads
// bench.key with `qwenctl bench --api-key-file`; no coordinator mounts them);
// and it copies ca.pem and the admin key (as api-key) into --client, a folder
// bind-mounted from the host, owned there by the folder's owner, so that
// qwenctl on the host can call the cluster. Everything else it writes is
// given to --owner, the user the images run as (it runs as root for the
// host's folder).
//
// The other one-shot jobs are qwenctl's own: `qwenctl mkmodel --if-missing`
// (the demo model) and `qwenctl bench --api-key-file` (which exits 1 when a
// request failed).
package main

import (
	"errors"
	"flag"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

const usage = `usage:
  composetool certs --tls DIR --keys DIR --client-keys DIR [--client DIR] --hosts H1,H2,... [--owner UID:GID]`

// Files of the keys dirs and the client folder.
const (
	keysFile      = "api-keys.jsonl"
	adminKeyFile  = "admin.key"
	benchKeyFile  = "bench.key"
	clientKeyFile = "api-key"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, usage)
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "certs":
		err = runCerts(os.Args[2:])
	case "-h", "--help", "help":
		fmt.Println(usage)
		return
	default:
		err = fmt.Errorf("unknown command %q\n%s", os.Args[1], usage)
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "composetool %s: %v\n", os.Args[1], err)
		os.Exit(1)
	}
}

// owner is a uid:gid; -1 leaves ownership alone.
type owner struct{ uid, gid int }

func parseOwner(s string) (owner, error) {
	if s == "" {
		return owner{-1, -1}, nil
	}
	u, g, ok := strings.Cut(s, ":")
	uid, err1 := strconv.Atoi(u)
	gid, err2 := strconv.Atoi(g)
	if !ok || err1 != nil || err2 != nil || uid < 0 || gid < 0 {
		return owner{}, fmt.Errorf("--owner: %q is not UID:GID", s)
	}
	return owner{uid, gid}, nil
}

// chownTree gives dir and everything under it to o. Only root can; anyone
// else (a rootless engine) leaves ownership as it is.
func (o owner) chownTree(dir string) error {
	if o.uid < 0 || os.Geteuid() != 0 {
		return nil
	}
	return filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		return os.Lchown(p, o.uid, o.gid)
	})
}

func newFlags(name string) *flag.FlagSet {
	fl := flag.NewFlagSet(name, flag.ContinueOnError)
	fl.Usage = func() { fmt.Fprintln(os.Stderr, usage) }
	return fl
}

func runCerts(args []string) error {
	fl := newFlags("certs")
	tlsDir := fl.String("tls", "", "TLS dir to fill (a volume)")
	keysDir := fl.String("keys", "", "dir of the API keys file, the keys' hashes, for the coordinators (a volume)")
	clientKeysDir := fl.String("client-keys", "", "dir of the keys themselves, admin.key and bench.key (a volume)")
	clientDir := fl.String("client", "", "folder for the host's client: ca.pem and api-key (the admin key)")
	hosts := fl.String("hosts", "", "comma-separated DNS names and IPs of the certificates (127.0.0.1 and localhost are always in)")
	ownerFlag := fl.String("owner", "65532:65532", "uid:gid to give what is written in --tls and --keys (when run as root)")
	if err := fl.Parse(args); err != nil {
		return err
	}
	if *tlsDir == "" || *keysDir == "" || *clientKeysDir == "" {
		return errors.New("--tls, --keys and --client-keys are required")
	}
	own, err := parseOwner(*ownerFlag)
	if err != nil {
		return err
	}
	var hs []string
	for _, h := range strings.Split(*hosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			hs = append(hs, h)
		}
	}

	// Certificates: once. A TLS dir missing any file (a run that died
	// midway) is made again from a new CA: the old CA's key is gone.
	complete := true
	for _, f := range security.CertFiles() {
		if f == security.CAKeyFile {
			continue
		}
		if _, err := os.Stat(filepath.Join(*tlsDir, f)); err != nil {
			complete = false
		}
	}
	if complete {
		fmt.Printf("certs: %s already holds the cluster's certificates\n", *tlsDir)
	} else {
		if err := security.WriteCerts(*tlsDir, hs, true); err != nil {
			return err
		}
		fmt.Printf("certs: wrote a new cluster CA and certificates to %s for %s (127.0.0.1, ::1 and localhost are always in)\n", *tlsDir, strings.Join(hs, ", "))
	}
	// Nothing at run time signs certificates: the CA's key does not stay.
	if err := os.Remove(filepath.Join(*tlsDir, security.CAKeyFile)); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err := own.chownTree(*tlsDir); err != nil {
		return err
	}

	// API keys: once, an admin key (for the host's client) and a user
	// key (for the bench).
	for _, d := range []string{*keysDir, *clientKeysDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return err
		}
		if err := os.Chmod(d, 0o700); err != nil {
			return err
		}
	}
	kf := filepath.Join(*keysDir, keysFile)
	_, errK := os.Stat(kf)
	_, errA := os.Stat(filepath.Join(*clientKeysDir, adminKeyFile))
	_, errB := os.Stat(filepath.Join(*clientKeysDir, benchKeyFile))
	if errK == nil && errA == nil && errB == nil {
		fmt.Printf("certs: %s already holds the API keys\n", *keysDir)
	} else {
		tmp := kf + ".new"
		os.Remove(tmp)
		for _, k := range []struct{ name, role, file string }{
			{"admin", security.APIRoleAdmin, adminKeyFile},
			{"bench", security.APIRoleUser, benchKeyFile},
		} {
			key, err := security.AddAPIKey(tmp, k.name, k.role)
			if err != nil {
				return err
			}
			if err := writeFile(filepath.Join(*clientKeysDir, k.file), []byte(key+"\n"), 0o600); err != nil {
				return err
			}
		}
		if err := os.Rename(tmp, kf); err != nil {
			return err
		}
		fmt.Printf("certs: wrote the API keys file (admin, bench) to %s, the keys to %s\n", *keysDir, *clientKeysDir)
	}
	for _, d := range []string{*keysDir, *clientKeysDir} {
		if err := own.chownTree(d); err != nil {
			return err
		}
	}

	// The host's client: the CA and the admin key, owned by whoever owns
	// the folder on the host. Written every time: a new cluster has a new
	// CA and new keys.
	if *clientDir == "" {
		return nil
	}
	ca, err := os.ReadFile(filepath.Join(*tlsDir, security.CAFile))
	if err != nil {
		return err
	}
	admin, err := os.ReadFile(filepath.Join(*clientKeysDir, adminKeyFile))
	if err != nil {
		return err
	}
	if err := os.MkdirAll(*clientDir, 0o755); err != nil {
		return err
	}
	fi, err := os.Stat(*clientDir)
	if err != nil {
		return err
	}
	host := owner{-1, -1}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		host = owner{int(st.Uid), int(st.Gid)}
	}
	for _, f := range []struct {
		name string
		data []byte
		mode os.FileMode
	}{{security.CAFile, ca, 0o644}, {clientKeyFile, admin, 0o600}} {
		p := filepath.Join(*clientDir, f.name)
		if err := writeFile(p, f.data, f.mode); err != nil {
			return err
		}
		if host.uid >= 0 && os.Geteuid() == 0 {
			if err := os.Lchown(p, host.uid, host.gid); err != nil {
				fmt.Fprintf(os.Stderr, "certs: %s stays root's: %v\n", p, err)
			}
		}
	}
	fmt.Printf("certs: wrote %s and %s (the admin key) to the client folder %s\n", security.CAFile, clientKeyFile, *clientDir)
	return nil
}

// writeFile writes data to path through a temporary file renamed over it.
func writeFile(path string, data []byte, mode os.FileMode) error {
	tmp := path + ".tmp"
	if err := os.WriteFile(tmp, data, mode); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
