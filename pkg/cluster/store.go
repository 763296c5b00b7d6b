package cluster

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.uber.org/zap"
	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
)

// DefaultPrefix is the key prefix used when Connect is given an empty one.
const DefaultPrefix = "/qwenfleet/"

// connectTimeout bounds Connect's reachability check when ctx has no earlier
// deadline.
const connectTimeout = 5 * time.Second

// retryDelay is the pause before a broken watch is re-established.
const retryDelay = 500 * time.Millisecond

// Store is an etcd client rooted at a key prefix. It is safe for concurrent
// use.
type Store struct {
	client    *clientv3.Client
	prefix    string
	closeOnce sync.Once
	closeErr  error
}

// ConnectConfig is how ConnectWith reaches etcd. The zero value is
// plaintext without authentication (Connect).
type ConnectConfig struct {
	// TLS, when set, is the client's TLS configuration (the cluster's:
	// security.TLS.ClientConfig); every endpoint must then be https://
	// (or unixs://), and without it none may be.
	TLS *tls.Config
	// Username and Password authenticate to etcd's auth (both or
	// neither).
	Username, Password string
}

// Connect dials etcd at endpoints and verifies it answers within ctx (and at
// most 5 seconds). prefix roots all keys; "" means DefaultPrefix, and a
// trailing "/" is added when missing. It is ConnectWith with the zero
// ConnectConfig: plaintext, no authentication.
func Connect(ctx context.Context, endpoints []string, prefix string) (*Store, error) {
	return ConnectWith(ctx, endpoints, prefix, ConnectConfig{})
}

// ConnectWith is Connect with TLS and etcd authentication (see
// ConnectConfig). An endpoint whose scheme does not match the
// configuration (http:// with TLS, https:// without it, or no scheme with
// TLS) is an error naming it: the etcd client would otherwise silently
// drop TLS for an http:// endpoint.
func ConnectWith(ctx context.Context, endpoints []string, prefix string, cfg ConnectConfig) (*Store, error) {
	if len(endpoints) == 0 {
		return nil, errors.New("cluster: no etcd endpoints")
	}
	for _, ep := range endpoints {
		if err := checkEndpoint(ep, cfg.TLS != nil); err != nil {
			return nil, err
		}
	}
	if (cfg.Username == "") != (cfg.Password == "") {
		return nil, errors.New("cluster: etcd authentication needs both a username and a password")
	}
	prefix = normalizePrefix(prefix)
	cli, err := clientv3.New(clientv3.Config{
		Endpoints:            endpoints,
		DialTimeout:          connectTimeout,
		DialKeepAliveTime:    5 * time.Second,
		DialKeepAliveTimeout: 5 * time.Second,
		// Reconnect within a second of etcd's return (gRPC's default
		// backoff grows to two minutes).
		DialOptions: []grpc.DialOption{grpc.WithConnectParams(grpc.ConnectParams{
			Backoff: backoff.Config{BaseDelay: 100 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: time.Second}, MinConnectTimeout: time.Second})},
		TLS:      cfg.TLS,
		Username: cfg.Username,
		Password: cfg.Password,
		Logger:   zap.NewNop(),
	})
	if err != nil {
		return nil, fmt.Errorf("cluster: etcd client for %v: %w", endpoints, err)
	}
	cctx, cancel := context.WithTimeout(ctx, connectTimeout)
	defer cancel()
	if _, err := cli.Get(cctx, prefix, clientv3.WithCountOnly()); err != nil {
		cli.Close()
		return nil, fmt.Errorf("cluster: etcd unreachable at %s: %w", strings.Join(endpoints, ","), err)
	}
	return &Store{client: cli, prefix: prefix}, nil
}

// checkEndpoint refuses an endpoint whose scheme does not match whether TLS
// is configured.
func checkEndpoint(ep string, withTLS bool) error {
	scheme := ""
	if i := strings.Index(ep, "://"); i >= 0 {
		scheme = ep[:i]
	} else if strings.HasPrefix(ep, "unixs:") {
		scheme = "unixs"
	} else if strings.HasPrefix(ep, "unix:") {
		scheme = "unix"
	}
	secure := scheme == "https" || scheme == "unixs"
	switch {
	case withTLS && !secure:
		return fmt.Errorf("cluster: etcd endpoint %q is not https:// but TLS is configured", ep)
	case !withTLS && secure:
		return fmt.Errorf("cluster: etcd endpoint %q is %s:// but no TLS is configured", ep, scheme)
	case scheme != "" && scheme != "http" && scheme != "https" && scheme != "unix" && scheme != "unixs":
		return fmt.Errorf("cluster: etcd endpoint %q: unknown scheme %q (want http or https)", ep, scheme)
	}
	return nil
}

func normalizePrefix(p string) string {
	if p == "" {
		return DefaultPrefix
	}
	if !strings.HasSuffix(p, "/") {
		p += "/"
	}
	return p
}

// Close closes the client. Leases held through it (registrations, election
// sessions) are no longer kept alive and expire after their TTL; they are not
// revoked. Close is idempotent.
func (s *Store) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.client.Close()
		if errors.Is(s.closeErr, context.Canceled) {
			s.closeErr = nil
		}
	})
	return s.closeErr
}

func (s *Store) workersPrefix() string      { return s.prefix + "workers/" }
func (s *Store) workerKey(id string) string { return s.workersPrefix() + id }
func (s *Store) placementKey() string       { return s.prefix + "placement" }
func (s *Store) electionPrefix() string     { return s.prefix + "leader" } // concurrency adds "/"

// sleepCtx waits d or until ctx ends; it reports whether ctx is still live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
