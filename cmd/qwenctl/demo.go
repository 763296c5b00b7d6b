package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// runDemo makes a preset model once (cached) and greedy-decodes from it.
func runDemo(args []string) error {
	fs := newFlags("demo", "[--preset tiny] [--tokens N] [--dir DIR]")
	preset := fs.String("preset", "tiny", "model shape to make and run")
	tokens := fs.Int("tokens", 32, "tokens to generate")
	dir := fs.String("dir", "", "where the model is cached (default: the user cache directory)")
	ef := addEngineFlags(fs)
	if err := parse(fs, args); err != nil {
		return err
	}
	if *tokens <= 0 {
		return usagef("--tokens: must be > 0")
	}
	cfg, err := model.Preset(*preset) // before the name becomes part of a path
	if err != nil {
		return usagef("--preset: %v", err)
	}
	if *tokens > cfg.MaxContext() {
		return usagef("--tokens: %d is beyond the model's context of %d", *tokens, cfg.MaxContext())
	}
	if *dir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		*dir = filepath.Join(base, "qwenfleet", "demo-"+*preset)
	}
	if _, err := os.Stat(filepath.Join(*dir, "config.json")); err != nil {
		fmt.Fprintf(os.Stderr, "making the %s model in %s (once)\n", *preset, *dir)
		tmp := *dir + ".partial"
		os.RemoveAll(tmp)
		if err := runMkmodel([]string{"--preset", *preset, "--out", tmp}); err != nil {
			return err
		}
		if err := os.Rename(tmp, *dir); err != nil {
			return err
		}
	}
	m, b, err := ef.load(*dir)
	if err != nil {
		return err
	}
	defer b.Close()
	defer m.Close()
	prompt := []int32{9707, 1879} // "Hello world" in the Qwen tokenizer
	start := time.Now()
	ids, err := m.Greedy(prompt, *tokens, nil)
	if err != nil {
		return err
	}
	el := time.Since(start)
	var s []string
	for _, id := range ids {
		s = append(s, fmt.Sprint(id))
	}
	fmt.Printf("prompt ids %v → generated %d ids in %.2fs (%.1f tokens/s): %s\n",
		prompt, len(ids), el.Seconds(), float64(len(ids))/el.Seconds(), strings.Join(s, ","))
	return nil
}
