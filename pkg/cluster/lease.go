package cluster

import (
	"context"
	"errors"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// Lease is an etcd lease this process keeps alive, through etcd outages.
//
// clientv3's KeepAlive gives a lease up once a TTL passes without an answer,
// though etcd may keep it: an etcd restarted from its data keeps its leases
// and extends them, and a stopped etcd does not expire anything until it runs
// again. A Lease keeps asking instead, and takes the lease for lost only when
// etcd answers that it no longer exists (Expired). Meanwhile ValidUntil says
// until when it cannot have expired: etcd counts a TTL from each renewal it
// answers, and it received that renewal after it was sent, so the lease lives
// at least a TTL past the sending of the last renewal answered (clocks on one
// host, or drifting less than their margin, assumed).
type Lease struct {
	client *clientv3.Client
	id     clientv3.LeaseID
	ttl    time.Duration

	mu         sync.Mutex
	validUntil time.Time

	expired   chan struct{} // etcd said the lease is gone, or Close
	stop      context.CancelFunc
	done      chan struct{}
	closeOnce sync.Once
}

// renewEvery is how often a lease of ttl is renewed: six times a TTL, so
// that etcd may miss five renewals in a row (a slow disk, an election)
// before the lease is at risk; retryEvery is the pause after a renewal
// that failed.
func renewEvery(ttl time.Duration) time.Duration { return max(ttl/6, 100*time.Millisecond) }

const retryEvery = 250 * time.Millisecond

// grantLease grants a lease of ttl seconds and keeps it alive until Close
// or until etcd says it expired.
func (s *Store) grantLease(ctx context.Context, ttl int64) (*Lease, error) {
	sent := time.Now()
	g, err := s.client.Grant(ctx, ttl)
	if err != nil {
		return nil, err
	}
	kctx, stop := context.WithCancel(s.client.Ctx())
	l := &Lease{client: s.client, id: g.ID, ttl: time.Duration(g.TTL) * time.Second, validUntil: sent.Add(time.Duration(g.TTL) * time.Second),
		expired: make(chan struct{}), stop: stop, done: make(chan struct{})}
	go l.keep(kctx)
	return l, nil
}

// ID is the lease's etcd id.
func (l *Lease) ID() clientv3.LeaseID { return l.id }

// TTL is the lease's time to live, as granted.
func (l *Lease) TTL() time.Duration { return l.ttl }

// ValidUntil is the time before which the lease cannot have expired: the
// sending of the last renewal etcd answered, plus the TTL.
func (l *Lease) ValidUntil() time.Time {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.validUntil
}

// Expired is closed when etcd answered that the lease no longer exists (it
// expired during an outage longer than its TTL, or was revoked), on Close,
// or when the Store is closed.
func (l *Lease) Expired() <-chan struct{} { return l.expired }

func (l *Lease) keep(ctx context.Context) {
	defer close(l.done)
	// Not kept any longer (Close, or the Store closed): lost to this process.
	defer l.closeOnce.Do(func() { close(l.expired) })
	wait := renewEvery(l.ttl)
	for sleepCtx(ctx, wait) {
		sent := time.Now()
		rctx, cancel := context.WithTimeout(ctx, max(renewEvery(l.ttl), time.Second))
		resp, err := l.client.KeepAliveOnce(rctx, l.id)
		cancel()
		switch {
		case err == nil && resp.TTL > 0:
			l.mu.Lock()
			l.validUntil = sent.Add(time.Duration(resp.TTL) * time.Second)
			l.mu.Unlock()
			wait = renewEvery(l.ttl)
		case err == nil || errors.Is(err, rpctypes.ErrLeaseNotFound):
			return
		default: // etcd did not answer: ask again soon
			wait = retryEvery
		}
	}
}

// Close stops renewing and revokes the lease (deleting its keys) when etcd
// answers within ctx. It is idempotent.
func (l *Lease) Close(ctx context.Context) error {
	l.stop()
	<-l.done
	if _, err := l.client.Revoke(ctx, l.id); err != nil && !isLeaseNotFound(err) {
		return err
	}
	return nil
}
