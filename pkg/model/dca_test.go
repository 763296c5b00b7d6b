package model_test

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"math/rand/v2"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// This file checks Dual Chunk Attention (qwen2.md section 2.8) against a
// direct float64 implementation of the document's equations (dcaAttend):
// the kernels on their own (TestDCAAttentionReference), the whole model
// (TestDCAModelReference), chunked prefill (TestDCAChunkedPrefill) and the
// bits of a sequence that never leaves its first chunk
// (TestDCAFirstChunkIsPlain).

// dcaTol bounds the relative error against the float64 reference.
const dcaTol = 1e-4

// dcaSpec is a DCA configuration for the reference: chunk_size C,
// local_size Lc, original_max_position_embeddings orig (0: no temperature).
type dcaSpec struct{ C, Lc, orig int }

// rotate returns x (one head of d values) rotated at RoPE position pos as
// qwen2.md 2.3 defines it: angle = pos·inv_freq[j] in float32, then
// cos/sin (times the rope scale) and the rotate-half pairing in float64.
func rotate(x []float64, pos int, invFreq []float32, ropeScale float64) []float64 {
	half := len(x) / 2
	out := make([]float64, len(x))
	for j := 0; j < half; j++ {
		a := float64(float32(pos) * invFreq[j])
		c, s := math.Cos(a)*ropeScale, math.Sin(a)*ropeScale
		out[j] = x[j]*c - x[j+half]*s
		out[j+half] = x[j+half]*c + x[j]*s
	}
	return out
}

// dcaAttend is Dual Chunk Attention over positions 0..n-1 of one sequence,
// computed from qwen2.md 2.8 as written, in float64: q [n, H·D], k, v
// [n, KVH·D] are the projections before RoPE. With c = C − Lc, keys are
// rotated at p mod c; the query at p (chunk i = ⌊p/c⌋) is rotated at
// p mod c (intra), min(p mod c + c, C) (succ) and min(2c − 1, C) (inter);
// three partial softmax attentions are taken with their log-sum-exps ℓ:
// intra over chunk i up to p, succ over all of chunk i−1, inter over chunks
// 0..i−2; they are merged with w = exp(ℓ − max ℓ)/Σ exp(ℓ − max ℓ). Scores
// are (q·k)·scale·τ with τ = max(1, 0.1·ln((p+1)/orig) + 1) when orig > 0
// (this repository's rule: the query's own length p+1). It returns the
// output [n, H·D] and, per element, the attention-weighted mean of |v|
// (the scale an error of the weighted sum is measured against).
func dcaAttend(q, k, v []float64, n, H, KVH, D int, invFreq []float32, ropeScale, scale float64, sp dcaSpec) (out, mag []float64) {
	c := sp.C - sp.Lc
	kd := KVH * D
	rk := make([]float64, n*kd) // keys rotated at p mod c
	for p := 0; p < n; p++ {
		for g := 0; g < KVH; g++ {
			copy(rk[p*kd+g*D:], rotate(k[p*kd+g*D:p*kd+(g+1)*D], p%c, invFreq, ropeScale))
		}
	}
	out, mag = make([]float64, n*H*D), make([]float64, n*H*D)
	type part struct {
		lo, hi, pos int // keys [lo, hi), query RoPE position
	}
	for p := 0; p < n; p++ {
		i := p / c
		parts := []part{{i * c, p + 1, p % c}}
		if i >= 1 {
			parts = append(parts, part{(i - 1) * c, i * c, min(p%c+c, sp.C)})
		}
		if i >= 2 {
			parts = append(parts, part{0, (i - 1) * c, min(2*c-1, sp.C)})
		}
		tau := 1.0
		if sp.orig > 0 {
			tau = math.Max(1, 0.1*math.Log(float64(p+1)/float64(sp.orig))+1)
		}
		for h := 0; h < H; h++ {
			g := h / (H / KVH)
			lse := make([]float64, len(parts))
			o := make([][]float64, len(parts))
			a := make([][]float64, len(parts))
			for pi, pt := range parts {
				qr := rotate(q[p*H*D+h*D:p*H*D+(h+1)*D], pt.pos, invFreq, ropeScale)
				s := make([]float64, pt.hi-pt.lo)
				m := math.Inf(-1)
				for j := pt.lo; j < pt.hi; j++ {
					var d float64
					for e := 0; e < D; e++ {
						d += qr[e] * rk[j*kd+g*D+e]
					}
					s[j-pt.lo] = d * scale * tau
					m = math.Max(m, s[j-pt.lo])
				}
				var sum float64
				for j := range s {
					s[j] = math.Exp(s[j] - m)
					sum += s[j]
				}
				lse[pi] = m + math.Log(sum)
				o[pi], a[pi] = make([]float64, D), make([]float64, D)
				for j := pt.lo; j < pt.hi; j++ {
					w := s[j-pt.lo] / sum
					for e := 0; e < D; e++ {
						o[pi][e] += w * v[j*kd+g*D+e]
						a[pi][e] += w * math.Abs(v[j*kd+g*D+e])
					}
				}
			}
			ml := math.Inf(-1)
			for _, l := range lse {
				ml = math.Max(ml, l)
			}
			var z float64
			for _, l := range lse {
				z += math.Exp(l - ml)
			}
			for pi, l := range lse {
				w := math.Exp(l-ml) / z
				for e := 0; e < D; e++ {
					out[p*H*D+h*D+e] += w * o[pi][e]
					mag[p*H*D+h*D+e] += w * a[pi][e]
				}
			}
		}
	}
	return out, mag
}

