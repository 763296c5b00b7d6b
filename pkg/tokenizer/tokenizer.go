package tokenizer

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync"
	"unicode/utf8"

	"golang.org/x/text/unicode/norm"
)

// Tokenizer encodes text to token ids and back. It is safe for concurrent
// use.
type Tokenizer struct {
	tokens  [][]byte         // id → bytes (nil for ids that are not tokens)
	special []bool           // id → is a special added token
	vocab   map[string]int32 // byte-level symbol string → id (BPE vocabulary)
	merges  *mergeTable      // (left id, right id) → rank and merged id
	byteID  [256]int32       // id of each single byte

	added      []addedToken // longest first
	addedFirst [256]bool    // first bytes of added tokens
	maxToken   int          // bytes of the longest token

	caches sync.Pool // *pieceCache
}

type addedToken struct {
	content string
	id      int32
	special bool
}

// Pieces of up to minCached bytes are merged directly: that is as cheap as
// a cache lookup.
const minCached = 3

// ErrUnknownID is wrapped by errors about an id that has no token.
var ErrUnknownID = errors.New("tokenizer: id not in the vocabulary")

// Load reads a HuggingFace tokenizer.json.
func Load(path string) (*Tokenizer, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	t, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return t, nil
}

// file is the part of tokenizer.json the tokenizer reads.
type file struct {
	AddedTokens []struct {
		ID         int32  `json:"id"`
		Content    string `json:"content"`
		Special    bool   `json:"special"`
		SingleWord bool   `json:"single_word"`
		Lstrip     bool   `json:"lstrip"`
		Rstrip     bool   `json:"rstrip"`
		Normalized bool   `json:"normalized"`
	} `json:"added_tokens"`
	Normalizer *struct {
		Type string `json:"type"`
	} `json:"normalizer"`
	Model struct {
		Type          string           `json:"type"`
		Vocab         map[string]int32 `json:"vocab"`
		Merges        json.RawMessage  `json:"merges"`
		ByteFallback  bool             `json:"byte_fallback"`
		ContinuingSub string           `json:"continuing_subword_prefix"`
		EndOfWordSuf  string           `json:"end_of_word_suffix"`
	} `json:"model"`
}

