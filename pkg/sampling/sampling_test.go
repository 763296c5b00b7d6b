package sampling

import (
	"math"
	"math/rand/v2"
	"slices"
	"strings"
	"testing"
)

var negInf = float32(math.Inf(-1))

func mustParams(t testing.TB, p Params) Params {
	t.Helper()
	p.Normalize()
	if err := p.Validate(); err != nil {
		t.Fatalf("Validate(%+v): %v", p, err)
	}
	return p
}

func newSampler(t testing.TB, p Params) *Sampler {
	t.Helper()
	p.HasSeed = true
	return New(mustParams(t, p))
}

func logRow(probs ...float64) []float32 {
	r := make([]float32, len(probs))
	for i, p := range probs {
		r[i] = float32(math.Log(p))
	}
	return r
}

func randRow(r *rand.Rand, n int, scale float64) []float32 {
	row := make([]float32, n)
	for i := range row {
		row[i] = float32(r.NormFloat64() * scale)
	}
	return row
}

// sampleCopy samples from a copy of row, which Sample modifies.
func sampleCopy(s *Sampler, row []float32, ctx Context) int32 {
	return s.Sample(slices.Clone(row), ctx)
}

func TestNormalize(t *testing.T) {
	var p Params
	p.TopK = -1
	p.Normalize()
	if p.TopP != 1 || p.RepetitionPenalty != 1 || p.TopK != 0 {
		t.Fatalf("Normalize: %+v", p)
	}
	if err := p.Validate(); err != nil {
		t.Fatal(err)
	}
	if !p.Greedy() || p.Penalized() {
		t.Fatalf("zero params: greedy=%v penalized=%v", p.Greedy(), p.Penalized())
	}
}

func TestValidate(t *testing.T) {
	nan := float32(math.NaN())
	inf := float32(math.Inf(1))
	cases := []struct {
		mod  func(*Params)
		want string
	}{
		{func(p *Params) { p.Temperature = -1 }, "temperature: must be >= 0, got -1"},
		{func(p *Params) { p.Temperature = nan }, "temperature:"},
		{func(p *Params) { p.Temperature = inf }, "temperature:"},
		{func(p *Params) { p.Temperature = 101 }, "temperature:"},
		{func(p *Params) { p.TopP = 1.5 }, "top_p: 1.5 is outside (0, 1]"},
		{func(p *Params) { p.TopP = -0.1 }, "top_p:"},
		{func(p *Params) { p.TopP = nan }, "top_p:"},
		{func(p *Params) { p.TopK = -3 }, "top_k: must be -1, 0 or >= 1, got -3"},
		{func(p *Params) { p.MinP = -0.1 }, "min_p:"},
		{func(p *Params) { p.MinP = 1.1 }, "min_p:"},
		{func(p *Params) { p.MinP = nan }, "min_p:"},
		{func(p *Params) { p.RepetitionPenalty = -1 }, "repetition_penalty: must be > 0"},
		{func(p *Params) { p.RepetitionPenalty = inf }, "repetition_penalty:"},
		{func(p *Params) { p.RepetitionPenalty = nan }, "repetition_penalty:"},
		{func(p *Params) { p.PresencePenalty = 2.5 }, "presence_penalty:"},
		{func(p *Params) { p.PresencePenalty = -inf }, "presence_penalty:"},
		{func(p *Params) { p.FrequencyPenalty = -3 }, "frequency_penalty:"},
		{func(p *Params) { p.FrequencyPenalty = nan }, "frequency_penalty:"},
	}
	for _, c := range cases {
		p := Params{Temperature: 0.7}
		p.Normalize()
		c.mod(&p)
		err := p.Validate()
		if err == nil || !strings.HasPrefix(err.Error(), c.want) {
			t.Errorf("%+v: got %v, want prefix %q", p, err, c.want)
		}
	}
	good := []Params{
		{Temperature: 0, TopP: 1, TopK: -1, MinP: 0, RepetitionPenalty: 1},
		{Temperature: 100, TopP: 0.01, TopK: 1, MinP: 1, RepetitionPenalty: 0.5, PresencePenalty: -2, FrequencyPenalty: 2},
		{Temperature: 0.7, TopP: 0.9, TopK: 50, MinP: 0.05, RepetitionPenalty: 1.1, PresencePenalty: 2, FrequencyPenalty: -2},
	}
	for _, p := range good {
		if err := p.Validate(); err != nil {
			t.Errorf("%+v: %v", p, err)
		}
	}
}

