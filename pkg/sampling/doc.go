// Package sampling picks the next token from a row of logits the way vLLM's
// sampler does, reproducibly for a given seed.
//
// A Sampler is made per request from normalized and validated Params. Each
// call to Sampler.Sample takes one row of logits (one entry per vocabulary id)
// and the request's Context and applies, in this order:
//
//  1. suppression: every id in Context.Suppress is set to -Inf;
//  2. repetition penalty, once per distinct id of Prompt+Output:
//     logit > 0 ? logit/rp : logit*rp;
//  3. presence and frequency penalties over Output only:
//     logit -= presence*(count > 0) + frequency*count;
//  4. greedy (Temperature == 0): the argmax, first index on ties, and stop;
//  5. temperature: probabilities are softmax(logit/Temperature);
//  6. top_k: keep exactly the TopK most probable ids (ties: lower id first,
//     so top_k=1 is greedy);
//  7. top_p: keep the smallest set of most probable ids whose cumulative
//     probability is >= TopP (at least one id is always kept);
//  8. min_p: drop ids whose probability is < MinP * (the largest probability);
//  9. draw one id from the renormalized remainder with the Sampler's RNG.
//
// A non-greedy call consumes exactly one draw, whatever the row holds, and
// the k-th draw of a request is a function of its seed and k alone
// (SplitMix64 at counter k), so the same seed and the same sequence of logit
// rows and contexts give the same ids, and a request resumed after k tokens
// (Sampler.Skip) goes on as if it had never stopped. If after steps 1-3 every logit is -Inf (or
// NaN), Sample returns the argmax of the row as it was passed in (0 when that
// row is all -Inf too); it never panics, whatever the logits.
//
// Weights are computed in float64 and kept as float32 (float64 on the top_k
// path); a weight below exp(-32) times the largest is taken as 0 (together such ids hold less than
// 2e-9 of the mass at a 151936-token vocabulary). With top_p and no top_k
// the vocabulary is never sorted: the mass is binned by magnitude and only
// the ids in the bin where the cumulative mass crosses top_p are ordered.
//
// For logprobs reporting, LogSumExp and TopN work on raw rows; TopN is
// O(V log n).
package sampling
