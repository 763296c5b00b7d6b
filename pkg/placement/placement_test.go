package placement

import (
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// TestValidTP matches qwen2.md section 5.2.
func TestValidTP(t *testing.T) {
	for _, tc := range []struct {
		preset string
		want   []int
	}{
		{"qwen2-0.5b", []int{1, 2}},
		{"qwen2-1.5b", []int{1, 2, 4}},
		{"qwen2-7b", []int{1, 2, 4}},
		{"qwen2-72b", []int{1, 2, 4, 8, 16, 32, 64}},
		{"qwen2-57b-a14b", []int{1, 2, 4}},
	} {
		t.Run(tc.preset, func(t *testing.T) {
			if got := ValidTP(preset(t, tc.preset)); !slices.Equal(got, tc.want) {
				t.Fatalf("ValidTP = %v, want %v", got, tc.want)
			}
		})
	}
}

// TestCheckTPReasons checks each rule names what fails (section 5.2 notes).
func TestCheckTPReasons(t *testing.T) {
	for _, tc := range []struct {
		preset string
		tp     int
		want   string
	}{
		{"qwen2-0.5b", 3, "tp=3 does not divide the 14 query heads"},
		{"qwen2-0.5b", 7, "tp=7 and the 2 KV heads do not divide one another"},
		{"qwen2-0.5b", 14, "tp=14 does not divide intermediate_size 4864"},
		{"qwen2-0.5b", 16, "tp=16 exceeds the 14 query heads"},
		{"qwen2-7b", 8, "tp=8 does not divide the 28 query heads"},
		{"qwen2-1.5b", 3, "tp=3 and the 2 KV heads do not divide one another"},
		{"qwen2-1.5b", 6, "tp=6 does not divide intermediate_size 8960"},
	} {
		t.Run(fmt.Sprintf("%s/tp%d", tc.preset, tc.tp), func(t *testing.T) {
			err := checkTP(preset(t, tc.preset), tc.tp)
			if err == nil || err.Error() != tc.want || !errors.Is(err, ErrInvalid) {
				t.Fatalf("err = %v, want %q (ErrInvalid)", err, tc.want)
			}
		})
	}
}

func defaults(t *testing.T, cfg *model.Config) Options {
	t.Helper()
	o := Options{}
	if err := o.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := o.fillFromModel(cfg); err != nil {
		t.Fatal(err)
	}
	return o
}

// TestWeightsPerRank72B matches section 5.3 (pure TP: one stage with the
// embedding and the LM head, counted once each).
func TestWeightsPerRank72B(t *testing.T) {
	cfg := preset(t, "qwen2-72b")
	opts := defaults(t, cfg)
	for _, tc := range []struct {
		tp  int
		gib float64
	}{{1, 135.43}, {2, 67.71}, {4, 33.86}, {8, 16.93}} {
		w := newSizer(cfg, opts, tc.tp).stage(0, cfg.NumHiddenLayers, true, true).weights
		if got := float64(w) / float64(gib); math.Abs(got-tc.gib) > 0.05 {
			t.Errorf("tp=%d: %.3f GiB per rank, want %.2f", tc.tp, got, tc.gib)
		}
	}
}

// TestWeightsTP1MatchNumParams: at tp=1 one stage holds exactly the
// checkpoint, tied or not.
func TestWeightsTP1MatchNumParams(t *testing.T) {
	for _, name := range []string{"qwen2-0.5b", "qwen2-1.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b", "tiny-moe"} {
		t.Run(name, func(t *testing.T) {
			cfg := preset(t, name)
			got := newSizer(cfg, defaults(t, cfg), 1).stage(0, cfg.NumHiddenLayers, true, true).weights
			if want := 2 * model.NumParams(cfg); got != want {
				t.Fatalf("weights %d, want %d", got, want)
			}
		})
	}
}

// TestSplitWeightsAddUp: summed over ranks, the split tensors come to the
// checkpoint plus the replicated norms (and router/gates) t−1 more times
// and, for a tied model split in stages, one more embedding.
func TestSplitWeightsAddUp(t *testing.T) {
	cfg := preset(t, "qwen2-7b")
	opts := defaults(t, cfg)
	H := int64(cfg.HiddenSize)
	norms := int64(2*cfg.NumHiddenLayers+1) * H
	for _, tp := range []int{2, 4} {
		z := newSizer(cfg, opts, tp)
		got := z.stage(0, cfg.NumHiddenLayers, true, true).weights * int64(tp)
		want := 2 * (model.NumParams(cfg) + int64(tp-1)*norms)
		if got != want {
			t.Errorf("tp=%d: ranks sum to %d bytes, want %d", tp, got, want)
		}
	}
}

// TestKVReplication: past tp = kv the per-rank KV stops shrinking.
func TestKVReplication(t *testing.T) {
	cfg := preset(t, "qwen2-72b")
	opts := defaults(t, cfg)
	kv := func(tp int) int64 { return newSizer(cfg, opts, tp).stage(0, 80, true, true).kv }
	if kv(4) != 2*kv(8) || kv(8) != kv(16) || kv(16) != kv(64) {
		t.Fatalf("kv per rank: tp4 %d tp8 %d tp16 %d tp64 %d", kv(4), kv(8), kv(16), kv(64))
	}
	// Section 5.4: 320 KiB per token at tp=1, 40 KiB at tp=8.
	if got := kv(8) / int64(opts.KVCacheTokens); got != 40<<10 {
		t.Fatalf("tp=8: %d bytes per token, want 40 KiB", got)
	}
}

// TestTiedLastStage: with pp > 1 a tied model's last stage pays for its
// own copy of the embedding rows.
func TestTiedLastStage(t *testing.T) {
	cfg := preset(t, "qwen2-0.5b")
	opts := defaults(t, cfg)
	z := newSizer(cfg, opts, 2)
	L := cfg.NumHiddenLayers
	one := z.stage(0, L, true, true).weights
	first, last := z.stage(0, 12, true, false).weights, z.stage(12, L, false, true).weights
	rows := int64((cfg.VocabSize + 1) / 2)
	if extra := first + last - one; extra != rows*int64(cfg.HiddenSize)*2 {
		t.Fatalf("pp=2 costs %d more bytes per rank, want one embedding slice %d", extra, rows*int64(cfg.HiddenSize)*2)
	}
}

func TestVocabRange(t *testing.T) {
	for _, tc := range []struct{ v, t int }{{151936, 1}, {151936, 2}, {152064, 8}, {512, 3}, {151936, 64}, {10, 4}} {
		next := 0
		for r := 0; r < tc.t; r++ {
			b, e := model.VocabSlice(tc.v, r, tc.t)
			if b != next || e < b || e-b > (tc.v+tc.t-1)/tc.t {
				t.Fatalf("V=%d t=%d rank %d: [%d, %d) after %d", tc.v, tc.t, r, b, e, next)
			}
			next = e
		}
		if next != tc.v {
			t.Fatalf("V=%d t=%d: slices end at %d", tc.v, tc.t, next)
		}
	}
	if b, e := model.VocabSlice(512, 2, 3); b != 342 || e != 512 {
		t.Fatalf("V=512 t=3 rank 2: [%d, %d), want [342, 512)", b, e)
	}
}

// TestBalance: stages cover every layer once, each has at least one, and
// the largest stage is as small as any contiguous partition allows (brute
// force over the small cases).
func TestBalance(t *testing.T) {
	for _, name := range []string{"qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2-57b-a14b"} {
		cfg := preset(t, name)
		opts := defaults(t, cfg)
		for _, tp := range ValidTP(cfg)[:2] {
			z := newSizer(cfg, opts, tp)
			L := cfg.NumHiddenLayers
			for _, pp := range []int{1, 2, 3, 4, 7, L - 1, L} {
				t.Run(fmt.Sprintf("%s/tp%d/pp%d", name, tp, pp), func(t *testing.T) {
					lo := z.layout(pp)
					if len(lo.stages) != pp || lo.stages[0].begin != 0 || lo.stages[pp-1].end != L {
						t.Fatalf("stages %+v", lo.stages)
					}
					for i, s := range lo.stages {
						if s.end-s.begin < 1 || (i > 0 && s.begin != lo.stages[i-1].end) {
							t.Fatalf("stage %d is [%d, %d)", i, s.begin, s.end)
						}
						if s.embed != (i == 0) || s.head != (i == pp-1) {
							t.Fatalf("stage %d embed=%v head=%v", i, s.embed, s.head)
						}
					}
					if pp <= 3 {
						if got, want := maxWeights(lo.stages), bruteBalance(z, pp); got != want {
							t.Fatalf("largest stage %d bytes, brute force %d", got, want)
						}
					}
				})
			}
		}
	}
}

func maxWeights(ss []stageMem) int64 {
	var m int64
	for _, s := range ss {
		m = max(m, s.weights)
	}
	return m
}

// bruteBalance is the smallest largest-stage weight over every partition
// into pp ≤ 3 stages.
func bruteBalance(z *sizer, pp int) int64 {
	L := len(z.layer)
	w := func(b, e, st int) int64 { return z.stage(b, e, st == 0, st == pp-1).weights }
	best := int64(math.MaxInt64)
	switch pp {
	case 1:
		best = w(0, L, 0)
	case 2:
		for a := 1; a < L; a++ {
			best = min(best, max(w(0, a, 0), w(a, L, 1)))
		}
	case 3:
		for a := 1; a < L; a++ {
			for b := a + 1; b < L; b++ {
				best = min(best, max(w(0, a, 0), w(a, b, 1), w(b, L, 2)))
			}
		}
	}
	return best
}

// TestBalanceTieBreak: equal costs give the earlier stages more layers.
func TestBalanceTieBreak(t *testing.T) {
	z := &sizer{layer: []int64{1, 1, 1, 1, 1}, cfg: &model.Config{}}
	if got := z.balance(2); !slices.Equal(got, []int{0, 3, 5}) {
		t.Fatalf("bounds %v, want [0 3 5]", got)
	}
	if got := z.balance(5); !slices.Equal(got, []int{0, 1, 2, 3, 4, 5}) {
		t.Fatalf("bounds %v, want one layer each", got)
	}
}

type planCase struct {
	name    string
	cfg     *model.Config
	workers []Worker
	opts    Options
}

func planCases(t *testing.T) []planCase {
	mixed := append(uniform(5, 2, 80*gib, "cuda"), uniform(3, 3, 24*gib, "cpu")...)
	for i := range mixed[5:] {
		mixed[5+i].ID = fmt.Sprintf("c%d", i)
	}
	nohost := uniform(5, 1, 16*gib, "")
	for i := range nohost {
		nohost[i].Host = ""
	}
	uneven := uniform(7, 3, 80*gib, "cuda")
	uneven[2].MemoryBytes = 96 * gib
	return []planCase{
		{"72b-8x80-2hosts", preset(t, "qwen2-72b"), uniform(8, 2, 80*gib, "cuda"), Options{}},
		{"72b-16x80-2hosts", preset(t, "qwen2-72b"), uniform(16, 2, 80*gib, "cuda"), Options{}},
		{"72b-7x80-3hosts-uneven", preset(t, "qwen2-72b"), uneven, Options{}},
		{"72b-8hosts", preset(t, "qwen2-72b"), uniform(8, 8, 80*gib, "cuda"), Options{}},
		{"72b-hosts-4-2-2", preset(t, "qwen2-72b"), onHosts(80*gib, 4, 2, 2), Options{}},
		{"72b-2hosts-4x24", preset(t, "qwen2-72b"), uniform(8, 2, 24*gib, "cuda"), Options{}},
		{"0.5b-8hosts-800m", preset(t, "qwen2-0.5b"), uniform(8, 8, 800<<20, "cuda"), Options{}},
		{"72b-12x80-3hosts-tp2", preset(t, "qwen2-72b"), uniform(12, 3, 80*gib, "cuda"), Options{TP: 2}},
		{"72b-mixed", preset(t, "qwen2-72b"), mixed, Options{PP: 2}},
		{"7b-5x16-nohost", preset(t, "qwen2-7b"), nohost, Options{}},
		{"0.5b-6x8-3hosts", preset(t, "qwen2-0.5b"), uniform(6, 3, 8*gib, "cpu"), Options{TP: 2, PP: 3}},
		{"57b-8x80", preset(t, "qwen2-57b-a14b"), uniform(8, 1, 80*gib, "cuda"), Options{}},
		{"57b-8x40-2hosts-ep2-pp2", preset(t, "qwen2-57b-a14b"), uniform(8, 2, 40*gib, "cuda"), Options{EP: 2, PP: 2}},
		{"57b-20x24-3hosts-ep8", preset(t, "qwen2-57b-a14b"), uniform(20, 3, 24*gib, "cuda"), Options{EP: 8, RedundantExperts: 1}},
		{"57b-7x40-4hosts", preset(t, "qwen2-57b-a14b"), uniform(7, 4, 40*gib, "cuda"), Options{}},
	}
}

// TestPlanInvariants: every layer in exactly one stage per replica, every
// worker used at most once (or listed unused), ranks in order (TP or EP
// ranks), every rank within the usable memory.
func TestPlanInvariants(t *testing.T) {
	for _, tc := range planCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			p, err := New(tc.cfg, tc.workers, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			mem := map[string]int64{}
			minMem := int64(math.MaxInt64)
			for _, w := range tc.workers {
				mem[w.ID] = w.MemoryBytes
				if w.Backend == p.Backend {
					minMem = min(minMem, w.MemoryBytes)
				}
			}
			use := func(id string) {
				if seen[id] {
					t.Fatalf("worker %s placed twice", id)
				}
				if _, ok := mem[id]; !ok {
					t.Fatalf("unknown worker %s", id)
				}
				seen[id] = true
			}
			for ri, r := range p.Replicas {
				if r.Index != ri || len(r.Stages) != p.PP {
					t.Fatalf("replica %d: index %d, %d stages", ri, r.Index, len(r.Stages))
				}
				next := 0
				for si, s := range r.Stages {
					width := p.TP
					if p.EP > 1 {
						width = p.EP
					}
					if s.Index != si || s.LayersBegin != next || s.LayersEnd <= s.LayersBegin || len(s.Ranks) != width {
						t.Fatalf("replica %d stage %d: %+v", ri, si, s)
					}
					next = s.LayersEnd
					if total := s.WeightBytes + s.KVBytes + s.ActivationBytes; float64(total) > 0.9*float64(minMem) {
						t.Fatalf("stage %d needs %d bytes per rank, over 0.9 × %d", si, total, minMem)
					}
					for i, rk := range s.Ranks {
						wantEP := 0
						if p.EP > 1 {
							wantEP = i
						}
						if rk.TPRank != i%p.TP || rk.EPRank != wantEP {
							t.Fatalf("rank %d has TPRank %d, EPRank %d (tp=%d ep=%d)", i, rk.TPRank, rk.EPRank, p.TP, p.EP)
						}
						use(rk.Worker)
					}
				}
				if next != tc.cfg.NumHiddenLayers {
					t.Fatalf("replica %d ends at layer %d", ri, next)
				}
			}
			for _, id := range p.Unused {
				use(id)
			}
			if len(seen) != len(tc.workers) {
				t.Fatalf("%d of %d workers accounted for", len(seen), len(tc.workers))
			}
			if tc.opts.TP > 0 && p.TP != tc.opts.TP || tc.opts.PP > 0 && p.PP != tc.opts.PP || tc.opts.EP > 0 && p.EP != tc.opts.EP {
				t.Fatalf("forced tp=%d pp=%d ep=%d, got tp=%d pp=%d ep=%d", tc.opts.TP, tc.opts.PP, tc.opts.EP, p.TP, p.PP, p.EP)
			}
			if p.EP < 1 {
				t.Fatalf("ep=%d", p.EP)
			}
		})
	}
}

