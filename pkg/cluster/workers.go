package cluster

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"sort"
	"strings"
	"sync"
	"time"

	"go.etcd.io/etcd/api/v3/mvccpb"
	"go.etcd.io/etcd/api/v3/v3rpc/rpctypes"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// WorkerInfo describes a registered worker; it is stored as JSON under
// <prefix>workers/<ID>.
type WorkerInfo struct {
	ID          string    `json:"id"`
	Addr        string    `json:"addr"`
	GossipAddr  string    `json:"gossip_addr,omitempty"`
	MetricsAddr string    `json:"metrics_addr,omitempty"` // Prometheus /metrics, when served
	Backend     string    `json:"backend"`
	DeviceName  string    `json:"device_name,omitempty"` // the GPU's name (cuda workers)
	MemoryBytes int64     `json:"memory_bytes"`
	Devices     int       `json:"devices"`
	PID         int       `json:"pid"`
	Host        string    `json:"host"`
	State       string    `json:"state"`
	Started     time.Time `json:"started"` // when this registration was made (a new one after a lost lease)
	// DrainTimeoutSeconds is how long the worker's replica may take to
	// finish its requests when the worker asks to be drained (state
	// "draining"); 0: the coordinator's default.
	DrainTimeoutSeconds float64 `json:"drain_timeout_s,omitempty"`
}

// Registration is a worker entry kept alive by its own etcd lease, through
// etcd outages: when etcd answers that the lease expired (it was
// unreachable, or stopped, for longer than the TTL), the entry is written
// again, unchanged, under a new lease, so a worker keeps its place (the
// coordinator sees the same process again).
type Registration struct {
	store *Store
	key   string
	ttl   int64
	stop  context.CancelFunc
	done  chan struct{}

	mu       sync.Mutex
	lease    *Lease
	info     WorkerInfo
	renewals int

	closeOnce sync.Once
	closeErr  error
}

// ttlSeconds converts a TTL to whole seconds (rounded up, at least 1), or
// def when ttl <= 0.
func ttlSeconds(ttl, def time.Duration) int64 {
	if ttl <= 0 {
		ttl = def
	}
	s := int64(math.Ceil(ttl.Seconds()))
	if s < 1 {
		s = 1
	}
	return s
}

// RegisterWorker stores w under <prefix>workers/<w.ID> attached to a new
// lease of ttl (default 10s; etcd may round very short TTLs up to its
// minimum) that is kept alive in the background, and written again under a
// new lease if etcd lets it expire. The key vanishes when Close is called
// (lease revoked) or when the process dies (lease expiry).
func (s *Store) RegisterWorker(ctx context.Context, w WorkerInfo, ttl time.Duration) (*Registration, error) {
	if w.ID == "" || strings.Contains(w.ID, "/") {
		return nil, fmt.Errorf("cluster: invalid worker id %q", w.ID)
	}
	r := &Registration{store: s, key: s.workerKey(w.ID), ttl: ttlSeconds(ttl, 10*time.Second), info: w, done: make(chan struct{})}
	// A fresh process replaces the entry of a dead one of the same id
	// (its lease not yet expired).
	lease, err := r.put(ctx, w, false)
	if err != nil {
		return nil, err
	}
	r.lease = lease
	kctx, stop := context.WithCancel(s.client.Ctx())
	r.stop = stop
	go r.keep(kctx)
	return r, nil
}

// put writes w under a new lease; onlyNew: only if no entry exists (an
// entry written again must not replace a newer process's).
func (r *Registration) put(ctx context.Context, w WorkerInfo, onlyNew bool) (*Lease, error) {
	data, err := json.Marshal(w)
	if err != nil {
		return nil, fmt.Errorf("cluster: encode worker: %w", err)
	}
	lease, err := r.store.grantLease(ctx, r.ttl)
	if err != nil {
		return nil, fmt.Errorf("cluster: grant lease: %w", err)
	}
	txn := r.store.client.Txn(ctx)
	if onlyNew {
		txn = txn.If(clientv3.Compare(clientv3.CreateRevision(r.key), "=", 0))
	}
	resp, err := txn.Then(clientv3.OpPut(r.key, string(data), clientv3.WithLease(lease.ID()))).Commit()
	if err == nil && !resp.Succeeded {
		err = errors.New("another process registered this id meanwhile")
	}
	if err != nil {
		rctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		lease.Close(rctx)
		cancel()
		return nil, fmt.Errorf("cluster: register worker %s: %w", w.ID, err)
	}
	return lease, nil
}

// keep writes the entry again under a new lease each time etcd lets the
// lease expire, until Close.
func (r *Registration) keep(ctx context.Context) {
	defer close(r.done)
	for {
		r.mu.Lock()
		lease := r.lease
		r.mu.Unlock()
		select {
		case <-ctx.Done():
			return
		case <-lease.Expired():
		}
		for {
			r.mu.Lock()
			info := r.info
			r.mu.Unlock()
			pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			l, err := r.put(pctx, info, true)
			cancel()
			if err == nil {
				r.mu.Lock()
				r.lease = l
				r.renewals++
				r.mu.Unlock()
				break
			}
			if !sleepCtx(ctx, retryDelay) {
				return
			}
		}
	}
}

