// Package server holds the gRPC services of the cluster, thin adapters
// around the pure packages: the coordinator's public Generator service
// (proto/qwenfleet/v1) over routing's Router, and the worker's internal
// Worker service (proto/worker/v1) over shard's Executor. It also holds the
// processes' lifecycles: a worker registering in etcd and joining gossip, a
// coordinator campaigning for leadership, watching workers, loading and
// warming them and turning each into a replica.
//
// Status codes: bad request fields are INVALID_ARGUMENT naming the field, a
// full queue RESOURCE_EXHAUSTED, an unknown model NOT_FOUND, no ready
// replica (or a standby coordinator) UNAVAILABLE.
package server
