// Package kernelstest is the conformance suite every kernels.Backend runs:
// each op on random shapes (ragged tails included) against plain float64
// loops written here, independently of any backend.
//
//	func TestCPU(t *testing.T) { kernelstest.Run(t, cpu.New(cpu.Config{})) }
package kernelstest

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// Run checks every op of b against the float64 reference.
func Run(t *testing.T, b kernels.Backend) {
	t.Run("Weight", func(t *testing.T) { testWeight(t, b) })
	t.Run("MatMul", func(t *testing.T) { testMatMul(t, b) })
	t.Run("Embed", func(t *testing.T) { testEmbed(t, b) })
	t.Run("RMSNorm", func(t *testing.T) { testRMSNorm(t, b) })
	t.Run("RoPE", func(t *testing.T) { testRoPE(t, b) })
	t.Run("RoPEMulti", func(t *testing.T) { testRoPEMulti(t, b) })
	t.Run("SwiGLU", func(t *testing.T) { testSwiGLU(t, b) })
	t.Run("Attention", func(t *testing.T) { testAttention(t, b) })
	t.Run("AttentionDCA", func(t *testing.T) { testAttentionDCA(t, b) })
	t.Run("RowOps", func(t *testing.T) { testRowOps(t, b) })
}

var dtypes = []kernels.DType{kernels.F32, kernels.F16, kernels.BF16}

// randWeight returns a weight of dtype dt with values of moderate size, and
// its exact values as float64.
func randWeight(t *testing.T, b kernels.Backend, rng *rand.Rand, dt kernels.DType, shape ...int) (kernels.Tensor, []float64) {
	t.Helper()
	n := kernels.NumElements(shape)
	raw := make([]byte, n*dt.Size())
	vals := make([]float64, n)
	for i := range n {
		v := rng.Float32()*2 - 1
		switch dt {
		case kernels.F32:
			u := math.Float32bits(v)
			raw[4*i], raw[4*i+1], raw[4*i+2], raw[4*i+3] = byte(u), byte(u>>8), byte(u>>16), byte(u>>24)
			vals[i] = float64(v)
		case kernels.BF16:
			h := uint16(math.Float32bits(v) >> 16) // truncation: any bf16 will do
			raw[2*i], raw[2*i+1] = byte(h), byte(h>>8)
			vals[i] = float64(math.Float32frombits(uint32(h) << 16))
		case kernels.F16:
			// sign, exponent 0..17 (subnormals included), mantissa
			h := uint16(rng.IntN(2))<<15 | uint16(rng.IntN(18))<<10 | uint16(rng.IntN(1024))
			raw[2*i], raw[2*i+1] = byte(h), byte(h>>8)
			vals[i] = f16ref(h)
		}
	}
	w, err := b.Weight(dt, shape, raw)
	if err != nil {
		t.Fatal(err)
	}
	return w, vals
}

// f16ref is the value of the IEEE half h, computed from its definition in
// float64. It is deliberately not safetensors.F16ToFloat32 (the decoder of
// the CPU kernels' Go paths and of the CUDA backend's readback): the suite
// checks the backends against an independent definition.
func f16ref(h uint16) float64 {
	sign := 1.0
	if h&0x8000 != 0 {
		sign = -1
	}
	e, m := int(h>>10)&0x1f, float64(h&0x3ff)
	if e == 0 {
		return sign * m * math.Pow(2, -24)
	}
	return sign * (1 + m/1024) * math.Pow(2, float64(e-15))
}

func randAct(b kernels.Backend, rng *rand.Rand, shape ...int) (kernels.Tensor, []float64) {
	n := kernels.NumElements(shape)
	f := make([]float32, n)
	v := make([]float64, n)
	for i := range f {
		f[i] = float32(rng.NormFloat64())
		v[i] = float64(f[i])
	}
	return b.FromFloat32(shape, f), v
}

// check compares got with want elementwise: |Δ| ≤ tol[i] (or tol[0] for all).
func check(t *testing.T, what string, got []float32, want []float64, tol ...float64) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d values, want %d", what, len(got), len(want))
	}
	for i := range want {
		tl := tol[0]
		if len(tol) > 1 {
			tl = tol[i]
		}
		d := math.Abs(float64(got[i]) - want[i])
		if !(d <= tl) {
			t.Fatalf("%s: [%d] = %g, want %g (|Δ| %.3g > %.3g)", what, i, got[i], want[i], d, tl)
		}
	}
}

