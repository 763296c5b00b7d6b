package placement

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current planner")

const gib = int64(1) << 30

// uniform makes n identical workers spread evenly over hosts host0…
// (the first n%hosts hosts get one more), ids w0… zero-padded so they
// sort in number order.
func uniform(n, hosts int, mem int64, backend string) []Worker {
	idw, hw := len(fmt.Sprint(n-1)), len(fmt.Sprint(hosts-1))
	var ws []Worker
	i := 0
	for h := 0; h < hosts; h++ {
		k := n / hosts
		if h < n%hosts {
			k++
		}
		for ; k > 0; k-- {
			ws = append(ws, Worker{
				ID: fmt.Sprintf("w%0*d", idw, i), Host: fmt.Sprintf("host%0*d", hw, h),
				MemoryBytes: mem, Backend: backend,
			})
			i++
		}
	}
	return ws
}

// onHosts makes workers of mem on hosts host0… holding sizes[h] workers
// each, ids w00… in order.
func onHosts(mem int64, sizes ...int) []Worker {
	var ws []Worker
	for h, k := range sizes {
		for ; k > 0; k-- {
			ws = append(ws, Worker{ID: fmt.Sprintf("w%02d", len(ws)), Host: fmt.Sprintf("host%d", h), MemoryBytes: mem, Backend: "cuda"})
		}
	}
	return ws
}

// tinyConfig is the small test model: hidden 64, 4 heads, 2 KV heads, 3
// layers, vocabulary 512, tied embeddings.
func tinyConfig(t *testing.T) *model.Config {
	t.Helper()
	cfg, err := model.ParseConfig([]byte(`{
		"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
		"num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
		"vocab_size": 512, "max_position_embeddings": 1024, "tie_word_embeddings": true,
		"torch_dtype": "bfloat16"}`))
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func preset(t *testing.T, name string) *model.Config {
	t.Helper()
	cfg, err := model.Preset(name)
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// TestGolden plans each case and compares Plan.String (or the error text)
// with testdata/<name>.golden. Run with -update to rewrite them, then
// review the diff.
func TestGolden(t *testing.T) {
	tiny := func(t *testing.T) *model.Config { return tinyConfig(t) }
	cases := []struct {
		name, model string
		cfg         func(*testing.T) *model.Config // nil: model.Preset(model)
		workers     []Worker
		opts        Options
	}{
		{"72b-8x80-1host", "qwen2-72b", nil, uniform(8, 1, 80*gib, "cuda"), Options{}},
		{"72b-8x80-2hosts", "qwen2-72b", nil, uniform(8, 2, 80*gib, "cuda"), Options{}},
		{"72b-16x80-2hosts", "qwen2-72b", nil, uniform(16, 2, 80*gib, "cuda"), Options{}},
		{"72b-16x80-tp16", "qwen2-72b", nil, uniform(16, 2, 80*gib, "cuda"), Options{TP: 16}},
		{"72b-4x141", "qwen2-72b", nil, uniform(4, 1, 141*gib, "cuda"), Options{}},
		{"72b-2x80-nofit", "qwen2-72b", nil, uniform(2, 1, 80*gib, "cuda"), Options{}},
		{"72b-8hosts-1x80", "qwen2-72b", nil, uniform(8, 8, 80*gib, "cuda"), Options{}},
		{"72b-2hosts-2x80", "qwen2-72b", nil, uniform(4, 2, 80*gib, "cuda"), Options{}},
		{"72b-hosts-4-2-2x80", "qwen2-72b", nil, onHosts(80*gib, 4, 2, 2), Options{}},
		{"72b-2hosts-4x24", "qwen2-72b", nil, uniform(8, 2, 24*gib, "cuda"), Options{}},
		{"7b-1x24", "qwen2-7b", nil, uniform(1, 1, 24*gib, "cuda"), Options{}},
		{"7b-2x24", "qwen2-7b", nil, uniform(2, 1, 24*gib, "cuda"), Options{}},
		{"7b-4x24", "qwen2-7b", nil, uniform(4, 1, 24*gib, "cuda"), Options{}},
		{"7b-1x16-nofit", "qwen2-7b", nil, uniform(1, 1, 16*gib, "cuda"), Options{}},
		{"7b-4x16", "qwen2-7b", nil, uniform(4, 1, 16*gib, "cuda"), Options{}},
		{"7b-mixed-backends", "qwen2-7b", nil,
			append(uniform(3, 1, 24*gib, "cuda"), Worker{ID: "cpu0", Host: "box", MemoryBytes: 64 * gib, Backend: "cpu"}), Options{}},
		{"7b-2hosts-1x16", "qwen2-7b", nil, uniform(2, 2, 16*gib, "cuda"), Options{}},
		{"0.5b-2cpu-8g", "qwen2-0.5b", nil, uniform(2, 2, 8*gib, "cpu"), Options{}},
		{"0.5b-4x1-1host", "qwen2-0.5b", nil, uniform(4, 1, 1*gib, "cuda"), Options{}},
		{"0.5b-8hosts-800m", "qwen2-0.5b", nil, uniform(8, 8, 800<<20, "cuda"), Options{}},
		{"0.5b-tp3-invalid", "qwen2-0.5b", nil, uniform(4, 1, 8*gib, "cuda"), Options{TP: 3}},
		{"57b-8x80", "qwen2-57b-a14b", nil, uniform(8, 1, 80*gib, "cuda"), Options{}},
		{"57b-2x80", "qwen2-57b-a14b", nil, uniform(2, 1, 80*gib, "cuda"), Options{}},
		{"57b-4x80", "qwen2-57b-a14b", nil, uniform(4, 1, 80*gib, "cuda"), Options{}},
		{"57b-4x141", "qwen2-57b-a14b", nil, uniform(4, 1, 141*gib, "cuda"), Options{}},
		{"57b-4x80-ep4", "qwen2-57b-a14b", nil, uniform(4, 1, 80*gib, "cuda"), Options{EP: 4}},
		{"57b-8x80-ep8-tp4", "qwen2-57b-a14b", nil, uniform(8, 1, 80*gib, "cuda"), Options{EP: 8, TP: 4}},
		{"57b-4x80-ep3-tp2-invalid", "qwen2-57b-a14b", nil, uniform(4, 1, 80*gib, "cuda"), Options{EP: 3, TP: 2}},
		{"57b-4x80-ep4-redundant2", "qwen2-57b-a14b", nil, uniform(4, 1, 80*gib, "cuda"), Options{EP: 4, RedundantExperts: 2}},
		{"57b-4hosts-1x80", "qwen2-57b-a14b", nil, uniform(4, 4, 80*gib, "cuda"), Options{}},
		{"tiny-tp2-pp2", "tiny-test", tiny, uniform(4, 2, 1*gib, "cuda"), Options{TP: 2, PP: 2}},
		{"tiny-tp2-pp2-3workers", "tiny-test", tiny, uniform(3, 1, 1*gib, "cuda"), Options{TP: 2, PP: 2}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			cfg := preset
			if tc.cfg != nil {
				cfg = func(t *testing.T, _ string) *model.Config { return tc.cfg(t) }
			}
			opts := tc.opts
			opts.Model = tc.model
			plan, err := New(cfg(t, tc.model), tc.workers, opts)
			var got string
			if err != nil {
				got = "error: " + err.Error() + "\n"
			} else {
				got = plan.String()
			}
			path := filepath.Join("testdata", tc.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run go test ./pkg/placement -update)", err)
			}
			if got != string(want) {
				t.Errorf("plan differs from %s (rerun with -update and review the diff):\n--- got\n%s--- want\n%s", path, got, want)
			}
		})
	}
}
