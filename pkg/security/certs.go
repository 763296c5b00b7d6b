package security

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/pem"
	"errors"
	"io/fs"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// File names in a TLS directory.
const (
	CAFile        = "ca.pem"
	CAKeyFile     = "ca-key.pem"
	GossipKeyFile = "gossip.key"
)

// Validity of what WriteCerts makes.
const (
	caValidity   = 10 * 365 * 24 * time.Hour
	leafValidity = 2 * 365 * 24 * time.Hour
)

// CertFiles lists every file WriteCerts writes, in the order it writes them.
func CertFiles() []string {
	files := []string{CAKeyFile, CAFile}
	for _, r := range Roles {
		files = append(files, r.keyFile(), r.certFile())
	}
	return append(files, GossipKeyFile)
}

// WriteCerts makes a new cluster CA and, signed by it, a certificate for each
// role, plus a gossip key, in dir (created 0700, or set to 0700). The
// certificates' SANs are hosts (each a DNS name or an IP address) plus
// 127.0.0.1, ::1 and localhost. Without overwrite it refuses, naming the
// file, when any of the files exists; with it, every file is replaced (a new
// CA: peers pick the new files up on their next check). It is
// WriteCertsWith with the current time.
func WriteCerts(dir string, hosts []string, overwrite bool) error {
	return WriteCertsWith(dir, hosts, CertOptions{Overwrite: overwrite})
}

// CertOptions are WriteCertsWith's choices.
type CertOptions struct {
	// Now is the time the certificates are made at: each is valid from an
	// hour before it (clock skew between hosts), the CA for 10 years and
	// the role certificates for 2. Zero means time.Now().
	Now time.Time
	// Overwrite replaces existing files; without it WriteCertsWith refuses,
	// naming the first file that exists, and writes nothing.
	Overwrite bool
}

// WriteCertsWith is WriteCerts with the time the certificates are made at
// given (tests make expired or not-yet-valid ones with it).
func WriteCertsWith(dir string, hosts []string, opts CertOptions) error {
	overwrite := opts.Overwrite
	if dir == "" {
		return errorf("no directory for the certificates")
	}
	dnsNames, ips, err := parseHosts(hosts)
	if err != nil {
		return err
	}
	if !overwrite {
		for _, f := range CertFiles() {
			p := filepath.Join(dir, f)
			if _, err := os.Lstat(p); err == nil {
				return errorf("%s exists (overwrite to replace it)", p)
			} else if !errors.Is(err, fs.ErrNotExist) {
				return errorf("%s: %v", p, err)
			}
		}
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return errorf("%v", err)
	}
	if err := os.Chmod(dir, 0o700); err != nil {
		return errorf("%v", err)
	}

	now := opts.Now
	if now.IsZero() {
		now = time.Now()
	}
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return errorf("generating the CA key: %v", err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          serial(),
		Subject:               pkix.Name{Organization: []string{"qwenfleet"}, CommonName: "qwenfleet cluster CA"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(caValidity),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
		MaxPathLenZero:        true,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		return errorf("making the CA certificate: %v", err)
	}
	caCert, err := x509.ParseCertificate(caDER)
	if err != nil {
		return errorf("parsing the CA certificate: %v", err)
	}
	type file struct {
		name string
		data []byte
		mode os.FileMode
	}
	keyPEM, err := encodeKey(caKey)
	if err != nil {
		return err
	}
	files := []file{
		{CAKeyFile, keyPEM, 0o600},
		{CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER}), 0o644},
	}
	for _, role := range Roles {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			return errorf("generating the %s key: %v", role, err)
		}
		eku := []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		if role == RoleClient {
			eku = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
		}
		tmpl := &x509.Certificate{
			SerialNumber: serial(),
			// The OU repeats the role for people reading the certificate
			// (openssl x509 -subject); RoleOf reads only the URI SAN.
			Subject:     pkix.Name{Organization: []string{"qwenfleet"}, OrganizationalUnit: []string{"qwenfleet:" + string(role)}, CommonName: "qwenfleet " + string(role)},
			NotBefore:   now.Add(-time.Hour),
			NotAfter:    now.Add(leafValidity),
			KeyUsage:    x509.KeyUsageDigitalSignature,
			ExtKeyUsage: eku,
			DNSNames:    dnsNames,
			IPAddresses: ips,
			URIs:        []*url.URL{{Scheme: roleURIScheme, Host: roleURIHost, Path: "/" + string(role)}},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			return errorf("making the %s certificate: %v", role, err)
		}
		keyPEM, err := encodeKey(key)
		if err != nil {
			return err
		}
		files = append(files,
			file{role.keyFile(), keyPEM, 0o600},
			file{role.certFile(), pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o644})
	}
	var gossip [32]byte
	if _, err := rand.Read(gossip[:]); err != nil {
		return errorf("generating the gossip key: %v", err)
	}
	files = append(files, file{GossipKeyFile, []byte(base64.StdEncoding.EncodeToString(gossip[:]) + "\n"), 0o600})

	for _, f := range files {
		if err := writeFileAtomic(filepath.Join(dir, f.name), f.data, f.mode); err != nil {
			return err
		}
	}
	return nil
}

