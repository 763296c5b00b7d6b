package main

import (
	"bytes"
	"encoding/json"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// TestMain lets the tests run this binary as qwenctl: with QWENCTL_MAIN set
// it runs main() with the given arguments instead of the tests.
func TestMain(m *testing.M) {
	if os.Getenv("QWENCTL_MAIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// qwenctl runs the command in a child process; it returns stdout, stderr
// and the exit code.
func qwenctl(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(os.Args[0], args...)
	cmd.Env = append(os.Environ(), "QWENCTL_MAIN=1")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	return out.String(), errb.String(), code
}

const refDir = "../../testdata/qwen2-ref"

// TestForwardMatchesReference drives `qwenctl forward` like the acceptance
// script: logits to a file and greedy ids, on every reference case.
func TestForwardMatchesReference(t *testing.T) {
	cases, _ := filepath.Glob(filepath.Join(refDir, "*", "reference.json"))
	if len(cases) == 0 {
		t.Fatal("no reference cases")
	}
	for _, rj := range cases {
		dir := filepath.Dir(rj)
		t.Run(filepath.Base(dir), func(t *testing.T) {
			var ref struct {
				PromptIDs   []int   `json:"prompt_ids"`
				GreedyIDs   []int   `json:"greedy_ids"`
				MaxAbsLogit float64 `json:"max_abs_logit"`
			}
			raw, _ := os.ReadFile(rj)
			if err := json.Unmarshal(raw, &ref); err != nil {
				t.Fatal(err)
			}
			ids := strings.Trim(strings.Join(strings.Fields(strings.Trim(jsonOf(ref.PromptIDs), "[]")), ""), ",")
			out := filepath.Join(t.TempDir(), "logits.safetensors")
			stdout, stderr, code := qwenctl(t, "forward", "--model", dir, "--ids", ids, "--out", out, "--generate", "16")
			if code != 0 {
				t.Fatalf("exit %d: %s", code, stderr)
			}
			var got struct{ IDs []int }
			if err := json.Unmarshal([]byte(stdout), &got); err != nil {
				t.Fatalf("stdout %q: %v", stdout, err)
			}
			if !slices.Equal(got.IDs, ref.GreedyIDs) {
				t.Fatalf("ids %v, want %v", got.IDs, ref.GreedyIDs)
			}
			gotLogits := readLogits(t, out)
			want := readLogits(t, filepath.Join(dir, "reference.safetensors"))
			tol := 1e-4 * math.Max(1, ref.MaxAbsLogit)
			for i := range want {
				if d := math.Abs(float64(gotLogits[i] - want[i])); !(d <= tol) {
					t.Fatalf("logit %d differs by %g > %g", i, d, tol)
				}
			}
		})
	}
}

func jsonOf(v any) string { b, _ := json.Marshal(v); return string(b) }

func readLogits(t *testing.T, path string) []float32 {
	t.Helper()
	ck, err := safetensors.Open(path, safetensors.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ck.Close()
	v, err := ck.ReadFloat32("logits")
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// TestMkmodelThenForward makes the tiny presets and runs them.
func TestMkmodelThenForward(t *testing.T) {
	for _, preset := range []string{"tiny", "tiny-moe"} {
		t.Run(preset, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "m")
			if _, stderr, code := qwenctl(t, "mkmodel", "--preset", preset, "--out", dir, "--seed", "3", "--dtype", "f16", "--layers", "2"); code != 0 {
				t.Fatalf("mkmodel: %s", stderr)
			}
			for _, f := range []string{"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} {
				if _, err := os.Stat(filepath.Join(dir, f)); err != nil {
					t.Errorf("missing %s", f)
				}
			}
			stdout, stderr, code := qwenctl(t, "forward", "--model", dir, "--ids", "9707,1879", "--generate", "5", "--threads", "1")
			if code != 0 {
				t.Fatalf("forward: %s", stderr)
			}
			var got struct{ IDs []int }
			if err := json.Unmarshal([]byte(stdout), &got); err != nil || len(got.IDs) != 5 {
				t.Fatalf("stdout %q: %v", stdout, err)
			}
			// Same seed, same weights: a second model decodes the same ids.
			dir2 := filepath.Join(t.TempDir(), "m2")
			qwenctl(t, "mkmodel", "--preset", preset, "--out", dir2, "--seed", "3", "--dtype", "f16", "--layers", "2")
			stdout2, _, _ := qwenctl(t, "forward", "--model", dir2, "--ids", "9707,1879", "--generate", "5", "--kernels", "generic")
			if stdout2 != stdout {
				t.Fatalf("same seed decodes %s and %s", stdout, stdout2)
			}
		})
	}
}

func TestMkmodelShardsAndConfigOnly(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "sharded")
	if _, stderr, code := qwenctl(t, "mkmodel", "--preset", "tiny", "--out", dir, "--shard-size", "12MiB"); code != 0 {
		t.Fatal(stderr)
	}
	shards, _ := filepath.Glob(filepath.Join(dir, "model-*-of-*.safetensors"))
	if len(shards) < 2 {
		t.Fatalf("%d shards", len(shards))
	}
	if _, err := os.Stat(filepath.Join(dir, safetensors.IndexFile)); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := qwenctl(t, "forward", "--model", dir, "--ids", "1,2", "--generate", "2"); code != 0 {
		t.Fatal(stderr)
	}
	cfgOnly := filepath.Join(t.TempDir(), "72b")
	if _, stderr, code := qwenctl(t, "mkmodel", "--preset", "qwen2-72b", "--out", cfgOnly, "--config-only"); code != 0 {
		t.Fatal(stderr)
	}
	entries, _ := os.ReadDir(cfgOnly)
	if len(entries) != 1 || entries[0].Name() != "config.json" {
		t.Fatalf("config-only wrote %v", entries)
	}
}

// TestBadInputOneLine: every bad invocation exits non-zero with one line on
// stderr that names the problem.
func TestBadInputOneLine(t *testing.T) {
	model := filepath.Join(refDir, "dense-gqa-f32")
	existing := t.TempDir()
	os.WriteFile(filepath.Join(existing, "config.json"), []byte("{}"), 0o644)
	notModel := t.TempDir()
	badCfg := t.TempDir()
	os.WriteFile(filepath.Join(badCfg, "config.json"), []byte(`{"model_type":"qwen2","hidden_size":-4}`), 0o644)
	cases := []struct {
		args []string
		want string
	}{
		{nil, "usage"},
		{[]string{"frobnicate"}, "unknown command"},
		{[]string{"forward", "--ids", "1"}, "--model"},
		{[]string{"forward", "--model", model}, "--ids"},
		{[]string{"forward", "--model", model, "--ids", "1,x", "--generate", "1"}, `"x"`},
		{[]string{"forward", "--model", model, "--ids", "1,-2", "--generate", "1"}, `"-2"`},
		{[]string{"forward", "--model", model, "--ids", "1,512", "--generate", "1"}, "512"},
		{[]string{"forward", "--model", model, "--ids", "1"}, "nothing to do"},
		{[]string{"forward", "--model", "/nonexistent", "--ids", "1", "--generate", "1"}, "/nonexistent"},
		{[]string{"forward", "--model", notModel, "--ids", "1", "--generate", "1"}, "config.json"},
		{[]string{"forward", "--model", badCfg, "--ids", "1", "--generate", "1"}, "hidden_size"},
		{[]string{"forward", "--model", model, "--ids", "1", "--generate", "1", "--kernels", "mmx"}, "mmx"},
		{[]string{"forward", "--model", model, "--ids", "1", "--out", "/nonexistent/dir/x.safetensors"}, "--out"},
		{[]string{"forward", "--bogus"}, "bogus"},
		{[]string{"mkmodel", "--preset", "huge", "--out", "x"}, "huge"},
		{[]string{"mkmodel", "--preset", "tiny"}, "--out"},
		{[]string{"mkmodel", "--preset", "tiny", "--out", t.TempDir(), "--dtype", "int4"}, "int4"},
		{[]string{"mkmodel", "--preset", "tiny", "--out", existing}, "already holds"},
		{[]string{"mkmodel", "--preset", "tiny", "--out", t.TempDir(), "--layers", "-1"}, "--layers"},
		{[]string{"demo", "--tokens", "0"}, "--tokens"},
		{[]string{"demo", "--preset", "../../../../victim"}, "--preset"},
		{[]string{"demo", "--tokens", "9223372036854775806"}, "--tokens"},
		{[]string{"forward", "--model", model, "--ids", "1,2", "--generate", "9223372036854775807"}, "--generate"},
		{[]string{"forward", "--model", model, "--ids", "1", "--generate", "1", "--threads", "50000000"}, "50000000"},
		{[]string{"drain"}, "WORKER_ID"},
		{[]string{"drain", "w1", "w2"}, "one WORKER_ID"},
		{[]string{"drain", "w1", "--timeout", "0s"}, "--timeout"},
		{[]string{"drain", "--bogus", "w1"}, "bogus"},
		{[]string{"drain", "--addr", "127.0.0.1:1", "w1"}, "Unavailable"},
	}
	for _, tc := range cases {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			_, stderr, code := qwenctl(t, tc.args...)
			if code == 0 {
				t.Fatal("exit 0")
			}
			lines := strings.Split(strings.TrimRight(stderr, "\n"), "\n")
			if tc.args != nil && len(lines) != 1 {
				t.Fatalf("stderr has %d lines: %q", len(lines), stderr)
			}
			if !strings.Contains(stderr, tc.want) {
				t.Fatalf("stderr %q does not mention %q", stderr, tc.want)
			}
		})
	}
}

