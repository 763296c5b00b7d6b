// Package qwenfleet holds the data files compiled into the binaries. The
// files live under assets/ (testdata/ holds only test data).
package qwenfleet

import (
	_ "embed"
	"encoding/json"
	"fmt"
)

// QwenTokenizerJSON is the Qwen byte-level BPE tokenizer.json as published
// for Qwen2.5 (the same vocabulary and merges as Qwen2, with 22 added tokens
// where Qwen2 has 3; see assets/tokenizer/SOURCE.md).
//
//go:embed assets/tokenizer/tokenizer.json
var QwenTokenizerJSON []byte

// Qwen2SpecialTokens are Qwen2's added tokens: <|endoftext|>, <|im_start|>
// and <|im_end|>.
var Qwen2SpecialTokens = map[int]string{151643: "<|endoftext|>", 151644: "<|im_start|>", 151645: "<|im_end|>"}

// Qwen2TokenizerJSON is QwenTokenizerJSON with only Qwen2's three added
// tokens: the tokenizer.json a Qwen2 checkpoint ships.
func Qwen2TokenizerJSON() ([]byte, error) {
	var doc map[string]json.RawMessage
	if err := json.Unmarshal(QwenTokenizerJSON, &doc); err != nil {
		return nil, fmt.Errorf("embedded tokenizer.json: %w", err)
	}
	var added []map[string]any
	if err := json.Unmarshal(doc["added_tokens"], &added); err != nil {
		return nil, fmt.Errorf("embedded tokenizer.json: added_tokens: %w", err)
	}
	var keep []map[string]any
	for _, t := range added {
		id, _ := t["id"].(float64)
		if _, ok := Qwen2SpecialTokens[int(id)]; ok {
			keep = append(keep, t)
		}
	}
	if len(keep) != len(Qwen2SpecialTokens) {
		return nil, fmt.Errorf("embedded tokenizer.json: found %d of Qwen2's %d special tokens", len(keep), len(Qwen2SpecialTokens))
	}
	raw, err := json.Marshal(keep)
	if err != nil {
		return nil, err
	}
	doc["added_tokens"] = raw
	return json.Marshal(doc)
}

// Qwen2TokenizerConfigJSON is the tokenizer_config.json of Qwen2-Instruct:
// special tokens and the ChatML chat template.
const Qwen2TokenizerConfigJSON = `{
  "add_prefix_space": false,
  "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
  "bos_token": null,
  "chat_template": "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}",
  "clean_up_tokenization_spaces": false,
  "eos_token": "<|im_end|>",
  "errors": "replace",
  "model_max_length": 32768,
  "pad_token": "<|endoftext|>",
  "split_special_tokens": false,
  "tokenizer_class": "Qwen2Tokenizer",
  "unk_token": null
}
`