func TestGreedy(t *testing.T) {
	s := newSampler(t, Params{})
	if got := sampleCopy(s, []float32{0.1, 3, -2, 2.9}, Context{}); got != 1 {
		t.Fatalf("argmax: got %d", got)
	}
	if got := sampleCopy(s, []float32{1, 5, 2, 5, 5}, Context{}); got != 1 {
		t.Fatalf("ties: got %d, want first index 1", got)
	}
	if got := sampleCopy(s, []float32{float32(math.NaN()), 1, 2}, Context{}); got != 2 {
		t.Fatalf("NaN: got %d", got)
	}
}

func TestPenalties(t *testing.T) {
	cases := []struct {
		name   string
		p      Params
		logits []float32
		ctx    Context
		want   int32
	}{
		{"none", Params{}, []float32{2, 1.9}, Context{Output: []int32{0}}, 0},
		{"repetition positive", Params{RepetitionPenalty: 1.2}, []float32{2, 1.9}, Context{Output: []int32{0}}, 1},
		{"repetition prompt", Params{RepetitionPenalty: 1.2}, []float32{2, 1.9}, Context{Prompt: []int32{0}}, 1},
		{"repetition negative", Params{RepetitionPenalty: 1.2}, []float32{-1, -1.1}, Context{Prompt: []int32{0}}, 1},
		{"repetition below 1 boosts", Params{RepetitionPenalty: 0.5}, []float32{1.9, 2}, Context{Prompt: []int32{0}}, 0},
		// 2/1.05 = 1.905 > 1.9: applied once, though 0 occurs 4 times.
		{"repetition once per id", Params{RepetitionPenalty: 1.05}, []float32{2, 1.9},
			Context{Prompt: []int32{0, 0}, Output: []int32{0, 0}}, 0},
		{"presence", Params{PresencePenalty: 0.5}, []float32{1, 0.8}, Context{Output: []int32{0}}, 1},
		{"presence ignores count", Params{PresencePenalty: 0.1}, []float32{1, 0.8}, Context{Output: []int32{0, 0, 0}}, 0},
		{"presence ignores prompt", Params{PresencePenalty: 2}, []float32{1, 0.8}, Context{Prompt: []int32{0}}, 0},
		{"negative presence", Params{PresencePenalty: -0.5}, []float32{0.8, 1}, Context{Output: []int32{0}}, 0},
		{"frequency once", Params{FrequencyPenalty: 0.1}, []float32{1, 0.8}, Context{Output: []int32{0}}, 0},
		{"frequency counts", Params{FrequencyPenalty: 0.1}, []float32{1, 0.8}, Context{Output: []int32{0, 0, 0}}, 1},
		{"frequency ignores prompt", Params{FrequencyPenalty: 2}, []float32{1, 0.8}, Context{Prompt: []int32{0, 0}}, 0},
		{"out of range ids ignored", Params{RepetitionPenalty: 2, PresencePenalty: 1, FrequencyPenalty: 1}, []float32{1, 0.8},
			Context{Prompt: []int32{-1, 7}, Output: []int32{2, -5}, Suppress: []int32{9, -1}}, 0},
	}
	for _, c := range cases {
		s := newSampler(t, c.p)
		// Twice: the scratch state must not leak from one call to the next.
		for range 2 {
			if got := sampleCopy(s, c.logits, c.ctx); got != c.want {
				t.Errorf("%s: got %d, want %d", c.name, got, c.want)
			}
		}
		// The same penalties reach sampled decoding (top_k=1 keeps the best).
		p := c.p
		p.Temperature, p.TopK = 1, 1
		if got := sampleCopy(newSampler(t, p), c.logits, c.ctx); got != c.want {
			t.Errorf("%s (top_k=1): got %d, want %d", c.name, got, c.want)
		}
	}
}

