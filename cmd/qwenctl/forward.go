package main

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math"
	"os"
	"path/filepath"
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
	fs := newFlags("forward", "--model DIR --ids 1,2,3 [--out FILE.safetensors] [--generate N]")
	dir := fs.String("model", "", "HuggingFace model directory (config.json + safetensors)")
	idsFlag := fs.String("ids", "", "comma-separated prompt token ids")
	out := fs.String("out", "", "write float32 tensor \"logits\" [len(ids), vocab_size] to this safetensors file")
	gen := fs.Int("generate", 0, "greedy-decode this many tokens through the KV cache and print {\"ids\":[...]}")
	ef := addEngineFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *dir == "" {
		return usagef("--model is required")
	}
	ids, err := parseIDs("ids", *idsFlag)
	if err != nil {
		return err
	}
	if *out == "" && *gen <= 0 {
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
	if _, err := os.Stat(*dir); err != nil {
		return fmt.Errorf("--model: %w", err)
	}
	cfg, err := model.LoadConfig(filepath.Join(*dir, "config.json"))
	if err != nil {
		return fmt.Errorf("--model: %w", err)
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
		logits := res.Logits[0]
		raw := make([]byte, 4*len(logits))
		for i, v := range logits {
			binary.LittleEndian.PutUint32(raw[4*i:], math.Float32bits(v))
		}
		t := safetensors.Tensor{Header: safetensors.Header{Name: "logits", DType: safetensors.F32, Shape: []int{len(ids), cfg.VocabSize}}, Data: raw}
		if err := safetensors.WriteFile(*out, []safetensors.Tensor{t}, map[string]string{"format": "pt"}); err != nil {
			return fmt.Errorf("--out: %w", err)
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
