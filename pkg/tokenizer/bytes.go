package tokenizer

import "unicode/utf8"

// byteToRune is GPT-2's byte-to-unicode table: bytes 0x21–0x7E, 0xA1–0xAC
// and 0xAE–0xFF stand for themselves; the other 68 bytes, in increasing
// order, become U+0100, U+0101, … (space → U+0120 'Ġ', LF → U+010A 'Ċ').
var byteToRune [256]rune

// runeToByte inverts byteToRune (-1 where a rune is not a byte symbol);
// every symbol is below U+0144.
var runeToByte [0x144]int16

func init() {
	for i := range runeToByte {
		runeToByte[i] = -1
	}
	n := rune(0)
	for b := 0; b < 256; b++ {
		if (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff) {
			byteToRune[b] = rune(b)
		} else {
			byteToRune[b] = 0x100 + n
			n++
		}
		runeToByte[byteToRune[b]] = int16(b)
	}
}

// symbolBytes turns a byte-level token string back into its bytes.
func symbolBytes(s string) ([]byte, bool) {
	out := make([]byte, 0, len(s))
	for _, r := range s {
		if r < 0 || int(r) >= len(runeToByte) || runeToByte[r] < 0 {
			return nil, false
		}
		out = append(out, byte(runeToByte[r]))
	}
	return out, true
}

// seqLen returns, for a lead byte, the length of its UTF-8 sequence and the
// range its second byte must lie in (0 for bytes that cannot start one).
// The ranges exclude overlong forms, surrogates and values above U+10FFFF.
func seqLen(b byte) (n int, lo, hi byte) {
	switch {
	case b < 0x80:
		return 1, 0, 0
	case b >= 0xc2 && b <= 0xdf:
		return 2, 0x80, 0xbf
	case b == 0xe0:
		return 3, 0xa0, 0xbf
	case b >= 0xe1 && b <= 0xec, b == 0xee, b == 0xef:
		return 3, 0x80, 0xbf
	case b == 0xed:
		return 3, 0x80, 0x9f
	case b == 0xf0:
		return 4, 0x90, 0xbf
	case b >= 0xf1 && b <= 0xf3:
		return 4, 0x80, 0xbf
	case b == 0xf4:
		return 4, 0x80, 0x8f
	}
	return 0, 0, 0
}

// scan reads one sequence at the start of b: size is how many bytes it
// covers, valid whether they form a character. An invalid result covers
// the maximal subpart (the longest prefix of a valid sequence, at least one
// byte). truncated is set when b ends inside what could still become a
// valid character.
func scan(b []byte) (size int, valid, truncated bool) {
	n, lo, hi := seqLen(b[0])
	if n == 1 {
		return 1, true, false
	}
	if n == 0 {
		return 1, false, false
	}
	for k := 1; k < n; k++ {
		if k >= len(b) {
			return k, false, true
		}
		c := b[k]
		if k == 1 && (c < lo || c > hi) || k > 1 && (c < 0x80 || c > 0xbf) {
			return k, false, false
		}
	}
	return n, true, false
}

// lossy appends b decoded as UTF-8 to dst, each maximal invalid subsequence
// replaced by U+FFFD (the rule of Rust's from_utf8_lossy and Python's
// errors="replace").
func lossy(dst, b []byte) []byte {
	for len(b) > 0 {
		if b[0] < utf8.RuneSelf {
			dst = append(dst, b[0])
			b = b[1:]
			continue
		}
		size, valid, _ := scan(b)
		if valid {
			dst = append(dst, b[:size]...)
		} else {
			dst = utf8.AppendRune(dst, utf8.RuneError)
		}
		b = b[size:]
	}
	return dst
}

// incompleteTail is the number of bytes at the end of b that begin a
// character that further bytes could still complete (0 to 3).
func incompleteTail(b []byte) int {
	for k := 1; k <= 3 && k <= len(b); k++ {
		i := len(b) - k
		if n, _, _ := seqLen(b[i]); n > 1 {
			if _, _, truncated := scan(b[i:]); truncated {
				return k
			}
			return 0
		}
		if b[i] < 0x80 || b[i] > 0xbf {
			return 0 // ASCII or an invalid byte: nothing pending
		}
	}
	return 0
}
