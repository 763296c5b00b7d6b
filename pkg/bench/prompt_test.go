package bench

import (
	"errors"
	"reflect"
	"slices"
	"strings"
	"testing"
)

func TestReadJSONL(t *testing.T) {
	in := `{"prompt": "Hello", "max_tokens": 16}

{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "max_tokens": 8}
{"prompt": "no length", "completion": "extra fields are ignored"}
{"messages": [{"role": "user", "content": ""}], "max_tokens": null}
`
	got, err := ReadJSONL(strings.NewReader(in))
	if err != nil {
		t.Fatal(err)
	}
	want := []Prompt{
		{Text: "Hello", MaxTokens: 16},
		{Messages: []Message{{"system", "Be brief."}, {"user", "Hi"}}, MaxTokens: 8},
		{Text: "no length"},
		{Messages: []Message{{"user", ""}}},
	}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("got %+v\nwant %+v", got, want)
	}
}

func TestReadJSONLBadLines(t *testing.T) {
	ok := `{"prompt": "a"}` + "\n"
	for _, tc := range []struct {
		name, in, want string
	}{
		{"not an object", "[1, 2]\n", "line 1: not a JSON object"},
		{"broken JSON", ok + `{"prompt": "a"` + "\n", "line 2:"},
		{"prompt not a string", ok + "\n" + `{"prompt": 3}` + "\n", "line 3:"},
		{"neither", ok + `{"text": "a"}` + "\n", `line 2: no "prompt" or "messages"`},
		{"empty messages", `{"messages": []}`, `line 1: no "prompt" or "messages"`},
		{"both", `{"prompt": "a", "messages": [{"role": "user", "content": "b"}]}`, "line 1: give"},
		{"empty prompt", `{"prompt": ""}`, `line 1: "prompt" is empty`},
		{"no role", ok + ok + `{"messages": [{"role": "user", "content": "a"}, {"content": "b"}]}`, "line 3: messages[1]: no role"},
		{"zero max_tokens", `{"prompt": "a", "max_tokens": 0}`, "line 1: max_tokens"},
		{"fractional max_tokens", `{"prompt": "a", "max_tokens": 2.5}`, "line 1: max_tokens"},
		{"string max_tokens", `{"prompt": "a", "max_tokens": "8"}`, "line 1: max_tokens"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ReadJSONL(strings.NewReader(tc.in))
			if err == nil || !strings.HasPrefix(err.Error(), tc.want) {
				t.Fatalf("error %v, want it to start with %q", err, tc.want)
			}
		})
	}
	if _, err := ReadJSONL(strings.NewReader("\n  \n")); !errors.Is(err, ErrNoPrompts) {
		t.Fatalf("blank input: %v", err)
	}
}

func TestDatasetCycles(t *testing.T) {
	d := Dataset{Prompts: []Prompt{{Text: "a", MaxTokens: 3}, {Text: "b"}, {Messages: []Message{{"user", "c"}}, MaxTokens: 5}},
		Output: LengthDist{Kind: Fixed, N: 9}}
	var texts []string
	var maxes []int
	for i := range 7 {
		p := d.Prompt(i)
		texts = append(texts, p.Text)
		maxes = append(maxes, p.MaxTokens)
	}
	if !slices.Equal(texts, []string{"a", "b", "", "a", "b", "", "a"}) || !slices.Equal(maxes, []int{3, 9, 5, 3, 9, 5, 3}) {
		t.Fatalf("texts %q max_tokens %v", texts, maxes)
	}
	d.Prompt(2).Messages[0].Content = "changed"
	if d.Prompts[2].Messages[0].Content != "c" {
		t.Fatal("Prompt shares its messages with the dataset")
	}
}

func TestSynthetic(t *testing.T) {
	in, _ := ParseLengthDist("uniform:4-40")
	s := Synthetic{Input: in, Output: LengthDist{Kind: Fixed, N: 6}, Limit: 20, Avoid: []int32{0, 7}, Seed: 3}
	seen := map[int32]bool{}
	for i := range 200 {
		p := s.Prompt(i)
		if n := len(p.TokenIDs); n < 4 || n > 40 || p.MaxTokens != 6 || p.Text != "" || p.Messages != nil {
			t.Fatalf("prompt %d: %+v", i, p)
		}
		for _, id := range p.TokenIDs {
			if id < 0 || id >= 20 || id == 0 || id == 7 {
				t.Fatalf("prompt %d has id %d", i, id)
			}
			seen[id] = true
		}
		// Deterministic in i alone, whatever was asked before.
		if again := s.Prompt(i); !slices.Equal(again.TokenIDs, p.TokenIDs) {
			t.Fatalf("prompt %d differs on a second call", i)
		}
	}
	if len(seen) != 18 {
		t.Fatalf("%d distinct ids drawn, want 18", len(seen))
	}
	other := s
	other.Seed = 4
	if slices.Equal(other.Prompt(0).TokenIDs, s.Prompt(0).TokenIDs) {
		t.Fatal("another seed gives the same prompt")
	}
}

func TestTokenLimit(t *testing.T) {
	for _, tc := range []struct {
		name  string
		vocab int
		eos   []int32
		want  int
	}{
		{"qwen2: below the special tokens", 151936, []int32{151645, 151643}, 151643},
		{"reference model: eos at the top", 512, []int32{510}, 510},
		{"eos low in the vocabulary: keep all", 1000, []int32{2}, 1000},
		{"no eos", 512, nil, 512},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := TokenLimit(tc.vocab, tc.eos); got != tc.want {
				t.Fatalf("TokenLimit = %d, want %d", got, tc.want)
			}
		})
	}
}
