// Package shard is the worker's side of a step: it runs the model (today the
// whole model on one worker; tensor and pipeline slices come with the
// parallelism issue) over a batch the coordinator planned, against the KV
// storage the worker owns, and reduces each sampled row to what the
// coordinator needs: the top candidates and the row's log-normalizer, the
// whole row only when a request's sampling needs it, and the logprobs of
// prompt tokens when asked.
package shard
