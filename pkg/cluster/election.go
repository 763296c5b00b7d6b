package cluster

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
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
	store *Store
	lease *Lease
	key   string // <prefix>leader/<lease id in hex>
	rev   int64  // its create revision
	value string

	resignOnce sync.Once
	resignErr  error
}

// Campaign blocks until this candidate becomes leader or ctx ends. value
// identifies the candidate (e.g. its public address) and is what Leader
// returns while it leads. ttl is the lease TTL (DefaultLeaderTTL when
// <= 0): if the leader process dies, its lease expires after ttl and a
// standby that is campaigning takes over.
//
// The election is etcd's usual one (the layout of
// go.etcd.io/etcd/client/v3/concurrency): each candidate puts a key named
// after its lease under <prefix>leader/, and the oldest key leads. It is
// written here so that every etcd call is bounded: a candidate that gives
// up (ctx ended, its lease expired) revokes its lease within 2 s, etcd
// answering or not.
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
		lease.Close(rctx) // deletes the key
		return nil, err
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
	key := fmt.Sprintf("%s/%x", s.electionPrefix(), lease.ID())
	pctx, cancel := context.WithTimeout(cctx, 5*time.Second)
	resp, err := s.client.Txn(pctx).If(clientv3.Compare(clientv3.CreateRevision(key), "=", 0)).
		Then(clientv3.OpPut(key, value, clientv3.WithLease(lease.ID()))).Commit()
	cancel()
	if err != nil {
		return fail(fmt.Errorf("cluster: campaign: %w", err))
	}
	if !resp.Succeeded {
		return fail(fmt.Errorf("cluster: campaign: key %s exists", key)) // a fresh lease's key cannot
	}
	rev := resp.Header.Revision
	if err := s.waitOlderGone(cctx, rev); err != nil {
		if ctx.Err() != nil {
			err = ctx.Err()
		}
		return fail(fmt.Errorf("cluster: campaign: %w", err))
	}
	// The keys before ours are gone; ours must still be there (its lease
	// may have expired with theirs, in an outage).
	vctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	got, err := s.client.Get(vctx, key)
	cancel()
	switch {
	case err != nil:
		return fail(fmt.Errorf("cluster: campaign: %w", err))
	case len(got.Kvs) == 0 || got.Kvs[0].CreateRevision != rev:
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
	return &Leadership{store: s, lease: lease, key: key, rev: rev, value: value}, nil
}

// waitOlderGone waits until no election key created before rev is left.
func (s *Store) waitOlderGone(ctx context.Context, rev int64) error {
	for {
		gctx, cancel := context.WithTimeout(ctx, 5*time.Second)
		resp, err := s.client.Get(gctx, s.electionPrefix()+"/", append(clientv3.WithLastCreate(), clientv3.WithMaxCreateRev(rev-1))...)
		cancel()
		if err != nil {
			return err
		}
		if len(resp.Kvs) == 0 {
			return nil
		}
		// Wait for the youngest older key to go, then look again.
		if err := s.waitDeleted(ctx, string(resp.Kvs[0].Key), resp.Header.Revision); err != nil {
			return err
		}
	}
}

// waitDeleted waits for key's deletion after revision rev.
func (s *Store) waitDeleted(ctx context.Context, key string, rev int64) error {
	wctx, cancel := context.WithCancel(clientv3.WithRequireLeader(ctx))
	defer cancel()
	for wr := range s.client.Watch(wctx, key, clientv3.WithRev(rev+1)) {
		if err := wr.Err(); err != nil {
			return err
		}
		for _, ev := range wr.Events {
			if ev.Type == mvccpb.DELETE {
				return nil
			}
		}
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	return errors.New("watch ended")
}

// Fence names a leadership for conditional writes: the election key the
// leader holds and the revision it was created at. It stays the same for
// the whole term, and no later term has it.
type Fence struct {
	Key string
	Rev int64
}

// Fence is this leadership's fence (see Store.PutPlacement).
func (l *Leadership) Fence() Fence { return Fence{Key: l.key, Rev: l.rev} }

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

// Resign gives up leadership, letting a standby take over immediately: it
// revokes the lease, which deletes the key (within ctx). It is idempotent.
func (l *Leadership) Resign(ctx context.Context) error {
	l.resignOnce.Do(func() {
		if err := l.lease.Close(ctx); err != nil {
			l.resignErr = fmt.Errorf("cluster: resign: %w", err)
		}
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

// LeaderAt returns the current leader's value ("" when no candidate leads)
// and the etcd revision it was read at: a later revision is newer news (see
// WatchLeader).
func (s *Store) LeaderAt(ctx context.Context) (string, int64, error) {
	resp, err := s.client.Get(ctx, s.electionPrefix()+"/", clientv3.WithFirstCreate()...)
	if err != nil {
		return "", 0, fmt.Errorf("cluster: leader: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return "", resp.Header.Revision, nil
	}
	return string(resp.Kvs[0].Value), resp.Header.Revision, nil
}

// WatchLeader reports the current leader's value (the value of the
// first-created key under the election prefix, as Leader reads it; "" when
// no candidate leads) and the etcd revision it holds at: once when the
// watch starts, then on every change, until ctx ends. fn is called from one
// goroutine, in revision order. Through an etcd outage nothing is reported
// (the last value stands) and the watch is made again when etcd answers; a
// watch broken for another reason (compaction) starts over from a fresh
// read. It returns when ctx ends (or the store is closed).
func (s *Store) WatchLeader(ctx context.Context, fn func(value string, rev int64)) {
	// The candidates' keys, by key: their create revision and value. The
	// leader is the oldest.
	type cand struct {
		created int64
		value   string
	}
	var keys map[string]cand
	reported, first := "", true
	report := func(rev int64) {
		leader, oldest := "", int64(0)
		for _, c := range keys {
			if oldest == 0 || c.created < oldest {
				leader, oldest = c.value, c.created
			}
		}
		if first || leader != reported {
			first, reported = false, leader
			fn(leader, rev)
		}
	}
	s.watch(clientv3.WithRequireLeader(ctx), s.electionPrefix()+"/", true, func(resp *clientv3.GetResponse) bool {
		keys = map[string]cand{}
		for _, kv := range resp.Kvs {
			keys[string(kv.Key)] = cand{kv.CreateRevision, string(kv.Value)}
		}
		report(resp.Header.Revision)
		return true
	}, func(evs []*clientv3.Event) bool {
		var rev int64
		for _, ev := range evs {
			k := string(ev.Kv.Key)
			if ev.Type == mvccpb.PUT {
				keys[k] = cand{ev.Kv.CreateRevision, string(ev.Kv.Value)}
			} else {
				delete(keys, k)
			}
			rev = max(rev, ev.Kv.ModRevision)
		}
		report(rev)
		return true
	})
}
