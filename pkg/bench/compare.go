package bench

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
)

// Comparison is what Compare found between two runs' reports, A and B:
// whether the requests both completed generated the same token ids.
type Comparison struct {
	// ConfigDiffs are the differences between the configs that make the
	// runs' prompts or sampling differ ("seed 3 vs 4"): a run compared with
	// one of other prompts is not expected to agree.
	ConfigDiffs []string
	// Compared counts the requests (by index) that completed in both runs
	// and whose outputs were compared; Same those whose ids agreed.
	Compared, Same int
	// Diffs are the compared requests whose ids differ, by index.
	Diffs []OutputDiff
	// NotCompared are the indexes of the requests of either run that did not
	// complete in both (failed, interrupted, or not made in one).
	NotCompared []int
	// NoIDs are the indexes of requests that completed in both runs but
	// whose report holds no output ids (written by an older qwenctl).
	NoIDs []int
}

// OutputDiff is one request whose outputs differ.
type OutputDiff struct {
	Index  int
	Prefix *int // its shared prefix, in a shared-prefix workload
	// At is the first position at which the ids differ (the shorter
	// length when one output is a prefix of the other).
	At           int
	LenA, LenB   int
	TokA, TokB   int32 // the ids at At; -1 past the end
	PrefixDiffer bool  // the runs gave the request different prefixes
}

// Identical reports whether the runs agree: the same prompts, every request
// of either completed in both, and every output the same.
func (c *Comparison) Identical() bool {
	return len(c.ConfigDiffs) == 0 && len(c.Diffs) == 0 && len(c.NotCompared) == 0 && len(c.NoIDs) == 0 && c.Compared > 0
}

// Compare compares the outputs of two runs request by request: run the
// same workload twice (the same --seed, greedy sampling) against two
// servers or two configurations of one (say, prefix caching off and on),
// and the outputs should be the same token for token.
func Compare(a, b *Report) *Comparison {
	c := &Comparison{ConfigDiffs: configDiffs(a.Config, b.Config)}
	byIndex := func(r *Report) map[int]*Record {
		m := make(map[int]*Record, len(r.Records))
		for i := range r.Records {
			m[r.Records[i].Index] = &r.Records[i]
		}
		return m
	}
	ra, rb := byIndex(a), byIndex(b)
	all := map[int]bool{}
	for i := range ra {
		all[i] = true
	}
	for i := range rb {
		all[i] = true
	}
	ok := func(r *Record) bool { return r != nil && r.Error == "" && !r.Interrupted }
	for _, i := range slices.Sorted(maps.Keys(all)) {
		x, y := ra[i], rb[i]
		switch {
		case !ok(x) || !ok(y):
			c.NotCompared = append(c.NotCompared, i)
			continue
		case x.OutputTokenIDs == nil && x.OutputTokens > 0, y.OutputTokenIDs == nil && y.OutputTokens > 0:
			c.NoIDs = append(c.NoIDs, i)
			continue
		}
		c.Compared++
		prefixDiffer := (x.PrefixIndex == nil) != (y.PrefixIndex == nil) || x.PrefixIndex != nil && *x.PrefixIndex != *y.PrefixIndex
		if !prefixDiffer && slices.Equal(x.OutputTokenIDs, y.OutputTokenIDs) {
			c.Same++
			continue
		}
		d := OutputDiff{Index: i, Prefix: x.PrefixIndex, LenA: len(x.OutputTokenIDs), LenB: len(y.OutputTokenIDs), TokA: -1, TokB: -1, PrefixDiffer: prefixDiffer}
		for d.At < min(d.LenA, d.LenB) && x.OutputTokenIDs[d.At] == y.OutputTokenIDs[d.At] {
			d.At++
		}
		if d.At < d.LenA {
			d.TokA = x.OutputTokenIDs[d.At]
		}
		if d.At < d.LenB {
			d.TokB = y.OutputTokenIDs[d.At]
		}
		c.Diffs = append(c.Diffs, d)
	}
	return c
}

// configDiffs lists what differs between two configs in what decides the
// prompts and the sampling.
func configDiffs(a, b Config) []string {
	var out []string
	diff := func(name string, x, y any) {
		if x != y {
			out = append(out, fmt.Sprintf("%s %v vs %v", name, x, y))
		}
	}
	text := func(v fmt.Stringer, isNil bool) string {
		if isNil {
			return "none"
		}
		return v.String()
	}
	diff("model", a.Model, b.Model)
	diff("dataset", a.Dataset, b.Dataset)
	diff("input_len", text(a.InputLen, a.InputLen == nil), text(b.InputLen, b.InputLen == nil))
	diff("shared_prefix", text(a.SharedPrefix, a.SharedPrefix == nil), text(b.SharedPrefix, b.SharedPrefix == nil))
	diff("output_len", a.OutputLen.String(), b.OutputLen.String())
	diff("seed", a.Seed, b.Seed)
	diff("temperature", a.Temperature, b.Temperature)
	diff("ignore_eos", a.IgnoreEOS, b.IgnoreEOS)
	return out
}

// maxDiffLines bounds the differing requests WriteText lists one by one.
const maxDiffLines = 20

// WriteText prints the comparison: what differs in the configs, a line per
// differing request (the first 20), and a summary line.
func (c *Comparison) WriteText(w io.Writer) error {
	var b strings.Builder
	for _, d := range c.ConfigDiffs {
		fmt.Fprintf(&b, "config differs: %s\n", d)
	}
	for i, d := range c.Diffs {
		if i == maxDiffLines {
			fmt.Fprintf(&b, "... and %d more requests differ\n", len(c.Diffs)-i)
			break
		}
		fmt.Fprintf(&b, "request %d", d.Index)
		if d.Prefix != nil {
			fmt.Fprintf(&b, " (prefix %d)", *d.Prefix)
		}
		switch {
		case d.PrefixDiffer:
			b.WriteString(": the runs gave it different prefixes\n")
		case d.TokA >= 0 && d.TokB >= 0:
			fmt.Fprintf(&b, ": differs at output token %d: %d vs %d (%d and %d tokens)\n", d.At, d.TokA, d.TokB, d.LenA, d.LenB)
		default:
			fmt.Fprintf(&b, ": one output is the start of the other: %d vs %d tokens\n", d.LenA, d.LenB)
		}
	}
	fmt.Fprintf(&b, "%d requests compared: %d identical, %d differ", c.Compared, c.Same, len(c.Diffs))
	if n := len(c.NotCompared); n > 0 {
		fmt.Fprintf(&b, "; %d not completed in both runs", n)
	}
	if n := len(c.NoIDs); n > 0 {
		fmt.Fprintf(&b, "; %d without output_token_ids", n)
	}
	b.WriteString("\n")
	_, err := io.WriteString(w, b.String())
	return err
}
