package bench

import (
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseSharedPrefix(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want SharedPrefix
	}{
		{"8:512", SharedPrefix{N: 8, L: 512}},
		{" 1 : 1 ", SharedPrefix{N: 1, L: 1}},
		{"1000:4096", SharedPrefix{N: 1000, L: 4096}},
	} {
		t.Run(tc.in, func(t *testing.T) {
			got, err := ParseSharedPrefix(tc.in)
			if err != nil || got != tc.want {
				t.Fatalf("got %+v, %v", got, err)
			}
			if again, err := ParseSharedPrefix(got.String()); err != nil || again != got {
				t.Fatalf("%q does not read back: %+v %v", got.String(), again, err)
			}
		})
	}
	for _, tc := range []struct{ in, want string }{
		{"", "want N:L"},
		{"8", "want N:L"},
		{"8:", "want N:L"},
		{":512", "want N:L"},
		{"8:512:3", "want N:L"},
		{"x:512", "want N:L"},
		{"8:1.5", "want N:L"},
		{"0:512", "N (the number of prefixes) must be >= 1"},
		{"-2:512", "N (the number of prefixes) must be >= 1"},
		{"8:0", "L (the tokens of a prefix) must be >= 1"},
		{"100000:100000", "N×L must be at most"},
	} {
		t.Run("bad "+tc.in, func(t *testing.T) {
			got, err := ParseSharedPrefix(tc.in)
			if !errors.Is(err, ErrBadSharedPrefix) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("got %+v, %v; want an error saying %q", got, err, tc.want)
			}
		})
	}
	var v struct {
		P SharedPrefix `json:"p"`
	}
	if err := json.Unmarshal([]byte(`{"p": "4:64"}`), &v); err != nil || v.P != (SharedPrefix{4, 64}) {
		t.Fatalf("from JSON: %+v %v", v, err)
	}
	if b, _ := json.Marshal(v); string(b) != `{"p":"4:64"}` {
		t.Fatalf("to JSON: %s", b)
	}
}

func TestSharedPrefixes(t *testing.T) {
	in, _ := ParseLengthDist("uniform:2-6")
	user := Synthetic{Input: in, Output: LengthDist{Kind: Fixed, N: 4}, Limit: 50, Avoid: []int32{0, 7}, Seed: 3}
	const n, l = 5, 12
	s, err := NewSharedPrefixes(SharedPrefix{N: n, L: l}, user)
	if err != nil {
		t.Fatal(err)
	}
	// Exactly N distinct prefixes of L ids, none of them avoided.
	if len(s.Prefixes) != n {
		t.Fatalf("%d prefixes, want %d", len(s.Prefixes), n)
	}
	for k, p := range s.Prefixes {
		if len(p) != l || slices.ContainsFunc(p, func(id int32) bool { return id < 0 || id >= 50 || id == 0 || id == 7 }) {
			t.Fatalf("prefix %d: %v", k, p)
		}
		for j := range k {
			if slices.Equal(s.Prefixes[j], p) {
				t.Fatalf("prefixes %d and %d are the same", j, k)
			}
		}
	}
	// Every request is one of them, then a user turn of Input ids.
	used := map[int]int{}
	turns := map[int]map[string]bool{} // distinct user turns by prefix
	for i := range 300 {
		p := s.Prompt(i)
		if p.Prefix == nil || *p.Prefix < 0 || *p.Prefix >= n || p.MaxTokens != 4 || p.Text != "" || p.Messages != nil {
			t.Fatalf("prompt %d: %+v", i, p)
		}
		k := *p.Prefix
		if u := len(p.TokenIDs) - l; u < 2 || u > 6 || !slices.Equal(p.TokenIDs[:l], s.Prefixes[k]) {
			t.Fatalf("prompt %d is not prefix %d and a user turn of 2-6: %v", i, k, p.TokenIDs)
		}
		used[k]++
		if turns[k] == nil {
			turns[k] = map[string]bool{}
		}
		turns[k][string(toBytes(p.TokenIDs[l:]))] = true
		// Deterministic in i alone, whatever was asked before.
		if again := s.Prompt(i); *again.Prefix != k || !slices.Equal(again.TokenIDs, p.TokenIDs) {
			t.Fatalf("prompt %d differs on a second call", i)
		}
	}
	for k := range n {
		// About 60 requests each; their user turns vary.
		if used[k] < 30 || len(turns[k]) < used[k]*9/10 {
			t.Fatalf("prefix %d: %d requests, %d distinct user turns", k, used[k], len(turns[k]))
		}
	}
	// The same seed gives the same prefixes and requests, another seed others.
	again, _ := NewSharedPrefixes(SharedPrefix{N: n, L: l}, user)
	other := user
	other.Seed = 4
	diff, _ := NewSharedPrefixes(SharedPrefix{N: n, L: l}, other)
	for i := range 20 {
		if p, q := s.Prompt(i), again.Prompt(i); *p.Prefix != *q.Prefix || !slices.Equal(p.TokenIDs, q.TokenIDs) {
			t.Fatalf("request %d differs under the same seed", i)
		}
	}
	if slices.Equal(diff.Prefixes[0], s.Prefixes[0]) || slices.Equal(diff.Prompt(0).TokenIDs, s.Prompt(0).TokenIDs) {
		t.Fatal("another seed gives the same prefix and prompt")
	}
	// Prompts are the caller's.
	p := s.Prompt(0)
	p.TokenIDs[0] = -1
	if s.Prefixes[*p.Prefix][0] == -1 {
		t.Fatal("Prompt shares its ids with the prefix")
	}
}

