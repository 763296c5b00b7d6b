// Package control is the coordinator's control plane as a pure state
// machine, in the manner of etcd's raft: events go in, the new state and a
// list of actions come out, and a thin adapter (pkg/server) carries the
// actions out and feeds their results back as events. The package does no
// I/O, starts no goroutine and reads no clock: time arrives with every
// event. Given the same events at the same times it makes the same
// decisions, so its tests are scripts (testdata/*.txt) replayed without
// processes, networks or sleeps.
//
// # The loop
//
//	m := control.New(cfg)
//	for ev := range events {            // etcd watch, gossip, results, RPCs, a ticker
//		for _, a := range m.Step(time.Now(), ev) {
//			carryOut(a)                 // gRPC, etcd, the router; results come back as events
//		}
//		publish(m.Status())             // what status RPCs and metrics read
//	}
//
// # What it decides
//
//   - Membership: the workers registered in etcd (Workers, WorkerUp,
//     WorkerGone), those gossip reports dead (GossipSuspect: not planned until
//     gossip sees them again or etcd shows a new process), those that failed a
//     load or a step (kept out for a backoff that doubles on each failure, from
//     RetryBackoff up to MaxRetryBackoff), and those draining.
//   - Placement: the free workers are planned into replicas (pkg/placement,
//     itself pure); each new replica gets a generation above every one handed
//     out before, also by earlier leaders (LeadershipGained carries the last
//     one stored). A replica is written to etcd before any of its workers
//     loads (they read their assignment from there), then loaded, warmed up
//     and served; a failure at any point drops it and frees its workers.
//   - Fencing: every WritePlacement carries the fence (the election key's
//     create revision) of the leadership it was decided under; the adapter
//     makes the write conditional on it. A machine that is not leader emits no
//     write; after LeadershipLost or a write refused by its fence it drops
//     every replica and stays a follower.
//   - Failures: a lost worker, a refused step, a failed step of a split
//     replica drop the replica (its requests move to the others, recomputed);
//     a failed step of a one-worker replica asks for a health check first.
//   - Drain: a draining worker's replica takes no new requests; it is released
//     when idle or when the drain's timeout passes (its requests then move).
//   - Experts: a rebalance (asked for, or every EPLBInterval when tokens were
//     routed) gathers a replica's expert counts, computes the new table
//     (pkg/expertparallel), has every worker load it, then switches the
//     replica's steps to it and writes the placement; when any worker fails,
//     the new table is cancelled on all and the old one stays.
//
// # What stays in the adapter, and why
//
// Only what touches the world: dialling and closing gRPC connections, the
// Load/Warmup/Step/SetExperts calls and their deadlines, the etcd writes and
// watches, gossip, the routing engines (whose step loop is its own pure
// scheduler in pkg/routing) and the public API. The adapter also turns raw
// outcomes into the facts events carry (a step refused with
// FailedPrecondition becomes StepFailed{Refused: true}; a replica whose
// engine holds no sequence becomes ReplicaIdle) and keeps the metrics.
// None of it chooses what to load where, what to drop, or what to write.
package control
