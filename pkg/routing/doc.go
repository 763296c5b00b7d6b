// Package routing is the coordinator's request path without the network:
// a continuous-batching Scheduler over a paged KV cache, the Engine that
// drives it one step at a time against an Executor (a worker group behind
// gRPC in production, a model in-process in tests), and the Router that
// spreads requests over the replicas' engines.
//
// One step, as in vLLM's v1 scheduler: running sequences come first, oldest
// first, each taking the tokens it still has to compute (one for a decode,
// a chunk of the prompt for a prefill) out of a per-step token budget; new
// requests join from the waiting queue while budget and KV blocks remain.
// When a running sequence cannot get the block it needs, the newest running
// sequence is preempted: its blocks are freed and it goes back to the front
// of the queue to be recomputed from its prompt and the tokens it already
// generated (recompute, never swap; the KV pool never runs out of memory).
// A sequence whose whole length could not fit the pool even alone is refused
// when it is added, so every admitted sequence eventually completes.
//
// Pure logic: no gRPC, no etcd. Not safe for concurrent use except where a
// type says so (Engine and Router are).
package routing
