package cpu_test

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
)

func randSlice(r *rand.Rand, n int) []float32 {
	v := make([]float32, n)
	for i := range v {
		v[i] = r.Float32()*2 - 1
	}
	return v
}

// TestBatchInvariance: with BatchInvariant, a row's MatMul and Attention
// results are bit-identical alone and at any place in any batch.
func TestBatchInvariance(t *testing.T) {
	for _, v := range cpu.Variants() {
		for _, mode := range []string{"plain", "packed", "q8", "q8a", "bf16"} {
			t.Run(fmt.Sprintf("%s/%s", v, mode), func(t *testing.T) {
				cfg := cpu.Config{Threads: 2, Generic: v == "generic", Kernels: map[bool]string{true: "", false: v}[v == "generic"], BatchInvariant: true, PackWeights: mode == "packed"}
				if mode == "q8" || mode == "q8a" {
					cfg.Quantize = mode
				}
				if mode == "bf16" {
					cfg.Compute = "bf16dp"
				}
				b, err := cpu.New(cfg)
				if err != nil {
					t.Fatal(err)
				}
				defer b.Close()
				r := rand.New(rand.NewPCG(1, 2))
				const K, N = 1100, 38 // K over one k block with a tail; N not a multiple of 4
				for _, dt := range []kernels.DType{kernels.F32, kernels.BF16} {
					w := b.FromFloat32([]int{N, K}, randSlice(r, N*K))
					if dt == kernels.BF16 {
						if w, err = b.Weight(kernels.BF16, []int{N, K}, bf16Bytes(b.ToFloat32(w))); err != nil {
							t.Fatal(err)
						}
					}
					xs := randSlice(r, 70*K)
					alone := make([][]float32, 70)
					for i := range alone {
						alone[i] = b.ToFloat32(b.MatMul(b.FromFloat32([]int{1, K}, xs[i*K:(i+1)*K]), w, nil))
					}
					for T := 2; T <= 70; T += 1 + T/33*36 { // 2..33, then 70 (five tiles: widened panels)
						y := b.ToFloat32(b.MatMul(b.FromFloat32([]int{T, K}, xs[:T*K]), w, nil))
						for i := 0; i < T; i++ {
							for j := 0; j < N; j++ {
								if y[i*N+j] != alone[i][j] {
									t.Fatalf("%v T=%d row %d col %d: %v batched, %v alone", dt, T, i, j, y[i*N+j], alone[i][j])
								}
							}
						}
					}
				}
				// Attention: sequence 0 decodes alone, then beside a prefill.
				const H, KVH, D, bs = 4, 2, 16, 4
				kc := b.FromFloat32([]int{64 * bs, KVH * D}, randSlice(r, 64*bs*KVH*D))
				vc := b.FromFloat32([]int{64 * bs, KVH * D}, randSlice(r, 64*bs*KVH*D))
				blocks0 := []int32{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19}
				blocks1 := []int32{8, 9, 10, 11, 12, 13, 14, 15}
				q := randSlice(r, 8*H*D)
				one := &kernels.AttnBatch{Heads: H, KVHeads: KVH, HeadDim: D, BlockSize: bs, Scale: 0.25,
					Seqs: []kernels.AttnSeq{{Row: 0, N: 1, Start: 16, Blocks: blocks0}}}
				a := b.ToFloat32(b.Attention(b.FromFloat32([]int{1, H * D}, q[:H*D]), kc, vc, one))
				two := &kernels.AttnBatch{Heads: H, KVHeads: KVH, HeadDim: D, BlockSize: bs, Scale: 0.25,
					Seqs: []kernels.AttnSeq{{Row: 0, N: 7, Start: 3, Blocks: blocks1}, {Row: 7, N: 1, Start: 16, Blocks: blocks0}}}
				qq := append(append([]float32{}, q[H*D:8*H*D]...), q[:H*D]...)
				bt := b.ToFloat32(b.Attention(b.FromFloat32([]int{8, H * D}, qq), kc, vc, two))
				for j := 0; j < H*D; j++ {
					if bt[7*H*D+j] != a[j] {
						t.Fatalf("attention %d: %v batched, %v alone", j, bt[7*H*D+j], a[j])
					}
				}
				// The same position inside a prefill chunk that sees more keys.
				// (16 keys alone, 34 for the chunk's last row: the scalar tail
				// of the micro-kernel would split them differently.)
				qc := randSlice(r, 20*H*D)
				copy(qc[2*H*D:], q[:H*D])
				chunk := &kernels.AttnBatch{Heads: H, KVHeads: KVH, HeadDim: D, BlockSize: bs, Scale: 0.25,
					Seqs: []kernels.AttnSeq{{Row: 0, N: 20, Start: 14, Blocks: blocks0}}}
				ct := b.ToFloat32(b.Attention(b.FromFloat32([]int{20, H * D}, qc), kc, vc, chunk))
				for j := 0; j < H*D; j++ {
					if ct[2*H*D+j] != a[j] {
						t.Fatalf("attention in a chunk %d: %v, %v alone", j, ct[2*H*D+j], a[j])
					}
				}
				// Long context: position 600 decoded alone and inside a chunk
				// that runs past it, across several attention blocks.
				const long = 700
				lk := b.FromFloat32([]int{long, KVH * D}, randSlice(r, long*KVH*D))
				lv := b.FromFloat32([]int{long, KVH * D}, randSlice(r, long*KVH*D))
				lb := make([]int32, long) // block size 1, pages shuffled
				for i, p := range r.Perm(long) {
					lb[i] = int32(p)
				}
				lq := randSlice(r, 90*H*D)
				dec := &kernels.AttnBatch{Heads: H, KVHeads: KVH, HeadDim: D, BlockSize: 1, Scale: 0.25,
					Seqs: []kernels.AttnSeq{{Row: 0, N: 1, Start: 600, Blocks: lb}}}
				la := b.ToFloat32(b.Attention(b.FromFloat32([]int{1, H * D}, lq[40*H*D:41*H*D]), lk, lv, dec))
				pre := &kernels.AttnBatch{Heads: H, KVHeads: KVH, HeadDim: D, BlockSize: 1, Scale: 0.25,
					Seqs: []kernels.AttnSeq{{Row: 0, N: 90, Start: 560, Blocks: lb}}}
				lc := b.ToFloat32(b.Attention(b.FromFloat32([]int{90, H * D}, lq), lk, lv, pre))
				for j := 0; j < H*D; j++ {
					if lc[40*H*D+j] != la[j] {
						t.Fatalf("long attention %d: %v in a chunk, %v alone", j, lc[40*H*D+j], la[j])
					}
				}
			})
		}
	}
}

