package model

import (
	"encoding/json"
	"math"
	"strings"
	"testing"
)

// qwen2_57b is the Qwen2-57B-A14B config (qwen2.md section 1).
const qwen2_57b = `{
  "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
  "hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28,
  "num_attention_heads": 28, "num_key_value_heads": 4, "vocab_size": 151936,
  "max_position_embeddings": 131072, "rope_theta": 1000000.0, "rms_norm_eps": 1e-06,
  "hidden_act": "silu", "tie_word_embeddings": false, "torch_dtype": "bfloat16",
  "bos_token_id": 151643, "eos_token_id": 151643, "attention_dropout": 0.0,
  "initializer_range": 0.02, "use_sliding_window": false, "sliding_window": 131072,
  "max_window_layers": 28, "num_experts": 64, "num_experts_per_tok": 8,
  "moe_intermediate_size": 2560, "shared_expert_intermediate_size": 20480,
  "norm_topk_prob": false, "decoder_sparse_step": 1, "mlp_only_layers": [],
  "router_aux_loss_coef": 0.001, "output_router_logits": false,
  "rope_scaling": {"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32768}
}`

func TestParseConfig57B(t *testing.T) {
	c, err := ParseConfig([]byte(qwen2_57b))
	if err != nil {
		t.Fatal(err)
	}
	if !c.IsMoE() || !c.IsMoELayer(0) || !c.IsMoELayer(27) || c.HeadDimension() != 128 {
		t.Fatalf("MoE layout wrong: %+v", c)
	}
	if c.MaxContext() != 65536 {
		t.Fatalf("context %d, want 32768×2", c.MaxContext())
	}
	if len(c.EosTokenIDs) != 1 || c.EosTokenIDs[0] != 151643 {
		t.Fatalf("eos %v", c.EosTokenIDs)
	}
	if n := NumParams(c); n != 57_408_658_944 {
		t.Fatalf("57B-A14B has %d parameters, qwen2.md says 57,408,658,944", n)
	}
}

// TestYarnFrequencies checks qwen2.md 2.7's worked numbers for Qwen2
// (θ = 1e6, d = 128, L0 = 32768): dims 0–22 unchanged, 40–63 divided by the
// factor, and mscale 0.1·ln(4)+1.
func TestYarnFrequencies(t *testing.T) {
	c, err := ParseConfig([]byte(strings.Replace(qwen2_57b, `"factor": 2.0`, `"factor": 4.0`, 1)))
	if err != nil {
		t.Fatal(err)
	}
	inv, scale := c.Rope()
	if math.Abs(float64(scale)-1.1386) > 1e-4 {
		t.Fatalf("mscale %v, want 1.1386", scale)
	}
	for j := range inv {
		theta := math.Pow(1e6, -2*float64(j)/128)
		r := float64(inv[j]) / theta
		switch {
		case j <= 23 && math.Abs(r-1) > 1e-6:
			t.Errorf("dim %d scaled by %v, want unchanged", j, r)
		case j >= 40 && math.Abs(r-0.25) > 1e-6:
			t.Errorf("dim %d scaled by %v, want 1/4", j, r)
		case j > 23 && j < 40 && (r >= 1 || r <= 0.25):
			t.Errorf("dim %d scaled by %v, want a blend", j, r)
		}
	}
	// Without original_max_position_embeddings, max_position_embeddings is L0.
	c2, err := ParseConfig([]byte(strings.Replace(qwen2_57b, `, "original_max_position_embeddings": 32768`, "", 1)))
	if err != nil {
		t.Fatal(err)
	}
	if c2.MaxContext() != 131072*2 {
		t.Fatalf("context %d without original_max_position_embeddings", c2.MaxContext())
	}
}

func TestConfigErrorsNameTheKey(t *testing.T) {
	cases := []struct{ key, value string }{
		{"model_type", `"llama"`},
		{"hidden_size", `0`},
		{"hidden_size", `"big"`},
		{"num_hidden_layers", `-1`},
		{"num_attention_heads", `24`},
		{"num_key_value_heads", `3`},
		{"vocab_size", `0`},
		{"rope_theta", `0`},
		{"rms_norm_eps", `-1`},
		{"hidden_act", `"gelu"`},
		{"use_sliding_window", `true`},
		{"eos_token_id", `[151643, 999999]`},
		{"bos_token_id", `-3`},
		{"rope_scaling", `{"type": "dynamic", "factor": 2}`},
		{"rope_scaling.factor", `{"type": "yarn", "factor": 0}`},
		{"num_experts_per_tok", `65`},
		{"moe_intermediate_size", `0`},
		{"decoder_sparse_step", `0`},
		{"mlp_only_layers", `[40]`},
		{"max_position_embeddings", `0`},
	}
	for _, tc := range cases {
		t.Run(tc.key+"="+tc.value, func(t *testing.T) {
			var m map[string]json.RawMessage
			if err := json.Unmarshal([]byte(qwen2_57b), &m); err != nil {
				t.Fatal(err)
			}
			key := tc.key
			if strings.HasPrefix(key, "rope_scaling") {
				key = "rope_scaling"
			}
			m[key] = json.RawMessage(tc.value)
			raw, _ := json.Marshal(m)
			_, err := ParseConfig(raw)
			if err == nil || !strings.Contains(err.Error(), `"`+tc.key+`"`) {
				t.Fatalf("err %v, want one naming %q", err, tc.key)
			}
		})
	}
}

