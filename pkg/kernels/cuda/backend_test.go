package cuda

import (
	"errors"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/kernelstest"
)

// gpu opens device 0, or skips the test where there is none.
func gpu(t *testing.T) *Backend {
	t.Helper()
	b, err := New(Config{})
	if errors.Is(err, ErrNoDriver) {
		t.Skipf("no GPU here: %v", err)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(b.Close)
	return b
}

// TestNoDriver: where there is no driver, New and Probe fail with
// ErrNoDriver and a message saying so, without a panic.
func TestNoDriver(t *testing.T) {
	t.Setenv(LibPathEnv, "")
	if _, err := Probe(0); err == nil {
		t.Skip("this machine has a CUDA driver")
	}
	_, err := New(Config{})
	if !errors.Is(err, ErrNoDriver) || !strings.Contains(err.Error(), "no CUDA driver") {
		t.Fatalf("New without a driver: %v", err)
	}
	if _, err := Probe(3); !errors.Is(err, ErrNoDriver) {
		t.Fatalf("Probe without a driver: %v", err)
	}
}

func TestSizeClass(t *testing.T) {
	for _, tc := range [][2]uint64{{1, 256}, {256, 256}, {257, 512}, {1 << 20, 1 << 20}, {1<<20 + 1, 2 << 20}, {5<<20 - 3, 5 << 20}} {
		if g := sizeClass(tc[0]); g != tc[1] {
			t.Errorf("sizeClass(%d) = %d, want %d", tc[0], g, tc[1])
		}
	}
}

func TestAttentionMeta(t *testing.T) {
	ab := &kernels.AttnBatch{BlockSize: 4, Seqs: []kernels.AttnSeq{
		{Row: 0, N: 3, Start: 5, Blocks: []int32{7, 2, 9}}, // positions 5..7: blocks 0, 1
		{Row: 3, N: 1, Start: 0, Blocks: []int32{4}},
	}}
	m, err := attentionMeta(4, ab, 40)
	if err != nil {
		t.Fatal(err)
	}
	want := attnMeta{rowSeq: []int32{0, 0, 0, 1}, seqRow: []int32{0, 3}, seqStart: []int32{5, 0}, seqBoff: []int32{0, 2},
		blocks: []int32{7, 2, 4}}
	for i, pair := range [][2][]int32{{m.rowSeq, want.rowSeq}, {m.seqRow, want.seqRow}, {m.seqStart, want.seqStart},
		{m.seqBoff, want.seqBoff}, {m.blocks, want.blocks}} {
		if !equalI32(pair[0], pair[1]) {
			t.Errorf("field %d: %v, want %v", i, pair[0], pair[1])
		}
	}
	for _, bad := range []*kernels.AttnBatch{
		{BlockSize: 4, Seqs: []kernels.AttnSeq{{Row: 0, N: 4, Start: 1, Blocks: []int32{0}}}},    // positions 1..4 need 2 blocks
		{BlockSize: 4, Seqs: []kernels.AttnSeq{{Row: 0, N: 4, Start: 0, Blocks: []int32{10}}}},   // block outside 40 slots
		{BlockSize: 4, Seqs: []kernels.AttnSeq{{Row: 0, N: 3, Start: 0, Blocks: []int32{0}}}},    // row 3 uncovered
		{BlockSize: 4, Seqs: []kernels.AttnSeq{{Row: 2, N: 3, Start: 0, Blocks: []int32{0, 1}}}}, // rows past T
	} {
		if _, err := attentionMeta(4, bad, 40); err == nil {
			t.Errorf("%+v accepted", bad.Seqs)
		}
	}
}

func equalI32(a, b []int32) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// TestSourceNamesKernels: every kernel the backend looks up is defined in
// the source it compiles.
func TestSourceNamesKernels(t *testing.T) {
	src := Source()
	for _, k := range kernelNames {
		if !strings.Contains(src, "void "+k+"(") {
			t.Errorf("kernel %s is not in the source", k)
		}
	}
	if strings.Contains(src, "#include") {
		t.Error("the source includes a header (NVRTC is given none)")
	}
}

// TestConformance runs the kernels conformance suite on GPU 0 (skipped
// without one; ./scripts/device-check.sh runs it on a lent GPU).
func TestConformance(t *testing.T) {
	b := gpu(t)
	t.Logf("%s, %d MiB, compute %d.%d", b.Info().Name, b.Info().MemoryBytes>>20, b.Info().ComputeMajor, b.Info().ComputeMinor)
	kernelstest.Run(t, b)
}
