package model

import (
	"bufio"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// ConfigJSON renders cfg as HF writes config.json: dense models without the
// MoE keys, MoE models with all of them, rope_scaling null when unset.
func ConfigJSON(cfg *Config) ([]byte, error) {
	raw, err := json.Marshal(cfg)
	if err != nil {
		return nil, err
	}
	var m map[string]any
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, err
	}
	moeKeys := []string{"num_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
		"norm_topk_prob", "decoder_sparse_step", "mlp_only_layers", "router_aux_loss_coef", "output_router_logits"}
	if cfg.ModelType == "qwen2_moe" {
		m["mlp_only_layers"] = append([]int{}, cfg.MlpOnlyLayers...)
		m["output_router_logits"] = cfg.OutputRouterLogits
	} else {
		for _, k := range moeKeys {
			delete(m, k)
		}
	}
	return json.MarshalIndent(m, "", "  ")
}

// WriteOptions configures WriteCheckpoint.
type WriteOptions struct {
	// ShardBytes is the largest shard; a bigger checkpoint is split into
	// model-0000i-of-0000n.safetensors files with an index. 0 means 2 GiB.
	ShardBytes int64
	// Tokenizer, when not nil, is written as tokenizer.json.
	Tokenizer []byte
	// TokenizerConfig, when not nil, is written as tokenizer_config.json.
	TokenizerConfig []byte
}

// WriteCheckpoint writes a checkpoint of src's weights for cfg into dir in
// HuggingFace layout: config.json, generation_config.json, the safetensors
// file(s) and the optional tokenizer files. Tensors are streamed, so memory
// stays bounded whatever the model's size.
func WriteCheckpoint(dir string, cfg *Config, src *RandomWeights, opts WriteOptions) error {
	if opts.ShardBytes <= 0 {
		opts.ShardBytes = 2 << 30
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	if err := WriteConfig(dir, cfg); err != nil {
		return err
	}
	gen := map[string]any{"bos_token_id": 151643, "pad_token_id": 151643, "do_sample": false,
		"eos_token_id": append([]int{}, cfg.EosTokenIDs...), "transformers_version": "4.46.3"}
	if err := writeJSON(filepath.Join(dir, "generation_config.json"), gen); err != nil {
		return err
	}
	for name, data := range map[string][]byte{"tokenizer.json": opts.Tokenizer, "tokenizer_config.json": opts.TokenizerConfig} {
		if data != nil {
			if err := os.WriteFile(filepath.Join(dir, name), data, 0o644); err != nil {
				return err
			}
		}
	}

	// Split the tensors, in checkpoint order, into shards.
	var shards [][]safetensors.Header
	var size, total int64
	for _, t := range src.Tensors() {
		dt, shape, _ := src.Lookup(t.Name)
		n := int64(kernels.NumElements(shape) * dt.Size())
		if len(shards) == 0 || (size+n > opts.ShardBytes && size > 0) {
			shards = append(shards, nil)
			size = 0
		}
		shards[len(shards)-1] = append(shards[len(shards)-1], safetensors.Header{Name: t.Name, DType: dt, Shape: shape})
		size += n
		total += n
	}
	weightMap := map[string]string{}
	for i, hs := range shards {
		name := safetensors.SingleFile
		if len(shards) > 1 {
			name = fmt.Sprintf("model-%05d-of-%05d.safetensors", i+1, len(shards))
		}
		if err := writeShard(filepath.Join(dir, name), hs, src); err != nil {
			return err
		}
		for _, h := range hs {
			weightMap[h.Name] = name
		}
	}
	if len(shards) > 1 {
		return safetensors.WriteIndex(dir, weightMap, total)
	}
	return nil
}

// WriteConfig writes dir/config.json.
func WriteConfig(dir string, cfg *Config) error {
	data, err := ConfigJSON(cfg)
	if err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "config.json"), append(data, '\n'), 0o644)
}

func writeShard(path string, hs []safetensors.Header, src *RandomWeights) error {
	w, err := safetensors.Create(path, hs, map[string]string{"format": "pt"})
	if err != nil {
		return err
	}
	bw := bufio.NewWriterSize(w, 1<<20)
	for _, h := range hs {
		if err := src.Stream(h.Name, bw); err != nil {
			w.Close()
			return err
		}
	}
	if err := bw.Flush(); err != nil {
		w.Close()
		return err
	}
	return w.Close()
}

func writeJSON(path string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return err
	}
	return os.WriteFile(path, append(data, '\n'), 0o644)
}