// TestDeterministic: the worker order does not change the plan.
func TestDeterministic(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range planCases(t) {
		t.Run(tc.name, func(t *testing.T) {
			want, err := New(tc.cfg, tc.workers, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			for range 20 {
				ws := slices.Clone(tc.workers)
				rng.Shuffle(len(ws), func(i, j int) { ws[i], ws[j] = ws[j], ws[i] })
				got, err := New(tc.cfg, ws, tc.opts)
				if err != nil {
					t.Fatal(err)
				}
				if !reflect.DeepEqual(got, want) {
					t.Fatalf("shuffled workers give another plan:\n%s\nwant\n%s", got, want)
				}
			}
		})
	}
}

// TestPrefersTPInsideHost: "TP inside a host, PP across hosts". Phase 1
// (pp=1, every TP group inside one host) decides whenever such a layout
// fits, even where a pipeline would give more replicas; otherwise phase 2
// pipelines across hosts and keeps TP inside them.
func TestPrefersTPInsideHost(t *testing.T) {
	for _, tc := range []struct {
		name             string
		preset           string
		workers          []Worker
		tp, pp, replicas int
		unused           int
		explain          string // a line of Explain starts with it
	}{
		{"72b 8x80 one host", "qwen2-72b", uniform(8, 1, 80*gib, "cuda"), 4, 1, 2, 0, "tp=4 inside one host fits (tp=2 needs 74.92 GiB per rank); pipeline layouts not needed"},
		{"72b 8x80 two hosts", "qwen2-72b", uniform(8, 2, 80*gib, "cuda"), 4, 1, 2, 0, "tp=4 inside one host fits"},
		{"72b 16x80 two hosts", "qwen2-72b", uniform(16, 2, 80*gib, "cuda"), 4, 1, 4, 0, "tp=1 x pp=3 would give 5 replicas, but pipelines are considered only"},
		{"72b 4x141", "qwen2-72b", uniform(4, 1, 141*gib, "cuda"), 2, 1, 2, 0, "tp=2 inside one host fits"},
		{"72b 8 hosts of 1x80", "qwen2-72b", uniform(8, 8, 80*gib, "cuda"), 1, 4, 2, 0,
			"no tensor-parallel group inside one host fits (tp=1 needs 148.69 GiB per rank, 72 GiB usable; tp=4 would fit, but no host has 4 workers); pipeline stages across hosts"},
		{"72b 2 hosts of 2x80", "qwen2-72b", uniform(4, 2, 80*gib, "cuda"), 2, 2, 1, 0,
			"no tensor-parallel group inside one host fits (tp=2 needs 74.92 GiB per rank"},
		// Phase 1 leaves the two 2-GPU hosts idle rather than pipeline.
		{"72b hosts of 4,2,2x80", "qwen2-72b", onHosts(80*gib, 4, 2, 2), 4, 1, 1, 4, "tp=2 x pp=2 would give 2 replicas"},
		{"72b 2 hosts of 4x24", "qwen2-72b", uniform(8, 2, 24*gib, "cuda"), 4, 2, 1, 0, "tp=8 (1 replica) also fits but splits its TP groups across hosts"},
		{"7b 2 hosts of 1x16", "qwen2-7b", uniform(2, 2, 16*gib, "cuda"), 1, 2, 1, 0, "no tensor-parallel group inside one host fits"},
		{"7b 4x16", "qwen2-7b", uniform(4, 1, 16*gib, "cuda"), 2, 1, 2, 0, "tp=2 inside one host fits (tp=1 needs 17.81 GiB per rank)"},
		{"7b 4x24", "qwen2-7b", uniform(4, 1, 24*gib, "cuda"), 1, 1, 4, 0, "one worker holds the whole model (tp=1); pipeline layouts not needed"},
		{"0.5b 4x1 one host", "qwen2-0.5b", uniform(4, 1, 1*gib, "cuda"), 2, 2, 1, 0, "no tensor-parallel group inside one host fits (tp=2 needs 1.07 GiB per rank, 921.6 MiB usable); pipeline stages, each pipeline inside one host"},
		{"0.5b 8 hosts of 800MiB", "qwen2-0.5b", uniform(8, 8, 800<<20, "cuda"), 2, 4, 1, 0, "every layout that fits splits a TP group across hosts"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := New(preset(t, tc.preset), tc.workers, Options{})
			if err != nil {
				t.Fatal(err)
			}
			if p.TP != tc.tp || p.PP != tc.pp || len(p.Replicas) != tc.replicas || len(p.Unused) != tc.unused {
				t.Fatalf("tp=%d pp=%d, %d replicas, %d unused; want tp=%d pp=%d, %d replicas, %d unused\n%s",
					p.TP, p.PP, len(p.Replicas), len(p.Unused), tc.tp, tc.pp, tc.replicas, tc.unused, p)
			}
			if !slices.ContainsFunc(p.Explain, func(l string) bool { return strings.HasPrefix(l, tc.explain) }) {
				t.Fatalf("no Explain line starts with %q:\n%s", tc.explain, strings.Join(p.Explain, "\n"))
			}
			crossOK := strings.HasPrefix(tc.explain, "every layout that fits splits")
			for _, r := range p.Replicas {
				for _, s := range r.Stages {
					if spansHosts(workersOf(s.Ranks)) != crossOK {
						t.Fatalf("replica %d stage %d: TP group spans hosts = %v, want %v", r.Index, s.Index, !crossOK, crossOK)
					}
				}
			}
		})
	}
}