func normals(rng *rand.Rand, n int) ([]float32, []float64) {
	f, d := make([]float32, n), make([]float64, n)
	for i := range f {
		f[i] = float32(rng.NormFloat64())
		d[i] = float64(f[i])
	}
	return f, d
}

// dcaKernels runs DCA through the backend ops as the model does: for each
// prefill chunk (sizes chunks), keys rotated at p mod c by RoPE and written
// into a paged cache with shuffled blocks, queries rotated three ways by
// RoPEMulti at d.Positions, then Attention with DCAChunk and DCAOrigLen.
// With dca nil it is plain attention (RoPE at p). It returns [n, H·D].
func dcaKernels(b kernels.Backend, q, k, v []float32, n, H, KVH, D, bs int, r *kernels.Rope, scale float32, d *model.DualChunkAttention, chunks []int, rng *rand.Rand) []float32 {
	kd := KVH * D
	nb := (n + bs - 1) / bs
	blocks := make([]int32, nb)
	for i, p := range rng.Perm(nb + 2)[:nb] {
		blocks[i] = int32(p)
	}
	kc, vc := b.Zeros((nb+2)*bs, kd), b.Zeros((nb+2)*bs, kd)
	defer b.Free(kc)
	defer b.Free(vc)
	out := make([]float32, 0, n*H*D)
	s := 0
	for _, m := range chunks {
		e := s + m
		var kpos, qpos, slots []int32
		for p := s; p < e; p++ {
			slots = append(slots, blocks[p/bs]*int32(bs)+int32(p%bs))
			if d == nil {
				kpos = append(kpos, int32(p))
				continue
			}
			kp, succ, inter := d.Positions(p)
			kpos = append(kpos, int32(kp))
			qpos = append(qpos, int32(kp), int32(succ), int32(inter))
		}
		kt := b.FromFloat32([]int{m, kd}, k[s*kd:e*kd])
		b.RoPE(kt, D, kpos, r)
		b.WriteKV(kc, kt, slots)
		vt := b.FromFloat32([]int{m, kd}, v[s*kd:e*kd])
		b.WriteKV(vc, vt, slots)
		b.Free(kt)
		b.Free(vt)
		qt := b.FromFloat32([]int{m, H * D}, q[s*H*D:e*H*D])
		ab := &kernels.AttnBatch{Heads: H, KVHeads: KVH, HeadDim: D, BlockSize: bs, Scale: scale,
			Seqs: []kernels.AttnSeq{{Row: 0, N: m, Start: s, Blocks: blocks}}}
		if d == nil {
			b.RoPE(qt, D, kpos, r)
		} else {
			q3 := b.RoPEMulti(qt, D, qpos, r)
			b.Free(qt)
			qt = q3
			ab.DCAChunk, ab.DCAOrigLen = d.ChunkLen(), d.OriginalMaxPositionEmbeddings
		}
		o := b.Attention(qt, kc, vc, ab)
		out = append(out, b.ToFloat32(o)...)
		b.Free(qt)
		b.Free(o)
		s = e
	}
	if s != n {
		panic(fmt.Sprintf("chunks cover %d of %d positions", s, n))
	}
	return out
}

