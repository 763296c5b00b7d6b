package sampling

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
)

// Context is what the penalties and masks look at. Ids outside [0, len(logits))
// are ignored.
type Context struct {
	Prompt   []int32 // prompt ids (the repetition penalty covers Prompt+Output, like vLLM/HF)
	Output   []int32 // ids generated so far (presence/frequency count these only)
	Suppress []int32 // ids that must not be chosen now (e.g. EOS before min_tokens); set to -Inf
}

// Sampler samples the tokens of one request. It holds the request's RNG and
// scratch buffers reused from call to call, so steady-state calls do not
// allocate: with penalties, 8 bytes per vocabulary id; with top_p and no
// top_k, a 32 KiB histogram; plus candidate lists. A Sampler is not safe for
// concurrent use.
type Sampler struct {
	p     Params
	seed  uint64
	draws uint64 // non-greedy calls so far: the position of the next draw

	// Penalty bookkeeping, vocabulary-sized, allocated only when penalized:
	// stamp[id] == gen marks id as seen in this call, count[id] is then its
	// number of occurrences in Output.
	stamp   []uint32
	count   []int32
	gen     uint32
	touched []int32

	saved []savedLogit // original values of the logits changed in steps 1-3
	cand  []int32      // candidate ids (top-k heap, top-p boundary bin)
	wbuf  []float64    // top-k weights
	hist  *histogram   // top-p weight histogram
}

type savedLogit struct {
	id int32
	v  float32
}

// seedStream is SplitMix64's increment γ (2^64 / the golden ratio).
const seedStream = 0x9e3779b97f4a7c15

// New returns a Sampler for p, which should already be normalized and
// validated (New normalizes its own copy again; invalid values give
// unspecified, but in-range, ids). Without HasSeed a random seed is drawn;
// Seed reports it.
func New(p Params) *Sampler {
	p.Normalize()
	seed := p.Seed
	if !p.HasSeed {
		seed = rand.Uint64()
	}
	return &Sampler{
		p:    p,
		seed: seed,
	}
}

// Skip moves the Sampler n draws on, as if it had sampled n tokens: a
// request resumed after n generated tokens (elsewhere, or by another
// coordinator) draws what an undisturbed run would.
func (s *Sampler) Skip(n int) {
	if n > 0 {
		s.draws += uint64(n)
	}
}

// uniform is the k-th draw of a seed, in [0, 1): SplitMix64's output for
// counter k (a bijective mix of seed + (k+1)·γ), so the state of a
// request's randomness is its seed and its position alone.
func uniform(seed, k uint64) float64 {
	z := seed + (k+1)*seedStream
	z = (z ^ z>>30) * 0xbf58476d1ce4e5b9
	z = (z ^ z>>27) * 0x94d049bb133111eb
	z ^= z >> 31
	return float64(z>>11) / (1 << 53)
}

// Seed returns the seed of the Sampler's RNG (the drawn one without HasSeed).
func (s *Sampler) Seed() uint64 { return s.seed }

const (
	// expCutoff: weights exp(d) below exp(expCutoff) ≈ 1.3e-14 times the
	// largest are taken as 0. Together they weigh under V*1.3e-14 (2e-9 of
	// the mass for V = 151936), far below float32 resolution, and skipping
	// their exponentials makes low temperatures cheap.
	expCutoff = -32.0
	// nucleusSortCutoff: below this many undecided candidates the top-p
	// boundary is found by sorting them.
	nucleusSortCutoff = 64
)

// Sample picks the next id from one row of logits (len = vocabulary size),
// following the order described in the package documentation.
//
// Sample modifies logits in place: on return the row holds intermediate
// values (penalized logits or unnormalized probabilities) and must not be
// used for anything else, e.g. compute logprobs before calling Sample. An
// empty row gives -1.
func (s *Sampler) Sample(logits []float32, ctx Context) int32 {
	greedy := s.p.Greedy()
	var u float64
	if !greedy {
		u = uniform(s.seed, s.draws) // always exactly one draw per non-greedy call
		s.draws++
	}
	n := len(logits)
	if n == 0 {
		return -1
	}
	s.saved = s.saved[:0]
	negInf := float32(math.Inf(-1))
	for _, id := range ctx.Suppress {
		if uint(id) < uint(n) {
			s.saved = append(s.saved, savedLogit{id, logits[id]})
			logits[id] = negInf
		}
	}
	if s.p.Penalized() {
		s.applyPenalties(logits, ctx)
	}
	if greedy {
		if i := argmax(logits); i >= 0 {
			return int32(i)
		}
		return s.fallback()
	}
	if k := s.p.TopK; k > 0 && k < n {
		return s.sampleTopK(logits, k, u)
	}
	return s.sampleFull(logits, u)
}

