package cuda

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
)

// gemvRows is the most rows qf_gemv_* multiply at once (decode batches);
// larger products use the tiled qf_gemm_*.
const gemvRows = 8

func f32t(t kernels.Tensor, op string) *tensor {
	d := dev(t)
	if d.dt != kernels.F32 {
		panic(fmt.Sprintf("cuda: %s of a %v tensor (activations are F32)", op, d.dt))
	}
	return d
}

// checkIndices panics (a programming error, as in the CPU backend) when an
// index of v is outside [0, n): a kernel would read or write out of bounds.
func checkIndices(what string, v []int32, n int) {
	for _, i := range v {
		if i < 0 || int(i) >= n {
			panic(fmt.Sprintf("cuda: %s %d outside [0, %d)", what, i, n))
		}
	}
}

// view is rows [r0, r1) of a float32 matrix, sharing its memory.
func (t *tensor) view(r0, r1 int) *tensor {
	cols := kernels.Cols(t)
	return &tensor{ptr: t.ptr + uint64(r0*cols*4), shape: []int{r1 - r0, cols}, dt: t.dt}
}

// Embed implements kernels.Backend.
func (b *Backend) Embed(table kernels.Tensor, ids []int32) kernels.Tensor {
	tb := dev(table)
	V, H := kernels.Rows(tb), kernels.Cols(tb)
	checkIndices("Embed id", ids, V)
	b.enter()
	out := b.alloc(kernels.F32, len(ids), H)
	if len(ids) == 0 {
		return out
	}
	idt := b.uploadI32(ids)
	defer b.Free(idt)
	g, bl := flat(len(ids) * H)
	k := "qf_embed_bf16"
	if tb.dt == kernels.F32 {
		k = "qf_embed_f32"
	}
	b.launch(k, g, bl, tb, idt, out, len(ids), H)
	return out
}

// MatMul implements kernels.Backend: y = x·wᵀ + bias.
func (b *Backend) MatMul(x, w, bias kernels.Tensor) kernels.Tensor {
	xt, wt := f32t(x, "MatMul"), dev(w)
	T, K := kernels.Rows(xt), kernels.Cols(xt)
	N := kernels.Rows(wt)
	if kernels.Cols(wt) != K {
		panic(fmt.Sprintf("cuda: MatMul x %v · w %v", xt.shape, wt.shape))
	}
	var bt *tensor
	if bias != nil {
		bt = f32t(bias, "MatMul bias")
		if bt.n() != N {
			panic(fmt.Sprintf("cuda: MatMul bias %v for %d outputs", bt.shape, N))
		}
	}
	b.enter()
	y := b.alloc(kernels.F32, T, N)
	if T == 0 || N == 0 {
		return y
	}
	sfx := "bf16"
	if wt.dt == kernels.F32 {
		sfx = "f32"
	}
	if T <= gemvRows {
		b.launch("qf_gemv_"+sfx, [3]uint32{uint32(min(N, 65535)), 1, 1}, [3]uint32{256, 1, 1}, xt, wt, bt, y, T, N, K)
		return y
	}
	grid := [3]uint32{uint32((N + 63) / 64), uint32((T + 63) / 64), 1}
	for t0 := 0; t0 < T; t0 += 64 * 65535 { // grid.y limit
		t1 := min(T, t0+64*65535)
		grid[1] = uint32((t1 - t0 + 63) / 64)
		b.launch("qf_gemm_"+sfx, grid, [3]uint32{16, 16, 1}, xt.view(t0, t1), wt, bt, y.view(t0, t1), t1-t0, N, K)
	}
	return y
}

