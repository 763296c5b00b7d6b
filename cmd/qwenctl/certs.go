package main

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// runCerts writes a cluster CA, the certificates of every role and the
// gossip key (pkg/security.WriteCerts).
func runCerts(args []string) error {
	fs := newFlags("certs", "--out DIR [--hosts H1,H2,...] [--force] [--if-missing]")
	out := fs.String("out", "", "directory to write the CA, the role certificates and gossip.key to (created 0700)")
	hosts := fs.String("hosts", "", "comma-separated DNS names and IP addresses for the certificates (127.0.0.1, ::1 and localhost are always in)")
	force := fs.Bool("force", false, "replace existing files (a new CA: every certificate changes)")
	ifMissing := fs.Bool("if-missing", false, "exit 0 and write nothing when --out already holds every file (ca-key.pem may have been moved away) and its certificates name every --hosts entry; "+
		"an incomplete or different set is refused unless --force, which then makes a new one")
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
	if *ifMissing {
		why, exists := certsDiffer(*out, hs)
		switch {
		case why == "":
			fmt.Fprintf(os.Stderr, "%s already holds the cluster's certificates: left as they are (--if-missing)\n", *out)
			return nil
		case exists && !*force:
			return fmt.Errorf("--if-missing: %s holds another set of certificates (%s); --force replaces it (a new CA: every certificate changes)", *out, why)
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

// certsDiffer says why dir does not hold a complete set of certificates
// naming every host ("" when it does: every file of security.CertFiles but
// the CA's key, and certificates of the coordinator and worker roles that
// verify each host), and whether it holds any of the files.
func certsDiffer(dir string, hosts []string) (why string, exists bool) {
	var missing []string
	for _, f := range security.CertFiles() {
		_, err := os.Lstat(filepath.Join(dir, f))
		switch {
		case err == nil:
			exists = true
		case f == security.CAKeyFile:
			// Nothing at run time needs the CA's key: it may be kept elsewhere.
		case errors.Is(err, fs.ErrNotExist):
			missing = append(missing, f)
		default:
			missing = append(missing, fmt.Sprintf("%s (%v)", f, err))
		}
	}
	if len(missing) > 0 {
		return "no " + strings.Join(missing, ", "), exists
	}
	for _, role := range []security.Role{security.RoleCoordinator, security.RoleWorker} {
		file := filepath.Join(dir, string(role)+".pem")
		cert, err := readCert(file)
		if err != nil {
			return err.Error(), true
		}
		for _, h := range hosts {
			if err := cert.VerifyHostname(h); err != nil {
				return fmt.Sprintf("%s does not name %s", file, h), true
			}
		}
	}
	return "", true
}

// readCert parses the first certificate of a PEM file.
func readCert(file string) (*x509.Certificate, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil || blk.Type != "CERTIFICATE" {
		return nil, fmt.Errorf("%s holds no PEM certificate", file)
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%s: %v", file, err)
	}
	return c, nil
}
