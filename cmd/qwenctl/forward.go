package main

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"encoding/json"
	"flag"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// engineFlags are the flags of commands that run a model in this process.
type engineFlags struct {
	threads  *int
	mmap     *bool
	kernels  *string
	quantize *string
	compute  *string
}

func addEngineFlags(fs interface {
	Int(string, int, string) *int
	Bool(string, bool, string) *bool
	String(string, string, string) *string
}) engineFlags {
	return engineFlags{
		threads:  fs.Int("threads", 0, "compute threads (0: one per CPU)"),
		mmap:     fs.Bool("mmap", false, "use the weights through a memory map of the files instead of copies in memory"),
		kernels:  fs.String("kernels", "", "CPU kernel set: generic, or a SIMD set (default: the best this CPU supports)"),
		quantize: fs.String("quantize", "", "quantisation at load: q8 (int8 weights, groups of 32), q8a (int8 weights and activations, VNNI), or none"),
		compute:  fs.String("compute", "f32", "products of bf16 weights: f32 (float32 activations; the reference checks use it) or bf16 (the fastest the CPU has: VDPBF16PS on bf16-rounded activations where it outruns float32 FMA, as on AMD Zen 4/5, for faster prefill and batches; float32 elsewhere)"),
	}
}

// load opens the model in dir on a new CPU backend.
func (e engineFlags) load(dir string) (*model.Model, *cpu.Backend, error) {
	if *e.threads < 0 || *e.threads > cpu.MaxThreads {
		return nil, nil, usagef("--threads: %d is outside [0, %d]", *e.threads, cpu.MaxThreads)
	}
	if st, err := os.Stat(filepath.Join(dir, "config.json")); err != nil || st.IsDir() {
		return nil, nil, fmt.Errorf("--model: %s has no config.json (want a HuggingFace model directory)", dir)
	}
	if *e.quantize != "" && *e.quantize != "q8" && *e.quantize != "q8a" {
		return nil, nil, usagef("--quantize: %q is not q8 or q8a", *e.quantize)
	}
	if *e.quantize != "" && *e.mmap {
		return nil, nil, usagef("--quantize: quantised weights are copies; drop --mmap")
	}
	switch {
	case *e.compute != "bf16" && *e.compute != "f32":
		return nil, nil, usagef("--compute: %q is not bf16 or f32", *e.compute)
	case *e.compute == "bf16" && *e.quantize != "":
		return nil, nil, usagef("--compute: bf16 with --quantize %s: choose one", *e.quantize)
	case *e.compute == "bf16" && *e.mmap:
		return nil, nil, usagef("--compute: bf16 packs copies of the weights; drop --mmap")
	}
	cfg := cpu.Config{Threads: *e.threads, Kernels: *e.kernels, PackWeights: !*e.mmap, Quantize: *e.quantize, Compute: *e.compute}
	if cfg.Kernels == "generic" {
		cfg.Generic, cfg.Kernels = true, ""
	}
	b, err := cpu.New(cfg)
	if err != nil {
		return nil, nil, usagef("--kernels: %v", err)
	}
	start := time.Now()
	m, err := model.Load(dir, b, model.LoadOptions{Mmap: *e.mmap})
	if err != nil {
		b.Close()
		return nil, nil, err
	}
	fmt.Fprintf(os.Stderr, "loaded %s: %.2f GB of weights in %.2fs on %s with %d threads%s\n",
		dir, float64(m.WeightBytes())/1e9, time.Since(start).Seconds(), b.Name(), b.Threads(), map[bool]string{true: ", packed", false: ""}[b.Packs()]+map[bool]string{true: ", int8", false: ""}[b.Quantizes()]+computeNote(*e.compute, b.ComputesBF16()))
	return m, b, nil
}