func TestPenaltyValues(t *testing.T) {
	s := newSampler(t, Params{RepetitionPenalty: 2, PresencePenalty: 0.5, FrequencyPenalty: 0.25})
	row := []float32{4, -4, 4, 1}
	s.Sample(row, Context{Prompt: []int32{0, 1}, Output: []int32{1, 2, 2}})
	want := []float32{2, -8 - 0.5 - 0.25, 2 - 0.5 - 0.5, 1}
	if !slices.Equal(row, want) {
		t.Fatalf("penalized row %v, want %v", row, want)
	}
}

func TestReproducible(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	row := randRow(r, 1000, 2)
	configs := []Params{
		{Temperature: 1},
		{Temperature: 0.8, TopP: 0.9},
		{Temperature: 1.3, TopK: 40, TopP: 0.95, MinP: 0.01},
		{Temperature: 0.7, MinP: 0.05, RepetitionPenalty: 1.1, PresencePenalty: 0.2, FrequencyPenalty: 0.1},
	}
	for _, p := range configs {
		draw := func(seed uint64) []int32 {
			p := p
			p.Seed = seed
			s := newSampler(t, p)
			var out []int32
			for range 200 {
				out = append(out, sampleCopy(s, row, Context{Prompt: []int32{1, 2, 3}, Output: out}))
			}
			return out
		}
		a, b, c := draw(42), draw(42), draw(43)
		if !slices.Equal(a, b) {
			t.Errorf("%+v: same seed differs", p)
		}
		if slices.Equal(a, c) {
			t.Errorf("%+v: different seeds give the same sequence", p)
		}
	}
	// Without HasSeed, Seed reports the drawn seed and replays the run.
	p := mustParams(t, Params{Temperature: 1})
	s1 := New(p)
	p.Seed, p.HasSeed = s1.Seed(), true
	s2 := New(p)
	for range 50 {
		if sampleCopy(s1, row, Context{}) != sampleCopy(s2, row, Context{}) {
			t.Fatal("replay with Seed() differs")
		}
	}
}

func checkFreq(t *testing.T, name string, p Params, row []float32, want []float64) {
	t.Helper()
	s := newSampler(t, p)
	const n = 20000
	counts := make([]int, len(row))
	buf := make([]float32, len(row))
	for range n {
		copy(buf, row)
		counts[s.Sample(buf, Context{})]++
	}
	for i, w := range want {
		if f := float64(counts[i]) / n; math.Abs(f-w) > 0.02 {
			t.Errorf("%s: id %d frequency %.4f, want %.4f", name, i, f, w)
		}
	}
}

func TestDistribution(t *testing.T) {
	row := logRow(0.1, 0.2, 0.7)
	want := []float64{0.1, 0.2, 0.7}
	checkFreq(t, "plain", Params{Temperature: 1}, row, want)
	checkFreq(t, "top_p 0.99", Params{Temperature: 1, TopP: 0.99}, row, want)
	// Top-k path: the 4th id is -Inf and top_k=3 keeps the other three.
	row4 := append(slices.Clone(row), negInf)
	checkFreq(t, "top_k 3", Params{Temperature: 1, TopK: 3}, row4, append(want, 0))
	checkFreq(t, "top_k 3 top_p 0.99", Params{Temperature: 1, TopK: 3, TopP: 0.99}, row4, append(want, 0))
	// Temperature 2 flattens: probs ∝ sqrt(p).
	var z float64
	tw := make([]float64, 3)
	for i, p := range want {
		tw[i] = math.Sqrt(p)
		z += tw[i]
	}
	for i := range tw {
		tw[i] /= z
	}
	checkFreq(t, "temperature 2", Params{Temperature: 2}, row, tw)
	// top_p 0.8 keeps {2, 1}: renormalized 0.2/0.9, 0.7/0.9.
	checkFreq(t, "top_p 0.8", Params{Temperature: 1, TopP: 0.8}, row, []float64{0, 0.2 / 0.9, 0.7 / 0.9})
}

func TestTopK1IsGreedy(t *testing.T) {
	r := rand.New(rand.NewPCG(3, 4))
	s := newSampler(t, Params{Temperature: 1.5, TopK: 1, TopP: 0.9})
	g := newSampler(t, Params{})
	for range 50 {
		row := randRow(r, 500, 1)
		row[r.IntN(500)] = row[r.IntN(500)] // maybe a tie
		if a, b := sampleCopy(s, row, Context{}), sampleCopy(g, row, Context{}); a != b {
			t.Fatalf("top_k=1 gave %d, greedy %d", a, b)
		}
	}
}