// argmax returns the first index of the largest value, ignoring NaN, or -1
// when every value is -Inf or NaN.
func argmax(row []float32) int {
	best := -1
	bv := float32(math.Inf(-1))
	for i, v := range row {
		if v > bv {
			bv, best = v, i
		}
	}
	return best
}

// fallback is the answer when every processed logit is -Inf or NaN: the
// argmax of the row as passed in. Only the saved ids can differ from the
// processed row, whose values are all -Inf/NaN.
func (s *Sampler) fallback() int32 {
	best := int32(-1)
	bv := float32(math.Inf(-1))
	for _, e := range s.saved {
		if e.v > bv || (e.v == bv && best >= 0 && e.id < best) {
			best, bv = e.id, e.v
		}
	}
	if best < 0 {
		return 0
	}
	return best
}

func (s *Sampler) applyPenalties(logits []float32, ctx Context) {
	n := len(logits)
	if len(s.stamp) != n {
		s.stamp = make([]uint32, n)
		s.count = make([]int32, n)
		s.gen = 0
	}
	s.gen++
	if s.gen == 0 { // wrapped: old stamps could collide
		clear(s.stamp)
		s.gen = 1
	}
	gen, stamp, count := s.gen, s.stamp, s.count
	touched := s.touched[:0]
	for _, id := range ctx.Output {
		if uint(id) >= uint(n) {
			continue
		}
		if stamp[id] != gen {
			stamp[id] = gen
			count[id] = 0
			touched = append(touched, id)
		}
		count[id]++
	}
	rep := s.p.repetitionActive()
	if rep {
		for _, id := range ctx.Prompt {
			if uint(id) < uint(n) && stamp[id] != gen {
				stamp[id] = gen
				count[id] = 0
				touched = append(touched, id)
			}
		}
	}
	rp, pres, freq := s.p.RepetitionPenalty, s.p.PresencePenalty, s.p.FrequencyPenalty
	for _, id := range touched {
		v := logits[id]
		s.saved = append(s.saved, savedLogit{id, v})
		if rep {
			if v > 0 {
				v /= rp
			} else {
				v *= rp
			}
		}
		if c := count[id]; c > 0 {
			v -= pres + freq*float32(c)
		}
		logits[id] = v
	}
	s.touched = touched
}

// sampleTopK handles 0 < k < len(logits): only the k best logits get a
// weight, so only k exponentials are computed.
func (s *Sampler) sampleTopK(logits []float32, k int, u float64) int32 {
	ids := selectTop(logits, k, s.cand[:0])
	s.cand = ids
	m := float64(rankKey(logits[ids[0]]))
	if math.IsInf(m, -1) {
		return s.fallback()
	}
	invT := 1 / float64(s.p.Temperature)
	w := s.wbuf[:0]
	for _, id := range ids {
		l := float64(logits[id])
		var x float64
		if math.IsInf(m, 1) {
			if math.IsInf(l, 1) {
				x = 1
			}
		} else if d := (l - m) * invT; d > expCutoff {
			x = expNeg(d)
		}
		w = append(w, x)
	}
	s.wbuf = w
	if s.p.topPActive() {
		// ids are sorted by decreasing probability: keep the shortest prefix
		// reaching top_p of the (top-k renormalized) mass.
		var z float64
		for _, x := range w {
			z += x
		}
		target := float64(s.p.TopP) * z
		var cum float64
		for j, x := range w {
			cum += x
			if cum >= target {
				w, ids = w[:j+1], ids[:j+1]
				break
			}
		}
	}
	if minP := float64(s.p.MinP); minP > 0 {
		// The largest weight is w[0] == 1 (exp(0)).
		thr := minP * w[0]
		j := 0
		for i, x := range w {
			if x >= thr {
				w[j], ids[j] = x, ids[i]
				j++
			}
		}
		w, ids = w[:j], ids[:j]
	}
	var z float64
	for _, x := range w {
		z += x
	}
	t := u * z
	var cum float64
	last := -1
	for j, x := range w {
		if x > 0 {
			cum += x
			last = j
			if cum > t {
				return ids[j]
			}
		}
	}
	if last < 0 {
		return s.cand[0]
	}
	return ids[last]
}

