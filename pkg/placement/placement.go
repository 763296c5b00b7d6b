package placement

import (
	"cmp"
	"fmt"
	"slices"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// Plan is the planner's decision: groups of PP stages of workers, each a
// replica of the whole model, plus why. A stage has TP ranks, or with
// expert parallelism (EP > 1) EP ranks whose attention is split over
// groups of TP.
type Plan struct {
	Model   string `json:"model,omitempty"`
	Backend string `json:"backend"`
	TP      int    `json:"tp"` // attention (and, without EP, MLP) tensor-parallel degree
	PP      int    `json:"pp"`
	// EP is the expert-parallel ranks of each stage; 1: no expert
	// parallelism.
	EP       int       `json:"ep"`
	Replicas []Replica `json:"replicas"`
	// Unused lists the workers no replica uses, sorted by (host, id).
	Unused []string `json:"unused"`
	// Explain says, a sentence a line, why this layout.
	Explain []string `json:"explain"`
}

// Replica is one copy of the model: PP stages of TP (or EP) ranks each.
type Replica struct {
	Index  int     `json:"index"`
	Stages []Stage `json:"stages"`
}

// Stage is a contiguous layer range [LayersBegin, LayersEnd) served by TP
// ranks, or EP ranks with expert parallelism. The byte counts are per rank
// (the largest rank where vocabulary or expert shares differ) and are the
// same in every replica.
type Stage struct {
	Index       int  `json:"index"`
	LayersBegin int  `json:"layers_begin"`
	LayersEnd   int  `json:"layers_end"`
	Embed       bool `json:"embed"` // holds embed_tokens (vocab slice model.VocabSlice)
	// Head: holds the final norm and the LM head (for a tied model on a
	// stage without the embedding, its own copy of embed_tokens).
	Head            bool   `json:"head"`
	Ranks           []Rank `json:"ranks"`
	WeightBytes     int64  `json:"weight_bytes"`
	KVBytes         int64  `json:"kv_bytes"`
	ActivationBytes int64  `json:"activation_bytes"`
}

// Rank is one worker's place in a stage: its TP rank and, with expert
// parallelism, its EP rank (its index in the stage; TPRank = EPRank % TP).
type Rank struct {
	TPRank int    `json:"tp_rank"`
	EPRank int    `json:"ep_rank,omitempty"`
	Worker string `json:"worker"`
	Host   string `json:"host"`
	Addr   string `json:"addr,omitempty"`
}

// New plans cfg on workers. It is pure and deterministic: the same inputs
// in any worker order give the same plan. The error says why no plan
// exists; it matches ErrNoWorkers, ErrInvalid or ErrNoFit.
func New(cfg *model.Config, workers []Worker, opts Options) (*Plan, error) {
	if cfg == nil {
		return nil, invalidf("no model config")
	}
	if err := opts.Validate(); err != nil {
		return nil, err
	}
	kvDefault := opts.KVCacheTokens == 0
	if err := opts.fillFromModel(cfg); err != nil {
		return nil, err
	}
	label := opts.Model
	if label == "" {
		label = "the model"
	}
	pool, skipped, err := pickWorkers(workers)
	if err != nil {
		return nil, err
	}
	n := len(pool)
	have := fmt.Sprintf("have %d", n)
	if len(skipped) > 0 {
		have = fmt.Sprintf("have %d %s workers", n, backendName(pool[0].Backend))
	}
	L := cfg.NumHiddenLayers
	if opts.TP > 0 && opts.EP <= 1 { // with ep > 1, checkEP checks the attention's tp
		if err := checkTP(cfg, opts.TP); err != nil {
			return nil, err
		}
	}
	if opts.PP > L {
		return nil, invalidf("pp=%d exceeds the %d layers (every stage needs one)", opts.PP, L)
	}
	if opts.EP > 1 {
		t := opts.TP
		if t == 0 {
			t = attentionTP(cfg, opts.EP)
		}
		if err := checkEP(cfg, opts.EP, t, opts.RedundantExperts); err != nil {
			return nil, err
		}
	}
	if r := opts.RedundantExperts; r > 0 {
		switch {
		case !cfg.IsMoE():
			return nil, invalidf("%d redundant %s a MoE model, and this %s model has no experts", r, plural(r, "expert needs", "experts need"), cfg.ModelType)
		case opts.EP == 1:
			return nil, invalidf("%d redundant %s expert parallelism, but ep=1", r, plural(r, "expert needs", "experts need"))
		case opts.EP == 0 && opts.TP > 0:
			return nil, invalidf("%d redundant %s expert parallelism, but tp=%d is forced without ep (force ep too)", r, plural(r, "expert needs", "experts need"), opts.TP)
		}
	}
	// The forced stage width: EP ranks with expert parallelism, else TP.
	width, wname := opts.TP, fmt.Sprintf("tp=%d", opts.TP)
	if opts.EP > 1 {
		width, wname = opts.EP, fmt.Sprintf("ep=%d", opts.EP)
	}
	if width > 0 && opts.PP > 0 && width*opts.PP > n {
		return nil, &planError{ErrNoFit, fmt.Sprintf("%s x pp=%d needs %d workers, %s", wname, opts.PP, width*opts.PP, have)}
	}
	if width > n {
		return nil, &planError{ErrNoFit, fmt.Sprintf("%s needs at least %d workers, %s", wname, width, have)}
	}
	if opts.PP > n {
		return nil, &planError{ErrNoFit, fmt.Sprintf("pp=%d needs at least %d workers, %s", opts.PP, opts.PP, have)}
	}

	minMem := slices.MinFunc(pool, func(a, b Worker) int { return cmp.Compare(a.MemoryBytes, b.MemoryBytes) }).MemoryBytes
	usable := int64(opts.Utilization * float64(minMem))
	s := &search{cfg: cfg, opts: opts, minMem: minMem, usable: usable, shapes: stageShapes(cfg, opts),
		sizers: map[shape]*sizer{}, layoutsOf: map[[3]int]*layout{}}

	sorted := sortWorkers(pool)
	var d decision
	if opts.TP > 0 || opts.PP > 0 || opts.EP > 1 {
		d, err = s.chooseForced(sorted, label, n)
	} else {
		d, err = s.chooseAuto(sorted, label, n)
	}
	if err != nil {
		return nil, err
	}
	best := d.best

	p := &Plan{Model: opts.Model, Backend: pool[0].Backend, TP: best.lo.t, PP: best.lo.pp, EP: best.lo.ep, Unused: []string{}}
	for r, groups := range best.a.replicas {
		rep := Replica{Index: r}
		for st, m := range best.lo.stages {
			stage := Stage{Index: st, LayersBegin: m.begin, LayersEnd: m.end, Embed: m.embed, Head: m.head,
				WeightBytes: m.weights, KVBytes: m.kv, ActivationBytes: m.acts}
			for i, w := range groups[st] {
				rk := Rank{TPRank: i % best.lo.t, Worker: w.ID, Host: w.Host, Addr: w.Addr}
				if best.lo.ep > 1 {
					rk.EPRank = i
				}
				stage.Ranks = append(stage.Ranks, rk)
			}
			rep.Stages = append(rep.Stages, stage)
		}
		p.Replicas = append(p.Replicas, rep)
	}
	for _, w := range sortWorkers(slices.Concat(best.a.unused, skipped)) {
		p.Unused = append(p.Unused, w.ID)
	}
	e := explainer{search: s, label: label, kvDefault: kvDefault, pool: pool, skipped: skipped}
	p.Explain = e.explain(d)
	return p, nil
}

// choice is a fitting layout and what mapping it onto the workers gives.
type choice struct {
	lo       *layout
	reps     int        // replicas
	crossing int        // stage groups (TP, or EP with expert parallelism) in use spanning hosts
	a        assignment // the mapping; only filled in for the chosen layout
}

func (c choice) replicas() int { return c.reps }

// Phases of the automatic choice (decision.phase).
const (
	phaseForced = 0 // TP and/or PP forced: the shortest-group rule
	phaseLocal  = 1 // pp=1, every TP group inside one host
	phasePipe   = 2 // pipelines allowed: TP inside hosts, PP across them
)

// decision is the chosen layout and what explain needs to say why.
type decision struct {
	phase int
	best  choice
	// alts are the other candidates of the deciding step, best first:
	// for phaseForced the other layouts of best's group size; for
	// phaseLocal the other fitting host-local tp=t layouts; for phasePipe
	// every other fitting layout.
	alts []choice
	g0   int // phaseForced: the smallest group size that fits
	// pipe is, for phaseLocal, the layout phasePipe would have chosen
	// (nil when none fits), to say what a pipeline would give.
	pipe *choice
	// maxHost (automatic choice) is the most workers one host has: the
	// largest stage group that can form inside a host.
	maxHost int
}

// chooseForced picks a layout when TP, PP or EP is forced: the smallest
// group size g that fits, then the largest g giving the same number of
// replicas; among layouts of that g the fewest stage groups spanning
// hosts, then the wider stage, then the larger tp.
func (s *search) chooseForced(sorted []Worker, label string, n int) (decision, error) {
	g0 := 0
	for g := 1; g <= min(n, s.largestG()) && g0 == 0; g++ {
		if len(s.fitting(g)) > 0 {
			g0 = g
		}
	}
	if g0 == 0 {
		return decision{}, s.noFit(label, n)
	}
	g := g0
	for g1 := n / (n / g0); g1 > g0; g1-- {
		if len(s.fitting(g1)) > 0 {
			g = g1
			break
		}
	}
	var cands []choice
	for _, lo := range s.fitting(g) {
		a := assign(sorted, lo.w(), lo.pp, false)
		cands = append(cands, choice{lo: lo, reps: len(a.replicas), crossing: a.crossingTP(), a: a})
	}
	slices.SortStableFunc(cands, func(x, y choice) int {
		if c := cmp.Compare(x.crossing, y.crossing); c != 0 {
			return c
		}
		return compareWider(x.lo, y.lo)
	})
	return decision{phase: phaseForced, best: cands[0], alts: cands[1:], g0: g0}, nil
}

// chooseAuto picks a layout when no degree is forced: "TP (or EP) inside
// a host, PP across hosts", in two phases. A stage group is the t ranks of
// a TP group, or the ep ranks of an expert-parallel stage.
//
//  1. Only pp=1 layouts whose stage groups form inside hosts (groups of w
//     workers of one host; workers that cannot join such a group are
//     unused). If any fits: the most replicas, then the wider stage.
//  2. Otherwise every layout: stage groups all inside hosts first, then
//     the most replicas, then the largest group giving that many, then
//     the fewest stage groups spanning hosts, then the wider stage.
func (s *search) chooseAuto(sorted []Worker, label string, n int) (decision, error) {
	sizes := hostSizes(sorted)
	d := decision{maxHost: slices.Max(sizes)}
	local := s.localCandidates(sizes)
	pipe := s.pipeCandidates(sizes, n)
	switch {
	case len(local) > 0:
		d.phase, d.best, d.alts = phaseLocal, local[0], local[1:]
		d.best.a = assign(sorted, d.best.lo.w(), 1, true)
		if len(pipe) > 0 {
			d.pipe = &pipe[0]
		}
	case len(pipe) > 0:
		d.phase, d.best, d.alts = phasePipe, pipe[0], pipe[1:]
		d.best.a = assign(sorted, d.best.lo.w(), d.best.lo.pp, false)
	default:
		return decision{}, s.noFit(label, n)
	}
	return d, nil
}

// localCandidates lists the fitting pp=1 layouts whose stage groups form
// inside hosts, best first (most replicas, then the wider stage). sizes
// are the workers per host.
func (s *search) localCandidates(sizes []int) []choice {
	var out []choice
	for _, sh := range s.shapes {
		if sh.w() > slices.Max(sizes) {
			break
		}
		if lo := s.layout(sh, 1); lo.peak <= s.usable {
			out = append(out, choice{lo: lo, reps: localGroups(sizes, sh.w())})
		}
	}
	slices.SortStableFunc(out, func(x, y choice) int {
		if c := cmp.Compare(y.replicas(), x.replicas()); c != 0 {
			return c
		}
		return compareWider(x.lo, y.lo)
	})
	return out
}

// compareWider orders the wider stage first, then the larger tp.
func compareWider(x, y *layout) int {
	if c := cmp.Compare(y.w(), x.w()); c != 0 {
		return c
	}
	return cmp.Compare(y.t, x.t)
}

// pipeCandidates lists every fitting layout of up to n workers, best
// first: stage groups all inside hosts, the most replicas, the largest
// group giving that many, the fewest stage groups spanning hosts, the
// wider stage.
//
// It counts rather than assigns (assign gives the same numbers): the n/w
// groups are the host-local ones first, then groups of the hosts'
// leftovers, each of which spans hosts (every host leaves fewer than w);
// the n/g replicas take the first n/g·pp groups.
func (s *search) pipeCandidates(sizes []int, n int) []choice {
	var out []choice
	local := map[int]int{} // localGroups by stage width
	for g := 1; g <= min(n, s.largestG()); g++ {
		for _, lo := range s.fitting(g) {
			l, ok := local[lo.w()]
			if !ok {
				l = localGroups(sizes, lo.w())
				local[lo.w()] = l
			}
			reps := n / g
			out = append(out, choice{lo: lo, reps: reps, crossing: max(0, reps*lo.pp-l)})
		}
	}
	slices.SortStableFunc(out, comparePipe)
	return out
}

func comparePipe(x, y choice) int {
	if c := cmp.Compare(min(x.crossing, 1), min(y.crossing, 1)); c != 0 {
		return c
	}
	if c := cmp.Compare(y.replicas(), x.replicas()); c != 0 {
		return c
	}
	if c := cmp.Compare(y.lo.g(), x.lo.g()); c != 0 {
		return c
	}
	if c := cmp.Compare(x.crossing, y.crossing); c != 0 {
		return c
	}
	return compareWider(x.lo, y.lo)
}

// hostSizes is the number of workers on each host, in host order
// (workers sorted by host).
func hostSizes(sorted []Worker) []int {
	var out []int
	for i := 0; i < len(sorted); {
		j := i
		for j < len(sorted) && sorted[j].Host == sorted[i].Host {
			j++
		}
		out = append(out, j-i)
		i = j
	}
	return out
}

// localGroups is how many stage groups of w workers form inside hosts.
func localGroups(sizes []int, w int) int {
	n := 0
	for _, k := range sizes {
		n += k / w
	}
	return n
}

// pickWorkers checks the workers and keeps the largest backend group
// (ties: the backend named first). skipped are the workers of other
// backends.
func pickWorkers(workers []Worker) (pool, skipped []Worker, err error) {
	if len(workers) == 0 {
		return nil, nil, &planError{ErrNoWorkers, "no workers to place the model on"}
	}
	seen := make(map[string]bool, len(workers))
	count := map[string]int{}
	for _, w := range workers {
		switch {
		case w.ID == "":
			return nil, nil, invalidf("a worker has no id (host %q)", w.Host)
		case seen[w.ID]:
			return nil, nil, invalidf("worker id %q appears twice", w.ID)
		case w.MemoryBytes <= 0:
			return nil, nil, invalidf("worker %s has no memory (%d bytes)", w.ID, w.MemoryBytes)
		}
		seen[w.ID] = true
		count[w.Backend]++
	}
	backends := make([]string, 0, len(count))
	for b := range count {
		backends = append(backends, b)
	}
	slices.SortFunc(backends, func(a, b string) int {
		if c := cmp.Compare(count[b], count[a]); c != 0 {
			return c
		}
		return strings.Compare(a, b)
	})
	for _, w := range workers {
		if w.Backend == backends[0] {
			pool = append(pool, w)
		} else {
			skipped = append(skipped, w)
		}
	}
	return pool, skipped, nil
}

// sortWorkers orders workers by (Host, ID). Workers without a Host sort
// together as one unnamed host: with no host information TP is not avoided.
func sortWorkers(ws []Worker) []Worker {
	out := slices.Clone(ws)
	slices.SortFunc(out, func(a, b Worker) int {
		if c := strings.Compare(a.Host, b.Host); c != 0 {
			return c
		}
		return strings.Compare(a.ID, b.ID)
	})
	return out
}

// search evaluates layouts against one usable-memory bound, caching the
// per-shape arithmetic.
type search struct {
	cfg    *model.Config
	opts   Options
	minMem int64   // the smallest worker's memory
	usable int64   // Utilization × minMem: the bound on every rank
	shapes []shape // the stage shapes allowed, ascending width (stageShapes)
	// Caches, only looked up, never iterated.
	sizers    map[shape]*sizer
	layoutsOf map[[3]int]*layout // by (tp, ep, pp)
}

// stageShapes lists the stage shapes the planner considers, ascending
// width: the forced ones, or
//
//   - for a dense model, or EP=1, or TP forced without EP: tp=t for every
//     valid t (ValidTP), no expert parallelism;
//   - for a MoE model with neither forced: one rank holding everything
//     (tp=1), and for each width g > 1 dividing the experts ep=g with
//     attention at the largest valid tp dividing g (attentionTP), where
//     checkEP allows it.
func stageShapes(cfg *model.Config, opts Options) []shape {
	switch {
	case opts.EP > 1:
		t := opts.TP
		if t == 0 {
			t = attentionTP(cfg, opts.EP)
		}
		return []shape{{t, opts.EP}} // checked by New
	case opts.TP > 0:
		return []shape{{opts.TP, 1}} // checked by New; may exceed ValidTP's bound
	case opts.EP == 1 || !cfg.IsMoE():
		var out []shape
		for _, t := range ValidTP(cfg) {
			out = append(out, shape{t, 1})
		}
		return out
	}
	out := []shape{{1, 1}}
	for g := 2; g <= min(cfg.NumExperts, maxTP); g++ {
		if cfg.NumExperts%g != 0 {
			continue
		}
		if t := attentionTP(cfg, g); checkEP(cfg, g, t, opts.RedundantExperts) == nil {
			out = append(out, shape{t, g})
		}
	}
	return out
}

func (s *search) sizer(sh shape) *sizer {
	if z, ok := s.sizers[sh]; ok {
		return z
	}
	z := newShapeSizer(s.cfg, s.opts, sh)
	s.sizers[sh] = z
	return z
}

// layouts lists the valid layouts of group size g allowed by the forced
// degrees, in ascending stage width.
func (s *search) layouts(g int) []*layout {
	var out []*layout
	for _, sh := range s.shapes {
		if g%sh.w() != 0 {
			continue
		}
		pp := g / sh.w()
		if pp > s.cfg.NumHiddenLayers || (s.opts.PP > 0 && pp != s.opts.PP) {
			continue
		}
		out = append(out, s.layout(sh, pp))
	}
	return out
}

// layout is shape sh × pp, cached.
func (s *search) layout(sh shape, pp int) *layout {
	key := [3]int{sh.t, sh.ep, pp}
	lo, ok := s.layoutsOf[key]
	if !ok {
		lo = s.sizer(sh).layout(pp)
		s.layoutsOf[key] = lo
	}
	return lo
}

func (s *search) fitting(g int) []*layout {
	var out []*layout
	for _, lo := range s.layouts(g) {
		if lo.peak <= s.usable {
			out = append(out, lo)
		}
	}
	return out
}

// largestG is the largest group size any allowed layout has.
func (s *search) largestG() int {
	w, pp := s.shapes[len(s.shapes)-1].w(), s.cfg.NumHiddenLayers
	if s.opts.PP > 0 {
		pp = s.opts.PP
	}
	return w * pp
}

// noFit explains why no layout of up to n workers fits: the best one
// (lowest peak per rank) and, when one exists, how many such workers
// would do.
func (s *search) noFit(label string, n int) error {
	var best *layout
	for g := 1; g <= min(n, s.largestG()); g++ {
		for _, lo := range s.layouts(g) {
			if best == nil || lo.peak < best.peak {
				best = lo
			}
		}
	}
	weights := s.sizer(shape{1, 1}).stage(0, s.cfg.NumHiddenLayers, true, true).weights
	var b strings.Builder
	fmt.Fprintf(&b, "%s needs %s of %s weights", label, fmtBytes(weights), dtypeName(s.cfg, s.opts))
	minMem := s.minMem
	if best != nil {
		m := best.stages[best.peakAt]
		fmt.Fprintf(&b, "; the best layout on %d %s (%s) needs %s per worker (%s weights + %s KV for %d tokens + %s activations) but %s is usable (%v × %s)",
			n, plural(n, "worker", "workers"), best.name(), fmtBytes(m.total()), fmtBytes(m.weights), fmtBytes(m.kv), s.opts.KVCacheTokens, fmtBytes(m.acts),
			fmtBytes(s.usable), s.opts.Utilization, fmtBytes(minMem))
	}
	more := ""
	for g := n + 1; g <= s.largestG() && more == ""; g++ {
		if f := s.fitting(g); len(f) > 0 {
			more = fmt.Sprintf("; %d workers of %s would fit it (%s)", g, fmtBytes(minMem), f[len(f)-1].name())
		}
	}
	if more == "" {
		more = fmt.Sprintf("; no layout up to %d workers fits workers of %s", s.largestG(), fmtBytes(minMem))
	}
	b.WriteString(more)
	return &planError{ErrNoFit, b.String()}
}

func dtypeName(cfg *model.Config, opts Options) string {
	switch opts.WeightBytesPerParam {
	case 2:
		if strings.EqualFold(cfg.TorchDtype, "float16") {
			return "f16"
		}
		return "bf16"
	case 4:
		return "f32"
	case 1:
		return "8-bit"
	}
	return fmt.Sprintf("%d-byte", opts.WeightBytesPerParam)
}

// assignment maps a layout onto sorted workers: replicas[r][stage] is the
// group of that stage (TP, or EP with expert parallelism), in rank order.
type assignment struct {
	replicas [][][]Worker
	unused   []Worker
}

// assign builds stage groups host by host (t workers of one host each:
// the stage width, tp or ep), then, unless local, groups the hosts'
// leftovers in order across hosts (with local they are unused); a replica
// takes pp consecutive groups, so the host-local groups are used first
// and a pipeline crosses hosts only where a host runs out.
func assign(sorted []Worker, t, pp int, local bool) assignment {
	var groups [][]Worker
	var pool []Worker
	for i := 0; i < len(sorted); {
		j := i
		for j < len(sorted) && sorted[j].Host == sorted[i].Host {
			j++
		}
		host := sorted[i:j]
		k := 0
		for ; k+t <= len(host); k += t {
			groups = append(groups, host[k:k+t])
		}
		pool = append(pool, host[k:]...)
		i = j
	}
	k := 0
	for ; !local && k+t <= len(pool); k += t {
		groups = append(groups, pool[k:k+t])
	}
	var a assignment
	a.unused = append(a.unused, pool[k:]...)
	r := 0
	for ; r+pp <= len(groups); r += pp {
		a.replicas = append(a.replicas, groups[r:r+pp])
	}
	for _, grp := range groups[r:] {
		a.unused = append(a.unused, grp...)
	}
	return a
}

// crossingTP counts the stage groups (TP, or EP) in use that span more
// than one host.
func (a assignment) crossingTP() int {
	n := 0
	for _, rep := range a.replicas {
		for _, grp := range rep {
			if spansHosts(grp) {
				n++
			}
		}
	}
	return n
}

// crossingPP counts the replicas whose stages are on more than one host.
func (a assignment) crossingPP() int {
	n := 0
	for _, rep := range a.replicas {
		if spansHosts(slices.Concat(rep...)) {
			n++
		}
	}
	return n
}

func spansHosts(ws []Worker) bool {
	for _, w := range ws[1:] {
		if w.Host != ws[0].Host {
			return true
		}
	}
	return false
}