// RMSNorm implements kernels.Backend.
func (b *Backend) RMSNorm(x, w kernels.Tensor, eps float32) kernels.Tensor {
	xt, wt := f32t(x, "RMSNorm"), f32t(w, "RMSNorm weight")
	T, H := kernels.Rows(xt), kernels.Cols(xt)
	if wt.n() != H {
		panic(fmt.Sprintf("cuda: RMSNorm x %v with w of %d", xt.shape, wt.n()))
	}
	b.enter()
	y := b.alloc(kernels.F32, xt.shape...)
	if T > 0 {
		b.launch("qf_rmsnorm", [3]uint32{uint32(min(T, 65535)), 1, 1}, [3]uint32{256, 1, 1}, xt, wt, y, T, H, eps)
	}
	return y
}

// Add implements kernels.Backend.
func (b *Backend) Add(dst, src kernels.Tensor) {
	d, s := f32t(dst, "Add"), f32t(src, "Add")
	if d.n() != s.n() {
		panic(fmt.Sprintf("cuda: Add %v += %v", d.shape, s.shape))
	}
	b.enter()
	if n := d.n(); n > 0 {
		g, bl := flat(n)
		b.launch("qf_add", g, bl, d, s, n)
	}
}

// RoPE implements kernels.Backend.
func (b *Backend) RoPE(x kernels.Tensor, headDim int, pos []int32, r *kernels.Rope) {
	xt := f32t(x, "RoPE")
	T, C := kernels.Rows(xt), kernels.Cols(xt)
	if len(pos) != T || headDim <= 0 || C%headDim != 0 || len(r.InvFreq) != headDim/2 {
		panic(fmt.Sprintf("cuda: RoPE x %v headDim %d with %d positions, %d freqs", xt.shape, headDim, len(pos), len(r.InvFreq)))
	}
	if T == 0 {
		return
	}
	b.enter()
	pt, ft := b.paramI32(pos), b.paramF32(r.InvFreq)
	g, bl := flat(T * C / 2)
	b.launch("qf_rope", g, bl, xt, pt, ft, T, C, headDim, r.Scale)
}

// RoPEMulti implements kernels.Backend: qf_rope_multi writes the k
// rotated copies of every row (the rotation of qf_rope, the same bits).
func (b *Backend) RoPEMulti(x kernels.Tensor, headDim int, pos []int32, r *kernels.Rope) kernels.Tensor {
	xt := f32t(x, "RoPEMulti")
	T, C := kernels.Rows(xt), kernels.Cols(xt)
	if T == 0 || len(pos) == 0 || len(pos)%T != 0 || headDim <= 0 || C%headDim != 0 || len(r.InvFreq) != headDim/2 {
		panic(fmt.Sprintf("cuda: RoPEMulti x %v headDim %d with %d positions, %d freqs", xt.shape, headDim, len(pos), len(r.InvFreq)))
	}
	k := len(pos) / T
	b.enter()
	y := b.alloc(kernels.F32, T, k*C)
	if C == 0 {
		return y
	}
	pt, ft := b.paramI32(pos), b.paramF32(r.InvFreq)
	g, bl := flat(T * k * C / 2)
	b.launch("qf_rope_multi", g, bl, xt, y, pt, ft, T, C, headDim, k, r.Scale)
	return y
}

// SwiGLU implements kernels.Backend.
func (b *Backend) SwiGLU(gate, up kernels.Tensor) kernels.Tensor {
	g, u := f32t(gate, "SwiGLU"), f32t(up, "SwiGLU")
	if g.n() != u.n() {
		panic(fmt.Sprintf("cuda: SwiGLU %v with %v", g.shape, u.shape))
	}
	b.enter()
	y := b.alloc(kernels.F32, g.shape...)
	if n := g.n(); n > 0 {
		gr, bl := flat(n)
		b.launch("qf_swiglu", gr, bl, g, u, y, n)
	}
	return y
}

