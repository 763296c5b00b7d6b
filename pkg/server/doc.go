// Package server holds the adapters around the pure packages:
//
//   - the coordinator's control loop (coordinator.go, experts.go): it feeds
//     pkg/control's state machine the etcd worker watch, gossip, ticks,
//     requests and the results of what it asked for, and carries out the
//     actions it returns (dial and close a replica's workers, write the
//     placement fenced on the election key, load, warm up, serve, drop,
//     check health, move experts). It decides nothing itself: which workers
//     form which replica, when to drop, what to write are the machine's;
//   - the coordinator's client of one replica's workers (replica_client.go);
//   - the gRPC services, proto ↔ domain and status codes: the public
//     Generator (proto/qwenfleet/v1, api.go) over routing's Router, and the
//     internal Worker service (proto/worker/v1, worker.go) over shard's
//     Executor;
//   - the processes' lifecycles (process.go): a worker registering in etcd
//     (its state written by one writer, statewriter.go) and joining gossip; a
//     coordinator with embedded or external etcd and its local workers
//     (pkg/supervise).
//
// Workers of a split replica talk to each other directly (the Exchange
// RPC: tensor-parallel all-reduces, hidden states from stage to stage, and
// the all-to-all parts of an expert-parallel stage's combine); the
// coordinator sends each numbered step to all of them and merges the last
// stage's vocabulary slices (shard.Merge).
//
// Expert-parallel replicas carry an expert placement (expertparallel.Table)
// in their assignment. The coordinator can re-place the experts from the
// workers' routing counts while the replica serves (ExpertLoad with
// rebalance): every worker loads the experts it gains (SetExperts), steps
// numbered after the switch name the new placement's version, and a
// worker frees the experts it lost after its first step on the new one.
//
// Status codes: bad request fields are INVALID_ARGUMENT naming the field, a
// full queue RESOURCE_EXHAUSTED, an unknown model NOT_FOUND, no ready
// replica (or a standby coordinator) UNAVAILABLE.
package server
