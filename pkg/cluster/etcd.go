package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"

	"github.com/qwenfleet/qwenfleet/pkg/security"
)

// etcdReadyTimeout bounds how long StartEmbeddedEtcd waits for the server to
// become ready.
const etcdReadyTimeout = 30 * time.Second

// EmbeddedEtcdConfig configures StartEmbeddedEtcdConfig. The zero value of
// every field except Dir picks a sensible default.
type EmbeddedEtcdConfig struct {
	// Dir is the data directory (required).
	Dir string
	// Name is the etcd member name; default "qwenfleet".
	Name string
	// Host is the address both listeners bind to and advertise;
	// default "127.0.0.1".
	Host string
	// ClientPort is the client listener port; 0 picks a free port.
	ClientPort int
	// PeerPort is the peer listener port; 0 picks a free port.
	PeerPort int
	// Logger receives etcd's logs; nil discards them.
	Logger *zap.Logger
	// TLSDir, when set, is a directory security.WriteCerts wrote: the
	// client and peer listeners serve https with its coordinator pair
	// (coordinator.pem, coordinator-key.pem) and require a client
	// certificate signed by its ca.pem (any role), and Endpoints are
	// https:// URLs. etcd re-reads the pair on every handshake, so a
	// rotated pair is served at once; it reads ca.pem only when it starts,
	// so a new CA needs a restart of the embedded etcd.
	TLSDir string
	// Log, when set, receives etcd's refused connections (plaintext, no
	// client certificate, another CA's certificate: etcd's "rejected
	// connection" lines), each remote host's once, through a
	// security.Refusals (listener "etcd", or "etcd-peer" for the peer
	// port). The rest of etcd's logging goes to Logger as without it.
	Log *slog.Logger
}

// EmbeddedEtcd is a single-member etcd server running inside this process.
type EmbeddedEtcd struct {
	etcd      *embed.Etcd
	endpoints []string
	closeOnce sync.Once
}

// StartEmbeddedEtcd starts a single-member etcd server with its data under
// dir, listening on free loopback ports. It returns once the server is ready
// to serve clients (or fails after 30s).
func StartEmbeddedEtcd(dir string) (*EmbeddedEtcd, error) {
	return StartEmbeddedEtcdConfig(EmbeddedEtcdConfig{Dir: dir})
}

// StartEmbeddedEtcdConfig is StartEmbeddedEtcd with explicit settings.
// When a port is 0 a free one is picked; since another process could grab it
// before etcd binds it, startup is retried a few times in that case.
func StartEmbeddedEtcdConfig(c EmbeddedEtcdConfig) (*EmbeddedEtcd, error) {
	if c.Dir == "" {
		return nil, errors.New("cluster: embedded etcd needs a data dir")
	}
	if c.Name == "" {
		c.Name = "qwenfleet"
	}
	if c.Host == "" {
		c.Host = "127.0.0.1"
	}
	attempts := 1
	if c.ClientPort == 0 || c.PeerPort == 0 {
		attempts = 3
	}
	var lastErr error
	for i := 0; i < attempts; i++ {
		e, err := startEtcdOnce(c)
		if err == nil {
			return e, nil
		}
		lastErr = err
	}
	return nil, lastErr
}

func startEtcdOnce(c EmbeddedEtcdConfig) (*EmbeddedEtcd, error) {
	clientPort, peerPort := c.ClientPort, c.PeerPort
	var err error
	if clientPort == 0 {
		if clientPort, err = freePort(c.Host); err != nil {
			return nil, err
		}
	}
	if peerPort == 0 {
		if peerPort, err = freePort(c.Host); err != nil {
			return nil, err
		}
	}
	scheme := "http"
	if c.TLSDir != "" {
		scheme = "https"
	}
	clientURL := url.URL{Scheme: scheme, Host: net.JoinHostPort(c.Host, strconv.Itoa(clientPort))}
	peerURL := url.URL{Scheme: scheme, Host: net.JoinHostPort(c.Host, strconv.Itoa(peerPort))}

	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = c.Dir
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = c.Name + "=" + peerURL.String()
	cfg.InitialClusterToken = "qwenfleet-" + c.Name
	if c.TLSDir != "" {
		// Checked here for an error naming the file (etcd's would not
		// say that a pair is of another CA or role).
		if _, err := security.NewTLS(c.TLSDir, security.RoleCoordinator); err != nil {
			return nil, fmt.Errorf("cluster: embedded etcd TLS: %w", err)
		}
		cert := filepath.Join(c.TLSDir, string(security.RoleCoordinator)+".pem")
		key := filepath.Join(c.TLSDir, string(security.RoleCoordinator)+"-key.pem")
		ca := filepath.Join(c.TLSDir, security.CAFile)
		cfg.ClientTLSInfo.CertFile, cfg.ClientTLSInfo.KeyFile, cfg.ClientTLSInfo.TrustedCAFile = cert, key, ca
		cfg.ClientTLSInfo.ClientCertAuth = true
		// Coordinators and workers only: a client certificate (a
		// metrics scraper's) must not read the placement's secrets or
		// write the election.
		cfg.ClientTLSInfo.AllowedCNs = EtcdClientCNs
		cfg.PeerTLSInfo.CertFile, cfg.PeerTLSInfo.KeyFile, cfg.PeerTLSInfo.TrustedCAFile = cert, key, ca
		cfg.PeerTLSInfo.ClientCertAuth = true
		cfg.PeerTLSInfo.AllowedCNs = []string{"qwenfleet " + string(security.RoleCoordinator)}
	}
	lg := c.Logger
	if lg == nil {
		lg = zap.NewNop()
	}
	if c.Log != nil {
		r := security.NewRefusals(c.Log)
		lg = lg.WithOptions(zap.WrapCore(func(core zapcore.Core) zapcore.Core {
			return &refusalCore{Core: core, r: r}
		}))
	}
	cfg.Logger = "zap"
	cfg.LogLevel = "error"
	cfg.ZapLoggerBuilder = embed.NewZapLoggerBuilder(lg)

	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return nil, fmt.Errorf("cluster: start embedded etcd: %w", err)
	}
	timer := time.NewTimer(etcdReadyTimeout)
	defer timer.Stop()
	select {
	case <-e.Server.ReadyNotify():
	case err := <-e.Err():
		e.Close()
		return nil, fmt.Errorf("cluster: embedded etcd failed: %w", err)
	case <-timer.C:
		e.Server.Stop()
		e.Close()
		return nil, fmt.Errorf("cluster: embedded etcd not ready after %s", etcdReadyTimeout)
	}
	ee := &EmbeddedEtcd{etcd: e}
	for _, l := range e.Clients {
		ee.endpoints = append(ee.endpoints, scheme+"://"+l.Addr().String())
	}
	if len(ee.endpoints) == 0 {
		ee.endpoints = []string{clientURL.String()}
	}
	return ee, nil
}

