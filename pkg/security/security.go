// Package security holds the groundwork of qwenfleet's transport security:
// a cluster certificate authority, certificates by role, TLS configurations
// that follow the files on disk, and API keys for the public API.
//
// Roles. Every certificate the cluster CA signs names one role in a URI SAN
// "qwenfleet://role/<role>" (RoleOf reads it; the subject's OU repeats it as
// "qwenfleet:<role>" for people):
//
//   - coordinator: serves the public and internal APIs and calls workers
//     (server and client authentication);
//   - worker: serves the worker API and calls other workers (server and
//     client authentication); one certificate is shared by all workers;
//   - client: tools that call internal ports, such as a metrics scraper
//     (client authentication only).
//
// Files. WriteCerts writes, into one directory (mode 0700): ca.pem and
// ca-key.pem, coordinator.pem/coordinator-key.pem, worker.pem/worker-key.pem,
// client.pem/client-key.pem (ECDSA P-256, PEM; private keys PKCS#8, mode
// 0600) and gossip.key (one base64 line of 32 random bytes, mode 0600: the
// memberlist AES-256 key). Every file is written to a temporary name and
// renamed, so a reader never sees half a file. WriteCertsWith takes the time
// they are made at; the CA is valid 10 years, the others 2.
//
// Rotation. NewTLS reads ca.pem and the pair of its role; the configurations
// it returns check, at most once a second and only when a handshake happens,
// whether those files changed (size, modification time or inode) and
// re-read them, so certificates are rotated by replacing the files, with no
// restart. A set of files that does not load (a certificate written before
// its key, say) leaves the previous one in use and is retried on the next
// check; Err reports it. Replacing ca.pem by a new CA makes every old
// certificate invalid at once; to rotate without a gap, put the old and the
// new CA both in ca.pem (it may hold several), then the new pairs, then drop
// the old CA. Server configurations disable session tickets, so no
// connection resumes past a rotation without a check against the current
// CA.
//
// API keys (the public API) live in a JSON-lines file of
// {"sha256": hex, "name": ..., "role": "user"|"admin", "max_streams": n}
// (max_streams optional): only the SHA-256 of a key is stored. AddAPIKey
// makes one; LoadAPIKeys and APIKeys.Lookup check one, and follow the file's
// changes the same way (at most once a second), so a key is added or revoked
// by editing the file.
//
// Nothing in this package logs but Refusals (which names listeners, remote
// addresses and reasons); its errors name files, never key material.
package security

import (
	"context"
	"crypto/x509"
	"fmt"

	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// Role is the role a certificate grants.
type Role string

const (
	RoleCoordinator Role = "coordinator"
	RoleWorker      Role = "worker"
	RoleClient      Role = "client"
)

// Roles lists the certificate roles in the order WriteCerts writes them.
var Roles = []Role{RoleCoordinator, RoleWorker, RoleClient}

// Valid reports whether r is one of the certificate roles.
func (r Role) Valid() bool {
	switch r {
	case RoleCoordinator, RoleWorker, RoleClient:
		return true
	}
	return false
}

func (r Role) certFile() string { return string(r) + ".pem" }
func (r Role) keyFile() string  { return string(r) + "-key.pem" }

// roleURIScheme and roleURIHost make the URI SAN qwenfleet://role/<role>.
const (
	roleURIScheme = "qwenfleet"
	roleURIHost   = "role"
)

// RoleOf returns the role a certificate names in its URI SAN
// qwenfleet://role/<role>. It does not verify the certificate: use it on a
// verified chain's leaf only. A certificate naming no role, an unknown one or
// more than one gives false.
func RoleOf(cert *x509.Certificate) (Role, bool) {
	if cert == nil {
		return "", false
	}
	var found Role
	for _, u := range cert.URIs {
		if u.Scheme != roleURIScheme || u.Host != roleURIHost {
			continue
		}
		r := Role(trimSlash(u.Path))
		if !r.Valid() || (found != "" && found != r) {
			return "", false
		}
		found = r
	}
	return found, found != ""
}

func trimSlash(p string) string {
	if len(p) > 0 && p[0] == '/' {
		return p[1:]
	}
	return p
}

// PeerRole returns the role of the verified client certificate of a gRPC
// call: the leaf of the first chain the TLS handshake verified. A call
// without TLS, without a client certificate, or whose certificate was not
// verified against a CA (VerifiedChains empty) gives false.
func PeerRole(ctx context.Context) (Role, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok || p.AuthInfo == nil {
		return "", false
	}
	var chains [][]*x509.Certificate
	switch ai := p.AuthInfo.(type) {
	case credentials.TLSInfo:
		chains = ai.State.VerifiedChains
	case *credentials.TLSInfo:
		chains = ai.State.VerifiedChains
	default:
		return "", false
	}
	if len(chains) == 0 || len(chains[0]) == 0 {
		return "", false
	}
	return RoleOf(chains[0][0])
}

// errorf prefixes the package name.
func errorf(format string, args ...any) error {
	return fmt.Errorf("security: "+format, args...)
}