const tokenizerFile = "../../assets/tokenizer/tokenizer.json"

// TestTokenizeJSONL drives `qwenctl tokenize --jsonl` like the acceptance
// script: every reference line, ids in order.
func TestTokenizeJSONL(t *testing.T) {
	cases, err := os.ReadFile("../../testdata/tokenizer/cases.jsonl")
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "tokenize", "--tokenizer", tokenizerFile, "--jsonl")
	cmd.Env = append(os.Environ(), "QWENCTL_MAIN=1")
	cmd.Stdin = bytes.NewReader(cases)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	want := strings.Split(strings.TrimSpace(string(cases)), "\n")
	got := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(got) != len(want) {
		t.Fatalf("%d lines out for %d in", len(got), len(want))
	}
	for i := range want {
		var w, g struct{ IDs []int32 }
		json.Unmarshal([]byte(want[i]), &w)
		if err := json.Unmarshal([]byte(got[i]), &g); err != nil || !slices.Equal(w.IDs, g.IDs) {
			t.Errorf("line %d: %s, want ids %v", i+1, got[i], w.IDs)
		}
	}
}

func TestTokenizeAndDetokenize(t *testing.T) {
	stdout, stderr, code := qwenctl(t, "tokenize", "--tokenizer", tokenizerFile, "--text", "Hello world")
	if code != 0 || strings.TrimSpace(stdout) != `{"ids":[9707,1879]}` {
		t.Fatalf("tokenize: %q %q", stdout, stderr)
	}
	stdout, _, _ = qwenctl(t, "tokenize", "--tokenizer", tokenizerFile, "--text", "", "--chat")
	if !strings.HasPrefix(stdout, `{"ids":[151644,`) || !strings.HasSuffix(strings.TrimSpace(stdout), `151644,77091,198]}`) {
		t.Fatalf("chat: %q", stdout)
	}
	stdout, stderr, code = qwenctl(t, "detokenize", "--tokenizer", tokenizerFile, "--ids", "151644,9707,1879,151645")
	if code != 0 || stdout != "<|im_start|>Hello world<|im_end|>\n" {
		t.Fatalf("detokenize: %q %q", stdout, stderr)
	}
	stdout, _, _ = qwenctl(t, "detokenize", "--tokenizer", tokenizerFile, "--ids", "151644,9707,1879,151645", "--skip-special", "--json")
	if strings.TrimSpace(stdout) != `{"text":"Hello world"}` {
		t.Fatalf("detokenize --json: %q", stdout)
	}
	// mkmodel writes the tokenizer next to the weights, for --model.
	dir := filepath.Join(t.TempDir(), "m")
	qwenctl(t, "mkmodel", "--preset", "tiny", "--out", dir, "--layers", "1")
	stdout, stderr, code = qwenctl(t, "tokenize", "--model", dir, "--text", "你好，世界！")
	if code != 0 || strings.TrimSpace(stdout) != `{"ids":[108386,3837,99489,6313]}` {
		t.Fatalf("tokenize --model: %q %q", stdout, stderr)
	}
}