func runForward(args []string) error {
	fs := newFlags("forward", "--model DIR (--ids 1,2,3 | --random-prompt N [--seed S]) [--out FILE.safetensors] [--generate N] [--chunk T] [--json FILE]")
	dir := fs.String("model", "", "HuggingFace model directory (config.json + safetensors)")
	idsFlag := fs.String("ids", "", "comma-separated prompt token ids")
	out := fs.String("out", "", "write float32 tensor \"logits\" [len(ids), vocab_size] to this safetensors file (with --chunk or --random-prompt: [1, vocab_size], the last prompt token's)")
	gen := fs.Int("generate", 0, "greedy-decode this many tokens through the KV cache and print {\"ids\":[...]}")
	randomPrompt := fs.Int("random-prompt", 0, "prefill N seeded random token ids (instead of --ids) and report time and memory; chunks of --chunk tokens")
	seed := fs.Uint64("seed", 1, "seed of the --random-prompt token ids")
	chunk := fs.Int("chunk", 0, "prefill the prompt through the KV cache in chunks of T tokens, one forward step each, as the serving scheduler's chunked prefill does, and report time and memory (default with --random-prompt: 512)")
	jsonOut := fs.String("json", "", "with --chunk or --random-prompt: also write the prefill report as a JSON object to this file (- for stdout)")
	ef := addEngineFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	set := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
	if *dir == "" {
		return usagef("--model is required")
	}
	switch {
	case *randomPrompt < 0:
		return usagef("--random-prompt: %d < 0", *randomPrompt)
	case set["random-prompt"] && *randomPrompt == 0:
		return usagef("--random-prompt: 0 tokens (want N ≥ 1)")
	case *randomPrompt > 0 && set["ids"]:
		return usagef("--random-prompt and --ids: give one prompt, not both")
	case set["seed"] && *randomPrompt == 0:
		return usagef("--seed: only seeds --random-prompt")
	case *chunk < 0 || set["chunk"] && *chunk == 0:
		return usagef("--chunk: %d tokens (want T ≥ 1)", *chunk)
	}
	prefill := *randomPrompt > 0 || *chunk > 0
	if prefill && *chunk == 0 {
		*chunk = 512
	}
	switch {
	case *jsonOut != "" && !prefill:
		return usagef("--json: reports a chunked prefill; add --chunk T or --random-prompt N")
	case prefill && set["generate"]:
		return usagef("--generate: not with --chunk or --random-prompt (they measure a prefill; --generate prefills in one step)")
	}
	var ids []int32
	if *randomPrompt == 0 {
		var err error
		if ids, err = parseIDs("ids", *idsFlag); err != nil {
			return err
		}
	}
	if !prefill && *out == "" && *gen <= 0 {
		return usagef("nothing to do: give --out FILE and/or --generate N")
	}
	if *gen < 0 {
		return usagef("--generate: %d < 0", *gen)
	}
	// Everything that can be checked before the weights load is checked
	// first, so bad input costs one line and no waiting.
	if *out != "" {
		if st, err := os.Stat(filepath.Dir(*out)); err != nil || !st.IsDir() {
			return usagef("--out: directory %s does not exist", filepath.Dir(*out))
		}
	}
	if *jsonOut != "" && *jsonOut != "-" {
		if st, err := os.Stat(filepath.Dir(*jsonOut)); err != nil || !st.IsDir() {
			return usagef("--json: directory %s does not exist", filepath.Dir(*jsonOut))
		}
	}
	if _, err := os.Stat(*dir); err != nil {
		return fmt.Errorf("--model: %w", err)
	}
	cfg, err := model.LoadConfig(filepath.Join(*dir, "config.json"))
	if err != nil {
		return fmt.Errorf("--model: %w", err)
	}
	if *randomPrompt > cfg.MaxContext() {
		return usagef("--random-prompt: %d tokens exceed the model's context of %d", *randomPrompt, cfg.MaxContext())
	}
	if *randomPrompt > 0 {
		ids = randomIDs(*randomPrompt, cfg.VocabSize, *seed)
	}
	for _, id := range ids {
		if int(id) >= cfg.VocabSize {
			return usagef("--ids: token id %d is outside the vocabulary [0, %d)", id, cfg.VocabSize)
		}
	}
	if len(ids) > cfg.MaxContext() {
		return usagef("--ids: %d tokens exceed the model's context of %d", len(ids), cfg.MaxContext())
	}
	if *gen > cfg.MaxContext()+1-len(ids) {
		return usagef("--generate: %d prompt + %d new tokens exceed the model's context of %d", len(ids), *gen, cfg.MaxContext())
	}
	m, b, err := ef.load(*dir)
	if err != nil {
		return err
	}
	defer b.Close()
	defer m.Close()

	if prefill {
		return runPrefill(m, ids, *chunk, *out, *jsonOut, prefillInfo{Model: *dir, Random: *randomPrompt > 0, Seed: *seed, Threads: b.Threads(), Backend: b.Name(), Compute: *ef.compute, Quantize: *ef.quantize, Mmap: *ef.mmap})
	}

	if *out != "" {
		start := time.Now()
		bm, st := m.NewCache(len(ids), model.DefaultBlockSize)
		if err := bm.Reserve(kvcache.SeqID(0), len(ids)); err != nil {
			return err
		}
		res, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: ids, Blocks: bm.Table(0), AllLogits: true}}}, st)
		if err != nil {
			return err
		}
		if err := writeLogits(*out, res.Logits[0], len(ids), cfg.VocabSize); err != nil {
			return err
		}
		fmt.Fprintf(os.Stderr, "forward: %d tokens in %.3fs, logits [%d, %d] written to %s\n",
			len(ids), time.Since(start).Seconds(), len(ids), cfg.VocabSize, *out)
	}

	if *gen > 0 {
		start := time.Now()
		var first time.Time
		gotIDs, err := m.Greedy(ids, *gen, func(step int, _ int32, _ []float32) {
			if step == 0 {
				first = time.Now()
			}
		})
		if err != nil {
			return err
		}
		end := time.Now()
		prefill := first.Sub(start)
		fmt.Fprintf(os.Stderr, "prefill: %d tokens in %.3fs (%.1f tokens/s)", len(ids), prefill.Seconds(), float64(len(ids))/prefill.Seconds())
		if n := len(gotIDs) - 1; n > 0 {
			d := end.Sub(first)
			fmt.Fprintf(os.Stderr, "; decode: %d tokens in %.3fs (%.1f tokens/s)", n, d.Seconds(), float64(n)/d.Seconds())
		}
		fmt.Fprintln(os.Stderr)
		return json.NewEncoder(os.Stdout).Encode(map[string][]int32{"ids": gotIDs})
	}
	return nil
}