// LoadGossipKey reads a gossip key file: one base64 line of 32 bytes.
func LoadGossipKey(file string) ([]byte, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, errorf("%v", err)
	}
	key, err := base64.StdEncoding.DecodeString(strings.TrimSpace(string(b)))
	if err != nil || len(key) != 32 {
		return nil, errorf("%s: not one base64 line of 32 bytes", file)
	}
	return key, nil
}

// parseHosts splits hosts into DNS names and IP addresses and adds the
// loopback names; it refuses an empty or malformed name.
func parseHosts(hosts []string) ([]string, []net.IP, error) {
	dns := []string{"localhost"}
	ips := []net.IP{net.IPv4(127, 0, 0, 1).To4(), net.IPv6loopback}
	seen := map[string]bool{"localhost": true, "127.0.0.1": true, "::1": true}
	for _, h := range hosts {
		h = strings.TrimSpace(h)
		if h == "" {
			continue
		}
		if ip := net.ParseIP(h); ip != nil {
			if v4 := ip.To4(); v4 != nil {
				ip = v4
			}
			if !seen[ip.String()] {
				seen[ip.String()] = true
				ips = append(ips, ip)
			}
			continue
		}
		h = strings.ToLower(strings.TrimSuffix(h, "."))
		if !validDNSName(h) {
			return nil, nil, errorf("host %q is neither an IP address nor a DNS name", h)
		}
		if !seen[h] {
			seen[h] = true
			dns = append(dns, h)
		}
	}
	return dns, ips, nil
}

// validDNSName accepts letters, digits, '-' and '.', labels of 1 to 63
// characters, and a leading "*." wildcard.
func validDNSName(h string) bool {
	h = strings.TrimPrefix(h, "*.")
	if h == "" || len(h) > 253 {
		return false
	}
	for _, label := range strings.Split(h, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return false
		}
		for _, c := range label {
			if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '-') {
				return false
			}
		}
	}
	return true
}

func serial() *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		panic("security: crypto/rand failed: " + err.Error())
	}
	return n.Add(n, big.NewInt(1))
}

func encodeKey(key *ecdsa.PrivateKey) ([]byte, error) {
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, errorf("encoding a private key: %v", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}

// writeFileAtomic writes data to a temporary file beside path, with mode,
// and renames it to path.
func writeFileAtomic(path string, data []byte, mode os.FileMode) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return errorf("%v", err)
	}
	name := tmp.Name()
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(name)
		}
	}()
	if err := tmp.Chmod(mode); err != nil {
		return errorf("%s: %v", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return errorf("%s: %v", path, err)
	}
	if err := tmp.Sync(); err != nil {
		return errorf("%s: %v", path, err)
	}
	if err := tmp.Close(); err != nil {
		return errorf("%s: %v", path, err)
	}
	if err := os.Rename(name, path); err != nil {
		return errorf("%s: %v", path, err)
	}
	ok = true
	return nil
}