// sampleFull handles the no-top-k case; it turns logits into unnormalized
// probabilities in place (the largest is exactly 1).
func (s *Sampler) sampleFull(w []float32, u float64) int32 {
	mi := argmax(w)
	if mi < 0 {
		return s.fallback()
	}
	m := float64(w[mi])
	if math.IsInf(m, 1) {
		// Only the +Inf logits keep a probability, shared equally.
		for i, v := range w {
			if math.IsInf(float64(v), 1) {
				w[i] = 0
			} else {
				w[i] = float32(math.Inf(-1))
			}
		}
		m = 0
	}
	invT := 1 / float64(s.p.Temperature)
	minP := s.p.MinP
	var z float64
	if !s.p.topPActive() {
		for i, v := range w {
			var x float32
			if d := (float64(v) - m) * invT; d > expCutoff {
				x = float32(expNeg(d))
				if x < minP {
					x = 0
				}
			}
			w[i] = x
			z += float64(x)
		}
		if id := pickIndexOrder(w, u*z); id >= 0 {
			return id
		}
		return int32(mi)
	}

	// top_p. The weights' mass is binned by the top bits of the float32
	// (exponent + 4 mantissa bits: the bins are ordered and each spans a
	// factor 2^(1/16)). Walking the bins down from the top finds the bin
	// holding the nucleus boundary: the ids of higher bins are all kept, and
	// only the boundary bin's ids go through nucleus.
	for i, v := range w {
		var x float32
		if d := (float64(v) - m) * invT; d > expCutoff {
			x = float32(expNeg(d))
		}
		w[i] = x
	}
	if s.hist == nil {
		s.hist = new(histogram)
	}
	hist := s.hist.fill(w)
	for _, h := range hist {
		z += h
	}
	target := float64(s.p.TopP) * z
	bin, above := -1, 0.0 // the boundary bin, the mass of the bins above it
	for b := histBins - 1; b >= 0; b-- {
		h := hist[b]
		if h == 0 {
			continue
		}
		if bin >= 0 {
			above += hist[bin]
		}
		bin = b
		if above+h >= target {
			break
		}
	}
	// The argmax weighs 1, so bin >= 0 unless the parameters are invalid
	// (e.g. a NaN temperature). If rounding kept the walk from reaching
	// target, bin is the lowest non-empty one and everything is kept.
	if bin < 0 {
		return int32(mi)
	}
	cand := s.cand[:0]
	lo, span := binBits(bin)
	for i, x := range w {
		if math.Float32bits(x)-lo < span {
			cand = append(cand, int32(i))
		}
	}
	s.cand = cand
	kept := nucleus(w, cand, target-above)
	if len(kept) == 0 { // only with invalid parameters
		return int32(mi)
	}
	// The nucleus is every id ranking at or above its last member (wc, idc):
	// weight > wc, or weight == wc and id <= idc.
	wc, idc := w[kept[0]], kept[0]
	var keptMass float64
	for _, id := range kept {
		x := w[id]
		keptMass += float64(x)
		if x < wc || (x == wc && id > idc) {
			wc, idc = x, id
		}
	}
	if minP > wc {
		// min_p is the stricter cut: keep weight >= minP (<= 1, so the
		// argmax stays), drawing in index order.
		var mass float64
		for _, x := range w {
			if x >= minP {
				mass += float64(x)
			}
		}
		t := u * mass
		var cum float64
		last := int32(mi)
		for i, x := range w {
			if x >= minP {
				cum += float64(x)
				last = int32(i)
				if cum > t {
					break
				}
			}
		}
		return last
	}
	// Draw: pick the bin by its mass, then the id within it in index order,
	// the order its mass was summed in; the boundary bin's kept part comes
	// last.
	t := u * (above + keptMass)
	for b := histBins - 1; b > bin; b-- {
		h := hist[b]
		if h == 0 {
			continue
		}
		if t >= h {
			t -= h
			continue
		}
		lo, span := binBits(b)
		var cum float64
		last := int32(mi)
		for i, x := range w {
			if math.Float32bits(x)-lo < span {
				cum += float64(x)
				last = int32(i)
				if cum > t {
					break
				}
			}
		}
		return last
	}
	if id := pickList(w, kept, t/keptMass); id >= 0 {
		return id
	}
	return int32(mi)
}

// The top-p histogram: bin b holds the weights whose float32 bits, shifted
// right by histShift, equal histBase+b (sign 0, 8 exponent bits, 4 mantissa
// bits). Non-zero weights lie in [exp(expCutoff), 1], i.e. bins 11..752;
// zero weights land in some bin (index arithmetic wraps) but add nothing.
const (
	histShift = 19
	histBase  = 80 << 4 // exponent 80, 2^-47 < exp(expCutoff)
	histBins  = 1024
)

// histogram has four interleaved sub-histograms: consecutive weights update
// different memory, which keeps the adds from waiting on each other.
type histogram [4][histBins]float64

func binOf(x float32) uint32 {
	return (math.Float32bits(x)>>histShift - histBase) & (histBins - 1)
}

// fill bins the mass of w and returns the merged histogram (h[0]).
func (h *histogram) fill(w []float32) *[histBins]float64 {
	clear(h[:])
	n := len(w) &^ 3
	for i := 0; i < n; i += 4 {
		x0, x1, x2, x3 := w[i], w[i+1], w[i+2], w[i+3]
		h[0][binOf(x0)] += float64(x0)
		h[1][binOf(x1)] += float64(x1)
		h[2][binOf(x2)] += float64(x2)
		h[3][binOf(x3)] += float64(x3)
	}
	for _, x := range w[n:] {
		h[0][binOf(x)] += float64(x)
	}
	for b := range h[0] {
		h[0][b] += h[1][b] + h[2][b] + h[3][b]
	}
	return &h[0]
}

