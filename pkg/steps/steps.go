// Package steps holds the types of one forward step that both sides of a
// replica speak: the coordinator's engine (pkg/routing) builds a Batch and
// reads a Result; a worker's shard executor (pkg/shard) runs the Batch and
// returns the Result. Neither side imports the other: both import this.
//
// The types carry data only; who fills which field is documented on it.
package steps

import "time"

// Seq is one sequence's part of a step.
type Seq struct {
	ID     uint64
	Tokens []int32
	Start  int
	Blocks []int32
	Sample bool // outputs wanted for the last token
	TopN   int  // candidates wanted (≥ 1 when Sample)
	// FullRow asks for the whole logits row of the last token.
	FullRow bool
	// WantLogSumExp asks for the row's log-normalizer (logprobs).
	WantLogSumExp bool
	// PromptTargets, when not nil, has one entry per token: the id whose
	// logprob is wanted at that position, or -1.
	PromptTargets []int32
	// RequestID is the client's id of the request (for workers' logs).
	RequestID string
}

// Batch is what an executor runs. Workers of a split replica run numbered
// batches strictly in ID order.
type Batch struct {
	ID   uint64
	Seqs []Seq
	// Copies are done, in order, before the step: block Dst's K and V
	// (every layer) become block Src's (copy-on-write of a block shared
	// through the prefix cache).
	Copies []BlockCopy
}

// BlockCopy copies one KV block into another.
type BlockCopy struct{ Src, Dst int32 }

// Candidate is a token and its raw logit.
type Candidate struct {
	ID    int32
	Logit float32
}

// SeqResult is one sequence's output of a step (only for Sample items,
// except PromptLogprobs).
type SeqResult struct {
	Candidates     []Candidate // descending by logit, ties by id
	LogSumExp      float64     // of the whole row
	Row            []float32   // when FullRow
	PromptLogprobs []float32   // one per PromptTargets entry (NaN where -1)
	// A part of a result (one tensor-parallel rank's vocabulary slice
	// [VocabBegin, VocabEnd); both zero for a whole one) has the slice's
	// candidates, LogSumExp and Row; PromptLogprobs then hold each target's
	// raw logit where the slice owns it (NaN elsewhere) and PromptLSE each
	// prompt row's logsumexp over the slice. shard.Merge joins the parts.
	PromptLSE            []float64
	VocabBegin, VocabEnd int
}

// Result is the output of a step, in the batch's order.
type Result struct {
	Seqs    []SeqResult
	Forward time.Duration
	// Comm is the time the step's workers spent in all-reduces and passing
	// hidden states between stages (the slowest worker's).
	Comm time.Duration
	// SentBytes is what the step's workers sent each other.
	SentBytes int64
}