func TestConfigDefaultsAndDenseLayers(t *testing.T) {
	c, err := ParseConfig([]byte(`{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
		"num_hidden_layers":2,"num_attention_heads":4,"vocab_size":100,"eos_token_id":[1,2]}`))
	if err != nil {
		t.Fatal(err)
	}
	if c.NumKeyValueHeads != 4 || c.RopeTheta != 10000 || c.RMSNormEps != 1e-6 || c.MaxContext() != 32768 || len(c.EosTokenIDs) != 2 {
		t.Fatalf("defaults: %+v", c)
	}
	// a MoE model with one dense layer needs intermediate_size
	moe := `{"model_type":"qwen2_moe","hidden_size":64,"num_hidden_layers":2,"num_attention_heads":4,
		"vocab_size":100,"num_experts":4,"num_experts_per_tok":2,"moe_intermediate_size":8,"mlp_only_layers":[1]}`
	if _, err := ParseConfig([]byte(moe)); err == nil || !strings.Contains(err.Error(), "intermediate_size") {
		t.Fatalf("dense layer without intermediate_size: %v", err)
	}
}

func TestRoute(t *testing.T) {
	logits := []float32{0, 1, 2, 3, 3, 1, 0, 3} // two tokens, 4 experts
	ex, w := Route(logits, 4, 2, false)
	if ex[0] != 3 || ex[1] != 2 || ex[2] != 0 || ex[3] != 3 { // token 1 ties 0 and 3
		t.Fatalf("experts %v (ties go to the lower index)", ex)
	}
	if s := w[0] + w[1]; s >= 1 {
		t.Fatalf("unnormalised weights sum to %v", s)
	}
	_, w = Route(logits, 4, 2, true)
	if s := w[0] + w[1]; math.Abs(float64(s)-1) > 1e-6 {
		t.Fatalf("normalised weights sum to %v", s)
	}
}

// TestPresetParameterCounts: the real-shape presets have exactly the
// parameter counts of qwen2.md section 1.3 (tied models count the
// embedding once).
func TestPresetParameterCounts(t *testing.T) {
	want := map[string]int64{
		"qwen2-0.5b":     494_032_768,
		"qwen2-1.5b":     1_543_714_304,
		"qwen2-7b":       7_615_616_512,
		"qwen2-72b":      72_706_203_648,
		"qwen2-57b-a14b": 57_408_658_944,
	}
	for name, n := range want {
		c, err := Preset(name)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Validate(); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := NumParams(c); got != n {
			t.Errorf("%s: %d parameters, want %d", name, got, n)
		}
	}
	for _, name := range PresetNames() {
		if _, err := Preset(name); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := Preset("qwen3"); err == nil {
		t.Fatal("unknown preset accepted")
	}
}

// TestConfigLimits: absurd sizes are refused up front, before anything
// loops over them or allocates for them.
func TestConfigLimits(t *testing.T) {
	for key, value := range map[string]string{
		"num_hidden_layers":       "3000000000",
		"hidden_size":             "1000000000",
		"vocab_size":              "2147483647",
		"num_experts":             "100000",
		"moe_intermediate_size":   "999999999",
		"max_position_embeddings": "1000000000000",
	} {
		var m map[string]json.RawMessage
		json.Unmarshal([]byte(qwen2_57b), &m)
		m[key] = json.RawMessage(value)
		raw, _ := json.Marshal(m)
		if _, err := ParseConfig(raw); err == nil || !strings.Contains(err.Error(), key) {
			t.Errorf("%s=%s: %v", key, value, err)
		}
	}
	// many layers of many experts: too many tensors
	big := strings.Replace(qwen2_57b, `"num_hidden_layers": 28`, `"num_hidden_layers": 4000`, 1)
	big = strings.Replace(big, `"num_experts": 64`, `"num_experts": 4000`, 1)
	if _, err := ParseConfig([]byte(big)); err == nil || !strings.Contains(err.Error(), "tensors") {
		t.Errorf("4000 layers of 4000 experts: %v", err)
	}
	huge := strings.Replace(qwen2_57b, `"factor": 2.0`, `"factor": 1e300`, 1)
	if _, err := ParseConfig([]byte(huge)); err == nil {
		t.Error("YaRN factor 1e300 accepted")
	}
}
