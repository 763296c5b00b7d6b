package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/url"
	"strconv"
	"sync"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
	"go.uber.org/zap"
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
	clientURL := url.URL{Scheme: "http", Host: net.JoinHostPort(c.Host, strconv.Itoa(clientPort))}
	peerURL := url.URL{Scheme: "http", Host: net.JoinHostPort(c.Host, strconv.Itoa(peerPort))}

	cfg := embed.NewConfig()
	cfg.Name = c.Name
	cfg.Dir = c.Dir
	cfg.ListenClientUrls = []url.URL{clientURL}
	cfg.AdvertiseClientUrls = []url.URL{clientURL}
	cfg.ListenPeerUrls = []url.URL{peerURL}
	cfg.AdvertisePeerUrls = []url.URL{peerURL}
	cfg.InitialCluster = c.Name + "=" + peerURL.String()
	cfg.InitialClusterToken = "qwenfleet-" + c.Name
	lg := c.Logger
	if lg == nil {
		lg = zap.NewNop()
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
		ee.endpoints = append(ee.endpoints, "http://"+l.Addr().String())
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
// ["http://127.0.0.1:41234"], suitable for Connect.
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
