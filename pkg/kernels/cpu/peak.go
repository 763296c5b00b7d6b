package cpu

import (
	"bufio"
	"math"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Peak is what this machine can do at best, as ProbePeak measured it, so
// that a kernel's speed can be stated as a share of it. A figure the
// machine cannot run is 0.
//
// ProbePeak runs each figure's loop on Threads OS threads at once (one
// goroutine per thread, runtime.LockOSThread, all released together) and
// times the wall clock from the release to the last thread's finish; each
// figure is the best of three such runs (the bandwidth, of five to ten
// passes). The compute loops are Go assembly with 12 to 16 independent
// accumulators, enough to hide the instructions' latency, so they measure
// throughput: the instructions' operands never leave the registers.
//
//   - FMA32GFLOPS: float32 fused multiply-add, in GFLOP/s, counting a
//     multiply-add as 2 flops: 2 × lanes × VFMADD231PS instructions per
//     second. FMAWidth says which registers: 512 (ZMM, AVX-512F, 16 lanes)
//     where the machine has AVX-512, else 256 (YMM, AVX2+FMA, 8 lanes); 0
//     where it has neither (FMA32GFLOPS is then 0).
//   - BF16GFLOPS: VDPBF16PS on ZMM (AVX512_BF16), in GFLOP/s: each
//     instruction does 32 bfloat16 products summed in pairs into 16 float32
//     lanes, counted as 2 × 32 flops. 0 with HasBF16 false where the machine
//     lacks the instruction.
//   - VNNIGOPS: VPDPBUSD on ZMM (AVX512_VNNI), in GOP/s: each instruction
//     does 64 unsigned×signed byte products summed in fours into 16 int32
//     lanes, counted as 2 × 64 ops. 0 with HasVNNI false where the machine
//     lacks the instruction.
//   - ReadGBs: memory read bandwidth in GB/s (1e9 bytes/s): the threads sum
//     disjoint parts of one buffer (4 × the last-level cache, at least 512
//     MiB and at most 2 GiB; touched by the same threads before any timing),
//     with 512-bit loads where the machine has AVX-512 (else 256-bit where
//     it has AVX2); the best pass over the whole buffer. It is comparable
//     to an OpenMP sum over a GiB array in C, and is the bound of a
//     memory-bound kernel like decode's GEMV.
//
// These are throughput ceilings of the core's execution units at the
// frequency the machine runs them at (AVX-512 may run slower than scalar
// code) and of the memory system, not vendor data-sheet numbers.
type Peak struct {
	Threads     int     `json:"threads"`      // OS threads that ran each loop at once
	FMA32GFLOPS float64 `json:"fma32_gflops"` // float32 FMA, GFLOP/s (2 flops per lane per instruction)
	BF16GFLOPS  float64 `json:"bf16_gflops"`  // VDPBF16PS, GFLOP/s (2 × 32 per instruction)
	VNNIGOPS    float64 `json:"vnni_gops"`    // VPDPBUSD, GOP/s (2 × 64 per instruction)
	ReadGBs     float64 `json:"read_gbs"`     // memory read bandwidth, GB/s (1e9 bytes/s)
	FMAWidth    int     `json:"fma_width"`    // bits of the FMA registers measured: 512, 256, or 0 for none
	HasBF16     bool    `json:"has_bf16"`     // AVX512_BF16: BF16GFLOPS was measured
	HasVNNI     bool    `json:"has_vnni"`     // AVX512_VNNI: VNNIGOPS was measured
	Model       string  `json:"model"`        // "model name" of /proc/cpuinfo; empty where unknown
}

// peakLoop is one compute loop: run(n) executes perIter instructions n
// times, each doing opsPerInstr flops (or int ops).
type peakLoop struct {
	run         func(n int)
	perIter     int
	opsPerInstr int
}

// peakKernels are what this architecture can run; a nil loop is a figure
// it cannot measure, and a nil read is summed in Go.
type peakKernels struct {
	fmaWidth  int
	fma, bf16 *peakLoop
	vnni      *peakLoop
	// read sums the uint64 words of b modulo 2^64.
	read func(b []uint64) uint64
	// reads are all the read loops the CPU can run, read among them, for
	// the tests.
	reads []func(b []uint64) uint64
}

// ProbePeak measures the figures of Peak on threads OS threads (0 or less:
// runtime.GOMAXPROCS(0); GOMAXPROCS is raised for the probe's duration
// where threads is more). d is roughly the time each compute figure takes
// (0: 200ms). It allocates and reads a buffer of 512 MiB or more, and
// returns an error, with Threads and Model set, on an architecture it has
// no loops for.
func ProbePeak(threads int, d time.Duration) (Peak, error) {
	if threads <= 0 {
		threads = runtime.GOMAXPROCS(0)
	}
	if d <= 0 {
		d = 200 * time.Millisecond
	}
	if mp := runtime.GOMAXPROCS(0); threads > mp {
		defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(threads))
	}
	p := Peak{Threads: threads, Model: cpuModelName()}
	k, err := peakKernelSet()
	if err != nil {
		return p, err
	}
	if k.fma != nil {
		p.FMA32GFLOPS = measureLoop(*k.fma, threads, d)
		p.FMAWidth = k.fmaWidth
	}
	if k.bf16 != nil {
		p.BF16GFLOPS = measureLoop(*k.bf16, threads, d)
		p.HasBF16 = true
	}
	if k.vnni != nil {
		p.VNNIGOPS = measureLoop(*k.vnni, threads, d)
		p.HasVNNI = true
	}
	read := k.read
	if read == nil {
		read = sumWordsGo
	}
	p.ReadGBs = measureRead(read, threads, readBufferBytes(), d)
	return p, nil
}