// WriteKV implements kernels.Backend.
func (b *Backend) WriteKV(cache, x kernels.Tensor, slots []int32) {
	c, xt := f32t(cache, "WriteKV"), f32t(x, "WriteKV")
	C := kernels.Cols(xt)
	if kernels.Cols(c) != C || len(slots) != kernels.Rows(xt) {
		panic(fmt.Sprintf("cuda: WriteKV cache %v x %v with %d slots", c.shape, xt.shape, len(slots)))
	}
	checkIndices("WriteKV slot", slots, kernels.Rows(c))
	if len(slots) == 0 {
		return
	}
	b.enter()
	st := b.paramI32(slots)
	g, bl := flat(len(slots) * C)
	b.launch("qf_write_kv", g, bl, c, xt, st, len(slots), C)
}

// attnMeta is a batch's sequences flattened for qf_attention.
type attnMeta struct {
	rowSeq, seqRow, seqStart, seqBoff, blocks []int32
}

func attentionMeta(T int, ab *kernels.AttnBatch, slots int) (*attnMeta, error) {
	m := &attnMeta{rowSeq: make([]int32, T)}
	for i := range m.rowSeq {
		m.rowSeq[i] = -1
	}
	for s, sq := range ab.Seqs {
		if sq.Row < 0 || sq.N < 0 || sq.Row+sq.N > T || sq.Start < 0 {
			return nil, fmt.Errorf("sequence %d: rows [%d, %d) of %d, start %d", s, sq.Row, sq.Row+sq.N, T, sq.Start)
		}
		need := (sq.Start + sq.N + ab.BlockSize - 1) / ab.BlockSize
		if len(sq.Blocks) < need {
			return nil, fmt.Errorf("sequence %d: %d blocks for %d positions", s, len(sq.Blocks), sq.Start+sq.N)
		}
		for _, blk := range sq.Blocks[:need] {
			if blk < 0 || (int(blk)+1)*ab.BlockSize > slots {
				return nil, fmt.Errorf("sequence %d: block %d outside the cache", s, blk)
			}
		}
		for r := sq.Row; r < sq.Row+sq.N; r++ {
			m.rowSeq[r] = int32(s)
		}
		m.seqRow = append(m.seqRow, int32(sq.Row))
		m.seqStart = append(m.seqStart, int32(sq.Start))
		m.seqBoff = append(m.seqBoff, int32(len(m.blocks)))
		m.blocks = append(m.blocks, sq.Blocks[:need]...)
	}
	for r, s := range m.rowSeq {
		if s < 0 {
			return nil, fmt.Errorf("query row %d belongs to no sequence", r)
		}
	}
	return m, nil
}

// Attention implements kernels.Backend: causal attention over the paged
// caches, one block of 4 warps per (query row, head); with DCA each block
// walks the row's inter, successive and intra key segments in turn with
// the matching query variant. No scores are stored: memory does not grow
// with the context or the chunk.
func (b *Backend) Attention(q, kc, vc kernels.Tensor, ab *kernels.AttnBatch) kernels.Tensor {
	qt, kt, vt := f32t(q, "Attention"), f32t(kc, "Attention"), f32t(vc, "Attention")
	T := kernels.Rows(qt)
	hd := ab.HeadDim
	if kernels.Cols(qt) != ab.QueryCols() || ab.DCAChunk < 0 || kernels.Cols(kt) != ab.KVHeads*hd || kernels.Cols(vt) != ab.KVHeads*hd ||
		ab.KVHeads <= 0 || ab.Heads%ab.KVHeads != 0 || hd <= 0 || hd > 256 || ab.BlockSize <= 0 {
		panic(fmt.Sprintf("cuda: Attention q %v k %v v %v with %d heads, %d KV heads of %d, DCA chunk %d", qt.shape, kt.shape, vt.shape, ab.Heads, ab.KVHeads, hd, ab.DCAChunk))
	}
	meta, err := attentionMeta(T, ab, kernels.Rows(kt))
	if err != nil {
		panic("cuda: Attention: " + err.Error())
	}
	b.enter()
	out := b.alloc(kernels.F32, T, ab.Heads*hd)
	if T == 0 {
		return out
	}
	bufs := []*tensor{b.paramI32(meta.rowSeq), b.paramI32(meta.seqRow), b.paramI32(meta.seqStart),
		b.paramI32(meta.seqBoff), b.paramI32(meta.blocks)}
	for r0 := 0; r0 < T; r0 += 65535 { // grid.x limit: rows in chunks
		r1 := min(T, r0+65535)
		rs := &tensor{ptr: bufs[0].ptr + uint64(4*r0), shape: []int{r1 - r0}, dt: kernels.F32}
		// Rows are indexed from the chunk: shift q, out and the row table.
		b.launch("qf_attention", [3]uint32{uint32(r1 - r0), uint32(ab.Heads), 1}, [3]uint32{128, 1, 1},
			qt.view(r0, r1), kt, vt, out.view(r0, r1), rs, b.shiftRows(bufs[1], meta.seqRow, r0), bufs[2], bufs[3], bufs[4],
			ab.Heads, ab.KVHeads, hd, ab.BlockSize, ab.Scale, ab.DCAChunk, max(ab.DCAOrigLen, 0))
	}
	return out
}