// computeNote says how bf16 weights multiply, for the load line.
func computeNote(asked string, bf16 bool) string {
	switch {
	case bf16:
		return ", bf16 compute (VDPBF16PS)"
	case asked == "bf16":
		return ", bf16 compute asked: float32 FMA is the faster product on this CPU"
	}
	return ""
}

// writeLogits writes float32 tensor "logits" [rows, vocab] to path.
func writeLogits(path string, logits []float32, rows, vocab int) error {
	raw := make([]byte, 4*len(logits))
	for i, v := range logits {
		binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
	}
	t := safetensors.Tensor{Header: safetensors.Header{Name: "logits", DType: safetensors.F32, Shape: []int{rows, vocab}}, Data: raw}
	if err := safetensors.WriteFile(path, []safetensors.Tensor{t}, map[string]string{"format": "pt"}); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	return nil
}

// randomIDs is n token ids drawn uniformly from [0, vocab), the same for
// the same seed.
func randomIDs(n, vocab int, seed uint64) []int32 {
	r := rand.New(rand.NewPCG(seed, 0x9e3779b97f4a7c15))
	ids := make([]int32, n)
	for i := range ids {
		ids[i] = int32(r.IntN(vocab))
	}
	return ids
}

// chunkedPrefill runs ids through a KV cache of exactly the blocks they
// need, chunk tokens per forward step: the way the serving scheduler
// prefills a long prompt (one sequence per step, Pos = the tokens already
// cached, the sequence's block table, logits of the step's last token
// only). It returns the last token's logits, the number of steps and the
// filled cache.
func chunkedPrefill(m *model.Model, ids []int32, chunk int) ([]float32, int, *kvcache.Storage, error) {
	if len(ids) == 0 || chunk <= 0 {
		return nil, 0, nil, fmt.Errorf("prefill: %d tokens in chunks of %d", len(ids), chunk)
	}
	bm, kv := m.NewCache(len(ids), model.DefaultBlockSize)
	const seq = kvcache.SeqID(0)
	var last []float32
	steps := 0
	for start := 0; start < len(ids); start += chunk {
		end := min(len(ids), start+chunk)
		if err := bm.Reserve(seq, end); err != nil {
			return nil, steps, nil, err
		}
		res, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: ids[start:end], Pos: start, Blocks: bm.Table(seq)}}}, kv)
		if err != nil {
			return nil, steps, nil, fmt.Errorf("prefill chunk [%d, %d): %w", start, end, err)
		}
		last = res.Logits[0]
		steps++
	}
	return last, steps, kv, nil
}

