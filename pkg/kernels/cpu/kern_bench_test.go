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

// BenchmarkPackedTile measures the packed 14×32 tiles alone on L1-resident
// data (k = 128): float32 FMA on a widened panel, and bf16 pairs on
// VDPBF16PS where the CPU has it.
func BenchmarkPackedTile(b *testing.B) {
	const k = 128
	for _, ks := range simdKernels() {
		if ks.pgemmF32 == nil {
			continue
		}
		b.Run(ks.name+"/f32", func(b *testing.B) {
			xp, w, c := make([]float32, packMR*k), make([]float32, packNR*k), make([]float32, packMR*packNR)
			for i := 0; i < b.N; i++ {
				ks.pgemmF32(xp, w, k, c, packNR)
			}
			b.ReportMetric(2*float64(packMR*packNR*k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
		if ks.pgemmDP == nil {
			continue
		}
		b.Run(ks.name+"/bf16", func(b *testing.B) {
			xt, w, c := make([]uint32, dpMR*k/2), make([]uint16, packNR*k), make([]float32, dpMR*packNR)
			for i := 0; i < b.N; i++ {
				ks.pgemmDP(xt, w, k/2, c, packNR)
			}
			b.ReportMetric(2*float64(dpMR*packNR*k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}
