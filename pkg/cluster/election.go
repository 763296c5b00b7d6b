package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	clientv3 "go.etcd.io/etcd/client/v3"
	"go.etcd.io/etcd/client/v3/concurrency"
)

// ErrNoLeader is returned by Leader when no candidate holds leadership.
var ErrNoLeader = errors.New("cluster: no leader")

// DefaultLeaderTTL is the election session TTL used when Campaign gets
// ttl <= 0.
const DefaultLeaderTTL = 10 * time.Second

// Leadership is held by the winner of Campaign until Resign or until its
// session ends.
type Leadership struct {
	session  *concurrency.Session
	election *concurrency.Election
	value    string

	resignOnce sync.Once
	resignErr  error
}

// Campaign blocks until this candidate becomes leader or ctx ends. value
// identifies the candidate (e.g. its public address) and is what Leader
// returns while it leads. ttl is the session TTL (DefaultLeaderTTL when
// <= 0): if the leader process dies, its session expires after ttl and a
// standby that is campaigning takes over.
func (s *Store) Campaign(ctx context.Context, value string, ttl time.Duration) (*Leadership, error) {
	sess, err := concurrency.NewSession(s.client, concurrency.WithTTL(int(ttlSeconds(ttl, DefaultLeaderTTL))), concurrency.WithContext(ctx))
	if err != nil {
		return nil, fmt.Errorf("cluster: election session: %w", err)
	}
	// Stop waiting if our own session dies while we queue.
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-sess.Done():
			cancel()
		case <-cctx.Done():
		}
	}()
	el := concurrency.NewElection(sess, s.electionPrefix())
	if err := el.Campaign(cctx, value); err != nil {
		sess.Close()
		if ctx.Err() != nil {
			return nil, fmt.Errorf("cluster: campaign: %w", ctx.Err())
		}
		return nil, fmt.Errorf("cluster: campaign: %w", err)
	}
	select {
	case <-sess.Done():
		sess.Close()
		return nil, errors.New("cluster: campaign: session expired")
	default:
	}
	return &Leadership{session: sess, election: el, value: value}, nil
}

// Fence names a leadership for conditional writes: the election key the
// leader holds and the revision it was created at. It stays the same for
// the whole term, and no later term has it.
type Fence struct {
	Key string
	Rev int64
}

// Fence is this leadership's fence (see Store.PutPlacement).
func (l *Leadership) Fence() Fence { return Fence{Key: l.election.Key(), Rev: l.election.Rev()} }

// Lost returns a channel closed when the session ends (lease expired, etcd
// unreachable for longer than the TTL, Store closed, or Resign called).
func (l *Leadership) Lost() <-chan struct{} { return l.session.Done() }

// Resign gives up leadership, letting a standby take over immediately, and
// closes the session. It is idempotent.
func (l *Leadership) Resign(ctx context.Context) error {
	l.resignOnce.Do(func() {
		var errs []error
		if err := l.election.Resign(ctx); err != nil {
			errs = append(errs, fmt.Errorf("cluster: resign: %w", err))
		}
		if err := l.session.Close(); err != nil && !isLeaseNotFound(err) {
			errs = append(errs, fmt.Errorf("cluster: close election session: %w", err))
		}
		l.resignErr = errors.Join(errs...)
	})
	return l.resignErr
}

// Leader returns the current leader's value, or ErrNoLeader.
func (s *Store) Leader(ctx context.Context) (string, error) {
	resp, err := s.client.Get(ctx, s.electionPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", fmt.Errorf("cluster: leader: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", ErrNoLeader
	}
	return string(resp.Kvs[0].Value), nil
}
