package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// runCerts writes a cluster CA, the certificates of every role and the
// gossip key (pkg/security.WriteCerts).
func runCerts(args []string) error {
	fs := newFlags("certs", "--out DIR [--hosts H1,H2,...] [--force]")
	out := fs.String("out", "", "directory to write the CA, the role certificates and gossip.key to (created 0700)")
	hosts := fs.String("hosts", "", "comma-separated DNS names and IP addresses for the certificates (127.0.0.1, ::1 and localhost are always in)")
	force := fs.Bool("force", false, "replace existing files (a new CA: every certificate changes)")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *out == "" {
		return usagef("--out: a directory is required")
	}
	var hs []string
	for _, h := range strings.Split(*hosts, ",") {
		if h = strings.TrimSpace(h); h != "" {
			hs = append(hs, h)
		}
	}
	if err := security.WriteCerts(*out, hs, *force); err != nil {
		return err
	}
	for _, f := range security.CertFiles() {
		fmt.Fprintln(os.Stdout, filepath.Join(*out, f))
	}
	return nil
}
