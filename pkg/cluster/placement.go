package cluster

import (
	"context"
	"errors"
	"fmt"

	clientv3 "go.etcd.io/etcd/client/v3"
)

// ErrNoPlacement is returned by GetPlacement when no placement is stored.
var ErrNoPlacement = errors.New("cluster: no placement stored")

// ErrFenced is returned by PutPlacement when the writer no longer holds
// the leadership its fence names: another coordinator leads (or nobody),
// and the write was not made.
var ErrFenced = errors.New("cluster: not the leader: placement write fenced off")

// ErrFenceGone is the ErrFenced of a writer whose election key no longer
// exists: its lease expired or was revoked. Another coordinator may lead,
// or none (etcd was away longer than the TTL, and the writer may win again
// at once): a new campaign says which. It matches ErrFenced.
var ErrFenceGone = fmt.Errorf("%w: the writer's election key is gone (its lease expired)", ErrFenced)

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
		Else(clientv3.OpGet(fence.Key)).
		Commit()
	if err != nil {
		return 0, fmt.Errorf("cluster: put placement: %w", err)
	}
	if !resp.Succeeded {
		if len(resp.Responses) == 1 && len(resp.Responses[0].GetResponseRange().GetKvs()) == 0 {
			return 0, ErrFenceGone
		}
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