func toBytes(ids []int32) []byte {
	b := make([]byte, 0, 4*len(ids))
	for _, id := range ids {
		b = append(b, byte(id), byte(id>>8), byte(id>>16), byte(id>>24))
	}
	return b
}

func TestSharedPrefixesLimits(t *testing.T) {
	user := Synthetic{Input: LengthDist{Kind: Fixed, N: 5}, Output: LengthDist{Kind: Fixed, N: 2}, Limit: 4, Avoid: []int32{0, 0, 9}}
	// 3 ids (1, 2, 3): 3 distinct prefixes of 1 token, all drawn.
	s, err := NewSharedPrefixes(SharedPrefix{N: 3, L: 1}, user)
	if err != nil {
		t.Fatal(err)
	}
	var firsts []int32
	for _, p := range s.Prefixes {
		firsts = append(firsts, p[0])
	}
	if slices.Sort(firsts); !slices.Equal(firsts, []int32{1, 2, 3}) {
		t.Fatalf("prefixes %v", s.Prefixes)
	}
	if _, err := NewSharedPrefixes(SharedPrefix{N: 4, L: 1}, user); err == nil || !strings.Contains(err.Error(), "3 ids make only 3 distinct prefixes of 1 tokens, not 4") {
		t.Fatalf("4 prefixes of 1 token from 3 ids: %v", err)
	}
	if _, err := NewSharedPrefixes(SharedPrefix{N: 9, L: 2}, user); err != nil {
		t.Fatalf("9 prefixes of 2 tokens from 3 ids: %v", err)
	}
	// The context caps the whole prompt: the user turn gets what the
	// prefix leaves.
	user.MaxInput = 12
	s, err = NewSharedPrefixes(SharedPrefix{N: 2, L: 10}, user)
	if err != nil {
		t.Fatal(err)
	}
	if p := s.Prompt(0); len(p.TokenIDs) != 12 {
		t.Fatalf("prompt of %d tokens in a context of 12", len(p.TokenIDs))
	}
	if _, err := NewSharedPrefixes(SharedPrefix{N: 2, L: 12}, user); err == nil || !strings.Contains(err.Error(), "no room for a user turn") {
		t.Fatalf("a prefix as long as the context: %v", err)
	}
}

// prefixRun is a shared-prefix run: prefixes 1, 0, 1, 1, 0 with TTFTs 50,
// 60, 10, 20, 30 ms; request 4 failed.
func prefixRun() []Request {
	var reqs []Request
	for i, k := range []int{1, 0, 1, 1, 0} {
		start := time.Duration(i) * 100 * msec
		ttft := []time.Duration{50, 60, 10, 20, 30}[i] * msec
		r := Request{Index: i, Start: start, End: start + ttft + 10*msec, PromptTokens: 20, OutputTokens: 2, Prefix: ptr(k),
			Chunks: []Chunk{{start + ttft, 1}, {start + ttft + 10*msec, 1}}, OutputIDs: []int32{int32(i), 5}}
		if i == 4 {
			r.Code = "Unavailable"
		}
		reqs = append(reqs, r)
	}
	return reqs
}

