package cluster

import (
	"context"
	"errors"
	"fmt"

	"go.etcd.io/etcd/api/v3/mvccpb"
	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrNoPlacement is returned by GetPlacement when no placement is stored.
var ErrNoPlacement = errors.New("cluster: no placement stored")

// PlacementUpdate is one placement value seen by WatchPlacement. Version is
// the etcd key version (1, 2, 3, ...); a deletion is reported with Version 0
// and a nil Value.
type PlacementUpdate struct {
	Value   []byte
	Version int64
}

// ErrFenced is returned by PutPlacement when the writer no longer holds
// the leadership its fence names: another coordinator leads (or nobody),
// and the write was not made.
var ErrFenced = errors.New("cluster: not the leader: placement write fenced off")

// PutPlacement stores value (an opaque JSON document) at <prefix>placement
// and returns its new version (1 for the first write, then 2, 3, ...), in
// one transaction conditioned on fence: the writer's election key still
// exists with the create revision it won with. A deposed leader's write
// (its session expired, a standby took over) fails with ErrFenced and
// changes nothing, however late it arrives.
func (s *Store) PutPlacement(ctx context.Context, value []byte, fence Fence) (version int64, err error) {
	if fence.Key == "" || fence.Rev == 0 {
		return 0, fmt.Errorf("%w: no leadership to write under", ErrFenced)
	}
	key := s.placementKey()
	resp, err := s.client.Txn(ctx).
		If(clientv3.Compare(clientv3.CreateRevision(fence.Key), "=", fence.Rev)).
		Then(clientv3.OpPut(key, string(value)), clientv3.OpGet(key)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("cluster: put placement: %w", err)
	}
	if !resp.Succeeded {
		return 0, ErrFenced
	}
	if len(resp.Responses) < 2 {
		return 0, errors.New("cluster: put placement: short transaction response")
	}
	kvs := resp.Responses[1].GetResponseRange().GetKvs()
	if len(kvs) == 0 {
		return 0, errors.New("cluster: put placement: value vanished")
	}
	return kvs[0].Version, nil
}

// GetPlacement returns the stored placement and its version, or
// ErrNoPlacement.
func (s *Store) GetPlacement(ctx context.Context) (value []byte, version int64, err error) {
	resp, err := s.client.Get(ctx, s.placementKey())
	if err != nil {
		return nil, 0, fmt.Errorf("cluster: get placement: %w", err)
	}
	if len(resp.Kvs) == 0 {
		return nil, 0, ErrNoPlacement
	}
	return resp.Kvs[0].Value, resp.Kvs[0].Version, nil
}

// DeletePlacement removes the stored placement (a later PutPlacement starts
// again at version 1).
func (s *Store) DeletePlacement(ctx context.Context) error {
	if _, err := s.client.Delete(ctx, s.placementKey()); err != nil {
		return fmt.Errorf("cluster: delete placement: %w", err)
	}
	return nil
}

// WatchPlacement sends the current placement first (if any) and then every
// change, until ctx ends; the channel is then closed. A broken watch is
// re-established, and the current value re-sent if it changed meanwhile.
func (s *Store) WatchPlacement(ctx context.Context) <-chan PlacementUpdate {
	out := make(chan PlacementUpdate, 16)
	go func() {
		defer close(out)
		var lastMod int64 = -1 // ModRevision of the last value sent; 0 = absent
		send := func(u PlacementUpdate, mod int64) bool {
			if mod == lastMod {
				return true
			}
			lastMod = mod
			select {
			case out <- u:
				return true
			case <-ctx.Done():
				return false
			}
		}
		first := true
		s.watch(ctx, s.placementKey(), false, func(resp *clientv3.GetResponse) bool {
			defer func() { first = false }()
			switch {
			case len(resp.Kvs) > 0:
				kv := resp.Kvs[0]
				return send(PlacementUpdate{Value: kv.Value, Version: kv.Version}, kv.ModRevision)
			case first: // absent from the start: nothing to say
				lastMod = 0
				return true
			default:
				return send(PlacementUpdate{}, 0)
			}
		}, func(evs []*clientv3.Event) bool {
			for _, ev := range evs {
				u, mod := PlacementUpdate{}, int64(0)
				if ev.Type == mvccpb.PUT {
					u, mod = PlacementUpdate{Value: ev.Kv.Value, Version: ev.Kv.Version}, ev.Kv.ModRevision
				}
				if !send(u, mod) {
					return false
				}
			}
			return true
		})
	}()
	return out
}
