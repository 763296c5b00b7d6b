package placement

import (
	"fmt"
	"slices"
	"strconv"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// explainer writes Plan.Explain.
type explainer struct {
	*search
	label     string
	kvDefault bool // KVCacheTokens came from the model's context
	pool      []Worker
	skipped   []Worker
}

func (e *explainer) explain(d decision) []string {
	best := d.best
	cfg, opts, lo := e.cfg, e.opts, best.lo
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	whole := e.sizer(shape{1, 1}).stage(0, cfg.NumHiddenLayers, true, true)
	kvNote := ""
	if e.kvDefault {
		kvNote = " (the model's context)"
	}
	add("%s: %s params, %s of %s weights; KV cache %s per token, %d tokens per replica%s",
		e.label, fmtParams(model.NumParams(cfg)), fmtBytes(whole.weights), dtypeName(cfg, opts),
		fmtBytes(int64(cfg.NumHiddenLayers)*2*int64(cfg.NumKeyValueHeads*cfg.HeadDimension())*int64(opts.KVBytesPerValue)),
		opts.KVCacheTokens, kvNote)
	if e.minMem == maxMemory(e.pool) {
		add("usable per worker: %s (%v × %s)", fmtBytes(e.usable), opts.Utilization, fmtBytes(e.minMem))
	} else {
		add("usable per worker: %s (%v × %s, the smallest worker; every rank is sized for it)", fmtBytes(e.usable), opts.Utilization, fmtBytes(e.minMem))
	}

	switch d.phase {
	case phaseForced:
		out = append(out, e.whyForced(d)...)
	case phaseLocal:
		out = append(out, e.whyLocal(d)...)
	default:
		out = append(out, e.whyPipe(d)...)
	}

	peak := lo.stages[lo.peakAt]
	where := ""
	if lo.pp > 1 {
		where = fmt.Sprintf(" (stage %d, the fullest)", lo.peakAt)
	}
	add("per rank%s: %s weights + %s KV + %s activations = %s of %s usable",
		where, fmtBytes(peak.weights), fmtBytes(peak.kv), fmtBytes(peak.acts), fmtBytes(peak.total()), fmtBytes(e.usable))

	if kv := cfg.NumKeyValueHeads; lo.t > kv {
		add("tp=%d > %d KV heads: each rank holds 1 KV head (every head on %d ranks), so per-rank KV cache and k/v weights stop shrinking past tp=%d",
			lo.t, kv, lo.t/kv, kv)
	}
	if lo.pp > 1 {
		var counts []string
		for _, m := range lo.stages {
			counts = append(counts, strconv.Itoa(m.end-m.begin))
		}
		z := e.sizer(lo.shape())
		var layers int64
		for _, w := range z.layer {
			layers += w
		}
		avg := float64(layers) / float64(len(z.layer))
		add("layers split %s, balancing weight bytes per rank (the embedding weighs %.1f layers, final norm + LM head %.1f)",
			strings.Join(counts, "/"), float64(z.embed)/avg, float64(z.head)/avg)
		if cfg.TieWordEmbeddings {
			add("tie_word_embeddings: the last stage holds its own copy of the embedding slice as LM head (%s per rank), as vLLM does",
				fmtBytes(z.head-z.headShared))
		}
	}
	switch {
	case lo.ep > 1:
		add("%s", e.expertLine(lo))
	case cfg.IsMoE() && lo.t > 1:
		add("MoE: every expert is split over the %d TP ranks (no expert parallelism)", lo.t)
	}
	if r := opts.RedundantExperts; r > 0 && lo.ep == 1 {
		add("%d redundant expert %s unused: without expert parallelism every rank holds every expert (or a slice of each)", r, plural(r, "slot", "slots"))
	}

	kind := groupKind(lo)
	if lo.w() > 1 {
		if best.crossing == 0 {
			add("every %s group is inside one host", kind)
		} else {
			add("%d %s %s hosts (not enough free workers on one host)", best.crossing, kind, plural(best.crossing, "group spans", "groups span"))
		}
	}
	if lo.pp > 1 {
		if c := best.a.crossingPP(); c == 0 {
			add("every replica's pipeline stays inside one host")
		} else if len(best.a.replicas) == 1 {
			add("the pipeline crosses hosts")
		} else {
			add("%d of %d replicas pipeline across hosts", c, len(best.a.replicas))
		}
	}
	g := lo.g()
	used := len(best.a.replicas) * g
	line := fmt.Sprintf("%d %s %d of %d %s", len(best.a.replicas), plural(len(best.a.replicas), "replica uses", "replicas use"), used, len(e.pool), plural(len(e.pool), "worker", "workers"))
	if left := len(best.a.unused); left > 0 {
		if d.phase == phaseLocal && left >= g {
			line += fmt.Sprintf("; %d left over (%s groups do not span hosts, and no host has %d more free workers)", left, kind, g)
		} else {
			line += fmt.Sprintf("; %d left over (a replica needs %d)", left, g)
		}
	}
	add("%s", line)
	if len(e.skipped) > 0 {
		add("%d other-backend %s not planned: a replica does not mix backends, and %s has the most workers",
			len(e.skipped), plural(len(e.skipped), "worker", "workers"), backendName(e.pool[0].Backend))
	}
	return out
}

// expertLine describes an expert-parallel stage: what one rank holds.
func (e *explainer) expertLine(lo *layout) string {
	cfg, ep, t := e.cfg, lo.ep, lo.t
	experts := fmt.Sprintf("%d experts", cfg.NumExperts/ep)
	if cfg.NumExperts%ep != 0 {
		experts = fmt.Sprintf("up to %d experts", (cfg.NumExperts+ep-1)/ep)
	}
	if r := e.opts.RedundantExperts; r > 0 {
		experts += fmt.Sprintf(" (+%d redundant)", r)
	}
	var attn string
	switch {
	case t == ep:
		attn = fmt.Sprintf("attention tp=%d", t)
	case t == 1:
		attn = "attention whole on every rank (tp=1)"
	default:
		attn = fmt.Sprintf("attention tp=%d (%d groups of %d consecutive ranks)", t, ep/t, t)
	}
	shared := ""
	if cfg.SharedExpertIntermediateSize > 0 {
		shared = fmt.Sprintf(", shared expert sliced %d ways", ep)
	}
	dense := ""
	for l := 0; l < cfg.NumHiddenLayers; l++ {
		if !cfg.IsMoELayer(l) {
			dense = fmt.Sprintf(", dense MLP layers sliced %d ways", ep)
			break
		}
	}
	return fmt.Sprintf("ep=%d: %s per rank per layer, %s%s%s, embedding and LM head vocabulary-sliced %d ways",
		ep, experts, attn, shared, dense, ep)
}

// groupKind names a layout's stage groups: "EP" with expert parallelism,
// else "TP".
func groupKind(lo *layout) string {
	if lo.ep > 1 {
		return "EP"
	}
	return "TP"
}

// whyForced explains a choice under a forced degree: the shortest-group
// rule.
func (e *explainer) whyForced(d decision) []string {
	opts, best, lo, g0 := e.opts, d.best, d.best.lo, d.g0
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	g := lo.g()
	chosenTP := "" // says how tp was chosen under a forced ep
	if opts.EP > 1 && opts.TP == 0 {
		chosenTP = fmt.Sprintf(", attention tp=%d (the largest valid tp dividing it)", lo.t)
	}
	switch {
	case opts.EP > 1 && opts.PP > 0:
		add("ep=%d x pp=%d as requested%s: %d workers per replica", opts.EP, opts.PP, chosenTP, g)
	case opts.TP > 0 && opts.PP > 0:
		add("%s as requested: %d workers per replica", lo.name(), g)
	case opts.EP > 1:
		req := fmt.Sprintf("ep=%d", opts.EP)
		if opts.TP > 0 {
			req = lo.shape().name()
		}
		add("%s as requested%s; pp=%d is the shortest pipeline that fits%s", req, chosenTP, g0/lo.w(), e.smaller(g0))
	case opts.TP > 0:
		add("tp=%d as requested; pp=%d is the shortest pipeline that fits%s", lo.t, g0/lo.t, e.smaller(g0))
	case slices.ContainsFunc(e.shapes, func(sh shape) bool { return sh.ep > 1 }):
		// pp forced on a MoE model: the stage shape is the planner's (tp=1
		// or expert parallel).
		name := ""
		for _, sh := range e.shapes {
			if sh.w() == g0/lo.pp {
				name = sh.name()
			}
		}
		add("pp=%d as requested; %s is the narrowest stage that fits%s", lo.pp, name, e.smaller(g0))
	default:
		add("pp=%d as requested; tp=%d is the smallest degree that fits%s", lo.pp, g0/lo.pp, e.smaller(g0))
	}
	if g > g0 {
		add("groups of %d (%s) give the same %d replicas as groups of %d, with more memory to spare per rank",
			g, lo.name(), best.replicas(), g0)
	}
	if len(d.alts) > 0 {
		var names []string
		hostBetter, tpBetter := false, false
		for _, a := range d.alts {
			names = append(names, a.lo.name())
			hostBetter = hostBetter || a.crossing > best.crossing
			tpBetter = tpBetter || (a.crossing == best.crossing && a.lo.w() < lo.w())
		}
		var why []string
		if hostBetter {
			why = append(why, fmt.Sprintf("its %s groups stay inside a host", groupKind(lo)))
		}
		if tpBetter {
			why = append(why, fmt.Sprintf("a larger %s makes a shorter pipeline (less bubble)", widthWord(lo)))
		}
		add("%s preferred to %s, which also fit%s", lo.name(), strings.Join(names, ", "), prefix(": ", strings.Join(why, "; ")))
	}
	return out
}

// whyLocal explains a phase-1 choice: a pp=1 layout whose TP groups are
// inside hosts fits, so pipelines were not considered.
func (e *explainer) whyLocal(d decision) []string {
	best, lo := d.best, d.best.lo
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	// The widest in-host stage below best's that does not fit.
	var miss *layout
	for _, sh := range e.shapes {
		if sh.w() >= lo.w() {
			break
		}
		if l := e.layout(sh, 1); l.peak > e.usable {
			miss = l
		}
	}
	note := ""
	if miss != nil {
		note = fmt.Sprintf(" (%s needs %s per rank)", miss.name(), fmtBytes(miss.peak))
	}
	if lo.w() == 1 {
		add("one worker holds the whole model (tp=1)%s; pipeline layouts not needed", note)
	} else {
		add("%s inside one host fits%s; pipeline layouts not needed", lo.name(), note)
	}
	if len(d.alts) > 0 && lo.w() > 1 { // one worker gives the most replicas: nothing to weigh
		var fewer, smaller []string
		for _, a := range d.alts {
			name := fmt.Sprintf("%s (%d %s)", a.lo.name(), a.replicas(), plural(a.replicas(), "replica", "replicas"))
			if a.replicas() < best.replicas() {
				fewer = append(fewer, name)
			} else {
				smaller = append(smaller, name)
			}
		}
		var why []string
		if len(fewer) > 0 {
			why = append(why, "more replicas")
		}
		if len(smaller) > 0 {
			why = append(why, fmt.Sprintf("as many replicas with a larger %s, so more memory to spare per rank", widthWord(lo)))
		}
		add("%s (%d %s) preferred to %s, which also %s inside a host: %s", lo.name(), best.replicas(),
			plural(best.replicas(), "replica", "replicas"), strings.Join(slices.Concat(fewer, smaller), ", "),
			plural(len(d.alts), "fits", "fit"), strings.Join(why, "; "))
	}
	if p := d.pipe; p != nil && p.replicas() > best.replicas() {
		add("%s would give %d replicas, but pipelines are considered only when no TP group inside a host fits",
			p.lo.name(), p.replicas())
	}
	return out
}

// whyPipe explains a phase-2 choice: no in-host pp=1 layout fits, so
// pipelines are allowed, TP kept inside hosts and PP across them.
func (e *explainer) whyPipe(d decision) []string {
	best, lo := d.best, d.best.lo
	var out []string
	add := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }

	// Why phase 1 found nothing: the in-host pp=1 layout closest to
	// fitting, and the smallest degree that would fit but needs more
	// workers than a host has.
	var closest *layout
	for _, sh := range e.shapes {
		if sh.w() > d.maxHost {
			break
		}
		if l := e.layout(sh, 1); closest == nil || l.peak < closest.peak {
			closest = l
		}
	}
	var why []string
	if closest != nil {
		why = append(why, fmt.Sprintf("%s needs %s per rank, %s usable", closest.name(), fmtBytes(closest.peak), fmtBytes(e.usable)))
	}
	for _, sh := range e.shapes {
		if w := sh.w(); w > d.maxHost && w <= len(e.pool) && e.layout(sh, 1).peak <= e.usable {
			why = append(why, fmt.Sprintf("%s would fit, but no host has %d workers", sh.name(), w))
			break
		}
	}
	then := "pipeline layouts allowed"
	switch {
	case lo.pp > 1 && best.a.crossingPP() > 0:
		then = "pipeline stages across hosts"
	case lo.pp > 1:
		then = "pipeline stages, each pipeline inside one host"
	}
	kind := "tensor-parallel"
	if slices.ContainsFunc(e.shapes, func(sh shape) bool { return sh.ep > 1 }) {
		kind = "single-worker or expert-parallel"
	}
	add("no %s group inside one host fits (%s); %s", kind, strings.Join(why, "; "), then)

	// The deciding criterion against each alternative.
	var spans, smallerG, shorter []choice
	for _, a := range d.alts {
		switch {
		case min(a.crossing, 1) > min(best.crossing, 1):
			if a.replicas() >= best.replicas() {
				spans = append(spans, a) // only the ones that would otherwise compete
			}
		case a.replicas() < best.replicas():
			// fewer replicas: not worth a mention
		case a.lo.g() < lo.g():
			smallerG = append(smallerG, a)
		default:
			shorter = append(shorter, a)
		}
	}
	if best.crossing == 0 {
		if len(spans) > 0 {
			var ns []string
			for _, a := range spans {
				ns = append(ns, fmt.Sprintf("%s (%d %s)", a.lo.name(), a.replicas(), plural(a.replicas(), "replica", "replicas")))
			}
			kinds := "TP"
			if slices.ContainsFunc(spans, func(a choice) bool { return a.lo.ep > 1 }) {
				kinds = "EP"
				if slices.ContainsFunc(spans, func(a choice) bool { return a.lo.ep == 1 }) {
					kinds = "TP or EP"
				}
			}
			add("%s also %s but %s %s groups across hosts", strings.Join(ns, ", "), plural(len(ns), "fits", "fit"), plural(len(ns), "splits its", "split their"), kinds)
		}
	} else {
		add("every layout that fits splits a %s group across hosts (no host has enough workers)", groupKind(lo))
	}
	inside := ""
	if best.crossing == 0 && len(spans) > 0 {
		inside = " keeping TP inside hosts"
		if kind != "tensor-parallel" {
			inside = " keeping TP and EP groups inside hosts"
		}
	}
	if len(smallerG) > 0 {
		g0 := lo.g()
		for _, a := range smallerG {
			g0 = min(g0, a.lo.g())
		}
		add("most replicas%s: %d, with groups of %d to %d workers; the largest group, %s, leaves the most memory to spare per rank",
			inside, best.replicas(), g0, lo.g(), lo.name())
	} else {
		add("most replicas%s: %d, with groups of %d workers (%s)", inside, best.replicas(), lo.g(), lo.name())
	}
	if len(shorter) > 0 {
		var reason []string
		if slices.ContainsFunc(shorter, func(a choice) bool { return a.crossing > best.crossing }) {
			reason = append(reason, fmt.Sprintf("fewer %s groups span hosts", groupKind(lo)))
		}
		if slices.ContainsFunc(shorter, func(a choice) bool { return a.crossing == best.crossing }) {
			reason = append(reason, fmt.Sprintf("a larger %s makes a shorter pipeline (less bubble)", widthWord(lo)))
		}
		add("%s preferred to %s, which also %s: %s", lo.name(), names(shorter), plural(len(shorter), "fits", "fit"), strings.Join(reason, "; "))
	}
	return out
}

