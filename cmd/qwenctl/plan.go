package main

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/placement"
	"github.com/qwenfleet/qwenfleet/pkg/units"
)

func runPlan(args []string) error {
	fs := newFlags("plan", "(--model DIR | --preset NAME) --workers N --mem SIZE [flags]")
	dir := fs.String("model", "", "HuggingFace model directory (only its config.json is read)")
	presetName := fs.String("preset", "", "model shape: "+strings.Join(model.PresetNames(), ", "))
	workers := fs.Int("workers", 0, "number of identical workers (GPUs, or machines for --backend cpu)")
	mem := fs.String("mem", "", "memory of each worker, like 80GiB or 24GB")
	hosts := fs.Int("hosts", 1, "hosts the workers are spread evenly over (host0, host1, …)")
	backend := fs.String("backend", "cuda", "the workers' backend: cuda or cpu")
	tp := fs.Int("tp", 0, "force the tensor-parallel degree (0: the planner chooses)")
	pp := fs.Int("pp", 0, "force the pipeline-parallel degree (0: the planner chooses)")
	ep := fs.Int("ep", 0, "force the expert-parallel ranks per stage of a MoE model (0: the planner chooses, 1: none)")
	redundant := fs.Int("redundant-experts", 0, "extra expert slots per rank per MoE layer, for the expert load balancer (needs expert parallelism)")
	kvTokens := fs.Int("kv-tokens", 0, "KV cache each replica must hold, in tokens (0: the model's max context)")
	asJSON := fs.Bool("json", false, "print the plan as JSON")
	if err := parse(fs, args); err != nil {
		return err
	}
	if (*dir == "") == (*presetName == "") {
		return usagef("give one of --model DIR or --preset NAME")
	}
	var cfg *model.Config
	var label string
	if *presetName != "" {
		c, err := model.Preset(*presetName)
		if err != nil {
			return usagef("--preset: %v", err)
		}
		cfg, label = c, *presetName
	} else {
		if st, err := os.Stat(filepath.Join(*dir, "config.json")); err != nil || st.IsDir() {
			return usagef("--model: %s has no config.json (want a HuggingFace model directory)", *dir)
		}
		c, err := model.LoadConfig(filepath.Join(*dir, "config.json"))
		if err != nil {
			return fmt.Errorf("--model: %w", err)
		}
		cfg, label = c, filepath.Base(filepath.Clean(*dir))
	}
	if *workers < 1 {
		return usagef("--workers: need at least 1, got %d", *workers)
	}
	if *workers > 1<<16 {
		return usagef("--workers: %d is beyond the limit of %d", *workers, 1<<16)
	}
	if *mem == "" {
		return usagef("--mem is required (memory of each worker, like 80GiB)")
	}
	memBytes, err := units.ParseBytes(*mem)
	if err != nil {
		return usagef("--mem: %v", err)
	}
	if memBytes <= 0 {
		return usagef("--mem: must be more than 0")
	}
	if *hosts < 1 || *hosts > *workers {
		return usagef("--hosts: must be in [1, --workers=%d], got %d", *workers, *hosts)
	}
	if *backend != "cuda" && *backend != "cpu" {
		return usagef("--backend: %q is not cuda or cpu", *backend)
	}
	for _, f := range []struct {
		name string
		v    int
	}{{"tp", *tp}, {"pp", *pp}, {"ep", *ep}, {"kv-tokens", *kvTokens}} {
		if f.v < 0 {
			return usagef("--%s: must be >= 0 (0: the planner chooses), got %d", f.name, f.v)
		}
	}
	if *redundant < 0 {
		return usagef("--redundant-experts: must be >= 0, got %d", *redundant)
	}

	plan, err := placement.New(cfg, spreadWorkers(*workers, *hosts, memBytes, *backend), placement.Options{
		Model: label, TP: *tp, PP: *pp, EP: *ep, RedundantExperts: *redundant, KVCacheTokens: *kvTokens,
	})
	if err != nil {
		return err
	}
	if *asJSON {
		enc := json.NewEncoder(os.Stdout)
		enc.SetIndent("", "  ")
		return enc.Encode(plan)
	}
	fmt.Print(plan.String())
	return nil
}

// spreadWorkers makes n identical workers over hosts host0… (the first
// n%hosts hosts get one more), ids w0… zero-padded so they sort in
// number order.
func spreadWorkers(n, hosts int, mem int64, backend string) []placement.Worker {
	idw, hw := len(fmt.Sprint(n-1)), len(fmt.Sprint(hosts-1))
	ws := make([]placement.Worker, 0, n)
	for h := 0; h < hosts; h++ {
		k := n / hosts
		if h < n%hosts {
			k++
		}
		for ; k > 0; k-- {
			ws = append(ws, placement.Worker{
				ID: fmt.Sprintf("w%0*d", idw, len(ws)), Host: fmt.Sprintf("host%0*d", hw, h),
				MemoryBytes: mem, Backend: backend,
			})
		}
	}
	return ws
}
