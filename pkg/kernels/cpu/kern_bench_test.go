package cpu

import (
	"testing"
)

// BenchmarkGemmTile measures the register-blocked tile alone on L1-resident
// data: the ceiling of the GEMM path.
func BenchmarkGemmTile(b *testing.B) {
	for _, k := range append([]kernelSet{genericKernels}, simdKernels()...) {
		b.Run(k.name, func(b *testing.B) {
			const n = 512
			mr := k.gemmRows
			x := make([]float32, mr*n)
			p := make([]float32, 4*n)
			c := make([]float32, mr*4)
			for i := range x {
				x[i] = 1e-3
			}
			for i := range p {
				p[i] = 1e-3
			}
			for i := 0; i < b.N; i++ {
				k.gemm(x, n, p, n, n, c, 4)
			}
			b.ReportMetric(2*float64(mr*4*n)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}
