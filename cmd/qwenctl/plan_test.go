package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/placement"
)

// TestPlan drives `qwenctl plan`: text and JSON output, a model directory,
// plan errors (exit 1) and bad flags (exit 2, naming the flag).
func TestPlan(t *testing.T) {
	stdout, stderr, code := qwenctl(t, "plan", "--preset", "qwen2-72b", "--workers", "8", "--mem", "80GiB", "--hosts", "2")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	for _, want := range []string{"qwen2-72b: tp=4 x pp=1, 2 replicas on 8 cuda workers", "w4@host1 w5@host1 w6@host1 w7@host1", "why:"} {
		if !strings.Contains(stdout, want) {
			t.Errorf("stdout lacks %q:\n%s", want, stdout)
		}
	}

	stdout, stderr, code = qwenctl(t, "plan", "--preset", "qwen2-0.5b", "--workers", "4", "--mem", "8GiB", "--tp", "2", "--pp", "2", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var p placement.Plan
	if err := json.Unmarshal([]byte(stdout), &p); err != nil {
		t.Fatalf("stdout %q: %v", stdout, err)
	}
	if p.TP != 2 || p.PP != 2 || len(p.Replicas) != 1 || p.Replicas[0].Stages[1].LayersEnd != 24 || p.Model != "qwen2-0.5b" {
		t.Fatalf("plan %+v", p)
	}

	// Expert parallelism: --ep and --redundant-experts reach the planner.
	stdout, stderr, code = qwenctl(t, "plan", "--preset", "qwen2-57b-a14b", "--workers", "8", "--mem", "80GiB",
		"--ep", "8", "--redundant-experts", "1", "--json")
	if code != 0 {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	p = placement.Plan{}
	if err := json.Unmarshal([]byte(stdout), &p); err != nil {
		t.Fatalf("stdout %q: %v", stdout, err)
	}
	if p.EP != 8 || p.TP != 4 || len(p.Replicas) != 1 || len(p.Replicas[0].Stages[0].Ranks) != 8 ||
		p.Replicas[0].Stages[0].Ranks[5].EPRank != 5 || p.Replicas[0].Stages[0].Ranks[5].TPRank != 1 ||
		!strings.Contains(strings.Join(p.Explain, "\n"), "8 experts (+1 redundant) per rank per layer") {
		t.Fatalf("plan %+v", p)
	}
	stdout, stderr, code = qwenctl(t, "plan", "--preset", "qwen2-57b-a14b", "--workers", "8", "--mem", "80GiB")
	if code != 0 || !strings.HasPrefix(stdout, "qwen2-57b-a14b: ep=2 tp=2 x pp=1, 4 replicas") || !strings.Contains(stdout, "ep1/tp1:w1@host0") {
		t.Fatalf("exit %d: %s%s", code, stdout, stderr)
	}

	dir := filepath.Join(t.TempDir(), "my-7b")
	cfg, _ := model.Preset("qwen2-7b")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := model.WriteConfig(dir, cfg); err != nil {
		t.Fatal(err)
	}
	stdout, stderr, code = qwenctl(t, "plan", "--model", dir, "--workers", "4", "--mem", "16GiB")
	if code != 0 || !strings.HasPrefix(stdout, "my-7b: tp=2 x pp=1, 2 replicas") {
		t.Fatalf("exit %d: %s%s", code, stdout, stderr)
	}

	for _, tc := range []struct {
		args []string
		code int
		want string
	}{
		{[]string{"--preset", "qwen2-72b", "--workers", "2", "--mem", "80GiB"}, 1, "qwen2-72b needs 135.43 GiB of bf16 weights"},
		{[]string{"--preset", "qwen2-0.5b", "--workers", "4", "--mem", "8GiB", "--tp", "3"}, 1, "tp=3 does not divide the 14 query heads"},
		{[]string{"--preset", "tiny", "--workers", "3", "--mem", "8GiB", "--tp", "2", "--pp", "2"}, 1, "tp=2 x pp=2 needs 4 workers, have 3"},
		{[]string{"--workers", "2", "--mem", "8GiB"}, 2, "--model DIR or --preset NAME"},
		{[]string{"--preset", "qwen2-7b", "--model", dir, "--workers", "2", "--mem", "8GiB"}, 2, "--preset"},
		{[]string{"--preset", "huge", "--workers", "2", "--mem", "8GiB"}, 2, "--preset"},
		{[]string{"--preset", "qwen2-7b", "--mem", "8GiB"}, 2, "--workers"},
		{[]string{"--preset", "qwen2-7b", "--workers", "2"}, 2, "--mem"},
		{[]string{"--preset", "qwen2-7b", "--workers", "2", "--mem", "lots"}, 2, "--mem"},
		{[]string{"--preset", "qwen2-7b", "--workers", "2", "--mem", "8GiB", "--hosts", "3"}, 2, "--hosts"},
		{[]string{"--preset", "qwen2-7b", "--workers", "2", "--mem", "8GiB", "--tp", "-1"}, 2, "--tp"},
		{[]string{"--preset", "qwen2-57b-a14b", "--workers", "4", "--mem", "80GiB", "--ep", "-2"}, 2, "--ep"},
		{[]string{"--preset", "qwen2-57b-a14b", "--workers", "4", "--mem", "80GiB", "--redundant-experts", "-1"}, 2, "--redundant-experts"},
		{[]string{"--preset", "qwen2-57b-a14b", "--workers", "4", "--mem", "80GiB", "--ep", "3", "--tp", "2"}, 1, "ep=3 is not a multiple of tp=2"},
		{[]string{"--preset", "qwen2-7b", "--workers", "2", "--mem", "24GiB", "--redundant-experts", "2"}, 1, "2 redundant experts need a MoE model"},
		{[]string{"--preset", "qwen2-7b", "--workers", "2", "--mem", "8GiB", "--backend", "tpu"}, 2, "--backend"},
		{[]string{"--model", t.TempDir(), "--workers", "2", "--mem", "8GiB"}, 2, "config.json"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, stderr, code := qwenctl(t, append([]string{"plan"}, tc.args...)...)
			if code != tc.code || strings.Count(stderr, "\n") != 1 || !strings.Contains(stderr, tc.want) {
				t.Fatalf("exit %d, stderr %q; want exit %d mentioning %q", code, stderr, tc.code, tc.want)
			}
		})
	}
}
