// Package shard is the worker's side of a step: it runs the model, or the
// slice of it this worker holds (a pipeline stage's layers, one
// tensor-parallel rank), over a batch the coordinator planned, against the
// KV storage the worker owns, and reduces each sampled row to what the
// coordinator needs: the top candidates and the row's log-normalizer, the
// whole row only when a request's sampling needs it, and the logprobs of
// prompt tokens when asked.
//
// A sharded step talks to the other workers of its replica through a Link:
// all-reduces inside the tensor-parallel group, hidden states received from
// the previous stage and sent to the next. Every worker of a replica runs
// the replica's steps in the order of their ids (the coordinator numbers
// them), which keeps the collective calls of concurrent steps from
// crossing. A tensor-parallel last stage answers for its vocabulary slice
// only; Merge joins the ranks' answers into what one process would return.
package shard