// measureLoop times l on threads threads: the iteration count is set on
// one thread for runs of about d/3, and the best of three parallel runs
// gives the rate in G(FL)OP/s.
func measureLoop(l peakLoop, threads int, d time.Duration) float64 {
	n := calibrate(l.run, d/3)
	best := bestParallel(threads, 3,
		func(int) { l.run(max(n/8, 1)) }, // warm up each thread (AVX-512 clocks)
		func(int) { l.run(n) })
	ops := float64(threads) * float64(n) * float64(l.perIter) * float64(l.opsPerInstr)
	return ops / best.Seconds() / 1e9
}

// calibrate returns the iteration count that makes run take about target
// on this thread.
func calibrate(run func(n int), target time.Duration) int {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	target = max(target, time.Millisecond)
	n := 1 << 12
	for {
		t0 := time.Now()
		run(n)
		el := time.Since(t0)
		if el >= target/8 || n >= 1<<40 {
			if el <= 0 {
				return n
			}
			return max(int(float64(n)*float64(target)/float64(el)), 1)
		}
		n *= 2
	}
}

// bestParallel starts threads goroutines, each locked to its OS thread,
// which run warm(t) once (where warm is not nil) and then f(t) in rounds
// rounds, all threads of a round released together; it returns the
// shortest round's wall time, from the release to the last thread's finish
// (with no rounds, once every warm(t) has returned).
func bestParallel(threads, rounds int, warm, f func(t int)) time.Duration {
	start := make([]chan struct{}, rounds)
	done := make([]sync.WaitGroup, rounds)
	for r := range start {
		start[r] = make(chan struct{})
		done[r].Add(threads)
	}
	var ready sync.WaitGroup
	ready.Add(threads)
	for t := range threads {
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			if warm != nil {
				warm(t)
			}
			ready.Done()
			for r := range rounds {
				<-start[r]
				f(t)
				done[r].Done()
			}
		}()
	}
	ready.Wait()
	best := time.Duration(math.MaxInt64)
	for r := range rounds {
		t0 := time.Now()
		close(start[r])
		done[r].Wait()
		best = min(best, max(time.Since(t0), time.Nanosecond))
	}
	return best
}

// measureRead allocates size bytes, has each thread fill its own part (the
// first touch, which also places the pages near it), then times passes in
// which every thread sums its part: at least five, more while the passes
// have taken less than d, at most ten. It returns the best pass in GB/s.
func measureRead(read func([]uint64) uint64, threads int, size int64, d time.Duration) float64 {
	const chunk = 4096 // bytes: a part is a multiple of this
	words := size / 8
	per := words / int64(threads) / (chunk / 8) * (chunk / 8)
	if per == 0 {
		per = chunk / 8
	}
	buf := make([]uint64, per*int64(threads))
	part := func(t int) []uint64 { return buf[int64(t)*per : int64(t+1)*per] }
	sink := make([]uint64, 8*threads) // a sum per thread, 64 bytes apart
	pass := func(t int) { sink[8*t] += read(part(t)) }
	fill := func(t int) {
		b := part(t)
		for i := range b {
			b[i] = uint64(i)
		}
	}
	bestParallel(threads, 0, fill, nil) // the first touch, untimed
	best := time.Duration(math.MaxInt64)
	t0 := time.Now()
	for passes := 0; passes < 10 && (passes < 5 || time.Since(t0) < d); passes++ {
		best = min(best, bestParallel(threads, 1, nil, pass))
	}
	runtime.KeepAlive(sink)
	return float64(len(buf)*8) / best.Seconds() / 1e9
}

// sumWordsGo is the portable read loop.
func sumWordsGo(b []uint64) uint64 {
	var s0, s1, s2, s3 uint64
	for i := 0; i+4 <= len(b); i += 4 {
		s0 += b[i]
		s1 += b[i+1]
		s2 += b[i+2]
		s3 += b[i+3]
	}
	for i := len(b) &^ 3; i < len(b); i++ {
		s0 += b[i]
	}
	return s0 + s1 + s2 + s3
}

// readBufferBytes is 4 × the last-level cache, in [512 MiB, 2 GiB].
func readBufferBytes() int64 {
	const lo, hi = 512 << 20, 2 << 30
	return min(max(4*lastLevelCache(), lo), hi)
}

// lastLevelCache is the size of cpu0's highest-level cache from Linux's
// sysfs, or 0 where it is not known.
func lastLevelCache() int64 {
	dirs, _ := filepath.Glob("/sys/devices/system/cpu/cpu0/cache/index*")
	var level, size int64
	for _, dir := range dirs {
		l, err1 := readSysInt(filepath.Join(dir, "level"))
		s, err2 := readSysInt(filepath.Join(dir, "size"))
		if err1 == nil && err2 == nil && l >= level {
			level, size = l, s
		}
	}
	return size
}

// readSysInt reads a sysfs number like "4" or "260M" or "2048K".
func readSysInt(path string) (int64, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, err
	}
	s := strings.TrimSpace(string(b))
	mul := int64(1)
	switch {
	case strings.HasSuffix(s, "K"):
		mul, s = 1<<10, s[:len(s)-1]
	case strings.HasSuffix(s, "M"):
		mul, s = 1<<20, s[:len(s)-1]
	case strings.HasSuffix(s, "G"):
		mul, s = 1<<30, s[:len(s)-1]
	}
	v, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, err
	}
	return v * mul, nil
}

// cpuModelName is the first "model name" of /proc/cpuinfo, or "".
func cpuModelName() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return ""
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return ""
}