func TestTopP(t *testing.T) {
	row := logRow(0.1, 0.2, 0.7)
	for _, p := range []Params{{Temperature: 1, TopP: 0.5}, {Temperature: 1, TopP: 0.5, TopK: 2}} {
		s := newSampler(t, p)
		for range 1000 {
			if got := sampleCopy(s, row, Context{}); got != 2 {
				t.Fatalf("%+v: got %d, want 2", p, got)
			}
		}
	}
}

// TestTopPDistribution: top_p (and min_p) over weights spread across many
// histogram bins draw each kept id with its renormalized probability.
func TestTopPDistribution(t *testing.T) {
	row := make([]float32, 40)
	for i := range row {
		row[i] = -float32(i) * 0.15
	}
	probs := func(minP float64) []float64 {
		w := make([]float32, len(row))
		var z float64
		for i, v := range row {
			w[i] = float32(math.Exp(float64(v)))
			z += float64(w[i])
		}
		want := make([]float64, len(row))
		var zk float64
		for _, id := range naiveNucleus(w, 0.9*z) {
			if float64(w[id]) >= minP {
				want[id] = float64(w[id])
				zk += want[id]
			}
		}
		for i := range want {
			want[i] /= zk
		}
		return want
	}
	checkFreq(t, "top_p 0.9", Params{Temperature: 1, TopP: 0.9}, row, probs(0))
	checkFreq(t, "top_p 0.9 min_p 0.2", Params{Temperature: 1, TopP: 0.9, MinP: 0.2}, row, probs(0.2))
	// Top-k path: one extra -Inf id, dropped by top_k = 40.
	checkFreq(t, "top_k 40 top_p 0.9", Params{Temperature: 1, TopP: 0.9, TopK: 40}, append(slices.Clone(row), negInf), probs(0))
}

// TestTopPTies: on a uniform row the nucleus is the lowest ids.
func TestTopPTies(t *testing.T) {
	row := make([]float32, 200)
	for _, c := range []struct {
		p    Params
		keep int32
	}{
		{Params{Temperature: 1, TopP: 0.5}, 100},
		{Params{Temperature: 1, TopP: 0.5, TopK: 160}, 80}, // half of the top 160
	} {
		s := newSampler(t, c.p)
		var hi int32
		for range 600 {
			hi = max(hi, sampleCopy(s, row, Context{}))
		}
		if hi >= c.keep || hi < c.keep-10 {
			t.Errorf("%+v: largest id drawn %d, want just below %d", c.p, hi, c.keep)
		}
	}
}

func TestMinP(t *testing.T) {
	row := logRow(0.45, 0.1, 0.45)
	for _, p := range []Params{
		{Temperature: 1, MinP: 0.5},
		{Temperature: 1, MinP: 0.5, TopP: 0.999},
		{Temperature: 1, MinP: 0.5, TopK: 2},
	} {
		s := newSampler(t, p)
		var seen [3]int
		for range 2000 {
			seen[sampleCopy(s, row, Context{})]++
		}
		if seen[1] != 0 || seen[0] == 0 || seen[2] == 0 {
			t.Errorf("%+v: counts %v", p, seen)
		}
	}
}

func TestSuppress(t *testing.T) {
	row := logRow(0.05, 0.9, 0.05)
	for _, p := range []Params{{}, {Temperature: 1}, {Temperature: 1, TopP: 0.9}, {Temperature: 1, TopK: 2}} {
		s := newSampler(t, p)
		for range 500 {
			if got := sampleCopy(s, row, Context{Suppress: []int32{1}}); got == 1 {
				t.Fatalf("%+v: suppressed id chosen", p)
			}
		}
	}
}