// Parse builds a tokenizer from tokenizer.json bytes. It accepts the byte-level
// BPE files of Qwen2 and later Qwen models (merges as "a b" strings or
// ["a", "b"] pairs) and rejects what it cannot reproduce exactly, naming
// the field.
func Parse(data []byte) (*Tokenizer, error) {
	var f file
	if err := json.Unmarshal(data, &f); err != nil {
		return nil, fmt.Errorf("tokenizer.json: %w", err)
	}
	if f.Model.Type != "BPE" {
		return nil, fmt.Errorf("tokenizer.json: model.type %q is not supported (want BPE)", f.Model.Type)
	}
	if f.Model.ByteFallback || f.Model.ContinuingSub != "" || f.Model.EndOfWordSuf != "" {
		return nil, fmt.Errorf("tokenizer.json: model: byte_fallback, continuing_subword_prefix and end_of_word_suffix are not supported")
	}
	if f.Normalizer != nil && f.Normalizer.Type != "NFC" {
		return nil, fmt.Errorf("tokenizer.json: normalizer.type %q is not supported (want NFC)", f.Normalizer.Type)
	}
	if len(f.Model.Vocab) == 0 {
		return nil, fmt.Errorf("tokenizer.json: model.vocab is empty")
	}
	merges, err := parseMerges(f.Model.Merges)
	if err != nil {
		return nil, err
	}
	t := &Tokenizer{vocab: f.Model.Vocab}
	t.caches.New = func() any { return newPieceCache() }
	// Ids index a table, so they must be dense-ish: none beyond a bound
	// that leaves room for gaps but not for a hostile 2^31.
	limit := int32(min(len(f.Model.Vocab)+len(f.AddedTokens)+1<<16, 1<<24))
	maxID := int32(-1)
	for s, id := range f.Model.Vocab {
		if id < 0 || id >= limit {
			return nil, fmt.Errorf("tokenizer.json: model.vocab: %q has id %d outside [0, %d)", s, id, limit)
		}
		maxID = max(maxID, id)
	}
	for _, a := range f.AddedTokens {
		if a.ID < 0 || a.ID >= limit || a.Content == "" {
			return nil, fmt.Errorf("tokenizer.json: added_tokens: bad entry %d %q (ids must be in [0, %d))", a.ID, a.Content, limit)
		}
		if a.SingleWord || a.Lstrip || a.Rstrip {
			return nil, fmt.Errorf("tokenizer.json: added_tokens: %q: single_word/lstrip/rstrip are not supported", a.Content)
		}
		maxID = max(maxID, a.ID)
	}
	t.tokens = make([][]byte, maxID+1)
	t.special = make([]bool, maxID+1)
	for s, id := range f.Model.Vocab {
		b, ok := symbolBytes(s)
		if !ok {
			return nil, fmt.Errorf("tokenizer.json: model.vocab: %q is not a byte-level token", s)
		}
		if t.tokens[id] != nil {
			return nil, fmt.Errorf("tokenizer.json: model.vocab: id %d used twice", id)
		}
		t.tokens[id] = b
	}
	for b := 0; b < 256; b++ {
		id, ok := t.vocab[string(byteToRune[b])]
		if !ok {
			return nil, fmt.Errorf("tokenizer.json: model.vocab has no token for byte 0x%02x", b)
		}
		t.byteID[b] = id
	}
	t.merges = newMergeTable(len(merges))
	for rank, m := range merges {
		a, b := m[0], m[1]
		ia, oka := t.vocab[a]
		ib, okb := t.vocab[b]
		im, okm := t.vocab[a+b]
		if !oka || !okb || !okm {
			return nil, fmt.Errorf("tokenizer.json: model.merges[%d]: %q + %q: a part or the result is not in the vocabulary", rank, a, b)
		}
		t.merges.add(ia, ib, int32(rank), im)
	}
	for _, a := range f.AddedTokens {
		t.tokens[a.ID] = []byte(a.Content)
		t.special[a.ID] = a.Special
		t.added = append(t.added, addedToken{a.Content, a.ID, a.Special})
		t.addedFirst[a.Content[0]] = true
	}
	sort.SliceStable(t.added, func(i, j int) bool { return len(t.added[i].content) > len(t.added[j].content) })
	for _, b := range t.tokens {
		t.maxToken = max(t.maxToken, len(b))
	}
	return t, nil
}

// parseMerges reads model.merges: "a b" strings (older files) or ["a", "b"]
// pairs (newer ones).
func parseMerges(raw json.RawMessage) ([][2]string, error) {
	var strs []string
	if err := json.Unmarshal(raw, &strs); err == nil {
		out := make([][2]string, len(strs))
		for i, s := range strs {
			a, b, ok := strings.Cut(s, " ")
			if !ok || a == "" || b == "" || strings.Contains(b, " ") {
				return nil, fmt.Errorf("tokenizer.json: model.merges[%d]: %q is not \"a b\"", i, s)
			}
			out[i] = [2]string{a, b}
		}
		return out, nil
	}
	var pairs [][]string
	if err := json.Unmarshal(raw, &pairs); err != nil {
		return nil, fmt.Errorf("tokenizer.json: model.merges: neither \"a b\" strings nor [\"a\", \"b\"] pairs: %w", err)
	}
	out := make([][2]string, len(pairs))
	for i, p := range pairs {
		if len(p) != 2 || p[0] == "" || p[1] == "" {
			return nil, fmt.Errorf("tokenizer.json: model.merges[%d]: %q is not a pair", i, p)
		}
		out[i] = [2]string{p[0], p[1]}
	}
	return out, nil
}

// NumIDs is one more than the largest id with a token (the vocabulary the
// tokenizer can produce or read; a model's embedding may have more rows).
func (t *Tokenizer) NumIDs() int { return len(t.tokens) }

// Valid reports whether id has a token.
func (t *Tokenizer) Valid(id int32) bool {
	return id >= 0 && int(id) < len(t.tokens) && t.tokens[id] != nil
}

// IsSpecial reports whether id is a special added token (skipped by
// Decode with skipSpecial).
func (t *Tokenizer) IsSpecial(id int32) bool { return t.Valid(id) && t.special[id] }

// TokenBytes is the bytes of one token, or nil for an unknown id. The
// slice must not be modified.
func (t *Tokenizer) TokenBytes(id int32) []byte {
	if !t.Valid(id) {
		return nil
	}
	return t.tokens[id]
}