// prefillInfo is what runPrefill reports about the run besides its figures.
type prefillInfo struct {
	Model    string `json:"model"`
	Random   bool   `json:"random_prompt"`
	Seed     uint64 `json:"seed,omitempty"`
	Threads  int    `json:"threads"`
	Backend  string `json:"backend"`
	Compute  string `json:"compute"`
	Quantize string `json:"quantize,omitempty"`
	Mmap     bool   `json:"mmap"`
}

// prefillReport is the --json object of a chunked prefill. Memory figures
// are bytes of resident memory of the whole process.
type prefillReport struct {
	prefillInfo
	Tokens      int     `json:"tokens"`
	Chunk       int     `json:"chunk"`
	Chunks      int     `json:"chunks"`
	Seconds     float64 `json:"seconds"`
	TokensPerS  float64 `json:"tokens_per_s"`
	Layers      int     `json:"layers"`
	KVDim       int     `json:"kv_dim"`
	KVPerToken  int64   `json:"kv_bytes_per_token"` // layers × 2 × kvDim × 4
	KVBytes     int64   `json:"kv_bytes"`           // KVPerToken × tokens
	KVAllocated int64   `json:"kv_alloc_bytes"`     // the cache's blocks: tokens rounded up to whole blocks
	BlockSize   int     `json:"block_size"`
	WeightBytes int64   `json:"weight_bytes"`
	// PeakBefore is the process's peak after the weights loaded (loading's
	// transient copies included); RSSBefore its resident memory when the
	// prefill starts, after a collection that returns freed memory to the
	// OS.
	PeakBefore int64 `json:"peak_rss_before"`
	RSSBefore  int64 `json:"rss_before"`
	// PeakPrefill is the peak during the prefill alone when PeakReset (the
	// high-water mark was reset to the current RSS before it: Linux's
	// /proc/self/clear_refs), else the process's peak so far.
	PeakPrefill int64 `json:"peak_rss_prefill"`
	// PeakAfter is the process's peak after the prefill, loading included.
	PeakAfter int64 `json:"peak_rss_after"`
	// RSSKept is the resident memory after the prefill once a collection
	// has returned the garbage to the OS, the cache still held: weights,
	// cache and the runtime, without the collector's headroom that the
	// peaks include.
	RSSKept    int64  `json:"rss_after_gc"`
	PeakReset  bool   `json:"peak_reset"`
	PeakSource string `json:"peak_source"` // /proc/self/status VmHWM, or getrusage
	GCCycles   uint32 `json:"gc_cycles"`   // Go collections during the prefill
	GOGC       string `json:"gogc,omitempty"`
	GOMEMLIMIT string `json:"gomemlimit,omitempty"`
	LastArgmax int    `json:"last_argmax"` // the last prompt token's arg-max
}