// widthWord names what sets a layout's stage width: "ep" or "tp".
func widthWord(lo *layout) string {
	if lo.ep > 1 {
		return "ep"
	}
	return "tp"
}

func names(cs []choice) string {
	var ns []string
	for _, c := range cs {
		ns = append(ns, c.lo.name())
	}
	return strings.Join(ns, ", ")
}

// smaller says what the best layout of fewer than g0 workers would need.
func (e *explainer) smaller(g0 int) string {
	var best *layout
	for g := 1; g < g0; g++ {
		for _, lo := range e.layouts(g) {
			if best == nil || lo.peak < best.peak {
				best = lo
			}
		}
	}
	if best == nil {
		return ""
	}
	return fmt.Sprintf("; the best smaller layout, %s, needs %s per rank", best.name(), fmtBytes(best.peak))
}

func maxMemory(ws []Worker) int64 {
	var m int64
	for _, w := range ws {
		m = max(m, w.MemoryBytes)
	}
	return m
}

func backendName(b string) string {
	if b == "" {
		return "unnamed-backend"
	}
	return b
}

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

func prefix(p, s string) string {
	if s == "" {
		return ""
	}
	return p + s
}

// fmtBytes writes b in binary units with up to two decimals: "80 GiB",
// "67.71 GiB", "384 MiB".
func fmtBytes(b int64) string {
	units := []struct {
		name string
		size float64
	}{{"TiB", 1 << 40}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"KiB", 1 << 10}}
	for _, u := range units {
		if float64(b) >= u.size {
			return trimFloat(float64(b)/u.size) + " " + u.name
		}
	}
	return strconv.FormatInt(b, 10) + " B"
}

func fmtParams(n int64) string {
	switch {
	case n >= 1e9:
		return trimFloat(float64(n)/1e9) + " B"
	case n >= 1e6:
		return trimFloat(float64(n)/1e6) + " M"
	case n >= 1e3:
		return trimFloat(float64(n)/1e3) + " K"
	}
	return strconv.FormatInt(n, 10)
}

func trimFloat(v float64) string {
	s := strconv.FormatFloat(v, 'f', 2, 64)
	s = strings.TrimRight(s, "0")
	return strings.TrimSuffix(s, ".")
}