func bf16Bytes(v []float32) []byte {
	out := make([]byte, 2*len(v))
	for i, x := range v {
		u := math32bits(x) >> 16
		out[2*i], out[2*i+1] = byte(u), byte(u>>8)
	}
	return out
}

func math32bits(x float32) uint32 { return math.Float32bits(x) }

// TestDecodeStreams: one-token products of packed bf16 weights give the
// same bits with two or four weight streams per thread, and the same as
// the row inside a batch.
func TestDecodeStreams(t *testing.T) {
	r := rand.New(rand.NewPCG(7, 8))
	const K, N = 300, 32*11 + 5 // eleven whole panels and a ragged one
	wraw := bf16Bytes(randSlice(r, N*K))
	xs := randSlice(r, 3*K)
	var want []float32
	for _, threads := range []int{1, 2, 3} {
		for _, streams := range []int{2, 4} {
			b, err := cpu.New(cpu.Config{Threads: threads, PackWeights: true, BatchInvariant: true, DecodeStreams: streams})
			if err != nil {
				t.Fatal(err)
			}
			w, err := b.Weight(kernels.BF16, []int{N, K}, wraw)
			if err != nil {
				t.Fatal(err)
			}
			one := b.ToFloat32(b.MatMul(b.FromFloat32([]int{1, K}, xs[:K]), w, nil))
			batch := b.ToFloat32(b.MatMul(b.FromFloat32([]int{3, K}, xs), w, nil))
			b.Close()
			if want == nil {
				want = one
			}
			for j := range one {
				if one[j] != want[j] || batch[j] != want[j] {
					t.Fatalf("threads %d streams %d out %d: %v alone, %v in a batch, want %v", threads, streams, j, one[j], batch[j], want[j])
				}
			}
		}
	}
	if _, err := cpu.New(cpu.Config{DecodeStreams: 3}); err == nil {
		t.Fatal("3 decode streams accepted")
	}
}
