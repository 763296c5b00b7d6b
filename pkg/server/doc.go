// Package server holds the gRPC services of the cluster, thin adapters
// around the pure packages: the coordinator's public Generator service
// (proto/qwenfleet/v1) over routing's Router, and the worker's internal
// Worker service (proto/worker/v1) over shard's Executor. It also holds the
// processes' lifecycles: a worker registering in etcd and joining gossip, a
// coordinator campaigning for leadership, watching workers, planning the
// free ones into replicas (pkg/placement), writing the placement to etcd,
// having each worker load its assignment from it and warming them up.
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