func TestAllNegInf(t *testing.T) {
	all := []float32{negInf, negInf, negInf, negInf}
	configs := []Params{
		{}, {Temperature: 1}, {Temperature: 1, TopP: 0.9}, {Temperature: 1, TopK: 2},
		{Temperature: 0.5, MinP: 0.1, RepetitionPenalty: 1.3, PresencePenalty: 1, FrequencyPenalty: 1},
	}
	for _, p := range configs {
		s := newSampler(t, p)
		ctx := Context{Prompt: []int32{1}, Output: []int32{2}}
		if got := sampleCopy(s, all, ctx); got != 0 {
			t.Errorf("%+v: all -Inf gave %d, want 0", p, got)
		}
		// Everything finite suppressed: the argmax of the original row.
		row := []float32{negInf, 1, negInf, 3}
		if got := sampleCopy(s, row, Context{Suppress: []int32{1, 3, 3}}); got != 3 {
			t.Errorf("%+v: all suppressed gave %d, want 3", p, got)
		}
		nan := float32(math.NaN())
		if got := sampleCopy(s, []float32{nan, nan}, Context{}); got < 0 || got > 1 {
			t.Errorf("%+v: NaN row gave %d", p, got)
		}
		if got := s.Sample(nil, Context{}); got != -1 {
			t.Errorf("%+v: empty row gave %d", p, got)
		}
		pinf := float32(math.Inf(1))
		if got := sampleCopy(s, []float32{1, pinf, 2}, Context{}); got != 1 {
			t.Errorf("%+v: +Inf row gave %d, want 1", p, got)
		}
	}
}

// TestInvalidParamsNoPanic: parameters that fail Validate must still give
// in-range ids.
func TestInvalidParamsNoPanic(t *testing.T) {
	nan := float32(math.NaN())
	inf := float32(math.Inf(1))
	r := rand.New(rand.NewPCG(17, 18))
	row := randRow(r, 300, 3)
	row[5] = negInf
	for _, temp := range []float32{-1, nan, inf, 1e-40, 1} {
		for _, p := range []Params{
			{TopP: nan}, {TopP: 2}, {TopP: -1}, {TopK: -5}, {TopK: 1000}, {MinP: 2}, {MinP: nan},
			{RepetitionPenalty: -2}, {RepetitionPenalty: nan}, {PresencePenalty: inf}, {FrequencyPenalty: nan},
			{TopP: 0.5, TopK: 20, MinP: 0.2},
		} {
			p.Temperature, p.HasSeed = temp, true
			s := New(p)
			for range 3 {
				id := sampleCopy(s, row, Context{Prompt: []int32{1, 2}, Output: []int32{3, 3}, Suppress: []int32{4}})
				if id < 0 || int(id) >= len(row) {
					t.Fatalf("%+v: id %d out of range", p, id)
				}
			}
		}
	}
}

func TestLogSumExp(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	for range 20 {
		row := randRow(r, 1+r.IntN(300), 5)
		var naive float64
		for _, v := range row {
			naive += math.Exp(float64(v))
		}
		if got, want := LogSumExp(row), math.Log(naive); math.Abs(got-want) > 1e-9*math.Max(1, math.Abs(want)) {
			t.Fatalf("LogSumExp = %v, naive %v", got, want)
		}
	}
	if got := LogSumExp([]float32{1000, 1000}); math.Abs(got-(1000+math.Ln2)) > 1e-9 {
		t.Fatalf("large values: %v", got)
	}
	if got := LogSumExp(nil); !math.IsInf(got, -1) {
		t.Fatalf("empty: %v", got)
	}
	if got := LogSumExp([]float32{negInf, negInf}); !math.IsInf(got, -1) {
		t.Fatalf("all -Inf: %v", got)
	}
	if got := LogSumExp([]float32{negInf, 0}); got != 0 {
		t.Fatalf("[-Inf, 0]: %v", got)
	}
}

func TestTopN(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	for iter := range 200 {
		n := 1 + r.IntN(300)
		row := randRow(r, n, 3)
		if iter%2 == 0 { // many ties
			for i := range row {
				row[i] = float32(math.Round(float64(row[i])))
			}
			row[r.IntN(n)] = negInf
		}
		k := r.IntN(n + 5)
		lse := LogSumExp(row)
		got := TopN(row, k, lse)
		ids := make([]int32, n)
		for i := range ids {
			ids[i] = int32(i)
		}
		slices.SortStableFunc(ids, func(a, b int32) int {
			switch {
			case row[a] > row[b]:
				return -1
			case row[a] < row[b]:
				return 1
			}
			return 0
		})
		ids = ids[:min(k, n)]
		if len(got) != len(ids) {
			t.Fatalf("len %d, want %d", len(got), len(ids))
		}
		for i, c := range got {
			if c.ID != ids[i] || c.Logit != row[ids[i]] || c.Logprob != logprob(row[ids[i]], lse) {
				t.Fatalf("n=%d k=%d: position %d got %+v, want id %d", n, k, i, c, ids[i])
			}
		}
	}
	if got := TopN([]float32{negInf, 0}, 2, 0); got[1].Logprob != negInf || got[0].ID != 1 {
		t.Fatalf("-Inf logprob: %+v", got)
	}
	if got := TopN([]float32{negInf}, 1, math.Inf(-1)); got[0].Logprob != negInf {
		t.Fatalf("all -Inf logprob: %+v", got)
	}
	if TopN([]float32{1, 2}, 0, 0) != nil || TopN(nil, 3, 0) != nil {
		t.Fatal("empty TopN")
	}
}

