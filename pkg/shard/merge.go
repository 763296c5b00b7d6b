package shard

import (
	"cmp"
	"fmt"
	"math"
	"slices"

	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// Merge joins the answers of a tensor-parallel last stage's ranks for one
// sequence (each over its vocabulary slice; see steps.SeqResult) into
// the answer one process would give: the topN best candidates of all
// slices, the logsumexp of the whole row, prompt logprobs against it, and
// the whole row when the slices carry theirs. A single whole result is
// returned as it is.
func Merge(parts []steps.SeqResult, topN int, wantLSE bool) (steps.SeqResult, error) {
	if len(parts) == 1 && parts[0].VocabEnd == 0 {
		return parts[0], nil
	}
	slices.SortFunc(parts, func(a, b steps.SeqResult) int { return cmp.Compare(a.VocabBegin, b.VocabBegin) })
	var out steps.SeqResult
	lses := make([]float64, len(parts))
	end := 0
	for i, p := range parts {
		if p.VocabBegin != end || p.VocabEnd <= p.VocabBegin {
			return out, fmt.Errorf("shard: vocabulary slices do not tile: [%d, %d) after %d", p.VocabBegin, p.VocabEnd, end)
		}
		end = p.VocabEnd
		lses[i] = p.LogSumExp
		out.Candidates = append(out.Candidates, p.Candidates...)
		if len(p.PromptLogprobs) != len(parts[0].PromptLogprobs) || len(p.PromptLSE) != len(p.PromptLogprobs) {
			return out, fmt.Errorf("shard: ranks answer %d and %d prompt rows", len(parts[0].PromptLogprobs), len(p.PromptLogprobs))
		}
	}
	lse := logSumExps(lses)
	if wantLSE {
		out.LogSumExp = lse
	}
	slices.SortFunc(out.Candidates, func(a, b steps.Candidate) int {
		if c := cmp.Compare(b.Logit, a.Logit); c != 0 {
			return c
		}
		return cmp.Compare(a.ID, b.ID)
	})
	out.Candidates = out.Candidates[:min(topN, len(out.Candidates))]
	if len(parts[0].Row) > 0 {
		for _, p := range parts {
			out.Row = append(out.Row, p.Row...)
		}
	}
	if n := len(parts[0].PromptLogprobs); n > 0 {
		out.PromptLogprobs = make([]float32, n)
		row := make([]float64, len(parts))
		for j := range n {
			out.PromptLogprobs[j] = float32(math.NaN())
			for i, p := range parts {
				row[i] = p.PromptLSE[j]
				if v := p.PromptLogprobs[j]; !math.IsNaN(float64(v)) {
					out.PromptLogprobs[j] = v // the owner's raw logit
				}
			}
			out.PromptLogprobs[j] = float32(float64(out.PromptLogprobs[j]) - logSumExps(row))
		}
	}
	return out, nil
}

// logSumExps is log Σ exp(v).
func logSumExps(v []float64) float64 {
	mx := math.Inf(-1)
	for _, x := range v {
		mx = math.Max(mx, x)
	}
	if math.IsInf(mx, 0) {
		return mx
	}
	s := 0.0
	for _, x := range v {
		s += math.Exp(x - mx)
	}
	return mx + math.Log(s)
}