func TestSummarizeSharedPrefix(t *testing.T) {
	in := LengthDist{Kind: Fixed, N: 32}
	cfg := Config{Concurrency: 1, InputLen: &in, SharedPrefix: &SharedPrefix{N: 3, L: 512}}
	rep := Summarize(cfg, prefixRun(), time.Second, nil)
	p := rep.SharedPrefix
	// First uses: requests 0 and 1 (TTFT 50, 60); reuses 2 and 3 (10, 20);
	// request 4 failed.
	if p == nil || p.Used != 2 || p.FirstTTFT.Count != 2 || p.FirstTTFT.Mean != 55 || p.ReuseTTFT.Count != 2 || p.ReuseTTFT.Mean != 15 {
		t.Fatalf("shared prefix stats %+v", p)
	}
	for i, r := range rep.Records {
		if r.PrefixIndex == nil || *r.PrefixIndex != []int{1, 0, 1, 1, 0}[i] || !slices.Equal(r.OutputTokenIDs, []int32{int32(i), 5}) {
			t.Fatalf("record %d: %+v", i, r)
		}
	}
	var b strings.Builder
	rep.WriteText(&b)
	for _, want := range []string{
		"============ Serving Benchmark Result ============\nWorkload:                                shared prefix 3:512, user turn 32\n",
		"P99 TTFT (ms):                           59.70\nPrefixes used:                           2 of 3\n",
		"Mean TTFT, prefix first use (ms):        55.00\n",
		"Median TTFT, prefix reuse (ms):          15.00\n",
	} {
		if !strings.Contains(b.String(), want) {
			t.Errorf("no %q in\n%s", want, b.String())
		}
	}
	raw, _ := json.Marshal(rep)
	var got struct {
		Config struct {
			SharedPrefix string `json:"shared_prefix"`
		} `json:"config"`
		SharedPrefix map[string]any `json:"shared_prefix"`
		Records      []map[string]any
	}
	if err := json.Unmarshal(raw, &got); err != nil {
		t.Fatal(err)
	}
	if got.Config.SharedPrefix != "3:512" || got.SharedPrefix["prefixes_used"] != 2.0 || got.SharedPrefix["reuse_ttft_ms"] == nil ||
		got.Records[2]["prefix_index"] != 1.0 || len(got.Records[2]["output_token_ids"].([]any)) != 2 {
		t.Fatalf("JSON %s", raw)
	}
	// Other workloads: no prefix in the config, the records or the text.
	plain := Summarize(Config{}, run(), time.Second, nil)
	raw, _ = json.Marshal(plain)
	b.Reset()
	plain.WriteText(&b)
	if plain.SharedPrefix != nil || strings.Contains(string(raw), "prefix") || strings.Contains(b.String(), "refix") || strings.Contains(b.String(), "Workload") {
		t.Fatalf("a run without shared prefixes: %s\n%s", raw, b.String())
	}
}

func TestCompare(t *testing.T) {
	in := LengthDist{Kind: Fixed, N: 32}
	cfg := Config{Concurrency: 1, InputLen: &in, SharedPrefix: &SharedPrefix{N: 3, L: 512}, Seed: 7}
	a := Summarize(cfg, prefixRun(), time.Second, nil)
	cfgB := cfg
	cfgB.Concurrency, cfgB.API = 8, "http" // how the run was driven does not matter
	b := Summarize(cfgB, prefixRun(), time.Second, nil)
	c := Compare(a, b)
	if c.Identical() || c.Compared != 4 || c.Same != 4 || len(c.Diffs) != 0 || !slices.Equal(c.NotCompared, []int{4}) || c.ConfigDiffs != nil {
		t.Fatalf("the same run: %+v", c)
	}
	var out strings.Builder
	c.WriteText(&out)
	if out.String() != "4 requests compared: 4 identical, 0 differ; 1 not completed in both runs\n" {
		t.Fatalf("%q", out.String())
	}
	// Every request completed in both: identical.
	reqs := prefixRun()
	reqs[4].Code = ""
	a = Summarize(cfg, reqs, time.Second, nil)
	if c := Compare(a, a); !c.Identical() || c.Compared != 5 {
		t.Fatalf("a run against itself: %+v", c)
	}
	// Outputs that differ, a request given another prefix, a missing
	// request, and another seed.
	reqs = prefixRun()[:4]
	reqs[1].OutputIDs = []int32{1, 6}
	reqs[2].OutputIDs = []int32{2}
	reqs[3].Prefix = ptr(0)
	cfgB.Seed = 8
	b = Summarize(cfgB, reqs, time.Second, nil)
	c = Compare(a, b)
	if c.Identical() || c.Compared != 4 || c.Same != 1 || len(c.Diffs) != 3 || !slices.Equal(c.NotCompared, []int{4}) ||
		!slices.Equal(c.ConfigDiffs, []string{"seed 7 vs 8"}) {
		t.Fatalf("differing runs: %+v", c)
	}
	out.Reset()
	c.WriteText(&out)
	want := "config differs: seed 7 vs 8\n" +
		"request 1 (prefix 0): differs at output token 1: 5 vs 6 (2 and 2 tokens)\n" +
		"request 2 (prefix 1): one output is the start of the other: 2 vs 1 tokens\n" +
		"request 3 (prefix 1): the runs gave it different prefixes\n" +
		"4 requests compared: 1 identical, 3 differ; 1 not completed in both runs\n"
	if out.String() != want {
		t.Fatalf("got\n%s\nwant\n%s", out.String(), want)
	}
	// A report without output ids (an older qwenctl's) is not compared.
	old := Summarize(cfg, reqs, time.Second, nil)
	for i := range old.Records {
		old.Records[i].OutputTokenIDs = nil
	}
	if c := Compare(old, b); c.Identical() || c.Compared != 0 || len(c.NoIDs) != 4 {
		t.Fatalf("no ids: %+v", c)
	}
}