// runPrefill prefills ids in chunks and reports time and memory: one line
// on stderr, and the JSON object to jsonPath when it is set.
func runPrefill(m *model.Model, ids []int32, chunk int, outPath, jsonPath string, info prefillInfo) error {
	cfg := m.Config()
	if !info.Random {
		info.Seed = 0
	}
	r := prefillReport{prefillInfo: info, Tokens: len(ids), Chunk: chunk, Layers: m.NumLayers(), KVDim: m.KVDim(),
		BlockSize: model.DefaultBlockSize, WeightBytes: m.WeightBytes(), GOGC: os.Getenv("GOGC"), GOMEMLIMIT: os.Getenv("GOMEMLIMIT")}
	r.KVPerToken = int64(kvcache.BytesPerToken(r.Layers, r.KVDim))
	r.KVBytes = r.KVPerToken * int64(len(ids))
	r.KVAllocated = r.KVPerToken * int64((len(ids)+r.BlockSize-1)/r.BlockSize*r.BlockSize)

	// Loading leaves garbage (file buffers before packing); collect it and
	// hand it back so the prefill starts from what the weights hold, then
	// restart the high-water mark so it measures the prefill alone.
	before := readMem()
	runtime.GC()
	debug.FreeOSMemory()
	r.PeakBefore, r.PeakSource = before.peak, before.source
	r.RSSBefore = readMem().rss
	r.PeakReset = resetPeak()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	gc0 := ms.NumGC

	start := time.Now()
	logits, chunks, kv, err := chunkedPrefill(m, ids, chunk)
	elapsed := time.Since(start)
	after := readMem()
	runtime.ReadMemStats(&ms)
	if err != nil {
		return err
	}
	r.GCCycles = ms.NumGC - gc0
	runtime.GC()
	debug.FreeOSMemory()
	r.RSSKept = readMem().rss
	runtime.KeepAlive(kv)
	r.Chunks, r.Seconds = chunks, elapsed.Seconds()
	r.TokensPerS = float64(len(ids)) / r.Seconds
	r.PeakPrefill = after.peak
	r.PeakAfter = max(after.peak, r.PeakBefore)
	r.LastArgmax = model.Argmax(logits)

	if outPath != "" {
		if err := writeLogits(outPath, logits, 1, cfg.VocabSize); err != nil {
			return err
		}
	}
	during := "peak during it"
	if !r.PeakReset {
		during = "process peak after it (could not reset the high-water mark)"
	}
	fmt.Fprintf(os.Stderr, "prefill: %d tokens in %d chunks of %d: %.3fs (%.1f tokens/s); KV cache %s (%d B/token); RSS %s at start (peak %s through loading), %s %s (%s above the start), %s after a collection; %s\n",
		r.Tokens, r.Chunks, r.Chunk, r.Seconds, r.TokensPerS, fmtBytes(r.KVBytes), r.KVPerToken,
		fmtBytes(r.RSSBefore), fmtBytes(r.PeakBefore), during, fmtBytes(r.PeakPrefill), fmtBytes(r.PeakPrefill-r.RSSBefore), fmtBytes(r.RSSKept), r.PeakSource)
	if jsonPath == "" {
		return nil
	}
	raw, err := json.MarshalIndent(r, "", "  ")
	if err != nil {
		return err
	}
	raw = append(raw, '\n')
	if jsonPath == "-" {
		_, err = os.Stdout.Write(raw)
		return err
	}
	if err := os.WriteFile(jsonPath, raw, 0o644); err != nil {
		return fmt.Errorf("--json: %w", err)
	}
	return nil
}

func fmtBytes(n int64) string {
	switch {
	case n >= 1<<30 || n <= -1<<30:
		return fmt.Sprintf("%.2f GiB", float64(n)/(1<<30))
	case n >= 1<<20 || n <= -1<<20:
		return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20))
	}
	return fmt.Sprintf("%d KiB", n>>10)
}

// memSample is the process's resident memory now and at its peak, bytes.
type memSample struct {
	rss, peak int64
	source    string
}

// readMem reads VmRSS and VmHWM from /proc/self/status, or where there is
// none, getrusage's peak (ru_maxrss: KiB on Linux, bytes on macOS) for both.
func readMem() memSample {
	if raw, err := os.ReadFile("/proc/self/status"); err == nil {
		var s memSample
		sc := bufio.NewScanner(bytes.NewReader(raw))
		for sc.Scan() {
			k, v, ok := strings.Cut(sc.Text(), ":")
			if !ok || k != "VmRSS" && k != "VmHWM" {
				continue
			}
			f := strings.Fields(v) // "1234 kB"
			if len(f) != 2 || f[1] != "kB" {
				continue
			}
			n, err := strconv.ParseInt(f[0], 10, 64)
			if err != nil {
				continue
			}
			if k == "VmRSS" {
				s.rss = n << 10
			} else {
				s.peak = n << 10
			}
		}
		if s.peak > 0 {
			s.source = "/proc/self/status VmHWM"
			return s
		}
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return memSample{source: "none"}
	}
	peak := int64(ru.Maxrss)
	if runtime.GOOS != "darwin" && runtime.GOOS != "ios" {
		peak <<= 10
	}
	return memSample{rss: peak, peak: peak, source: "getrusage ru_maxrss"}
}

// resetPeak sets the process's high-water mark (VmHWM) to its current
// resident memory (Linux 4.0+); it reports whether it could.
func resetPeak() bool {
	f, err := os.OpenFile("/proc/self/clear_refs", os.O_WRONLY, 0)
	if err != nil {
		return false
	}
	_, werr := f.WriteString("5")
	cerr := f.Close()
	return werr == nil && cerr == nil
}
