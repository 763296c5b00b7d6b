package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/qwenfleet/qwenfleet"
	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/units"
)

// runMkmodel writes a random-weight checkpoint. The files are written into
// a staging directory inside --out and moved into place with config.json
// last, so a directory holding config.json holds the whole checkpoint (an
// interrupted run leaves none, and --if-missing then writes it again).
func runMkmodel(args []string) error {
	fs := newFlags("mkmodel", "--preset NAME --out DIR [--if-missing] [flags]")
	preset := fs.String("preset", "", "model shape: "+strings.Join(model.PresetNames(), ", "))
	out := fs.String("out", "", "directory to write (created; must not already hold a config.json)")
	ifMissing := fs.Bool("if-missing", false, "when --out already holds a model (a config.json), exit 0 and write nothing (an init container or a one-shot job run again)")
	seed := fs.Uint64("seed", 0, "random seed of the weights")
	dtype := fs.String("dtype", "bf16", "weight dtype: bf16, f16 or f32")
	layers := fs.Int("layers", 0, "keep the preset's widths but use this many layers (0: the preset's)")
	configOnly := fs.Bool("config-only", false, "write config.json only")
	shard := fs.String("shard-size", "2GiB", "largest safetensors shard")
	if err := parse(fs, args); err != nil {
		return err
	}
	if *preset == "" {
		return usagef("--preset is required (one of %s)", strings.Join(model.PresetNames(), ", "))
	}
	if *out == "" {
		return usagef("--out is required")
	}
	cfg, err := model.Preset(*preset)
	if err != nil {
		return usagef("--preset: %v", err)
	}
	dt, err := parseDType(*dtype)
	if err != nil {
		return err
	}
	shardBytes, err := units.ParseBytes(*shard)
	if err != nil {
		return usagef("--shard-size: %v", err)
	}
	if *layers < 0 {
		return usagef("--layers: %d < 0", *layers)
	}
	if *layers > 0 {
		cfg.NumHiddenLayers = *layers
		cfg.MaxWindowLayers = *layers
	}
	cfg.TorchDtype = map[kernels.DType]string{kernels.BF16: "bfloat16", kernels.F16: "float16", kernels.F32: "float32"}[dt]
	if err := cfg.Validate(); err != nil {
		return err
	}
	if _, err := os.Stat(filepath.Join(*out, "config.json")); err == nil {
		if *ifMissing {
			fmt.Fprintf(os.Stderr, "%s already holds a model (config.json): left as it is (--if-missing)\n", *out)
			return nil
		}
		return usagef("--out: %s already holds a model (config.json); remove it or choose another directory", *out)
	}
	if err := os.MkdirAll(*out, 0o755); err != nil {
		return fmt.Errorf("--out: %w", err)
	}
	if *configOnly {
		return model.WriteConfig(*out, cfg)
	}
	tok, err := qwenfleet.Qwen2TokenizerJSON()
	if err != nil {
		return err
	}
	start := time.Now()
	src := model.NewRandomWeights(cfg, dt, *seed)
	err = writeStaged(*out, func(dir string) error {
		return model.WriteCheckpoint(dir, cfg, src, model.WriteOptions{
			ShardBytes: shardBytes, Tokenizer: tok, TokenizerConfig: []byte(qwenfleet.Qwen2TokenizerConfigJSON),
		})
	})
	if err != nil {
		return err
	}
	bytes := model.NumParams(cfg) * int64(dt.Size())
	fmt.Fprintf(os.Stderr, "wrote %s: %s, %d layers, %.2f GB of %v weights in %.1fs\n",
		*out, *preset, cfg.NumHiddenLayers, float64(bytes)/1e9, dt, time.Since(start).Seconds())
	return nil
}

func parseDType(s string) (kernels.DType, error) {
	switch strings.ToLower(s) {
	case "bf16", "bfloat16":
		return kernels.BF16, nil
	case "f16", "fp16", "float16":
		return kernels.F16, nil
	case "f32", "fp32", "float32":
		return kernels.F32, nil
	}
	return 0, usagef("--dtype: %q is not one of bf16, f16, f32", s)
}

// stagingDir is where mkmodel writes inside --out before moving the files
// into place (the same file system: every move is a rename).
const stagingDir = ".mkmodel-partial"

// writeStaged runs write into out/.mkmodel-partial (made anew: what an
// interrupted run left there goes), then renames every file it wrote into
// out, config.json last, and removes the staging directory.
func writeStaged(out string, write func(dir string) error) error {
	stage := filepath.Join(out, stagingDir)
	if err := os.RemoveAll(stage); err != nil {
		return err
	}
	if err := os.Mkdir(stage, 0o755); err != nil {
		return err
	}
	if err := write(stage); err != nil {
		os.RemoveAll(stage)
		return err
	}
	entries, err := os.ReadDir(stage)
	if err != nil {
		return err
	}
	// config.json last: a reader (or --if-missing) that sees it sees the rest.
	slices.SortStableFunc(entries, func(a, b os.DirEntry) int {
		return cmpBool(a.Name() == "config.json", b.Name() == "config.json")
	})
	for _, e := range entries {
		if err := os.Rename(filepath.Join(stage, e.Name()), filepath.Join(out, e.Name())); err != nil {
			return err
		}
	}
	return os.Remove(stage)
}

// cmpBool orders false before true.
func cmpBool(a, b bool) int {
	switch {
	case a == b:
		return 0
	case a:
		return 1
	}
	return -1
}
