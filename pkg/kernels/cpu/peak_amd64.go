package cpu

import "golang.org/x/sys/cpu"

// The peak probe's loops, in peak_amd64.s.

//go:noescape
func peakFMA512(n int)

//go:noescape
func peakFMA256(n int)

//go:noescape
func peakBF16(n int)

//go:noescape
func peakVNNI(n int)

//go:noescape
func peakReadAVX2(p *uint64, n int) uint64

//go:noescape
func peakReadAVX512(p *uint64, n int) uint64

// peakRead makes a read loop of f, which sums a multiple of 32 words.
func peakRead(f func(p *uint64, n int) uint64) func([]uint64) uint64 {
	return func(b []uint64) uint64 {
		if len(b) == 0 {
			return 0
		}
		n := len(b) &^ 31
		s := f(&b[0], n)
		for _, v := range b[n:] {
			s += v
		}
		return s
	}
}

// peakKernelSet picks the loops this CPU (and its OS) can run.
func peakKernelSet() (peakKernels, error) {
	var k peakKernels
	switch {
	case cpu.X86.HasAVX512F:
		k.fmaWidth = 512
		k.fma = &peakLoop{run: peakFMA512, perIter: 16, opsPerInstr: 2 * 16}
	case cpu.X86.HasAVX2 && cpu.X86.HasFMA:
		k.fmaWidth = 256
		k.fma = &peakLoop{run: peakFMA256, perIter: 12, opsPerInstr: 2 * 8}
	}
	if cpu.X86.HasAVX512F && cpu.X86.HasAVX512BF16 {
		k.bf16 = &peakLoop{run: peakBF16, perIter: 16, opsPerInstr: 2 * 32}
	}
	if cpu.X86.HasAVX512F && cpu.X86.HasAVX512VNNI {
		k.vnni = &peakLoop{run: peakVNNI, perIter: 16, opsPerInstr: 2 * 64}
	}
	if cpu.X86.HasAVX2 {
		k.reads = append(k.reads, peakRead(peakReadAVX2))
	}
	if cpu.X86.HasAVX512F {
		k.reads = append(k.reads, peakRead(peakReadAVX512))
	}
	if len(k.reads) > 0 {
		k.read = k.reads[len(k.reads)-1] // the widest loads
	}
	return k, nil
}