// relErr is the largest |got − want| relative to mag (per element).
func relErr(got []float32, want, mag []float64) float64 {
	worst := 0.0
	for i := range want {
		e := math.Abs(float64(got[i])-want[i]) / mag[i]
		if math.IsNaN(e) {
			return math.Inf(1)
		}
		worst = math.Max(worst, e)
	}
	return worst
}

func invariantBackend(t testing.TB) *cpu.Backend {
	t.Helper()
	b, err := cpu.New(cpu.Config{Threads: 2, BatchInvariant: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// TestDCAAttentionReference: the CPU backend's DCA (RoPE for the keys,
// RoPEMulti for the queries, Attention) against dcaAttend on three long
// random sequences spanning many chunks, each run in several prefill
// chunks: within dcaTol of the reference, the error of each output
// element taken relative to the attention-weighted mean |v| it averages.
// Plain attention over the same data is far from the reference (the test
// sees DCA).
func TestDCAAttentionReference(t *testing.T) {
	cases := []struct {
		n, H, KVH, D, bs int
		sp               dcaSpec
		chunks           []int
		invariant        bool
	}{
		// c = 64, 11 chunks, the last of 60; C > 2Lc: inter at C = 96.
		{700, 4, 2, 32, 16, dcaSpec{96, 32, 0}, []int{512, 188}, true},
		// c = 80, 13 chunks, the last of 40; inter at 2c−1 = 159; τ past 300.
		{1000, 6, 2, 16, 7, dcaSpec{200, 120, 300}, []int{300, 1, 299, 400}, false},
		// c = 400, 6 chunks, the last of 100; succ clamped to C = 600 past
		// p mod c = 200; τ past 1000; a decode row at the end.
		{2100, 2, 1, 64, 16, dcaSpec{600, 200, 1000}, []int{512, 512, 512, 512, 51, 1}, false},
	}
	for ci, tc := range cases {
		t.Run(fmt.Sprintf("n%d_C%d_L%d_orig%d", tc.n, tc.sp.C, tc.sp.Lc, tc.sp.orig), func(t *testing.T) {
			var b kernels.Backend
			if tc.invariant {
				b = invariantBackend(t)
			} else {
				b = newBackend(t, 2)
			}
			rng := rand.New(rand.NewPCG(uint64(ci), 77))
			qf, qd := normals(rng, tc.n*tc.H*tc.D)
			kf, kd := normals(rng, tc.n*tc.KVH*tc.D)
			vf, vd := normals(rng, tc.n*tc.KVH*tc.D)
			r := &kernels.Rope{InvFreq: make([]float32, tc.D/2), Scale: 1}
			for j := range r.InvFreq {
				r.InvFreq[j] = float32(math.Pow(1e6, -2*float64(j)/float64(tc.D)))
			}
			scale := float32(1 / math.Sqrt(float64(tc.D)))
			want, mag := dcaAttend(qd, kd, vd, tc.n, tc.H, tc.KVH, tc.D, r.InvFreq, 1, float64(scale), tc.sp)
			d := &model.DualChunkAttention{ChunkSize: tc.sp.C, LocalSize: tc.sp.Lc, OriginalMaxPositionEmbeddings: tc.sp.orig}
			got := dcaKernels(b, qf, kf, vf, tc.n, tc.H, tc.KVH, tc.D, tc.bs, r, scale, d, tc.chunks, rng)
			e := relErr(got, want, mag)
			plain := relErr(dcaKernels(b, qf, kf, vf, tc.n, tc.H, tc.KVH, tc.D, tc.bs, r, scale, nil, []int{tc.n}, rng), want, mag)
			t.Logf("%s: max relative error %.3g (tolerance %g); plain attention %.3g", b.Name(), e, dcaTol, plain)
			if e > dcaTol {
				t.Errorf("DCA differs from the reference by %.3g relative", e)
			}
			if plain < 100*dcaTol {
				t.Errorf("plain attention is within %.3g of the DCA reference: the case does not tell them apart", plain)
			}
		})
	}
}

// TestDCAFirstChunkIsPlain: while every position lies in the first chunk
// (p < c), DCA is plain attention bit for bit on the batch-invariant CPU
// backend: the kernels with queries and keys over several attention
// blocks, and a whole model (prefill and decode steps) beside the same
// weights without DCA.
func TestDCAFirstChunkIsPlain(t *testing.T) {
	b := invariantBackend(t)
	rng := rand.New(rand.NewPCG(5, 6))
	const n, H, KVH, D = 590, 4, 2, 16 // across three attention blocks of 256
	qf, _ := normals(rng, n*H*D)
	kf, _ := normals(rng, n*KVH*D)
	vf, _ := normals(rng, n*KVH*D)
	r := &kernels.Rope{InvFreq: make([]float32, D/2), Scale: 1.1}
	for j := range r.InvFreq {
		r.InvFreq[j] = float32(math.Pow(1e6, -2*float64(j)/float64(D)))
	}
	d := &model.DualChunkAttention{ChunkSize: 800, LocalSize: 200, OriginalMaxPositionEmbeddings: 600} // c = 600
	chunks := []int{300, 1, 289}
	got := dcaKernels(b, qf, kf, vf, n, H, KVH, D, 4, r, 0.25, d, chunks, rand.New(rand.NewPCG(1, 1)))
	want := dcaKernels(b, qf, kf, vf, n, H, KVH, D, 4, r, 0.25, nil, chunks, rand.New(rand.NewPCG(1, 1)))
	for i := range want {
		if math.Float32bits(got[i]) != math.Float32bits(want[i]) {
			t.Fatalf("kernels: element %d: DCA %v, plain %v", i, got[i], want[i])
		}
	}

	cfg := dcaModelConfig(dcaSpec{64, 16, 100}) // c = 48
	dm := newDCAModel(t, b, cfg)
	plainCfg := *cfg
	plainCfg.DualChunkAttention = nil
	pm := newDCAModel(t, b, &plainCfg)
	prompt := dcaPrompt(40)
	for _, steps := range [][]int{{40}, {17, 23}} {
		a := forwardChunks(t, dm, prompt, steps, 8)
		p := forwardChunks(t, pm, prompt, steps, 8)
		for i := range p {
			if math.Float32bits(a[i]) != math.Float32bits(p[i]) {
				t.Fatalf("model, steps %v: logit %d: DCA %v, plain %v", steps, i, a[i], p[i])
			}
		}
	}
}

// dcaModelConfig is a tiny dense model (2 layers, H 64, 4 heads / 2 KV
// heads of 16, vocabulary 300) with DCA sp, and weights spread enough
// (initializer_range 0.2) that attention is far from uniform.
func dcaModelConfig(sp dcaSpec) *model.Config {
	cfg := &model.Config{
		ModelType: "qwen2", HiddenSize: 64, IntermediateSize: 128, NumHiddenLayers: 2,
		NumAttentionHeads: 4, NumKeyValueHeads: 2, VocabSize: 300, MaxPositionEmbeddings: 4096,
		RopeTheta: 1e6, RMSNormEps: 1e-6, HiddenAct: "silu", TieWordEmbeddings: true, InitializerRange: 0.2,
	}
	return model.WithDCA(cfg, sp.C, sp.Lc, sp.orig)
}

func newDCAModel(t testing.TB, b kernels.Backend, cfg *model.Config) *model.Model {
	t.Helper()
	m, err := model.New(cfg, b, model.NewRandomWeights(cfg, kernels.F32, 11))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func dcaPrompt(n int) []int32 {
	p := make([]int32, n)
	for i := range p {
		p[i] = int32((i*7919 + i*i*31 + 13) % 300)
	}
	return p
}

// forwardChunks runs prompt through m in steps of the given sizes (one
// sequence, blocks of bs) and returns every position's logits.
func forwardChunks(t testing.TB, m *model.Model, prompt []int32, steps []int, bs int) []float32 {
	t.Helper()
	bm, st := m.NewCache(len(prompt), bs)
	var out []float32
	pos := 0
	for _, n := range steps {
		if err := bm.Reserve(1, pos+n); err != nil {
			t.Fatal(err)
		}
		o, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: prompt[pos : pos+n], Pos: pos, Blocks: bm.Table(1), AllLogits: true}}}, st)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, o.Logits[0]...)
		pos += n
	}
	if pos != len(prompt) {
		t.Fatalf("steps %v cover %d of %d tokens", steps, pos, len(prompt))
	}
	return out
}

