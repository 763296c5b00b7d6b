package cluster

import (
	"context"
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

// Connect dials etcd at endpoints and verifies it answers within ctx (and at
// most 5 seconds). prefix roots all keys; "" means DefaultPrefix, and a
// trailing "/" is added when missing.
func Connect(ctx context.Context, endpoints []string, prefix string) (*Store, error) {
	if len(endpoints) == 0 {
		return nil, errors.New("cluster: no etcd endpoints")
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
		Logger: zap.NewNop(),
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
