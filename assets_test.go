package qwenfleet

import (
	"encoding/json"
	"testing"
)

func TestQwen2TokenizerJSON(t *testing.T) {
	raw, err := Qwen2TokenizerJSON()
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		AddedTokens []struct {
			ID      int    `json:"id"`
			Content string `json:"content"`
		} `json:"added_tokens"`
		Model struct {
			Vocab map[string]int `json:"vocab"`
		} `json:"model"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil {
		t.Fatal(err)
	}
	if len(doc.AddedTokens) != 3 || len(doc.Model.Vocab) != 151643 {
		t.Fatalf("%d added tokens, %d vocab entries", len(doc.AddedTokens), len(doc.Model.Vocab))
	}
	for _, a := range doc.AddedTokens {
		if Qwen2SpecialTokens[a.ID] != a.Content {
			t.Errorf("added token %d %q", a.ID, a.Content)
		}
	}
	var cfg map[string]any
	if err := json.Unmarshal([]byte(Qwen2TokenizerConfigJSON), &cfg); err != nil {
		t.Fatal(err)
	}
}