// TestDCAChunkedPrefill: a DCA prompt of 1100 tokens (23 chunks of 48)
// run through Forward in one step and in chunks (the scheduler's 512, and
// uneven ones with a decode step) gives the same logits: bit for bit on
// the batch-invariant backend (as plain attention does), within 1e-4 of
// the largest logit on the default one.
func TestDCAChunkedPrefill(t *testing.T) {
	cfg := dcaModelConfig(dcaSpec{64, 16, 300})
	prompt := dcaPrompt(1100)
	for _, invariant := range []bool{true, false} {
		t.Run(map[bool]string{true: "invariant", false: "default"}[invariant], func(t *testing.T) {
			var b kernels.Backend = newBackend(t, 2)
			if invariant {
				b = invariantBackend(t)
			}
			m := newDCAModel(t, b, cfg)
			whole := forwardChunks(t, m, prompt, []int{1100}, 16)
			scale := 0.0
			for _, v := range whole {
				scale = math.Max(scale, math.Abs(float64(v)))
			}
			for _, steps := range [][]int{{512, 512, 76}, {1, 300, 250, 48, 1, 500}} {
				got := forwardChunks(t, m, prompt, steps, 16)
				if invariant {
					for i := range whole {
						if math.Float32bits(got[i]) != math.Float32bits(whole[i]) {
							t.Fatalf("steps %v: logit %d (position %d): %v, %v in one step", steps, i, i/cfg.VocabSize, got[i], whole[i])
						}
					}
					continue
				}
				if d := maxDiff(got, whole); d > 1e-4*math.Max(1, scale) {
					t.Errorf("steps %v: logits differ from one step by %.3g (largest logit %.3g)", steps, d, scale)
				}
			}
		})
	}
}