// TestCountsMatchAssign: the replica and crossing-group counts the
// automatic choice computes match what assign produces.
func TestCountsMatchAssign(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	for range 300 {
		sizes := make([]int, 1+rng.IntN(6))
		for i := range sizes {
			sizes[i] = 1 + rng.IntN(9)
		}
		sorted := sortWorkers(onHosts(gib, sizes...))
		n := len(sorted)
		for tp := 1; tp <= n; tp++ {
			a := assign(sorted, tp, 1, true)
			if got := localGroups(sizes, tp); got != len(a.replicas) || a.crossingTP() != 0 {
				t.Fatalf("hosts %v tp=%d local: %d groups, assign %d (%d crossing)", sizes, tp, got, len(a.replicas), a.crossingTP())
			}
			for pp := 1; tp*pp <= n; pp++ {
				a := assign(sorted, tp, pp, false)
				reps := n / (tp * pp)
				crossing := max(0, reps*pp-localGroups(sizes, tp))
				if reps != len(a.replicas) || crossing != a.crossingTP() {
					t.Fatalf("hosts %v tp=%d pp=%d: %d replicas %d crossing, assign %d and %d",
						sizes, tp, pp, reps, crossing, len(a.replicas), a.crossingTP())
				}
			}
		}
	}
}

func workersOf(rs []Rank) []Worker {
	var ws []Worker
	for _, r := range rs {
		ws = append(ws, Worker{ID: r.Worker, Host: r.Host})
	}
	return ws
}