// MaxTokenBytes is the length in bytes of the longest token (an added
// token's text included).
func (t *Tokenizer) MaxTokenBytes() int { return t.maxToken }

// MaxNFCShrink bounds how much Encode's normalization can shorten a text:
// NFC turns at most 3 bytes into 1 (U+212A KELVIN SIGN becomes K; a Hangul
// L+V+T jamo triple, 9 bytes, one 3-byte syllable); replacing invalid
// UTF-8 by U+FFFD never shortens it.
const MaxNFCShrink = 3

// MaxTextBytes is the length of the longest text that could encode to n
// tokens or fewer: the encoded bytes are at least len(text)/MaxNFCShrink,
// and every token holds at most MaxTokenBytes of them. So a text longer
// than MaxTextBytes(n) needs more than n tokens, and a caller may refuse
// it without encoding it (a sound bound, not a tight one).
func (t *Tokenizer) MaxTextBytes(n int) int64 {
	return int64(max(n, 0)) * int64(t.maxToken) * MaxNFCShrink
}

// ID returns the id of an added token's text (e.g. "<|im_end|>").
func (t *Tokenizer) ID(content string) (int32, bool) {
	for _, a := range t.added {
		if a.content == content {
			return a.id, true
		}
	}
	return 0, false
}

// Encode tokenizes text, recognising added tokens (<|im_start|>, ...) inside
// it.
func (t *Tokenizer) Encode(text string) []int32 {
	return t.encode(text, true, make([]int32, 0, len(text)/3+1))
}

// EncodeOrdinary tokenizes text without recognising added tokens: their
// text is encoded like any other text.
func (t *Tokenizer) EncodeOrdinary(text string) []int32 {
	return t.encode(text, false, make([]int32, 0, len(text)/3+1))
}

func (t *Tokenizer) encode(text string, added bool, out []int32) []int32 {
	if !utf8.ValidString(text) {
		text = string(lossy(nil, []byte(text)))
	}
	c := t.caches.Get().(*pieceCache)
	defer t.caches.Put(c)
	if !added || len(t.added) == 0 {
		return t.encodeSegment(c, text, out)
	}
	start := 0
	for i := 0; i < len(text); i++ {
		if !t.addedFirst[text[i]] {
			continue
		}
		for _, a := range t.added {
			if strings.HasPrefix(text[i:], a.content) {
				out = t.encodeSegment(c, text[start:i], out)
				out = append(out, a.id)
				i += len(a.content) - 1
				start = i + 1
				break
			}
		}
	}
	return t.encodeSegment(c, text[start:], out)
}

// encodeSegment encodes text that holds no added token.
func (t *Tokenizer) encodeSegment(c *pieceCache, s string, out []int32) []int32 {
	if s == "" {
		return out
	}
	if !isASCII(s) && !norm.NFC.IsNormalString(s) {
		s = norm.NFC.String(s)
	}
	for len(s) > 0 {
		n := nextPiece(s)
		out = t.encodePiece(c, s[:n], out)
		s = s[n:]
	}
	return out
}

func isASCII(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] >= utf8.RuneSelf {
			return false
		}
	}
	return true
}

// encodePiece appends the BPE ids of one pre-token.
func (t *Tokenizer) encodePiece(c *pieceCache, p string, out []int32) []int32 {
	if len(p) <= minCached {
		return t.bpe(p, out, nil)
	}
	h := pieceHash(p)
	if ids, ok := c.get(p, h); ok {
		return append(out, ids...)
	}
	start := len(out)
	out = t.bpe(p, out, &c.bpe)
	c.put(p, h, out[start:])
	return out
}

// Decode turns ids into text: token bytes concatenated (added tokens as
// their text, special ones left out when skipSpecial) and decoded as UTF-8
// with invalid sequences replaced by U+FFFD. An id without a token is an
// error naming it.
func (t *Tokenizer) Decode(ids []int32, skipSpecial bool) (string, error) {
	var buf []byte
	for _, id := range ids {
		if !t.Valid(id) {
			return "", fmt.Errorf("%w: %d (valid ids are below %d)", ErrUnknownID, id, len(t.tokens))
		}
		if skipSpecial && t.special[id] {
			continue
		}
		buf = append(buf, t.tokens[id]...)
	}
	return string(lossy(nil, buf)), nil
}