func TestTokenizeBadInput(t *testing.T) {
	for _, tc := range []struct {
		args  []string
		stdin string
		want  string
	}{
		{[]string{"tokenize", "--text", "x"}, "", "--tokenizer"},
		{[]string{"tokenize", "--tokenizer", tokenizerFile}, "", "--jsonl"},
		{[]string{"tokenize", "--tokenizer", "/nonexistent.json", "--text", "x"}, "", "/nonexistent.json"},
		{[]string{"tokenize", "--tokenizer", tokenizerFile, "--model", "x", "--text", "x"}, "", "not both"},
		{[]string{"tokenize", "--tokenizer", tokenizerFile, "--jsonl"}, "{\"text\":\"a\"}\n{\"txt\":1}\n", "line 2"},
		{[]string{"tokenize", "--tokenizer", tokenizerFile, "--jsonl"}, "[1,2]\n", "line 1"},
		{[]string{"tokenize", "--tokenizer", tokenizerFile, "--text", "a<|im_end|>b", "--chat"}, "", "control token"},
		{[]string{"detokenize", "--tokenizer", tokenizerFile, "--ids", "1,999999"}, "", "999999"},
		{[]string{"detokenize", "--tokenizer", tokenizerFile, "--ids", "1,a"}, "", `"a"`},
		{[]string{"tokenize", "--tokenizer", "../../testdata/qwen2-ref/dense-gqa-f32/config.json", "--text", "x"}, "", "model.type"},
	} {
		t.Run(strings.Join(tc.args, " "), func(t *testing.T) {
			cmd := exec.Command(os.Args[0], tc.args...)
			cmd.Env = append(os.Environ(), "QWENCTL_MAIN=1")
			cmd.Stdin = strings.NewReader(tc.stdin)
			var errb bytes.Buffer
			cmd.Stderr = &errb
			err := cmd.Run()
			if err == nil {
				t.Fatal("exit 0")
			}
			if lines := strings.Count(strings.TrimRight(errb.String(), "\n"), "\n"); lines != 0 || !strings.Contains(errb.String(), tc.want) {
				t.Fatalf("stderr %q, want one line mentioning %q", errb.String(), tc.want)
			}
		})
	}
}

