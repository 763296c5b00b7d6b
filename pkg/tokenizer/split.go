package tokenizer

import (
	"unicode"
	"unicode/utf8"
)

// Character classes of the split pattern.
const (
	clsL    = 1 << iota // \p{L}
	clsN                // \p{N}
	clsS                // \s
	clsCRLF             // \r or \n
)

// bmpClass holds classOf for the Basic Multilingual Plane, computed once:
// unicode.IsLetter and friends search range tables, too slow to call for
// every CJK character.
var bmpClass [0x10000]uint8

func init() {
	for r := range bmpClass {
		bmpClass[r] = classOf(rune(r))
	}
}

func classOf(r rune) uint8 {
	var c uint8
	if unicode.IsLetter(r) {
		c |= clsL
	}
	if unicode.IsNumber(r) {
		c |= clsN
	}
	if unicode.IsSpace(r) {
		c |= clsS
	}
	if r == '\r' || r == '\n' {
		c |= clsCRLF
	}
	return c
}

// at decodes the rune at s[i:] with its class and width.
func at(s string, i int) (r rune, cls uint8, w int) {
	if c := s[i]; c < utf8.RuneSelf {
		return rune(c), bmpClass[c], 1
	}
	r, w = utf8.DecodeRuneInString(s[i:])
	if r < 0x10000 {
		return r, bmpClass[r], w
	}
	return r, classOf(r), w
}

// runOf returns the end of the run of runes from i whose class has a bit
// of want.
func runOf(s string, i int, want uint8) int {
	for i < len(s) {
		if b := s[i]; b < utf8.RuneSelf {
			if bmpClass[b]&want == 0 {
				break
			}
			i++
			continue
		}
		_, c, w := at(s, i)
		if c&want == 0 {
			break
		}
		i += w
	}
	return i
}

// runNot returns the end of the run of runes from i whose class has no bit
// of not.
func runNot(s string, i int, not uint8) int {
	for i < len(s) {
		_, c, w := at(s, i)
		if c&not != 0 {
			break
		}
		i += w
	}
	return i
}

// nextPiece returns the length of the first pre-token of s (len(s) > 0):
// the match of Qwen2's split pattern at the start of s,
//
//	(?i:'s|'t|'re|'ve|'m|'ll|'d)
//	|[^\r\n\p{L}\p{N}]?\p{L}+
//	|\p{N}
//	| ?[^\s\p{L}\p{N}]+[\r\n]*
//	|\s*[\r\n]+
//	|\s+(?!\S)
//	|\s+
//
// with the alternatives tried in order, as the backtracking regex engine of
// the HuggingFace tokenizer does. Every character is matched by some
// alternative, so the pieces cover the text.
func nextPiece(s string) int {
	r, c, w := at(s, 0)

	// (?i:'s|'t|'re|'ve|'m|'ll|'d)
	if r == '\'' && len(s) > 1 {
		if n := contraction(s[1:]); n > 0 {
			return 1 + n
		}
	}

	// [^\r\n\p{L}\p{N}]?\p{L}+
	if c&clsL != 0 {
		return runOf(s, w, clsL)
	}
	if c&(clsCRLF|clsN) == 0 && w < len(s) {
		if _, c2, w2 := at(s, w); c2&clsL != 0 {
			return runOf(s, w+w2, clsL)
		}
	}

	// \p{N}
	if c&clsN != 0 {
		return w
	}

	// ' ?[^\s\p{L}\p{N}]+[\r\n]*'
	j := 0
	if r == ' ' {
		j = 1
	}
	if k := runNot(s, j, clsS|clsL|clsN); k > j {
		return runOf(s, k, clsCRLF)
	}

	// Here the first rune is whitespace.
	end := runOf(s, 0, clsS)
	// \s*[\r\n]+ : up to the last CR/LF of the whitespace run
	last := -1
	for i := 0; i < end; {
		_, ci, wi := at(s, i)
		if ci&clsCRLF != 0 {
			last = i + wi
		}
		i += wi
	}
	if last > 0 {
		return last
	}
	// \s+(?!\S) : the run, less its last rune when a non-space follows
	if end == len(s) {
		return end
	}
	_, lastW := utf8.DecodeLastRuneInString(s[:end])
	if end-lastW > 0 {
		return end - lastW
	}
	// \s+
	return end
}

// contraction returns the length of s, the text after an apostrophe,
// matched by (?i:s|t|re|ve|m|ll|d), or 0. Case-insensitive matching follows
// Unicode simple case folding, under which U+017F (ſ) is an s.
func contraction(s string) int {
	lower := func(i int) (rune, int) {
		if i >= len(s) {
			return 0, 0
		}
		r, w := utf8.DecodeRuneInString(s[i:])
		if r == 'ſ' {
			return 's', w
		}
		return unicode.ToLower(r), w
	}
	r1, w1 := lower(0)
	switch r1 {
	case 's', 't', 'm', 'd':
		if w1 == 1 || r1 == 's' {
			return w1
		}
	case 'r', 'v', 'l':
		r2, w2 := lower(w1)
		if w1 == 1 && (r1 == 'r' && r2 == 'e' || r1 == 'v' && r2 == 'e' || r1 == 'l' && r2 == 'l') {
			return w1 + w2
		}
	}
	return 0
}
