package tokenizer

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode"
	"unicode/utf8"
)

// benchCorpus is about 1.5 MB of mixed text, built deterministically: English
// prose and Chinese prose made of vocabulary words drawn with a Zipf law
// (lower ids, the earlier merges, are the more frequent words), and this
// repository's Go source as code, in alternating paragraphs.
func benchCorpus(b *testing.B, tk *Tokenizer) string {
	b.Helper()
	var english, chinese []string
	ids := make([]int, 0, len(tk.vocab))
	for _, id := range tk.vocab {
		ids = append(ids, int(id))
	}
	sort.Ints(ids)
	for _, id := range ids {
		s := string(tk.tokens[id])
		if len(s) > 2 && s[0] == ' ' && strings.IndexFunc(s[1:], func(r rune) bool { return r < 'a' || r > 'z' }) < 0 {
			english = append(english, s)
		} else if len([]rune(s)) >= 1 && strings.IndexFunc(s, func(r rune) bool { return !unicode.Is(unicode.Han, r) }) < 0 {
			chinese = append(chinese, s)
		}
	}
	var code strings.Builder
	filepath.Walk("../..", func(p string, info os.FileInfo, err error) error {
		if err == nil && strings.HasSuffix(p, ".go") && !strings.Contains(p, "testdata") {
			data, _ := os.ReadFile(p)
			code.Write(data)
		}
		return nil
	})
	src := code.String()
	rng := rand.New(rand.NewPCG(42, 42))
	ze := rand.NewZipf(rng, 1.2, 1, uint64(len(english)-1))
	zc := rand.NewZipf(rng, 1.2, 1, uint64(len(chinese)-1))
	var out strings.Builder
	codePos := 0
	for out.Len() < 1_500_000 {
		// English paragraph
		for s := 0; s < 5; s++ {
			n := 8 + rng.IntN(15)
			for w := 0; w < n; w++ {
				word := english[ze.Uint64()]
				if w == 0 {
					word = " " + strings.ToUpper(word[1:2]) + word[2:]
				}
				out.WriteString(word)
				if rng.IntN(12) == 0 {
					out.WriteString(",")
				}
			}
			out.WriteString(".")
		}
		out.WriteString("\n\n")
		// Chinese paragraph
		for s := 0; s < 4; s++ {
			n := 6 + rng.IntN(14)
			for w := 0; w < n; w++ {
				out.WriteString(chinese[zc.Uint64()])
				if rng.IntN(8) == 0 {
					out.WriteString("，")
				}
			}
			out.WriteString("。")
		}
		out.WriteString("\n\n")
		// a chunk of code
		n := 1500 + rng.IntN(1500)
		if codePos+n > len(src) {
			codePos = 0
		}
		end := codePos + n
		for end < len(src) && !utf8.RuneStart(src[end]) {
			end++ // whole characters only
		}
		out.WriteString(src[codePos:end])
		codePos = end
		out.WriteString("\n\n")
	}
	if !utf8.ValidString(out.String()) {
		b.Fatal("corpus is not valid UTF-8")
	}
	return out.String()
}

// BenchmarkEncode measures encode throughput on one core. "cold" empties the
// piece cache before every pass over the corpus; "warm" keeps it.
func BenchmarkEncode(b *testing.B) {
	tk, err := Load(tokenizerPath)
	if err != nil {
		b.Fatal(err)
	}
	corpus := benchCorpus(b, tk)
	for _, mode := range []string{"cold", "warm"} {
		b.Run(mode, func(b *testing.B) {
			b.SetBytes(int64(len(corpus)))
			tk.Encode(corpus)
			var n int
			for i := 0; i < b.N; i++ {
				if mode == "cold" {
					b.StopTimer()
					tk.caches = sync.Pool{New: func() any { return newPieceCache() }}
					b.StartTimer()
				}
				n = len(tk.Encode(corpus))
			}
			b.ReportMetric(float64(len(corpus))/float64(n), "bytes/token")
		})
	}
}

// BenchmarkLoad measures parsing the 7 MB tokenizer.json.
func BenchmarkLoad(b *testing.B) {
	data, err := os.ReadFile(tokenizerPath)
	if err != nil {
		b.Fatal(err)
	}
	start := time.Now()
	for i := 0; i < b.N; i++ {
		if _, err := Parse(data); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(time.Since(start).Milliseconds())/float64(b.N), "ms/load")
}