// TestMkmodelIfMissing: --if-missing writes a model where there is none,
// then exits 0 leaving it as it is; an interrupted run's staging directory
// (no config.json yet) is written over; without the flag a model there is
// still a usage error.
func TestMkmodelIfMissing(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "m")
	args := []string{"mkmodel", "--preset", "tiny", "--layers", "1", "--out", dir, "--if-missing"}
	if _, stderr, code := qwenctl(t, args...); code != 0 {
		t.Fatalf("mkmodel --if-missing into nothing: exit %d: %s", code, stderr)
	}
	entries, _ := os.ReadDir(dir)
	var names []string
	for _, e := range entries {
		names = append(names, e.Name())
	}
	if want := []string{"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"}; !slices.Equal(names, want) {
		t.Fatalf("wrote %v, want %v (no staging directory left)", names, want)
	}
	weights := filepath.Join(dir, "model.safetensors")
	before, err := os.Stat(weights)
	if err != nil {
		t.Fatal(err)
	}
	// Again, with another seed: nothing is written.
	stdout, stderr, code := qwenctl(t, append(args, "--seed", "9")...)
	if code != 0 || stdout != "" || !strings.Contains(stderr, "already holds a model") || strings.Count(stderr, "\n") != 1 {
		t.Fatalf("mkmodel --if-missing over a model: exit %d, %q %q", code, stdout, stderr)
	}
	if after, err := os.Stat(weights); err != nil || !after.ModTime().Equal(before.ModTime()) || after.Size() != before.Size() {
		t.Fatalf("--if-missing rewrote the weights: %v", err)
	}
	if _, stderr, code := qwenctl(t, args[:len(args)-1]...); code != 2 || !strings.Contains(stderr, "already holds a model") {
		t.Fatalf("mkmodel without --if-missing over a model: exit %d %q", code, stderr)
	}

	// What an interrupted run leaves: files in the staging directory and no
	// config.json in the directory. --if-missing writes the model.
	cut := filepath.Join(t.TempDir(), "cut")
	if err := os.MkdirAll(filepath.Join(cut, stagingDir), 0o755); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(cut, stagingDir, "config.json"), []byte("{"), 0o644)
	os.WriteFile(filepath.Join(cut, "model.safetensors"), []byte("half"), 0o644)
	if _, stderr, code := qwenctl(t, "mkmodel", "--preset", "tiny", "--layers", "1", "--out", cut, "--if-missing"); code != 0 {
		t.Fatalf("mkmodel --if-missing after an interrupted run: exit %d: %s", code, stderr)
	}
	if _, err := os.Stat(filepath.Join(cut, stagingDir)); err == nil {
		t.Errorf("the staging directory is left")
	}
	if _, stderr, code := qwenctl(t, "forward", "--model", cut, "--ids", "1,2", "--generate", "2"); code != 0 {
		t.Fatalf("forward on the model written over an interrupted run: %s", stderr)
	}
}