// naiveNucleus is the definition: sort by weight desc (ties: lower id
// first), keep the shortest prefix reaching target.
func naiveNucleus(w []float32, target float64) []int32 {
	var ids []int32
	for i, x := range w {
		if x > 0 {
			ids = append(ids, int32(i))
		}
	}
	slices.SortStableFunc(ids, func(a, b int32) int {
		switch {
		case w[a] > w[b]:
			return -1
		case w[a] < w[b]:
			return 1
		}
		return 0
	})
	var cum float64
	for j, id := range ids {
		cum += float64(w[id])
		if cum >= target {
			return ids[:j+1]
		}
	}
	return ids
}

func TestNucleus(t *testing.T) {
	r := rand.New(rand.NewPCG(9, 10))
	for iter := range 300 {
		n := 1 + r.IntN(3000)
		w := make([]float32, n)
		for i := range w {
			switch iter % 3 {
			case 0:
				w[i] = float32(math.Exp(r.NormFloat64() * 3))
			case 1: // coarse values: many ties
				w[i] = float32(1 + r.IntN(4))
			default:
				w[i] = float32(r.Float64())
			}
		}
		var z float64
		for _, x := range w {
			z += float64(x)
		}
		// Dyadic fractions of an integer total are exact, so the tie
		// boundary is decided identically by both.
		p := float64(1+r.IntN(63)) / 64
		target := p * z
		want := naiveNucleus(w, target)
		var cand []int32
		for i := range w {
			cand = append(cand, int32(i))
		}
		r.Shuffle(len(cand), func(i, j int) { cand[i], cand[j] = cand[j], cand[i] })
		got := slices.Clone(nucleus(w, cand, target))
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Fatalf("iter %d n=%d p=%v: nucleus size %d, want %d", iter, n, p, len(got), len(want))
		}
	}
}

// TestTopPLargeVocab checks the candidate prefilter of the full-vocabulary
// top_p path: every draw lies in the nucleus computed the naive way.
func TestTopPLargeVocab(t *testing.T) {
	r := rand.New(rand.NewPCG(15, 16))
	s := newSampler(t, Params{Temperature: 0.8, TopP: 0.9, Seed: 1})
	for iter := range 12 {
		row := randRow(r, 10000, float64(1+iter%4))
		w := make([]float32, len(row))
		m := slices.Max(row)
		var z float64
		for i, v := range row {
			w[i] = float32(math.Exp(float64(v-m) / 0.8))
			z += float64(w[i])
		}
		in := map[int32]bool{}
		for _, id := range naiveNucleus(w, (0.9+1e-6)*z) {
			in[id] = true
		}
		for range 20 {
			if id := sampleCopy(s, row, Context{}); !in[id] {
				t.Fatalf("iter %d: id %d outside the nucleus of %d ids", iter, id, len(in))
			}
		}
	}
}

func TestExpNeg(t *testing.T) {
	for x := -707.0; x <= 0; x += 0.0013 {
		if e := math.Exp(x); math.Abs(expNeg(x)-e) > 1e-10*e {
			t.Fatalf("expNeg(%v) = %v, want %v", x, expNeg(x), e)
		}
	}
	if expNeg(0) != 1 {
		t.Fatal("expNeg(0) != 1")
	}
}