// shiftRows returns the sequences' first rows relative to row r0 (for a
// chunk of query rows starting there); r0 = 0 is the table itself.
func (b *Backend) shiftRows(t *tensor, seqRow []int32, r0 int) *tensor {
	if r0 == 0 {
		return t
	}
	s := make([]int32, len(seqRow))
	for i, r := range seqRow {
		s[i] = r - int32(r0)
	}
	st := b.uploadI32(s)
	// Freed at once: the default stream runs the kernel that reads it
	// before any later copy reuses the memory.
	defer b.Free(st)
	return st
}

// Gather implements kernels.Backend.
func (b *Backend) Gather(x kernels.Tensor, rows []int32) kernels.Tensor {
	xt := f32t(x, "Gather")
	R, H := kernels.Rows(xt), kernels.Cols(xt)
	checkIndices("Gather row", rows, R)
	b.enter()
	y := b.alloc(kernels.F32, len(rows), H)
	if len(rows) == 0 || H == 0 {
		return y
	}
	rt := b.uploadI32(rows)
	defer b.Free(rt)
	g, bl := flat(len(rows) * H)
	b.launch("qf_gather", g, bl, xt, rt, y, len(rows), H)
	return y
}

// ScatterAdd implements kernels.Backend.
func (b *Backend) ScatterAdd(dst, src kernels.Tensor, rows []int32, scale []float32) {
	d, s := f32t(dst, "ScatterAdd"), f32t(src, "ScatterAdd")
	R, H := kernels.Rows(d), kernels.Cols(d)
	if kernels.Cols(s) != H || kernels.Rows(s) != len(rows) || len(scale) != len(rows) {
		panic(fmt.Sprintf("cuda: ScatterAdd %v into %v with %d rows, %d scales", s.shape, d.shape, len(rows), len(scale)))
	}
	checkIndices("ScatterAdd row", rows, R)
	if len(rows) == 0 || H == 0 {
		return
	}
	b.enter()
	rt, st := b.uploadI32(rows), b.uploadF32(scale)
	defer b.Free(rt)
	defer b.Free(st)
	g, bl := flat(len(rows) * H)
	b.launch("qf_scatter_add", g, bl, d, s, rt, st, len(rows), H)
}

// ScaleRows implements kernels.Backend.
func (b *Backend) ScaleRows(x kernels.Tensor, s []float32) {
	xt := f32t(x, "ScaleRows")
	T, H := kernels.Rows(xt), kernels.Cols(xt)
	if len(s) != T {
		panic(fmt.Sprintf("cuda: ScaleRows %v with %d scales", xt.shape, len(s)))
	}
	if T == 0 || H == 0 {
		return
	}
	b.enter()
	st := b.uploadF32(s)
	defer b.Free(st)
	g, bl := flat(T * H)
	b.launch("qf_scale_rows", g, bl, xt, st, T, H)
}

var _ kernels.Backend = (*Backend)(nil)
var _ kernels.PreciseWeights = (*Backend)(nil)
