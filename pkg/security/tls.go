package security

import (
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"sync"
	"time"
)

// TLS gives the TLS configurations of one role from a directory WriteCerts
// wrote: ca.pem and <role>.pem/<role>-key.pem. The configurations read the
// files' current contents: see the package comment on rotation.
type TLS struct {
	dir  string
	role Role

	// interval is the least time between two checks of the files (a
	// second; tests shorten it).
	interval time.Duration

	mu      sync.Mutex
	checked time.Time
	stamps  []os.FileInfo
	cert    *tls.Certificate
	pool    *x509.CertPool
	lastErr error
}

// NewTLS reads dir's CA and the pair of role. Its errors name the file.
func NewTLS(dir string, role Role) (*TLS, error) {
	if !role.Valid() {
		return nil, errorf("unknown role %q", role)
	}
	t := &TLS{dir: dir, role: role, interval: time.Second}
	stamps, err := t.stat()
	if err != nil {
		return nil, err
	}
	cert, pool, err := t.load()
	if err != nil {
		return nil, err
	}
	t.stamps, t.cert, t.pool, t.checked = stamps, cert, pool, time.Now()
	return t, nil
}

// Role is the role of the pair this TLS presents.
func (t *TLS) Role() Role { return t.role }

// Dir is the directory the files are read from.
func (t *TLS) Dir() string { return t.dir }

// Err is the error of the last failed re-read (the previous files stay in
// use), or nil when the files in use are the current ones.
func (t *TLS) Err() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.lastErr
}

// Certificate returns the pair in use (after a check of the files).
func (t *TLS) Certificate() *tls.Certificate {
	cert, _ := t.current()
	return cert
}

func (t *TLS) paths() []string {
	return []string{
		filepath.Join(t.dir, CAFile),
		filepath.Join(t.dir, t.role.certFile()),
		filepath.Join(t.dir, t.role.keyFile()),
	}
}

func (t *TLS) stat() ([]os.FileInfo, error) {
	var st []os.FileInfo
	for _, p := range t.paths() {
		fi, err := os.Stat(p)
		if err != nil {
			return nil, errorf("%v", err)
		}
		st = append(st, fi)
	}
	return st, nil
}

// load reads the CA and the pair, and checks that the pair is of t's role
// and signed by the CA.
func (t *TLS) load() (*tls.Certificate, *x509.CertPool, error) {
	p := t.paths()
	pool, err := LoadCAPool(p[0])
	if err != nil {
		return nil, nil, err
	}
	certPEM, err := os.ReadFile(p[1])
	if err != nil {
		return nil, nil, errorf("%v", err)
	}
	keyPEM, err := os.ReadFile(p[2])
	if err != nil {
		return nil, nil, errorf("%v", err)
	}
	pair, err := tls.X509KeyPair(certPEM, keyPEM)
	if err != nil {
		// X509KeyPair's errors describe, never quote, the key.
		return nil, nil, errorf("%s with %s: %v", p[1], p[2], err)
	}
	leaf := pair.Leaf
	if leaf == nil {
		if leaf, err = x509.ParseCertificate(pair.Certificate[0]); err != nil {
			return nil, nil, errorf("%s: %v", p[1], err)
		}
		pair.Leaf = leaf
	}
	if r, ok := RoleOf(leaf); !ok || r != t.role {
		return nil, nil, errorf("%s: not a %s certificate (no URI SAN qwenfleet://role/%s)", p[1], t.role, t.role)
	}
	inter := x509.NewCertPool()
	for _, der := range pair.Certificate[1:] {
		if c, err := x509.ParseCertificate(der); err == nil {
			inter.AddCert(c)
		}
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		return nil, nil, errorf("%s does not verify against %s: %v", p[1], p[0], err)
	}
	return &pair, pool, nil
}

// current returns the pair and CA pool in use, re-reading the files first
// when they changed and the last check is at least t.interval old.
func (t *TLS) current() (*tls.Certificate, *x509.CertPool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	now := time.Now()
	if now.Sub(t.checked) < t.interval {
		return t.cert, t.pool
	}
	t.checked = now
	stamps, err := t.stat()
	if err != nil {
		t.lastErr = err
		return t.cert, t.pool
	}
	if sameStamps(stamps, t.stamps) {
		return t.cert, t.pool
	}
	cert, pool, err := t.load()
	if err != nil {
		// Keep the files in use; the stamps stay old so the next check
		// tries again.
		t.lastErr = err
		return t.cert, t.pool
	}
	t.stamps, t.cert, t.pool, t.lastErr = stamps, cert, pool, nil
	return t.cert, t.pool
}