// TestForcedKeepsShortestGroupRule: a forced degree keeps the rule from
// before the phases (smallest group, then the largest with as many
// replicas), even where a TP group then spans hosts.
func TestForcedKeepsShortestGroupRule(t *testing.T) {
	cfg := preset(t, "qwen2-72b")
	p, err := New(cfg, uniform(16, 2, 80*gib, "cuda"), Options{TP: 1})
	if err != nil {
		t.Fatal(err)
	}
	if p.PP != 3 || len(p.Replicas) != 5 {
		t.Fatalf("tp=1 forced: pp=%d, %d replicas; want pp=3, 5 replicas", p.PP, len(p.Replicas))
	}
	p, err = New(cfg, uniform(8, 8, 80*gib, "cuda"), Options{PP: 1})
	if err != nil {
		t.Fatal(err)
	}
	if p.TP != 4 || len(p.Replicas) != 2 {
		t.Fatalf("pp=1 forced on 8 hosts: tp=%d, %d replicas; want tp=4 across hosts, 2 replicas", p.TP, len(p.Replicas))
	}
}

func TestErrors(t *testing.T) {
	cfg := preset(t, "qwen2-0.5b")
	ws := uniform(2, 1, 8*gib, "cuda")
	for _, tc := range []struct {
		name    string
		workers []Worker
		opts    Options
		kind    error
		want    string
	}{
		{"no workers", nil, Options{}, ErrNoWorkers, "no workers to place the model on"},
		{"duplicate id", []Worker{ws[0], ws[0]}, Options{}, ErrInvalid, `worker id "w0" appears twice`},
		{"no id", []Worker{{MemoryBytes: 1}}, Options{}, ErrInvalid, "a worker has no id"},
		{"no memory", []Worker{{ID: "a"}}, Options{}, ErrInvalid, "worker a has no memory"},
		{"bad tp", ws, Options{TP: 3}, ErrInvalid, "tp=3 does not divide the 14 query heads"},
		{"negative tp", ws, Options{TP: -1}, ErrInvalid, "TP must be >= 0"},
		{"utilization", ws, Options{Utilization: 1.5}, ErrInvalid, "Utilization must be in (0, 1]"},
		{"pp over layers", ws, Options{PP: 25}, ErrInvalid, "pp=25 exceeds the 24 layers"},
		{"too few workers", ws[:1], Options{TP: 2, PP: 1}, ErrNoFit, "tp=2 x pp=1 needs 2 workers, have 1"},
		{"tp over workers", ws[:1], Options{TP: 2}, ErrNoFit, "tp=2 needs at least 2 workers, have 1"},
		{"too small", []Worker{{ID: "a", MemoryBytes: 1 * gib}}, Options{}, ErrNoFit,
			"qwen2-0.5b needs 942.29 MiB of bf16 weights; the best layout on 1 worker (tp=1) needs 1.88 GiB per worker"},
		{"nothing fits", []Worker{{ID: "a", MemoryBytes: 1 << 20}}, Options{}, ErrNoFit, "no layout up to 48 workers fits workers of 1 MiB"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			opts := tc.opts
			opts.Model = "qwen2-0.5b"
			_, err := New(cfg, tc.workers, opts)
			if !errors.Is(err, tc.kind) || !strings.Contains(fmt.Sprint(err), tc.want) {
				t.Fatalf("err = %v, want %v containing %q", err, tc.kind, tc.want)
			}
		})
	}
}

