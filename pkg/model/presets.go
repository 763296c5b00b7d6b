package model

import (
	"fmt"
	"slices"
	"sort"
)

// Presets are the configs `qwenctl mkmodel --preset` knows: the real shapes
// of the Qwen2 family (Instruct variants, qwen2.md section 1) and three tiny
// models for demos and tests that keep the real vocabulary so the real
// tokenizer works with them (tiny-dca: tiny with Dual Chunk Attention in
// chunks of 256 positions and the length temperature past 1024).
var presets = map[string]func() *Config{
	"tiny":       func() *Config { return dense(128, 384, 4, 4, 2, 151936, true) },
	"tiny-moe":   func() *Config { return withMoE(dense(128, 384, 4, 4, 2, 151936, false), 32, 256) },
	"tiny-dca":   func() *Config { return WithDCA(dense(128, 384, 4, 4, 2, 151936, true), 320, 64, 1024) },
	"qwen2-0.5b": func() *Config { return dense(896, 4864, 24, 14, 2, 151936, true) },
	"qwen2-1.5b": func() *Config { return dense(1536, 8960, 28, 12, 2, 151936, true) },
	"qwen2-7b":   func() *Config { return dense(3584, 18944, 28, 28, 4, 152064, false) },
	"qwen2-72b": func() *Config {
		c := dense(8192, 29568, 80, 64, 8, 152064, false)
		c.MaxWindowLayers = 80
		return c
	},
	"qwen2-57b-a14b": func() *Config {
		c := withMoE(dense(3584, 18944, 28, 28, 4, 151936, false), 2560, 20480)
		c.EosTokenIDs = IntSet{151643}
		return c
	},
}

func dense(h, i, layers, heads, kv, vocab int, tied bool) *Config {
	bos := 151643
	window := 32768
	return &Config{
		Architectures: []string{"Qwen2ForCausalLM"}, ModelType: "qwen2",
		HiddenSize: h, IntermediateSize: i, NumHiddenLayers: layers,
		NumAttentionHeads: heads, NumKeyValueHeads: kv, VocabSize: vocab,
		MaxPositionEmbeddings: 32768, RopeTheta: 1e6, RMSNormEps: 1e-6, HiddenAct: "silu",
		TieWordEmbeddings: tied, TorchDtype: "bfloat16",
		BosTokenID: &bos, EosTokenIDs: IntSet{151645},
		InitializerRange: 0.02, SlidingWindow: &window, MaxWindowLayers: layers,
	}
}

// WithDCA switches Dual Chunk Attention on in c (chunk_size, local_size,
// original_max_position_embeddings as in dual_chunk_attention_config; 0
// for orig: no length temperature) and returns it. Tests make tiny DCA
// models with it from any preset.
func WithDCA(c *Config, chunkSize, localSize, orig int) *Config {
	c.DualChunkAttention = &DualChunkAttention{ChunkSize: chunkSize, LocalSize: localSize, OriginalMaxPositionEmbeddings: orig}
	return c
}

// withMoE turns a dense config into Qwen2-MoE with every layer sparse: 64
// experts, top-8 without renormalisation, experts of width inter and a
// shared expert of width shared.
func withMoE(c *Config, inter, shared int) *Config {
	c.ModelType, c.Architectures = "qwen2_moe", []string{"Qwen2MoeForCausalLM"}
	c.NumExperts, c.NumExpertsPerTok = 64, 8
	c.MoeIntermediateSize, c.SharedExpertIntermediateSize = inter, shared
	c.DecoderSparseStep, c.MlpOnlyLayers, c.RouterAuxLossCoef = 1, []int{}, 0.001
	return c
}

// PresetNames lists the presets, sorted.
func PresetNames() []string {
	var names []string
	for n := range presets {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Preset returns a fresh copy of a named config.
func Preset(name string) (*Config, error) {
	f, ok := presets[name]
	if !ok {
		return nil, fmt.Errorf("unknown preset %q (have %v)", name, PresetNames())
	}
	c := f()
	c.MlpOnlyLayers = slices.Clone(c.MlpOnlyLayers)
	return c, nil
}
