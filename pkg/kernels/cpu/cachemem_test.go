package cpu_test

import (
	"runtime"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
)

// TestCacheZeros: a cache tensor, mapped outside the Go heap when large,
// starts zeroed and works like any F32 tensor until FreeCache; unreachable
// ones are unmapped by the collector without harm.
func TestCacheZeros(t *testing.T) {
	b, err := cpu.New(cpu.Config{Threads: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	var ca kernels.CacheAllocator = b
	for _, rows := range []int{4, 4096} { // 2 KiB on the heap; 2 MiB mapped
		c := ca.CacheZeros(rows, 128)
		for i, v := range b.ToFloat32(c) {
			if v != 0 {
				t.Fatalf("%d rows: element %d is %v", rows, i, v)
			}
		}
		src := make([]float32, 256)
		for i := range src {
			src[i] = float32(i) + 0.5
		}
		b.WriteKV(c, b.FromFloat32([]int{2, 128}, src), []int32{1, int32(rows - 1)})
		got := b.ToFloat32(b.Gather(c, []int32{1, int32(rows - 1)}))
		for i := range src {
			if got[i] != src[i] {
				t.Fatalf("%d rows: read back %v at %d, wrote %v", rows, got[i], i, src[i])
			}
		}
		ca.FreeCache(c)
	}
	for range 64 { // 64 × 2 MiB left to the collector
		ca.CacheZeros(4096, 128)
	}
	runtime.GC()
	runtime.GC()
}