// TestDCAModelReference: a whole tiny DCA model on the CPU backend against
// the model computed in float64 from its weights (qwen2.md 2.1-2.6 with
// dcaAttend for attention), 600 positions over 13 chunks with the
// temperature past 200: logits within 1e-4 of the largest reference
// logit. The same weights without DCA are far from it.
func TestDCAModelReference(t *testing.T) {
	cfg := dcaModelConfig(dcaSpec{64, 16, 200})
	prompt := dcaPrompt(600)
	want := refForward(t, cfg, model.NewRandomWeights(cfg, kernels.F32, 11), prompt)
	scale := 0.0
	for _, v := range want {
		scale = math.Max(scale, math.Abs(v))
	}
	errOf := func(got []float32) float64 {
		d := 0.0
		for i, v := range want {
			d = math.Max(d, math.Abs(float64(got[i])-v))
		}
		return d / scale
	}
	b := newBackend(t, 2)
	got := forwardChunks(t, newDCAModel(t, b, cfg), prompt, []int{512, 88}, 16)
	plainCfg := *cfg
	plainCfg.DualChunkAttention = nil
	plain := forwardChunks(t, newDCAModel(t, b, &plainCfg), prompt, []int{600}, 16)
	e, pe := errOf(got), errOf(plain)
	t.Logf("max |Δlogit| / max |logit| = %.3g (tolerance %g; largest logit %.3g); plain attention %.3g", e, dcaTol, scale, pe)
	if e > dcaTol {
		t.Errorf("logits differ from the float64 reference by %.3g of the largest", e)
	}
	if pe < 100*dcaTol {
		t.Errorf("plain attention is within %.3g of the DCA reference: the case does not tell them apart", pe)
	}
}