func testWeight(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, dt := range dtypes {
		w, vals := randWeight(t, b, rng, dt, 3, 7)
		check(t, "ToFloat32 "+dt.String(), b.ToFloat32(w), vals, 0)
		if _, err := b.Weight(dt, []int{2, 2}, make([]byte, 3)); err == nil {
			t.Errorf("Weight %v with too few bytes: no error", dt)
		}
	}
}

func testMatMul(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(3, 4))
	for _, dt := range dtypes {
		for _, T := range []int{1, 2, 3, 4, 5, 7, 13, 14, 15, 19, 31, 70} {
			for _, K := range []int{1, 7, 8, 9, 16, 33, 100, 300} {
				for _, N := range []int{1, 3, 4, 5, 8, 13, 67} {
					name := fmt.Sprintf("%v T%d K%d N%d", dt, T, K, N)
					x, xv := randAct(b, rng, T, K)
					w, wv := randWeight(t, b, rng, dt, N, K)
					var bias kernels.Tensor
					var bv []float64
					if N%2 == 1 {
						bias, bv = randWeight(t, b, rng, dt, N)
					}
					want := make([]float64, T*N)
					tol := make([]float64, T*N)
					xr := roundedInput(b, w, xv)
					for i := range T {
						for j := range N {
							var s, a float64
							for k := range K {
								p := xr[i*K+k] * wv[j*K+k]
								s += p
								a += math.Abs(p)
							}
							if bv != nil {
								s += bv[j]
								a += math.Abs(bv[j])
							}
							want[i*N+j] = s
							tol[i*N+j] = 1e-5*a + 1e-6
						}
					}
					check(t, "MatMul "+name, b.ToFloat32(b.MatMul(x, w, bias)), want, tol...)
				}
			}
		}
	}
}

// InputRounder is implemented by backends whose MatMul rounds its
// activations before multiplying for some weights (the CPU's bf16
// compute): MatMulInputDType(w) is the dtype x is rounded to (F32: none).
type InputRounder interface {
	MatMulInputDType(w kernels.Tensor) kernels.DType
}

// roundedInput is xv as b's MatMul with w sees it: rounded to bf16 (to
// nearest, ties to even) where b says so, else unchanged.
func roundedInput(b kernels.Backend, w kernels.Tensor, xv []float64) []float64 {
	r, ok := b.(InputRounder)
	if !ok || r.MatMulInputDType(w) != kernels.BF16 {
		return xv
	}
	out := make([]float64, len(xv))
	for i, v := range xv {
		// Keep 8 significant bits: scale into [2^7, 2^8), round half to even.
		if v == 0 || math.IsInf(v, 0) || math.IsNaN(v) {
			out[i] = v
			continue
		}
		frac, exp := math.Frexp(v) // v = frac·2^exp, |frac| in [0.5, 1)
		out[i] = math.Ldexp(math.RoundToEven(frac*256), exp-8)
	}
	return out
}

func testEmbed(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, dt := range dtypes {
		table, tv := randWeight(t, b, rng, dt, 11, 19)
		ids := []int32{0, 10, 3, 3, 7}
		var want []float64
		for _, id := range ids {
			want = append(want, tv[int(id)*19:int(id+1)*19]...)
		}
		check(t, "Embed "+dt.String(), b.ToFloat32(b.Embed(table, ids)), want, 0)
	}
}

func testRMSNorm(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(7, 8))
	for _, dt := range dtypes {
		for _, H := range []int{1, 5, 64, 129} {
			T := 3
			x, xv := randAct(b, rng, T, H)
			w, wv := randWeight(t, b, rng, dt, H)
			eps := 1e-6
			want := make([]float64, T*H)
			for i := range T {
				var ss float64
				for k := range H {
					ss += xv[i*H+k] * xv[i*H+k]
				}
				r := 1 / math.Sqrt(ss/float64(H)+eps)
				for k := range H {
					want[i*H+k] = wv[k] * xv[i*H+k] * r
				}
			}
			check(t, fmt.Sprintf("RMSNorm %v H%d", dt, H), b.ToFloat32(b.RMSNorm(x, w, float32(eps))), want, 2e-6)
		}
	}
}

