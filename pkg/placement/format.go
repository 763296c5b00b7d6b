package placement

import (
	"fmt"
	"strings"
	"text/tabwriter"
)

// String renders the plan for people (qwenctl plan, golden files): the
// layout, the stages with their per-rank memory, each replica's workers
// as ID@host (with expert parallelism epE/tpT:ID@host), the unused
// workers and the explanation.
func (p *Plan) String() string {
	var b strings.Builder
	label := p.Model
	if label == "" {
		label = "model"
	}
	width, layout := p.TP, fmt.Sprintf("tp=%d", p.TP)
	if p.EP > 1 {
		width, layout = p.EP, fmt.Sprintf("ep=%d tp=%d", p.EP, p.TP)
	}
	used := len(p.Replicas) * width * p.PP
	fmt.Fprintf(&b, "%s: %s x pp=%d, %d %s on %d %s %s (%d unused)\n",
		label, layout, p.PP, len(p.Replicas), plural(len(p.Replicas), "replica", "replicas"),
		used+len(p.Unused), backendName(p.Backend), plural(used+len(p.Unused), "worker", "workers"), len(p.Unused))
	if len(p.Replicas) > 0 {
		b.WriteString("stages (memory per rank, the same in every replica):\n")
		tw := tabwriter.NewWriter(&b, 0, 0, 2, ' ', 0)
		for _, s := range p.Replicas[0].Stages {
			var holds []string
			if s.Embed {
				holds = append(holds, "embed")
			}
			if s.Head {
				holds = append(holds, "head")
			}
			if len(holds) == 0 {
				holds = append(holds, "-")
			}
			layers := fmt.Sprintf("layers %d-%d (%d)", s.LayersBegin, s.LayersEnd-1, s.LayersEnd-s.LayersBegin)
			if s.LayersEnd-s.LayersBegin == 1 {
				layers = fmt.Sprintf("layer %d (1)", s.LayersBegin)
			}
			fmt.Fprintf(tw, "  stage %d\t%s\t%s\tweights %s\tkv %s\tact %s\ttotal %s\n",
				s.Index, layers, strings.Join(holds, "+"),
				fmtBytes(s.WeightBytes), fmtBytes(s.KVBytes), fmtBytes(s.ActivationBytes),
				fmtBytes(s.WeightBytes+s.KVBytes+s.ActivationBytes))
		}
		tw.Flush()
	}
	for _, r := range p.Replicas {
		fmt.Fprintf(&b, "replica %d\n", r.Index)
		for _, s := range r.Stages {
			var ranks []string
			for _, rk := range s.Ranks {
				if p.EP > 1 {
					ranks = append(ranks, fmt.Sprintf("ep%d/tp%d:%s", rk.EPRank, rk.TPRank, rankName(rk)))
				} else {
					ranks = append(ranks, rankName(rk))
				}
			}
			fmt.Fprintf(&b, "  stage %d  %s\n", s.Index, strings.Join(ranks, " "))
		}
	}
	if len(p.Unused) > 0 {
		fmt.Fprintf(&b, "unused: %s\n", strings.Join(p.Unused, " "))
	}
	b.WriteString("why:\n")
	for _, e := range p.Explain {
		fmt.Fprintf(&b, "  - %s\n", e)
	}
	return b.String()
}

func rankName(r Rank) string {
	if r.Host == "" {
		return r.Worker
	}
	return r.Worker + "@" + r.Host
}