// freePort returns a TCP port on host that was free a moment ago.
func freePort(host string) (int, error) {
	l, err := net.Listen("tcp", net.JoinHostPort(host, "0"))
	if err != nil {
		return 0, fmt.Errorf("cluster: pick free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Endpoints returns the client URLs of the server, e.g.
// ["http://127.0.0.1:41234"] (https:// with TLSDir), suitable for Connect
// (ConnectWith with the cluster's TLS client configuration under TLSDir).
func (e *EmbeddedEtcd) Endpoints() []string {
	return append([]string(nil), e.endpoints...)
}

// Close stops the server. It is safe to call more than once.
func (e *EmbeddedEtcd) Close() error {
	e.closeOnce.Do(func() {
		e.etcd.Close()
	})
	return nil
}

// refusalCore passes etcd's log entries to Core, except its refused
// connections ("rejected connection on client endpoint", "... on peer
// endpoint", "http: TLS handshake error from ...") at Warn or above, which
// it reports to r instead (each remote host's once). Refusals at Debug (a
// peer that closed before its handshake: a TCP check) go to Core.
type refusalCore struct {
	zapcore.Core
	r *security.Refusals
}

func (c *refusalCore) Enabled(l zapcore.Level) bool {
	return l >= zapcore.WarnLevel || c.Core.Enabled(l)
}

func (c *refusalCore) With(fields []zapcore.Field) zapcore.Core {
	return &refusalCore{Core: c.Core.With(fields), r: c.r}
}

func (c *refusalCore) Check(e zapcore.Entry, ce *zapcore.CheckedEntry) *zapcore.CheckedEntry {
	if e.Level >= zapcore.WarnLevel && etcdRefusal(e.Message) {
		return ce.AddCore(e, c)
	}
	return c.Core.Check(e, ce)
}

// Write is called only for the entries Check took: refusals.
func (c *refusalCore) Write(e zapcore.Entry, fields []zapcore.Field) error {
	listener := "etcd"
	if strings.Contains(e.Message, "peer endpoint") {
		listener = "etcd-peer"
	}
	remote, reason := "", ""
	for _, f := range fields {
		switch {
		case f.Key == "remote-addr" && f.Type == zapcore.StringType:
			remote = f.String
		case f.Type == zapcore.ErrorType:
			if err, ok := f.Interface.(error); ok && err != nil {
				reason = security.HandshakeReason(err)
			}
		}
	}
	if remote == "" {
		// net/http's "http: TLS handshake error from ADDR: ERR".
		const from = "handshake error from "
		if i := strings.Index(e.Message, from); i >= 0 {
			rest := e.Message[i+len(from):]
			if j := strings.Index(rest, ": "); j >= 0 {
				remote, reason = rest[:j], rest[j+2:]
			} else {
				remote = rest
			}
		}
	}
	if remote == "" {
		remote = "unknown"
	}
	if reason == "" {
		reason = e.Message
	}
	c.r.Refuse(listener, remote, reason)
	return nil
}

// etcdRefusal reports whether an etcd log message is a refused connection.
func etcdRefusal(msg string) bool {
	return strings.HasPrefix(msg, "rejected connection") || strings.Contains(msg, "TLS handshake error")
}

// EtcdClientCNs are the certificate common names the embedded etcd takes
// clients with: the coordinators' and the workers' (security.WriteCerts
// names each role's certificate "qwenfleet <role>").
var EtcdClientCNs = []string{"qwenfleet " + string(security.RoleCoordinator), "qwenfleet " + string(security.RoleWorker)}