// refForward is the dense Qwen2 forward pass (qwen2.md 2.1-2.6) in float64
// on the weights of src, with dcaAttend as attention; it returns every
// position's logits [n, V].
func refForward(t *testing.T, cfg *model.Config, src *model.RandomWeights, ids []int32) []float64 {
	t.Helper()
	w := func(name string) []float64 {
		raw, err := src.Read(name)
		if err != nil {
			t.Fatal(err)
		}
		out := make([]float64, len(raw)/4)
		for i := range out {
			out[i] = float64(math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:])))
		}
		return out
	}
	n, H, V := len(ids), cfg.HiddenSize, cfg.VocabSize
	nh, kvh, hd := cfg.NumAttentionHeads, cfg.NumKeyValueHeads, cfg.HeadDimension()
	// linear: x [n, in] · Wᵀ (W [out, in]) + bias
	linear := func(x, W, bias []float64, in, out int) []float64 {
		y := make([]float64, n*out)
		for t := 0; t < n; t++ {
			for o := 0; o < out; o++ {
				var s float64
				for i := 0; i < in; i++ {
					s += x[t*in+i] * W[o*in+i]
				}
				if bias != nil {
					s += bias[o]
				}
				y[t*out+o] = s
			}
		}
		return y
	}
	rms := func(x, g []float64) []float64 {
		y := make([]float64, len(x))
		for t := 0; t < n; t++ {
			var ss float64
			for i := 0; i < H; i++ {
				ss += x[t*H+i] * x[t*H+i]
			}
			r := 1 / math.Sqrt(ss/float64(H)+cfg.RMSNormEps)
			for i := 0; i < H; i++ {
				y[t*H+i] = g[i] * x[t*H+i] * r
			}
		}
		return y
	}
	embed := w(model.EmbedName)
	x := make([]float64, n*H)
	for t, id := range ids {
		copy(x[t*H:(t+1)*H], embed[int(id)*H:])
	}
	invFreq, ropeScale := cfg.Rope()
	d := cfg.DualChunkAttention
	for l := 0; l < cfg.NumHiddenLayers; l++ {
		L := func(s string) []float64 { return w(model.LayerName(l, s)) }
		a := rms(x, L("input_layernorm.weight"))
		q := linear(a, L("self_attn.q_proj.weight"), L("self_attn.q_proj.bias"), H, nh*hd)
		k := linear(a, L("self_attn.k_proj.weight"), L("self_attn.k_proj.bias"), H, kvh*hd)
		v := linear(a, L("self_attn.v_proj.weight"), L("self_attn.v_proj.bias"), H, kvh*hd)
		att, _ := dcaAttend(q, k, v, n, nh, kvh, hd, invFreq, float64(ropeScale), 1/math.Sqrt(float64(hd)),
			dcaSpec{d.ChunkSize, d.LocalSize, d.OriginalMaxPositionEmbeddings})
		o := linear(att, L("self_attn.o_proj.weight"), nil, nh*hd, H)
		for i := range x {
			x[i] += o[i]
		}
		m := rms(x, L("post_attention_layernorm.weight"))
		I := cfg.IntermediateSize
		gate := linear(m, L("mlp.gate_proj.weight"), nil, H, I)
		up := linear(m, L("mlp.up_proj.weight"), nil, H, I)
		for i, g := range gate {
			gate[i] = g / (1 + math.Exp(-g)) * up[i]
		}
		f := linear(gate, L("mlp.down_proj.weight"), nil, I, H)
		for i := range x {
			x[i] += f[i]
		}
	}
	h := rms(x, w(model.NormName))
	head := embed
	if !cfg.TieWordEmbeddings {
		head = w(model.LMHead)
	}
	return linear(h, head, nil, H, V)
}

