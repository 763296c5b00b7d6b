package tokenizer

import (
	"encoding/json"
	"os"
	"testing"
)

// tinyDoc is a small byte-level BPE tokenizer.json: the 256 byte symbols,
// a few merges (as "a b" strings, or as pairs when pairs is set) and the
// given added tokens.
func tinyDoc(pairs bool, added []map[string]any) []byte {
	vocab := map[string]int32{}
	for b := 0; b < 256; b++ {
		vocab[string(byteToRune[b])] = int32(b)
	}
	merges := [][2]string{{"h", "e"}, {"l", "l"}, {"he", "ll"}, {"Ġ", "w"}, {"o", "r"}}
	for _, m := range merges {
		vocab[m[0]+m[1]] = int32(len(vocab))
	}
	var ms any
	if pairs {
		ms = merges
	} else {
		var strs []string
		for _, m := range merges {
			strs = append(strs, m[0]+" "+m[1])
		}
		ms = strs
	}
	doc := map[string]any{
		"version":      "1.0",
		"added_tokens": added,
		"normalizer":   map[string]any{"type": "NFC"},
		"model":        map[string]any{"type": "BPE", "vocab": vocab, "merges": ms},
	}
	b, err := json.Marshal(doc)
	if err != nil {
		panic(err)
	}
	return b
}

// FuzzLoadTokenizer checks that Parse (what Load runs on tokenizer.json
// bytes) never panics, and that a tokenizer it accepts encodes text to
// valid ids, decodes them, streams them to the same text, and renders
// chats, without panicking.
func FuzzLoadTokenizer(f *testing.F) {
	specials := []map[string]any{
		{"id": 300, "content": "<|endoftext|>", "special": true},
		{"id": 301, "content": "<|im_start|>", "special": true},
		{"id": 302, "content": "<|im_end|>", "special": true},
	}
	f.Add(tinyDoc(false, nil), "hello world")
	f.Add(tinyDoc(true, specials), "<|im_start|>user\nhello<|im_end|>")
	f.Add(tinyDoc(false, []map[string]any{{"id": 5, "content": "x", "special": false}}), "xxx")
	f.Add(tinyDoc(false, []map[string]any{{"id": 1 << 30, "content": "big"}}), "big")
	f.Add(tinyDoc(false, []map[string]any{{"id": 290, "content": ""}}), "")
	f.Add(tinyDoc(false, []map[string]any{{"id": 290, "content": "a", "lstrip": true}}), "a")
	for _, s := range []string{
		`{`,
		`null`,
		`{"model":{"type":"Unigram","vocab":{"a":0}}}`,
		`{"model":{"type":"BPE","vocab":{}}}`,
		`{"model":{"type":"BPE","vocab":{"a":0},"byte_fallback":true}}`,
		`{"normalizer":{"type":"NFKC"},"model":{"type":"BPE","vocab":{"a":0}}}`,
		`{"model":{"type":"BPE","vocab":{"a":0}}}`,
		`{"model":{"type":"BPE","vocab":{"a":-1}}}`,
		`{"model":{"type":"BPE","vocab":{"a":0,"b":0}}}`,
		`{"model":{"type":"BPE","vocab":{"a":0},"merges":["a"]}}`,
		`{"model":{"type":"BPE","vocab":{"a":0},"merges":[["a"]]}}`,
		`{"model":{"type":"BPE","vocab":{"a":0},"merges":{}}}`,
		`{"added_tokens":[{"id":0,"content":"x"}],"model":{"type":"BPE","vocab":{"\u0100":0}}}`,
	} {
		f.Add([]byte(s), "a")
	}
	// A prefix of the real file (the whole one is 7 MB: the fuzzer
	// minimises large inputs slowly): truncated JSON, refused.
	if b, err := os.ReadFile(tokenizerPath); err == nil && len(b) > 4096 {
		f.Add(b[:4096], "Hello")
	}
	f.Fuzz(func(t *testing.T, doc []byte, text string) {
		tk, err := Parse(doc)
		if err != nil {
			if tk != nil {
				t.Fatal("tokenizer returned with an error")
			}
			return
		}
		if tk.NumIDs() <= 0 || tk.MaxTokenBytes() <= 0 {
			t.Fatalf("%d ids, longest token %d bytes", tk.NumIDs(), tk.MaxTokenBytes())
		}
		for _, s := range []string{text, "Hello, world!", "你好 e\u0301", "<|im_start|>user\nhi<|im_end|>", "\xff\xfe"} {
			for _, ids := range [][]int32{tk.Encode(s), tk.EncodeOrdinary(s)} {
				for _, id := range ids {
					if !tk.Valid(id) {
						t.Fatalf("encode(%q) gave id %d, which has no token", s, id)
					}
				}
				for _, skip := range []bool{false, true} {
					got, err := tk.Decode(ids, skip)
					if err != nil {
						t.Fatalf("decode(encode(%q)): %v", s, err)
					}
					d := tk.NewDetokenizer(skip)
					var st string
					for _, id := range ids {
						delta, err := d.Add(id)
						if err != nil {
							t.Fatal(err)
						}
						st += delta
					}
					if st += d.Flush(); st != got {
						t.Fatalf("stream %q, decode %q", st, got)
					}
				}
			}
		}
		if _, err := tk.Decode([]int32{-1}, false); err == nil {
			t.Fatal("id -1 decoded")
		}
		_, _ = tk.EncodeChat([]Message{{Role: "user", Content: text}}, true)
		for _, id := range tk.StopIDs() {
			if !tk.Valid(id) {
				t.Fatalf("stop id %d has no token", id)
			}
		}
		_ = tk.MaxTextBytes(1 << 20)
	})
}
