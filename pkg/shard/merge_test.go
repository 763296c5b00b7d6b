package shard_test

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/shard"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// TestMergeEqualsWhole: rows split into vocabulary slices, answered per
// slice the way a tensor-parallel last stage answers, and merged, give the
// candidates, logsumexp, prompt logprobs and row of the whole row.
func TestMergeEqualsWhole(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	const V, rows, topN = 1001, 3, 7
	logits := make([]float32, rows*V)
	for i := range logits {
		logits[i] = float32(rng.NormFloat64() * 4)
	}
	logits[V-1] = logits[V-2] // a tie across the last two ids
	targets := []int32{-1, 5, V - 1}
	for _, tp := range []int{1, 2, 3, 4} {
		var parts []steps.SeqResult
		for r := tp - 1; r >= 0; r-- { // out of order: Merge sorts
			vb, ve := model.VocabSlice(V, r, tp)
			p := steps.SeqResult{VocabBegin: vb, VocabEnd: ve}
			for j, tg := range targets {
				row := logits[j*V+vb : j*V+ve]
				p.PromptLSE = append(p.PromptLSE, sampling.LogSumExp(row))
				lp := float32(math.NaN())
				if int(tg) >= vb && int(tg) < ve {
					lp = row[int(tg)-vb]
				}
				p.PromptLogprobs = append(p.PromptLogprobs, lp)
			}
			last := logits[(rows-1)*V+vb : (rows-1)*V+ve]
			p.LogSumExp = sampling.LogSumExp(last)
			p.Row = last
			for _, c := range sampling.TopN(last, topN, 0) {
				p.Candidates = append(p.Candidates, steps.Candidate{ID: c.ID + int32(vb), Logit: c.Logit})
			}
			parts = append(parts, p)
		}
		got, err := shard.Merge(parts, topN, true)
		if err != nil {
			t.Fatal(err)
		}
		last := logits[(rows-1)*V:]
		lse := sampling.LogSumExp(last)
		if math.Abs(got.LogSumExp-lse) > 1e-9 {
			t.Errorf("tp=%d: logsumexp %v, want %v", tp, got.LogSumExp, lse)
		}
		var want []steps.Candidate
		for _, c := range sampling.TopN(last, topN, 0) {
			want = append(want, steps.Candidate{ID: c.ID, Logit: c.Logit})
		}
		if !slices.Equal(got.Candidates, want) {
			t.Errorf("tp=%d: candidates %v, want %v", tp, got.Candidates, want)
		}
		if !slices.Equal(got.Row, last) {
			t.Errorf("tp=%d: row not put back together", tp)
		}
		for j, tg := range targets {
			row := logits[j*V : (j+1)*V]
			if tg < 0 {
				if !math.IsNaN(float64(got.PromptLogprobs[j])) {
					t.Errorf("tp=%d: prompt logprob %d should be NaN", tp, j)
				}
				continue
			}
			w := float64(row[tg]) - sampling.LogSumExp(row)
			if math.Abs(float64(got.PromptLogprobs[j])-w) > 1e-5 {
				t.Errorf("tp=%d: prompt logprob %d: %v, want %v", tp, j, got.PromptLogprobs[j], w)
			}
		}
	}
	// Slices that do not tile the vocabulary are an error.
	if _, err := shard.Merge([]steps.SeqResult{{VocabBegin: 0, VocabEnd: 10}, {VocabBegin: 11, VocabEnd: 20}}, 1, false); err == nil {
		t.Fatal("a gap between slices was merged")
	}
}