func (r *Registration) leaseID() clientv3.LeaseID {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.lease.ID()
}

// Renewals counts the times the entry was written again under a new lease.
func (r *Registration) Renewals() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.renewals
}

// Update replaces the stored WorkerInfo (e.g. a state change) under the same
// lease. w.ID must match the registered ID.
func (r *Registration) Update(ctx context.Context, w WorkerInfo) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if w.ID != r.info.ID {
		return fmt.Errorf("cluster: update: worker id %q does not match registration %q", w.ID, r.info.ID)
	}
	data, err := json.Marshal(w)
	if err != nil {
		return fmt.Errorf("cluster: encode worker: %w", err)
	}
	// Kept even when the write fails: an entry written again (a new lease)
	// carries it.
	r.info = w
	if _, err := r.store.client.Put(ctx, r.key, string(data), clientv3.WithLease(r.lease.ID())); err != nil {
		return fmt.Errorf("cluster: update worker %s: %w", w.ID, err)
	}
	return nil
}

// Close stops the keep-alive and revokes the lease, deleting the worker key.
// It is idempotent; later calls return the first call's result.
func (r *Registration) Close() error {
	r.closeOnce.Do(func() {
		r.stop()
		<-r.done
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if err := r.lease.Close(ctx); err != nil {
			r.closeErr = fmt.Errorf("cluster: revoke worker lease: %w", err)
		}
	})
	return r.closeErr
}

func isLeaseNotFound(err error) bool {
	return errors.Is(err, rpctypes.ErrLeaseNotFound)
}

// ListWorkers returns all registered workers sorted by ID. Entries that do
// not decode as WorkerInfo are skipped.
func (s *Store) ListWorkers(ctx context.Context) ([]WorkerInfo, error) {
	ws, _, err := s.listWorkers(ctx)
	if err != nil {
		return nil, err
	}
	return sortedWorkers(ws), nil
}

func (s *Store) listWorkers(ctx context.Context) (map[string]WorkerInfo, int64, error) {
	resp, err := s.client.Get(ctx, s.workersPrefix(), clientv3.WithPrefix())
	if err != nil {
		return nil, 0, fmt.Errorf("cluster: list workers: %w", err)
	}
	return workersOf(resp), resp.Header.Revision, nil
}

// workersOf reads the worker entries of a listing, by key.
func workersOf(resp *clientv3.GetResponse) map[string]WorkerInfo {
	ws := make(map[string]WorkerInfo, len(resp.Kvs))
	for _, kv := range resp.Kvs {
		var w WorkerInfo
		if json.Unmarshal(kv.Value, &w) == nil {
			ws[string(kv.Key)] = w
		}
	}
	return ws
}

func sortedWorkers(m map[string]WorkerInfo) []WorkerInfo {
	out := make([]WorkerInfo, 0, len(m))
	for _, w := range m {
		out = append(out, w)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out
}

// WatchWorkers sends the full sorted worker list now and again after every
// change, until ctx ends; the channel is then closed. A broken watch (etcd
// restart, compaction) is re-established with a fresh listing.
func (s *Store) WatchWorkers(ctx context.Context) <-chan []WorkerInfo {
	out := make(chan []WorkerInfo, 16)
	go func() {
		defer close(out)
		send := func(m map[string]WorkerInfo) bool {
			select {
			case out <- sortedWorkers(m):
				return true
			case <-ctx.Done():
				return false
			}
		}
		var ws map[string]WorkerInfo
		s.watch(ctx, s.workersPrefix(), true, func(resp *clientv3.GetResponse) bool {
			ws = workersOf(resp)
			return send(ws)
		}, func(evs []*clientv3.Event) bool {
			for _, ev := range evs {
				k := string(ev.Kv.Key)
				var w WorkerInfo
				if ev.Type == mvccpb.PUT && json.Unmarshal(ev.Kv.Value, &w) == nil {
					ws[k] = w
				} else {
					delete(ws, k)
				}
			}
			return send(ws)
		})
	}()
	return out
}

// watch runs a get-then-watch loop on key (or every key under it when
// prefix is set) until ctx ends or a callback returns false: snapshot gets
// the current values, events every batch of changes after them. A broken
// watch (etcd restarted, compacted) starts over with a new snapshot.
func (s *Store) watch(ctx context.Context, key string, prefix bool, snapshot func(*clientv3.GetResponse) bool, events func([]*clientv3.Event) bool) {
	var opts []clientv3.OpOption
	if prefix {
		opts = append(opts, clientv3.WithPrefix())
	}
	for ctx.Err() == nil && s.client.Ctx().Err() == nil {
		resp, err := s.client.Get(ctx, key, opts...)
		if err != nil {
			if !sleepCtx(ctx, retryDelay) {
				return
			}
			continue
		}
		if !snapshot(resp) {
			return
		}
		wctx, wcancel := context.WithCancel(ctx)
		for wr := range s.client.Watch(wctx, key, append(opts, clientv3.WithRev(resp.Header.Revision+1))...) {
			if wr.Canceled || wr.Err() != nil {
				break
			}
			if len(wr.Events) > 0 && !events(wr.Events) {
				wcancel()
				return
			}
		}
		wcancel()
		if !sleepCtx(ctx, retryDelay) {
			return
		}
	}
}
