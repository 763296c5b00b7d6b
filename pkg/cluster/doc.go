// Package cluster holds the coordination layer of a qwenfleet cluster: an
// etcd-backed Store (worker membership, placement and leader election), an
// optional embedded etcd server for the coordinator, and memberlist-based
// gossip for fast peer failure detection.
//
// A coordinator normally embeds etcd (StartEmbeddedEtcd) and connects to it
// like any other client (Connect). Workers register themselves under a lease
// (RegisterWorker) so that their entry disappears when they die. A standby
// coordinator campaigns for leadership (Campaign) and takes over when the
// leader's session expires.
//
// # Key layout
//
// All keys live under a prefix, "/qwenfleet/" by default (DefaultPrefix):
//
//	<prefix>workers/<id>      JSON WorkerInfo, attached to the worker's lease;
//	                          removed on Registration.Close or lease expiry.
//	<prefix>placement         the placement document (pkg/cluster/schema); its
//	                          etcd key Version (1, 2, 3, ...) is the placement
//	                          version. Written only by PutPlacement, in a
//	                          transaction conditioned on the writer's election
//	                          key (Leadership.Fence): a deposed leader's write
//	                          fails with ErrFenced.
//	<prefix>leader/<lease>    election keys (the layout of etcd's concurrency
//	                          package), one per candidate, attached to its
//	                          lease; the oldest key's value is the current leader.
package cluster