func TestNoAllocs(t *testing.T) {
	r := rand.New(rand.NewPCG(11, 12))
	row := randRow(r, 5000, 3)
	buf := make([]float32, len(row))
	ctx := Context{Prompt: []int32{1, 2, 3}, Output: []int32{4, 5, 4}, Suppress: []int32{6}}
	for _, p := range []Params{
		{Temperature: 0.8, TopP: 0.9},
		{Temperature: 0.8, TopK: 50, MinP: 0.05},
		{Temperature: 0.8, RepetitionPenalty: 1.1, FrequencyPenalty: 0.5},
	} {
		s := newSampler(t, p)
		copy(buf, row)
		s.Sample(buf, ctx) // warm the scratch buffers
		allocs := testing.AllocsPerRun(20, func() {
			copy(buf, row)
			s.Sample(buf, ctx)
		})
		if allocs != 0 {
			t.Errorf("%+v: %v allocs per Sample", p, allocs)
		}
	}
}

const benchVocab = 151936

// benchRow resembles LM logits: a Gaussian bulk (sigma 2) plus, unless flat,
// a few strong tokens carrying most of the mass.
func benchRow(flat bool) []float32 {
	r := rand.New(rand.NewPCG(13, 14))
	row := randRow(r, benchVocab, 2)
	if !flat {
		for i := range 20 {
			row[r.IntN(benchVocab)] = 20 - float32(i)*0.5
		}
	}
	return row
}

func BenchmarkSample(b *testing.B) {
	peaked, flat := benchRow(false), benchRow(true)
	buf := make([]float32, benchVocab)
	ctx := Context{Prompt: make([]int32, 2000), Output: make([]int32, 200)}
	for i := range ctx.Prompt {
		ctx.Prompt[i] = int32(i * 37 % benchVocab)
	}
	for i := range ctx.Output {
		ctx.Output[i] = int32(i * 101 % benchVocab)
	}
	for _, bc := range []struct {
		name string
		p    Params
		row  []float32
		ctx  Context
	}{
		{"copy_only", Params{}, peaked, Context{}}, // the row copy included in every case
		{"greedy", Params{}, peaked, Context{}},
		{"t0.8_top_p0.9", Params{Temperature: 0.8, TopP: 0.9}, peaked, Context{}},
		{"t0.8_top_p0.9_flat", Params{Temperature: 0.8, TopP: 0.9}, flat, Context{}},
		{"t0.8_top_p0.9_penalties", Params{Temperature: 0.8, TopP: 0.9, RepetitionPenalty: 1.1, FrequencyPenalty: 0.2}, peaked, ctx},
		{"t1", Params{Temperature: 1}, peaked, Context{}},
		{"t0.8_top_k50_top_p0.9", Params{Temperature: 0.8, TopK: 50, TopP: 0.9}, peaked, Context{}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			s := newSampler(b, bc.p)
			for b.Loop() {
				copy(buf, bc.row)
				if bc.name != "copy_only" {
					s.Sample(buf, bc.ctx)
				}
			}
		})
	}
}

func BenchmarkTopN(b *testing.B) {
	row := benchRow(false)
	lse := LogSumExp(row)
	for _, n := range []int{5, 20} {
		b.Run(map[int]string{5: "n5", 20: "n20"}[n], func(b *testing.B) {
			for b.Loop() {
				TopN(row, n, lse)
			}
		})
	}
	b.Run("LogSumExp", func(b *testing.B) {
		for b.Loop() {
			LogSumExp(row)
		}
	})
}

// TestSkipResumes checks that a Sampler moved on by Skip(k) draws what one
// that sampled k rows first draws next: a resumed request's randomness
// depends on its seed and position only.
func TestSkipResumes(t *testing.T) {
	r := rand.New(rand.NewPCG(21, 22))
	rows := make([][]float32, 40)
	for i := range rows {
		rows[i] = randRow(r, 500, 2)
	}
	p := Params{Temperature: 0.9, TopP: 0.95, TopK: 50, Seed: 7, HasSeed: true}
	whole := newSampler(t, p)
	var want []int32
	for _, row := range rows {
		want = append(want, sampleCopy(whole, row, Context{}))
	}
	for _, k := range []int{0, 1, 17, 39} {
		s := newSampler(t, p)
		s.Skip(k)
		for i := k; i < len(rows); i++ {
			if got := sampleCopy(s, rows[i], Context{}); got != want[i] {
				t.Fatalf("skip %d: draw %d gave %d, want %d", k, i, got, want[i])
			}
		}
	}
}