// TestHeterogeneousMemory: ranks are sized for the smallest worker.
func TestHeterogeneousMemory(t *testing.T) {
	ws := uniform(2, 1, 24*gib, "cuda")
	ws[1].MemoryBytes = 16 * gib // 7B fits 24 GiB but not 16 GiB alone
	p, err := New(preset(t, "qwen2-7b"), ws, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if p.TP != 2 || len(p.Replicas) != 1 {
		t.Fatalf("tp=%d, %d replicas; want one tp=2 replica sized for 16 GiB", p.TP, len(p.Replicas))
	}
}

// TestKVCacheTokens: a bigger KV cache needs bigger groups.
func TestKVCacheTokens(t *testing.T) {
	cfg := preset(t, "qwen2-7b")
	ws := uniform(4, 1, 24*gib, "cuda")
	small, err := New(cfg, ws, Options{KVCacheTokens: 4096})
	if err != nil {
		t.Fatal(err)
	}
	big, err := New(cfg, ws, Options{KVCacheTokens: 200_000})
	if err != nil {
		t.Fatal(err)
	}
	if small.TP*small.PP != 1 || big.TP*big.PP <= 1 {
		t.Fatalf("4096 tokens: tp=%d pp=%d; 200000 tokens: tp=%d pp=%d", small.TP, small.PP, big.TP, big.PP)
	}
}
