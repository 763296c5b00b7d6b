package main

import (
	"encoding/json"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// prefillModel is a small reference model (3 layers, vocabulary 512,
// context 32768).
var prefillModel = filepath.Join(refDir, "dense-gqa-f32")

// closeLogits fails the test unless got and want agree within a tolerance
// scaled by the largest logit, and have the same arg-max wherever the
// top two logits are further apart than the tolerance.
func closeLogits(t *testing.T, what string, got, want []float32) {
	t.Helper()
	if len(got) != len(want) {
		t.Fatalf("%s: %d logits, want %d", what, len(got), len(want))
	}
	maxAbs := 0.0
	for _, v := range want {
		maxAbs = math.Max(maxAbs, math.Abs(float64(v)))
	}
	tol := 1e-4 * math.Max(1, maxAbs)
	for i := range want {
		if d := math.Abs(float64(got[i] - want[i])); !(d <= tol) {
			t.Fatalf("%s: logit %d is %g, want %g (off by %g > %g)", what, i, got[i], want[i], d, tol)
		}
	}
	best, second := model.Argmax(want), math.Inf(-1)
	for i, v := range want {
		if i != best {
			second = math.Max(second, float64(v))
		}
	}
	if g := model.Argmax(got); g != best && float64(want[best])-second > 2*tol {
		t.Fatalf("%s: arg-max %d, want %d", what, g, best)
	}
}

// TestChunkedPrefillMatchesOneShot: prefilling through the KV cache in
// chunks gives the last token the logits of one forward step over the
// whole prompt, for chunks smaller than a cache block, straddling blocks,
// and larger than the prompt.
func TestChunkedPrefillMatchesOneShot(t *testing.T) {
	b, err := cpu.New(cpu.Config{Threads: 2, PackWeights: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	m, err := model.Load(prefillModel, b, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	ids := randomIDs(77, m.Config().VocabSize, 5)

	bm, st := m.NewCache(len(ids), model.DefaultBlockSize)
	if err := bm.Reserve(kvcache.SeqID(0), len(ids)); err != nil {
		t.Fatal(err)
	}
	res, err := m.Forward(&model.Batch{Seqs: []model.Seq{{Tokens: ids, Blocks: bm.Table(0)}}}, st)
	if err != nil {
		t.Fatal(err)
	}
	want := res.Logits[0]

	for _, chunk := range []int{1, 7, 16, 33, 77, 512} {
		got, steps, _, err := chunkedPrefill(m, ids, chunk)
		if err != nil {
			t.Fatalf("chunk %d: %v", chunk, err)
		}
		if n := (len(ids) + chunk - 1) / chunk; steps != n {
			t.Errorf("chunk %d: %d steps, want %d", chunk, steps, n)
		}
		closeLogits(t, "chunk "+strconv.Itoa(chunk), got, want)
	}
	if _, _, _, err := chunkedPrefill(m, nil, 4); err == nil {
		t.Error("an empty prompt prefilled")
	}
}

func readPrefillJSON(t *testing.T, path string) prefillReport {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var r prefillReport
	if err := json.Unmarshal(raw, &r); err != nil {
		t.Fatalf("%s: %v", raw, err)
	}
	return r
}

// TestForwardChunkedCLI drives `qwenctl forward --chunk` and
// `--random-prompt` end to end: the last token's logits match the last row
// of a one-shot --out, and the report's figures add up.
func TestForwardChunkedCLI(t *testing.T) {
	tmp := t.TempDir()
	ids := randomIDs(45, 512, 9)
	idStrs := make([]string, len(ids))
	for i, id := range ids {
		idStrs[i] = strconv.Itoa(int(id))
	}
	idList := strings.Join(idStrs, ",")

	full := filepath.Join(tmp, "full.safetensors")
	if _, stderr, code := qwenctl(t, "forward", "--model", prefillModel, "--ids", idList, "--out", full); code != 0 {
		t.Fatalf("one-shot: exit %d: %s", code, stderr)
	}
	all := readLogits(t, full)
	V := len(all) / len(ids)
	want := all[(len(ids)-1)*V:]

	last := filepath.Join(tmp, "last.safetensors")
	js := filepath.Join(tmp, "prefill.json")
	stdout, stderr, code := qwenctl(t, "forward", "--model", prefillModel, "--ids", idList, "--chunk", "10", "--out", last, "--json", js, "--threads", "1")
	if code != 0 {
		t.Fatalf("chunked: exit %d: %s", code, stderr)
	}
	if stdout != "" || !strings.Contains(stderr, "prefill: 45 tokens in 5 chunks of 10") {
		t.Fatalf("chunked: stdout %q stderr %q", stdout, stderr)
	}
	got := readLogits(t, last)
	closeLogits(t, "--chunk 10", got, want)

	r := readPrefillJSON(t, js)
	perToken := int64(3 * 2 * 2 * 16 * 4) // layers × K,V × kvDim (2 KV heads × 16) × float32
	switch {
	case r.Tokens != 45 || r.Chunk != 10 || r.Chunks != 5:
		t.Errorf("tokens %d chunk %d chunks %d, want 45 10 5", r.Tokens, r.Chunk, r.Chunks)
	case r.KVPerToken != perToken || r.KVBytes != 45*perToken || r.KVAllocated != 48*perToken:
		t.Errorf("KV %d B/token, %d bytes, %d allocated; want %d, %d, %d", r.KVPerToken, r.KVBytes, r.KVAllocated, perToken, 45*perToken, 48*perToken)
	case r.LastArgmax != model.Argmax(got):
		t.Errorf("last_argmax %d, want %d", r.LastArgmax, model.Argmax(got))
	case !(r.Seconds > 0) || !(r.TokensPerS > 0):
		t.Errorf("seconds %g, tokens/s %g", r.Seconds, r.TokensPerS)
	case r.PeakBefore <= 0 || r.RSSBefore <= 0 || r.PeakPrefill <= 0 || r.PeakAfter < r.PeakBefore || r.PeakAfter < r.PeakPrefill || r.RSSKept <= 0:
		t.Errorf("memory figures: %+v", r)
	case r.Random || r.Seed != 0 || r.Threads != 1:
		t.Errorf("random %v seed %d threads %d", r.Random, r.Seed, r.Threads)
	}

	// --random-prompt: chunks of 512 by default; the same seed, the same
	// prompt; the JSON can go to stdout.
	run := func(seed string) prefillReport {
		t.Helper()
		stdout, stderr, code := qwenctl(t, "forward", "--model", prefillModel, "--random-prompt", "600", "--seed", seed, "--json", "-")
		if code != 0 {
			t.Fatalf("--random-prompt: exit %d: %s", code, stderr)
		}
		if n := strings.Count(strings.TrimRight(stderr, "\n"), "\n"); n != 1 { // the load line and the prefill line
			t.Errorf("stderr has %d lines: %q", n+1, stderr)
		}
		var r prefillReport
		if err := json.Unmarshal([]byte(stdout), &r); err != nil {
			t.Fatalf("stdout %q: %v", stdout, err)
		}
		return r
	}
	r1, r2 := run("3"), run("3")
	if r1.Tokens != 600 || r1.Chunk != 512 || r1.Chunks != 2 || !r1.Random || r1.Seed != 3 {
		t.Errorf("--random-prompt 600: %+v", r1)
	}
	if r1.LastArgmax != r2.LastArgmax {
		t.Errorf("seed 3 twice: arg-max %d then %d", r1.LastArgmax, r2.LastArgmax)
	}
}

// TestForwardPrefillBadFlags: each bad combination of the prefill flags is
// one clear line and exit 2, before any weights load.
func TestForwardPrefillBadFlags(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{[]string{"--random-prompt", "8", "--ids", "1,2"}, "--random-prompt and --ids"},
		{[]string{"--random-prompt", "-1"}, "--random-prompt: -1"},
		{[]string{"--random-prompt", "0"}, "--random-prompt: 0"},
		{[]string{"--random-prompt", "32769"}, "exceed the model's context of 32768"},
		{[]string{"--ids", strings.Repeat("1,", 32768) + "1", "--chunk", "512"}, "--ids: 32769 tokens exceed the model's context of 32768"},
		{[]string{"--random-prompt", "8", "--chunk", "0"}, "--chunk: 0"},
		{[]string{"--ids", "1,2", "--chunk", "-4"}, "--chunk: -4"},
		{[]string{"--ids", "1,2", "--seed", "3", "--chunk", "2"}, "--seed"},
		{[]string{"--ids", "1,2", "--json", "x.json", "--generate", "1"}, "--json"},
		{[]string{"--random-prompt", "8", "--generate", "2"}, "--generate"},
		{[]string{"--random-prompt", "8", "--json", "/nonexistent/dir/x.json"}, "--json: directory"},
		{[]string{"--random-prompt", "8", "--out", "/nonexistent/dir/x.safetensors"}, "--out"},
		{[]string{"--chunk", "8"}, "--ids"},
		{[]string{"--ids", "1,600", "--chunk", "8"}, "600"},
	}
	for _, tc := range cases {
		t.Run(tc.want, func(t *testing.T) {
			_, stderr, code := qwenctl(t, append([]string{"forward", "--model", prefillModel}, tc.args...)...)
			if code != 2 {
				t.Fatalf("exit %d, want 2: %s", code, stderr)
			}
			if lines := strings.Count(strings.TrimRight(stderr, "\n"), "\n"); lines != 0 || !strings.Contains(stderr, tc.want) {
				t.Fatalf("stderr %q, want one line mentioning %q", stderr, tc.want)
			}
		})
	}
}
