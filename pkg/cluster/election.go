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

// DefaultLeaderTTL is the election lease TTL used when Campaign gets
// ttl <= 0: a standby takes over at most this long after the leader died.
const DefaultLeaderTTL = 3 * time.Second

// Leadership is held by the winner of Campaign until Resign, or until etcd
// says its lease expired (Lost). Its lease is kept alive through etcd
// outages (see Lease): while etcd does not answer, the leadership is not
// known lost, and ValidUntil says until when no other leader can exist.
type Leadership struct {
	lease    *Lease
	session  *concurrency.Session
	election *concurrency.Election
	value    string

	resignOnce sync.Once
	resignErr  error
}

// Campaign blocks until this candidate becomes leader or ctx ends. value
// identifies the candidate (e.g. its public address) and is what Leader
// returns while it leads. ttl is the lease TTL (DefaultLeaderTTL when
// <= 0): if the leader process dies, its lease expires after ttl and a
// standby that is campaigning takes over.
func (s *Store) Campaign(ctx context.Context, value string, ttl time.Duration) (*Leadership, error) {
	gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	lease, err := s.grantLease(gctx, ttlSeconds(ttl, DefaultLeaderTTL))
	cancel()
	if err != nil {
		return nil, fmt.Errorf("cluster: election lease: %w", err)
	}
	fail := func(err error) (*Leadership, error) {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		lease.Close(rctx)
		return nil, err
	}
	// The session only names the lease to the election: Lease keeps it
	// alive, and the session's own keep-alive (which gives up after a TTL
	// without etcd) is not relied on.
	sess, err := concurrency.NewSession(s.client, concurrency.WithLease(lease.ID()), concurrency.WithContext(ctx))
	if err != nil {
		return fail(fmt.Errorf("cluster: election session: %w", err))
	}
	// Stop waiting if our own lease expires while we queue.
	cctx, cancelWait := context.WithCancel(ctx)
	defer cancelWait()
	go func() {
		select {
		case <-lease.Expired():
			cancelWait()
		case <-cctx.Done():
		}
	}()
	el := concurrency.NewElection(sess, s.electionPrefix())
	if err := el.Campaign(cctx, value); err != nil {
		if ctx.Err() != nil {
			return fail(fmt.Errorf("cluster: campaign: %w", ctx.Err()))
		}
		return fail(fmt.Errorf("cluster: campaign: %w", err))
	}
	// The keys before ours are gone; ours must still be there (its lease
	// may have expired with theirs, in an outage).
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	resp, err := s.client.Get(vctx, el.Key())
	cancel()
	switch {
	case err != nil:
		return fail(fmt.Errorf("cluster: campaign: %w", err))
	case len(resp.Kvs) == 0 || resp.Kvs[0].CreateRevision != el.Rev():
		return fail(errors.New("cluster: campaign: the election lease expired"))
	}
	// When etcd comes back after a stop, it revokes every lease past its
	// TTL, one by one: the keys before ours may be gone while ours still
	// waits for its revocation. etcd answers a renewal of an expired lease
	// only once it is revoked: a candidate whose lease expired in the
	// outage does not win before the leader it waited behind campaigns
	// again.
	kctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	_, err = s.client.KeepAliveOnce(kctx, lease.ID())
	cancel()
	if err != nil {
		return fail(fmt.Errorf("cluster: campaign: the election lease: %w", err))
	}
	return &Leadership{lease: lease, session: sess, election: el, value: value}, nil
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

// Lost returns a channel closed when etcd says the leadership's lease
// expired (an outage longer than the TTL) or after Resign: the term is
// over, though no other leader may exist yet (campaign again at once to
// lead on).
func (l *Leadership) Lost() <-chan struct{} { return l.lease.Expired() }

// TTL is the leadership lease's time to live.
func (l *Leadership) TTL() time.Duration { return l.lease.TTL() }

// ValidUntil is the time before which no other leader can exist: the
// lease cannot have expired yet (see Lease.ValidUntil).
func (l *Leadership) ValidUntil() time.Time { return l.lease.ValidUntil() }

// Resign gives up leadership, letting a standby take over immediately, and
// revokes the lease. It is idempotent.
func (l *Leadership) Resign(ctx context.Context) error {
	l.resignOnce.Do(func() {
		var errs []error
		if err := l.election.Resign(ctx); err != nil {
			errs = append(errs, fmt.Errorf("cluster: resign: %w", err))
		}
		if err := l.lease.Close(ctx); err != nil {
			errs = append(errs, fmt.Errorf("cluster: revoke election lease: %w", err))
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
