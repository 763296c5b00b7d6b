package model

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
)

// FuzzLoadConfig checks that ParseConfig (what LoadConfig runs on a
// config.json's bytes) never panics, and that whatever it accepts holds
// what the loader relies on: sizes positive and bounded, heads dividing
// as attention needs, an even head dimension, a context in [1, 2^26],
// special ids in the vocabulary; the derived values (Rope, shapes, tensor
// parallel checks) compute without panicking; and the config written back
// (ConfigJSON, what WriteConfig saves) parses to the same config.
func FuzzLoadConfig(f *testing.F) {
	dirs, _ := filepath.Glob(filepath.Join("..", "..", "testdata", "qwen2-ref", "*", "config.json"))
	for _, p := range dirs {
		if b, err := os.ReadFile(p); err == nil {
			f.Add(b)
		}
	}
	for _, s := range []string{
		`{}`,
		`null`,
		`[]`,
		`{"model_type":"qwen2"}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":3,"vocab_size":32}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":0,"vocab_size":32}`,
		`{"model_type":"qwen2","hidden_size":60,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32}`,
		`{"model_type":"qwen2","hidden_size":64,"head_dim":-2,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"eos_token_id":[1,40]}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"rope_scaling":{"type":"yarn","factor":4,"original_max_position_embeddings":64}}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"rope_scaling":{"rope_type":"yarn","factor":1e300}}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"rope_scaling":{"rope_type":"yarn","factor":2,"beta_fast":1,"beta_slow":2}}`,
		`{"model_type":"qwen2_moe","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"num_experts":8,"num_experts_per_tok":2,"moe_intermediate_size":32,"mlp_only_layers":[1],"intermediate_size":64}`,
		`{"model_type":"qwen2_moe","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"num_experts":8,"num_experts_per_tok":9,"moe_intermediate_size":32}`,
		`{"model_type":"qwen2_moe","hidden_size":64,"num_hidden_layers":4096,"num_attention_heads":4,"vocab_size":32,"num_experts":4096,"num_experts_per_tok":1,"moe_intermediate_size":32}`,
		`{"model_type":"qwen2","hidden_size":1e400}`,
		`{"model_type":"qwen2","hidden_size":"64"}`,
		`{"model_type":"qwen2","rope_theta":-1,"hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32}`,
		`{"model_type":"qwen2","hidden_size":64`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"dual_chunk_attention_config":{}}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"dual_chunk_attention_config":{"chunk_size":64,"local_size":16,"original_max_position_embeddings":100}}`,
		`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":32,"dual_chunk_attention_config":{"chunk_size":16,"local_size":16}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig(data)
		if err != nil {
			if c != nil {
				t.Fatal("config returned with an error")
			}
			return
		}
		checkAccepted(t, c)
		out, err := ConfigJSON(c)
		if err != nil {
			t.Fatalf("ConfigJSON of an accepted config: %v", err)
		}
		c2, err := ParseConfig(out)
		if err != nil {
			t.Fatalf("the config written back is refused: %v\n%s", err, out)
		}
		out2, err := ConfigJSON(c2)
		if err != nil || !bytes.Equal(out, out2) {
			t.Fatalf("written back, the config changes:\n%s\n%s (%v)", out, out2, err)
		}
	})
}

// checkAccepted checks the invariants of a config ParseConfig accepted.
func checkAccepted(t *testing.T, c *Config) {
	t.Helper()
	for key, v := range map[string]int{"hidden_size": c.HiddenSize, "num_hidden_layers": c.NumHiddenLayers,
		"num_attention_heads": c.NumAttentionHeads, "num_key_value_heads": c.NumKeyValueHeads, "vocab_size": c.VocabSize,
		"max_position_embeddings": c.MaxPositionEmbeddings} {
		if v <= 0 {
			t.Fatalf("%s = %d accepted", key, v)
		}
	}
	if c.NumAttentionHeads%c.NumKeyValueHeads != 0 {
		t.Fatalf("%d KV heads do not divide %d heads", c.NumKeyValueHeads, c.NumAttentionHeads)
	}
	d := c.HeadDimension()
	if d <= 0 || d%2 != 0 {
		t.Fatalf("head dim %d accepted", d)
	}
	if c.HeadDim == 0 && c.HiddenSize%c.NumAttentionHeads != 0 {
		t.Fatalf("%d heads do not divide hidden size %d", c.NumAttentionHeads, c.HiddenSize)
	}
	if n := c.MaxContext(); n < 1 || n > 1<<26 {
		t.Fatalf("context %d accepted", n)
	}
	if c.BosTokenID != nil && (*c.BosTokenID < 0 || *c.BosTokenID >= c.VocabSize) {
		t.Fatalf("bos %d outside the vocabulary of %d", *c.BosTokenID, c.VocabSize)
	}
	for _, id := range c.EosTokenIDs {
		if id < 0 || id >= c.VocabSize {
			t.Fatalf("eos %d outside the vocabulary of %d", id, c.VocabSize)
		}
	}
	for l := 0; l < c.NumHiddenLayers; l++ {
		if !c.IsMoELayer(l) && c.IntermediateSize <= 0 {
			t.Fatalf("dense layer %d with intermediate size %d", l, c.IntermediateSize)
		}
		if c.IsMoELayer(l) && (c.NumExpertsPerTok < 1 || c.NumExpertsPerTok > c.NumExperts || c.MoeIntermediateSize <= 0) {
			t.Fatalf("MoE layer %d: %d of %d experts of width %d", l, c.NumExpertsPerTok, c.NumExperts, c.MoeIntermediateSize)
		}
	}
	if d := c.DualChunkAttention; d != nil && (d.LocalSize <= 0 || d.ChunkSize <= d.LocalSize || d.OriginalMaxPositionEmbeddings < 0) {
		t.Fatalf("DCA %+v accepted", *d)
	}
	inv, scale := c.Rope()
	if len(inv) != d/2 || scale != scale {
		t.Fatalf("rope: %d frequencies for head dim %d, scale %v", len(inv), d, scale)
	}
	// (Shapes names every tensor: only for configs of a few thousand, to
	// keep the fuzzer fast; Validate bounds the count at 2^20.)
	if c.NumHiddenLayers*(1+max(c.NumExperts, 0)) <= 4096 {
		for _, s := range Shapes(c) {
			for _, n := range s.Shape {
				if n <= 0 {
					t.Fatalf("tensor %s has shape %v", s.Name, s.Shape)
				}
			}
		}
	}
	for tp := 1; tp <= 4; tp++ {
		_ = CheckTP(c, tp)
		if c.IsMoE() {
			_ = CheckEP(c, 2*tp, tp)
		}
	}
}