func testRoPE(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(9, 10))
	for _, hd := range []int{2, 8, 64} {
		heads, T := 3, 5
		x, xv := randAct(b, rng, T, heads*hd)
		r := &kernels.Rope{InvFreq: make([]float32, hd/2), Scale: 1.25}
		for j := range r.InvFreq {
			r.InvFreq[j] = float32(math.Pow(10000, -2*float64(j)/float64(hd)))
		}
		pos := []int32{0, 1, 7, 100, 4000}
		b.RoPE(x, hd, pos, r)
		want := make([]float64, len(xv))
		for i := range T {
			for h := range heads {
				base := i*heads*hd + h*hd
				for j := 0; j < hd/2; j++ {
					a := float64(float32(pos[i]) * r.InvFreq[j])
					c, s := math.Cos(a)*1.25, math.Sin(a)*1.25
					x1, x2 := xv[base+j], xv[base+j+hd/2]
					want[base+j] = x1*c - x2*s
					want[base+j+hd/2] = x2*c + x1*s
				}
			}
		}
		check(t, fmt.Sprintf("RoPE hd%d", hd), b.ToFloat32(x), want, 2e-6)
	}
}

// testRoPEMulti: each copy is the bits RoPE gives at its position, and x
// is left alone.
func testRoPEMulti(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(21, 22))
	for _, tc := range []struct{ hd, heads, T, k int }{{8, 3, 5, 3}, {64, 2, 3, 3}, {16, 1, 4, 2}, {2, 4, 2, 1}} {
		C := tc.heads * tc.hd
		x, xv := randAct(b, rng, tc.T, C)
		r := &kernels.Rope{InvFreq: make([]float32, tc.hd/2), Scale: 1.1}
		for j := range r.InvFreq {
			r.InvFreq[j] = float32(math.Pow(1e6, -2*float64(j)/float64(tc.hd)))
		}
		pos := make([]int32, tc.T*tc.k)
		for i := range pos {
			pos[i] = int32(rng.IntN(5000))
		}
		got := b.ToFloat32(b.RoPEMulti(x, tc.hd, pos, r))
		name := fmt.Sprintf("RoPEMulti hd%d heads%d k%d", tc.hd, tc.heads, tc.k)
		check(t, name+" input", b.ToFloat32(x), xv, 0)
		want := make([]float64, tc.T*tc.k*C)
		xf := b.ToFloat32(x)
		for u := 0; u < tc.k; u++ {
			pu := make([]int32, tc.T)
			for i := range pu {
				pu[i] = pos[i*tc.k+u]
			}
			y := b.FromFloat32([]int{tc.T, C}, xf)
			b.RoPE(y, tc.hd, pu, r)
			for i, v := range b.ToFloat32(y) {
				want[(i/C*tc.k+u)*C+i%C] = float64(v)
			}
		}
		check(t, name+" (= RoPE)", got, want, 0)
	}
}