func sameStamps(a, b []os.FileInfo) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i].Size() != b[i].Size() || !a[i].ModTime().Equal(b[i].ModTime()) || !os.SameFile(a[i], b[i]) {
			return false
		}
	}
	return true
}

// defaultNextProtos are the ALPN protocols a server configuration offers
// when its caller set none: gRPC (h2) and HTTP/1.1.
var defaultNextProtos = []string{"h2", "http/1.1"}

// ServerConfig is the configuration of a listener of t's role. Each
// handshake uses the current pair and CA. With requireClientCert a client
// must present a certificate the cluster CA signed for client
// authentication; without it, one is verified when given (the public API,
// whose clients authenticate with API keys). A verified client
// certificate's role is PeerRole's answer.
//
// The handshake's configuration is made per connection (GetConfigForClient):
// it offers the NextProtos set on the returned configuration before the
// first handshake, or else h2 and http/1.1 (gRPC's and net/http's copies of
// the configuration are not seen). Session tickets are off: a resumed
// session would skip the client certificate's check against the current
// CA, and the cluster's connections are long-lived.
func (t *TLS) ServerConfig(requireClientCert bool) *tls.Config {
	auth := tls.VerifyClientCertIfGiven
	if requireClientCert {
		auth = tls.RequireAndVerifyClientCert
	}
	base := &tls.Config{MinVersion: tls.VersionTLS12, ClientAuth: auth}
	base.GetConfigForClient = func(*tls.ClientHelloInfo) (*tls.Config, error) {
		cert, pool := t.current()
		protos := base.NextProtos
		if len(protos) == 0 {
			protos = defaultNextProtos
		}
		return &tls.Config{
			MinVersion:   tls.VersionTLS12,
			Certificates: []tls.Certificate{*cert},
			ClientCAs:    pool,
			ClientAuth:   auth,
			NextProtos:   protos,

			SessionTicketsDisabled: true,
		}, nil
	}
	return base
}

// ClientConfig is the configuration of t's role dialling a cluster server:
// it presents the current pair and accepts a server whose certificate the
// current cluster CA signed for server authentication, of role coordinator
// or worker, and valid for serverName, a DNS name or an IP address (the
// host of the address dialled). With serverName "" the name checked is the
// one the dialler sets (tls.Dial and gRPC set the dialled host), except that
// an IP address is then not checked (TLS sends no IP address as a name):
// every server certificate of the cluster is accepted.
func (t *TLS) ClientConfig(serverName string) *tls.Config {
	return &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		// Go verifies only against a fixed RootCAs; VerifyConnection
		// verifies against the current CA instead. Never skipped.
		InsecureSkipVerify: true,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			cert, _ := t.current()
			return cert, nil
		},
		VerifyConnection: func(cs tls.ConnectionState) error {
			_, pool := t.current()
			if serverName != "" {
				cs.ServerName = serverName
			}
			return verifyServer(cs, pool)
		},
	}
}

func verifyServer(cs tls.ConnectionState, pool *x509.CertPool) error {
	if len(cs.PeerCertificates) == 0 {
		return errorf("the server presented no certificate")
	}
	inter := x509.NewCertPool()
	for _, c := range cs.PeerCertificates[1:] {
		inter.AddCert(c)
	}
	leaf := cs.PeerCertificates[0]
	if _, err := leaf.Verify(x509.VerifyOptions{
		Roots:         pool,
		Intermediates: inter,
		DNSName:       cs.ServerName,
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}); err != nil {
		return errorf("server certificate: %v", err)
	}
	if r, ok := RoleOf(leaf); !ok || (r != RoleCoordinator && r != RoleWorker) {
		return errorf("server certificate %q is not a coordinator's or a worker's", leaf.Subject.CommonName)
	}
	return nil
}

// LoadCAPool reads file, PEM holding one or more CA certificates (a
// cluster's ca.pem holds two during a rotation), into a pool. Its errors
// name the file.
func LoadCAPool(file string) (*x509.CertPool, error) {
	b, err := os.ReadFile(file)
	if err != nil {
		return nil, errorf("%v", err)
	}
	pool := x509.NewCertPool()
	n := 0
	for rest := b; ; {
		var blk *pem.Block
		blk, rest = pem.Decode(rest)
		if blk == nil {
			break
		}
		if blk.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			return nil, errorf("%s: %v", file, err)
		}
		pool.AddCert(c)
		n++
	}
	if n == 0 {
		return nil, errorf("%s: no PEM certificate", file)
	}
	return pool, nil
}