// TestDCAConfig: dual_chunk_attention_config is parsed with vLLM's
// defaults, validated with errors naming the key, written back unchanged,
// and gives the positions of qwen2.md 2.8; the context limit is still
// MaxContext.
func TestDCAConfig(t *testing.T) {
	const base = `{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
		"num_attention_heads":4,"vocab_size":100,"max_position_embeddings":1010000%s}`
	parse := func(extra string) (*model.Config, error) {
		return model.ParseConfig([]byte(fmt.Sprintf(base, extra)))
	}
	for _, extra := range []string{"", `,"dual_chunk_attention_config":null`} {
		c, err := parse(extra)
		if err != nil || c.DualChunkAttention != nil {
			t.Fatalf("%q: DCA %+v, %v", extra, c.DualChunkAttention, err)
		}
	}
	c, err := parse(`,"dual_chunk_attention_config":{}`)
	if err != nil {
		t.Fatal(err)
	}
	if d := c.DualChunkAttention; d == nil || d.ChunkSize != 8192 || d.LocalSize != 1024 || d.OriginalMaxPositionEmbeddings != 0 {
		t.Fatalf("defaults: %+v", d)
	}
	// The Qwen2.5-1M object (qwen2.md 2.8) with sparse keys, which are ignored.
	c, err = parse(`,"dual_chunk_attention_config":{"chunk_size":262144,"local_size":8192,"original_max_position_embeddings":262144,
		"sparse_attention_config":null,"sparse_attention_enabled":true,"sparse_attention_threshold":32768}`)
	if err != nil {
		t.Fatal(err)
	}
	if d := c.DualChunkAttention; d.ChunkLen() != 253952 || d.OriginalMaxPositionEmbeddings != 262144 || c.MaxContext() != 1010000 {
		t.Fatalf("1M config: %+v, chunk %d, context %d", d, d.ChunkLen(), c.MaxContext())
	}
	out, err := model.ConfigJSON(c)
	if err != nil {
		t.Fatal(err)
	}
	c2, err := model.ParseConfig(out)
	if err != nil || *c2.DualChunkAttention != *c.DualChunkAttention {
		t.Fatalf("written back: %+v, %v\n%s", c2.DualChunkAttention, err, out)
	}
	for _, tc := range []struct{ key, obj string }{
		{"dual_chunk_attention_config.chunk_size", `{"chunk_size":1024,"local_size":1024}`},
		{"dual_chunk_attention_config.chunk_size", `{"chunk_size":100000000}`},
		{"dual_chunk_attention_config.chunk_size", `{"chunk_size":512}`}, // below the default local_size
		{"dual_chunk_attention_config.chunk_size", `{"chunk_size":"big"}`},
		{"dual_chunk_attention_config.local_size", `{"chunk_size":100,"local_size":0}`},
		{"dual_chunk_attention_config.local_size", `{"local_size":-5}`},
		{"dual_chunk_attention_config.original_max_position_embeddings", `{"original_max_position_embeddings":-1}`},
		{"dual_chunk_attention_config", `7`},
	} {
		_, err := parse(`,"dual_chunk_attention_config":` + tc.obj)
		if err == nil || !strings.Contains(err.Error(), `"`+tc.key+`"`) {
			t.Errorf("%s: err %v, want one naming %q", tc.obj, err, tc.key)
		}
	}
	// Positions: c = 5, C = 7 (C < 2c: inter at C, succ clamped).
	d := &model.DualChunkAttention{ChunkSize: 7, LocalSize: 2}
	for p, want := range map[int][3]int{0: {0, 5, 7}, 1: {1, 6, 7}, 4: {4, 7, 7}, 5: {0, 5, 7}, 12: {2, 7, 7}} {
		k, s, i := d.Positions(p)
		if [3]int{k, s, i} != want {
			t.Errorf("c=5 C=7 p=%d: %d %d %d, want %v", p, k, s, i, want)
		}
	}
	// c = 4, C = 10 (C > 2c−1: inter at 2c−1).
	d = &model.DualChunkAttention{ChunkSize: 10, LocalSize: 6}
	if k, s, i := d.Positions(9); k != 1 || s != 5 || i != 7 {
		t.Errorf("c=4 C=10 p=9: %d %d %d, want 1 5 7", k, s, i)
	}
	p, err := model.Preset("tiny-dca")
	if err != nil || p.Validate() != nil || p.DualChunkAttention.ChunkLen() != 256 {
		t.Fatalf("tiny-dca: %+v %v", p.DualChunkAttention, err)
	}
	var m map[string]json.RawMessage
	if raw, _ := model.ConfigJSON(p); json.Unmarshal(raw, &m) != nil || m["dual_chunk_attention_config"] == nil {
		t.Fatalf("tiny-dca written without its DCA object")
	}
}