// testAttentionDCA is testAttention with Dual Chunk Attention: q holds
// three independent variants per row, and each key must be scored with
// the one its chunk calls for (intra for the query's chunk, succ for the
// one before, inter for earlier ones), the scores times RowScale.
func testAttentionDCA(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(23, 24))
	for _, tc := range []struct{ heads, kv, hd, bs, chunk, orig int }{{4, 2, 16, 4, 13, 0}, {6, 2, 8, 5, 40, 100}, {2, 1, 64, 16, 300, 200}} {
		name := fmt.Sprintf("h%d kv%d hd%d bs%d chunk%d orig%d", tc.heads, tc.kv, tc.hd, tc.bs, tc.chunk, tc.orig)
		// a prefill from 0, decode steps, chunks continuing a prefix, long
		// ones spanning attention blocks (256) and many DCA chunks
		seqs := []attnSeqSpec{{0, 30}, {9, 1}, {27, 4}, {600, 1}, {250, 270}}
		kvDim := tc.kv * tc.hd
		kc, vc, ab, keys, vals, T := pagedKV(b, rng, seqs, kvDim, tc.bs)
		ab.Heads, ab.KVHeads, ab.HeadDim = tc.heads, tc.kv, tc.hd
		ab.Scale, ab.DCAChunk, ab.DCAOrigLen = float32(1/math.Sqrt(float64(tc.hd))), tc.chunk, tc.orig
		QC := 3 * tc.heads * tc.hd
		q, qv := randAct(b, rng, T, QC)
		want := make([]float64, T*tc.heads*tc.hd)
		group := tc.heads / tc.kv
		for si, s := range ab.Seqs {
			for i := 0; i < s.N; i++ {
				row, p := s.Row+i, s.Start+i
				tau := 1.0
				if tc.orig > 0 && p+1 > tc.orig {
					tau = 0.1*math.Log(float64(p+1)/float64(tc.orig)) + 1
				}
				for h := 0; h < tc.heads; h++ {
					kvh := h / group
					sc := make([]float64, p+1)
					for j := range sc {
						v := min(2, p/tc.chunk-j/tc.chunk) // 0 intra, 1 succ, 2 inter
						var d float64
						for e := 0; e < tc.hd; e++ {
							d += qv[row*QC+(v*tc.heads+h)*tc.hd+e] * keys[si][j*kvDim+kvh*tc.hd+e]
						}
						sc[j] = d * float64(ab.Scale) * tau
					}
					softmaxMix(sc, vals[si], kvDim, kvh*tc.hd, want[row*tc.heads*tc.hd+h*tc.hd:][:tc.hd])
				}
			}
		}
		check(t, "AttentionDCA "+name, b.ToFloat32(b.Attention(q, kc, vc, ab)), want, 2e-5)
	}
}

func testSwiGLU(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(11, 12))
	_, gv := randAct(b, rng, 3, 4099)
	// extremes where exp over- or underflows
	for i, v := range []float64{0, -0.0, 100, -100, 88.5, -88.5, 87.2, -87.2, 30, -30, 1e-30} {
		gv[i*37] = v
	}
	gf := make([]float32, len(gv))
	for i, v := range gv {
		gf[i] = float32(v)
	}
	g := b.FromFloat32([]int{3, 4099}, gf)
	u, uv := randAct(b, rng, 3, 4099)
	want := make([]float64, len(gv))
	for i := range gv {
		want[i] = gv[i] / (1 + math.Exp(-gv[i])) * uv[i]
	}
	tol := make([]float64, len(want))
	for i, w := range want {
		tol[i] = 1e-5 * math.Max(1, math.Abs(w))
	}
	check(t, "SwiGLU", b.ToFloat32(b.SwiGLU(g, u)), want, tol...)
}

// softmaxMix is the float64 reference's last half of attention: out[e] =
// Σ_j softmax(sc)_j · vals[j·stride+off+e] (sc is overwritten).
func softmaxMix(sc, vals []float64, stride, off int, out []float64) {
	m := math.Inf(-1)
	for _, v := range sc {
		m = math.Max(m, v)
	}
	var sum float64
	for j := range sc {
		sc[j] = math.Exp(sc[j] - m)
		sum += sc[j]
	}
	for e := range out {
		var o float64
		for j := range sc {
			o += sc[j] / sum * vals[j*stride+off+e]
		}
		out[e] = o
	}
}

// attnSeqSpec is a sequence of an attention test: n query rows from
// position start.
type attnSeqSpec struct{ start, n int }

// pagedKV writes random K and V of every position of seqs into paged
// caches of kvDim columns through shuffled block tables (with spare
// blocks), and returns the caches, an AttnBatch with the sequences (the
// caller sets heads, dims and scale), each sequence's keys and values
// (positions × kvDim, as written) and the number of query rows.
func pagedKV(b kernels.Backend, rng *rand.Rand, seqs []attnSeqSpec, kvDim, bs int) (kc, vc kernels.Tensor, ab *kernels.AttnBatch, keys, vals [][]float64, T int) {
	nBlocks := 0
	for _, s := range seqs {
		nBlocks += (s.start + s.n + bs - 1) / bs
	}
	perm := rng.Perm(nBlocks + 3)
	slots := nBlocks*bs + 3*bs
	kc, vc = b.Zeros(slots, kvDim), b.Zeros(slots, kvDim)
	ab = &kernels.AttnBatch{BlockSize: bs}
	keys, vals = make([][]float64, len(seqs)), make([][]float64, len(seqs))
	next := 0
	for i, s := range seqs {
		n := s.start + s.n
		blocks := make([]int32, (n+bs-1)/bs)
		for j := range blocks {
			blocks[j] = int32(perm[next])
			next++
		}
		kt, kv := randAct(b, rng, n, kvDim)
		vt, vv := randAct(b, rng, n, kvDim)
		keys[i], vals[i] = kv, vv
		sl := make([]int32, n)
		for p := range sl {
			sl[p] = blocks[p/bs]*int32(bs) + int32(p%bs)
		}
		b.WriteKV(kc, kt, sl)
		b.WriteKV(vc, vt, sl)
		ab.Seqs = append(ab.Seqs, kernels.AttnSeq{Row: T, N: s.n, Start: s.start, Blocks: blocks})
		T += s.n
	}
	return kc, vc, ab, keys, vals, T
}