// binBits describes bin b as bit patterns: a weight x is in it iff
// Float32bits(x)-lo < span (unsigned, so a single well-predicted compare).
func binBits(b int) (lo, span uint32) {
	return uint32(histBase+b) << histShift, 1 << histShift
}

// pickList draws from ids with probabilities proportional to w[id], u in
// [0, 1); -1 if all weigh 0.
func pickList(w []float32, ids []int32, u float64) int32 {
	var z float64
	for _, id := range ids {
		z += float64(w[id])
	}
	t := u * z
	var cum float64
	last := int32(-1)
	for _, id := range ids {
		if x := w[id]; x > 0 {
			cum += float64(x)
			last = id
			if cum > t {
				return id
			}
		}
	}
	return last
}

// nucleus reorders cand and returns its prefix holding the top-p set: the
// fewest highest-weight ids (ties: lower id first) whose weights sum to at
// least target. cand must hold every id that can belong to it. It is a
// quickselect on cumulative weight: expected O(len(cand)), and only the last
// few undecided ids are sorted.
func nucleus(w []float32, cand []int32, target float64) []int32 {
	a, b := 0, len(cand) // cand[:a] is surely kept, cand[a:b] undecided, the rest dropped
	var kept float64     // weight of cand[:a], always < target
loop:
	for iter := 0; b-a > nucleusSortCutoff && iter < 64; iter++ {
		pv := median3(w[cand[a]], w[cand[a+(b-a)/2]], w[cand[b-1]])
		// Three-way partition of cand[a:b]: [a,lt) > pv, [lt,gt) == pv, [gt,b) < pv.
		lt, i, gt := a, a, b
		var sHi, sEq float64
		for i < gt {
			id := cand[i]
			switch x := w[id]; {
			case x > pv:
				cand[i], cand[lt] = cand[lt], id
				sHi += float64(x)
				lt++
				i++
			case x < pv:
				gt--
				cand[i], cand[gt] = cand[gt], id
			default:
				sEq += float64(x)
				i++
			}
		}
		switch {
		case kept+sHi >= target: // boundary above pv
			b = lt
		case kept+sHi+sEq >= target: // boundary among the ties at pv
			kept += sHi
			a, b = lt, gt
			break loop // all tied: the sort below orders them by id
		default: // everything >= pv is kept
			kept += sHi + sEq
			a = gt
		}
	}
	if a >= b {
		return cand[:a]
	}
	region := cand[a:b]
	slices.SortFunc(region, func(x, y int32) int {
		if wx, wy := w[x], w[y]; wx != wy {
			if wx > wy {
				return -1
			}
			return 1
		}
		return cmp.Compare(x, y)
	})
	for j, id := range region {
		kept += float64(w[id])
		if kept >= target {
			return cand[:a+j+1]
		}
	}
	return cand[:b]
}

func median3(x, y, z float32) float32 {
	if x > y {
		x, y = y, x
	}
	if y > z {
		y = z
	}
	if x > y {
		return x
	}
	return y
}

// pickIndexOrder returns the first index whose running weight sum exceeds t
// (the last positive weight if rounding leaves none), -1 if all are 0.
func pickIndexOrder(w []float32, t float64) int32 {
	var cum float64
	last := int32(-1)
	for i, x := range w {
		if x > 0 {
			cum += float64(x)
			last = int32(i)
			if cum > t {
				return last
			}
		}
	}
	return last
}

// exp2Frac[j] = 2^(j/64).
var exp2Frac = func() (t [64]float64) {
	for j := range t {
		t[j] = math.Exp2(float64(j) / 64)
	}
	return t
}()

const (
	log2eX64 = 64 * math.Log2E
	ln2Div64 = math.Ln2 / 64
	roundMag = 6755399441055744.0 // 1.5 * 2^52: adding it rounds to an integer
)

// expNeg is exp(x) for -708 < x <= 0 with relative error below 1e-10 (ample
// for float32 weights), about 2.5x as fast as math.Exp: x = k*ln2/64 + r with
// |r| <= ln2/128, exp(x) = 2^(k>>6) * 2^((k&63)/64) * poly(r). It is plain
// float64 arithmetic, hence deterministic.
func expNeg(x float64) float64 {
	kf := (float64(x*log2eX64) + roundMag) - roundMag
	r := x - kf*ln2Div64
	k := int64(kf)
	p := 1 + r*(1+r*(1.0/2+r*(1.0/6)))
	return p * exp2Frac[k&63] * math.Float64frombits(uint64((k>>6)+1023)<<52)
}
