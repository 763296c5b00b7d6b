package bench

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"slices"
)

// Message is one chat turn.
type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

// Prompt is the input of one request: exactly one of Text, Messages and
// TokenIDs is set. MaxTokens is the number of tokens to generate (>= 1).
// Prefix is set in a shared-prefix workload (SharedPrefixes): the index of
// the shared prefix TokenIDs begin with.
type Prompt struct {
	Text      string
	Messages  []Message
	TokenIDs  []int32
	MaxTokens int
	Prefix    *int
}

// Source gives the prompt of the i-th request (i >= 0). Prompt must be safe
// for concurrent use and depend only on i, so a run's prompts do not depend
// on the order in which requests happen to be sent. The caller owns the
// returned slices.
type Source interface {
	Prompt(i int) Prompt
}

// rngFor is the random stream of request i under seed: independent of every
// other request's.
func rngFor(seed uint64, i int) *rand.Rand {
	return rand.New(rand.NewPCG(seed, uint64(i)+1))
}

// Synthetic makes prompts of random token ids, as vLLM's "random" dataset
// does: request i gets Input.Sample ids drawn uniformly from [0, Limit)
// without the ids in Avoid, and asks for Output.Sample tokens.
type Synthetic struct {
	Input, Output LengthDist
	// Limit bounds the ids drawn (see TokenLimit); it must leave at least
	// one id that is not in Avoid.
	Limit int
	// Avoid are ids never drawn (end-of-sequence and other special ids).
	Avoid []int32
	Seed  uint64
	// MaxInput, when > 0, caps prompt lengths (the model's context: a
	// longer prompt could only be refused, after allocating it).
	MaxInput int
}

// Prompt makes the prompt of request i.
func (s Synthetic) Prompt(i int) Prompt { return s.draw(rngFor(s.Seed, i)) }

// draw makes a prompt from r: its length, its ids, then its output length.
func (s Synthetic) draw(r *rand.Rand) Prompt {
	n := s.Input.Sample(r)
	if s.MaxInput > 0 {
		n = min(n, s.MaxInput)
	}
	ids := make([]int32, n)
	for j := range ids {
		ids[j] = s.id(r)
	}
	return Prompt{TokenIDs: ids, MaxTokens: s.Output.Sample(r)}
}

// id draws one id from [0, Limit) that is not in Avoid.
func (s Synthetic) id(r *rand.Rand) int32 {
	id := int32(r.IntN(s.Limit))
	for slices.Contains(s.Avoid, id) {
		id = (id + 1) % int32(s.Limit)
	}
	return id
}

// ids is the number of distinct ids id draws from.
func (s Synthetic) ids() int {
	n := s.Limit
	for i, a := range s.Avoid {
		if a >= 0 && int(a) < s.Limit && !slices.Contains(s.Avoid[:i], a) {
			n--
		}
	}
	return n
}

// TokenLimit is the bound under which synthetic prompt ids are drawn for a
// model of vocab ids whose end-of-sequence ids are eos. Qwen2's special
// tokens (<|endoftext|>, <|im_start|>, <|im_end|>, ...) sit together at the
// top of the vocabulary, above every ordinary token, and the tables are
// padded beyond them; so when an eos id lies in the upper half of the
// vocabulary, ids from the lowest such id up are left out. Otherwise the
// whole vocabulary is used (Synthetic.Avoid still skips the eos ids).
func TokenLimit(vocab int, eos []int32) int {
	limit := vocab
	for _, e := range eos {
		if int(e) >= vocab/2 && int(e) < limit {
			limit = int(e)
		}
	}
	return max(limit, 1)
}

// Dataset serves prompts read from a file, cycling when more requests are
// made than it holds. Prompts without max_tokens ask for Output.Sample
// tokens, drawn per request from Seed.
type Dataset struct {
	Prompts []Prompt
	Output  LengthDist
	Seed    uint64
}

// Prompt gives prompt i mod len(Prompts).
func (d Dataset) Prompt(i int) Prompt {
	p := d.Prompts[i%len(d.Prompts)]
	p.Messages = slices.Clone(p.Messages)
	if p.MaxTokens == 0 {
		p.MaxTokens = d.Output.Sample(rngFor(d.Seed, i))
	}
	return p
}

// ErrNoPrompts is returned by ReadJSONL for input without a prompt.
var ErrNoPrompts = errors.New("no prompts")

// ReadJSONL reads one prompt per line:
//
//	{"prompt": "text", "max_tokens": 64}
//	{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 64}
//
// max_tokens is optional (0 = the caller's default); other fields are
// ignored; blank lines are skipped. Errors name the 1-based line.
func ReadJSONL(r io.Reader) ([]Prompt, error) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 0, 64<<10), 64<<20)
	var out []Prompt
	for line := 1; sc.Scan(); line++ {
		b := bytes.TrimSpace(sc.Bytes())
		if len(b) == 0 {
			continue
		}
		p, err := parseLine(b)
		if err != nil {
			return nil, fmt.Errorf("line %d: %w", line, err)
		}
		out = append(out, p)
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if len(out) == 0 {
		return nil, ErrNoPrompts
	}
	return out, nil
}

func parseLine(b []byte) (Prompt, error) {
	var v struct {
		Prompt    *string         `json:"prompt"`
		Messages  []Message       `json:"messages"`
		MaxTokens json.RawMessage `json:"max_tokens"`
	}
	if b[0] != '{' {
		return Prompt{}, errors.New("not a JSON object")
	}
	if err := json.Unmarshal(b, &v); err != nil {
		return Prompt{}, err
	}
	var p Prompt
	switch {
	case v.Prompt != nil && v.Messages != nil:
		return Prompt{}, errors.New(`give "prompt" or "messages", not both`)
	case v.Prompt != nil:
		if *v.Prompt == "" {
			return Prompt{}, errors.New(`"prompt" is empty`)
		}
		p.Text = *v.Prompt
	case len(v.Messages) > 0:
		for i, m := range v.Messages {
			if m.Role == "" {
				return Prompt{}, fmt.Errorf("messages[%d]: no role", i)
			}
		}
		p.Messages = v.Messages
	default:
		return Prompt{}, errors.New(`no "prompt" or "messages"`)
	}
	if len(v.MaxTokens) > 0 && string(v.MaxTokens) != "null" {
		var n float64
		if err := json.Unmarshal(v.MaxTokens, &n); err != nil || n != math.Trunc(n) || n < 1 || n > math.MaxInt32 {
			return Prompt{}, fmt.Errorf("max_tokens: %s is not an integer >= 1", v.MaxTokens)
		}
		p.MaxTokens = int(n)
	}
	return p, nil
}