// testAttention writes K/V of a mixed batch into a paged cache through
// shuffled block tables and checks attention against a dense reference.
func testAttention(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(13, 14))
	for _, tc := range []struct{ heads, kv, hd, bs int }{{4, 2, 8, 4}, {7, 1, 16, 16}, {2, 2, 64, 3}, {8, 8, 4, 1}} {
		name := fmt.Sprintf("h%d kv%d hd%d bs%d", tc.heads, tc.kv, tc.hd, tc.bs)
		// a prefill from 0, a decode step, a chunk continuing a cached prefix,
		// and long ones whose keys span several attention blocks (256)
		seqs := []attnSeqSpec{{0, 6}, {9, 1}, {5, 4}, {600, 1}, {250, 270}}
		kvDim := tc.kv * tc.hd
		kc, vc, ab, keys, vals, T := pagedKV(b, rng, seqs, kvDim, tc.bs)
		ab.Heads, ab.KVHeads, ab.HeadDim, ab.Scale = tc.heads, tc.kv, tc.hd, float32(1/math.Sqrt(float64(tc.hd)))
		q, qv := randAct(b, rng, T, tc.heads*tc.hd)
		want := make([]float64, T*tc.heads*tc.hd)
		group := tc.heads / tc.kv
		for si, s := range ab.Seqs {
			for i := 0; i < s.N; i++ {
				row := s.Row + i
				ctx := s.Start + i + 1
				for h := 0; h < tc.heads; h++ {
					kvh := h / group
					sc := make([]float64, ctx)
					for j := range ctx {
						var d float64
						for e := 0; e < tc.hd; e++ {
							d += qv[row*tc.heads*tc.hd+h*tc.hd+e] * keys[si][j*kvDim+kvh*tc.hd+e]
						}
						sc[j] = d * float64(ab.Scale)
					}
					softmaxMix(sc, vals[si], kvDim, kvh*tc.hd, want[row*tc.heads*tc.hd+h*tc.hd:][:tc.hd])
				}
			}
		}
		check(t, "Attention "+name, b.ToFloat32(b.Attention(q, kc, vc, ab)), want, 2e-5)
	}
}

func testRowOps(t *testing.T, b kernels.Backend) {
	rng := rand.New(rand.NewPCG(15, 16))
	x, xv := randAct(b, rng, 5, 9)
	rows := []int32{4, 0, 4, 2}
	var want []float64
	for _, r := range rows {
		want = append(want, xv[int(r)*9:int(r+1)*9]...)
	}
	g := b.Gather(x, rows)
	check(t, "Gather", b.ToFloat32(g), want, 0)

	scale := []float32{0.5, -1, 2, 0.25}
	dst, dv := randAct(b, rng, 5, 9)
	b.ScatterAdd(dst, g, rows, scale)
	for i, r := range rows {
		for e := 0; e < 9; e++ {
			dv[int(r)*9+e] += float64(scale[i]) * want[i*9+e]
		}
	}
	check(t, "ScatterAdd", b.ToFloat32(dst), dv, 1e-6)

	s := []float32{1, 2, 3, 4, 5}
	b.ScaleRows(x, s)
	for i := range xv {
		xv[i] *= float64(s[i/9])
	}
	check(t, "ScaleRows", b.ToFloat32(x), xv, 1e-6)

	a, av := randAct(b, rng, 2, 3)
	c, cv := randAct(b, rng, 2, 3)
	b.Add(a, c)
	for i := range av {
		av[i] += cv[i]
	}
	check(t, "Add", b.ToFloat32(a), av, 1e-6)
}
