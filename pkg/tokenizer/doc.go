// Package tokenizer is the Qwen2 byte-level BPE tokenizer, exact to the
// HuggingFace tokenizer built from the same tokenizer.json, with a streaming
// detokenizer and the ChatML chat template.
//
// # Encoding (qwen2.md section 4.1)
//
//  1. Added tokens (<|endoftext|>, <|im_start|>, <|im_end|>, and any other
//     added_tokens of the file) are found in the raw text first, leftmost
//     and longest first; each becomes its id and the text between them is
//     encoded by steps 2–5.
//  2. Unicode NFC normalisation.
//  3. Pre-tokenisation by Qwen2's split pattern
//     (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//     written by hand (Go's regexp has no look-ahead): see split.go.
//  4. Each piece's UTF-8 bytes become byte-level symbols (the GPT-2
//     byte-to-unicode table).
//  5. Byte-pair merges by rank: the adjacent pair of lowest rank is merged
//     first (leftmost on ties) until no pair has a rank. Short pieces use a
//     linear scan, long ones (runs of CJK text) a heap; results of
//     frequent pieces are cached.
//
// No BOS or EOS is added.
//
// # Decoding
//
// The bytes of the tokens are concatenated (added tokens as their text) and
// decoded as UTF-8 with every maximal invalid subsequence replaced by U+FFFD,
// as Rust's String::from_utf8_lossy and Python's errors="replace" do.
// Detokenizer does the same one token at a time: it holds back the bytes of a
// character that is not complete yet, so the deltas concatenate to exactly
// the full decode.
//
// # Invalid UTF-8 in input
//
// The HuggingFace tokenizer only takes Unicode strings (Python str, Rust
// String): bytes must be decoded first, conventionally with
// errors="replace", and a Python str holding a lone surrogate is refused
// when it crosses into Rust. Encode takes Go strings, which may hold any
// bytes: it replaces each maximal invalid subsequence by U+FFFD first (what
// bytes.decode("utf-8", errors="replace") does) and then encodes. It never
// fails or panics on any input.
//
// # Chat
//
// RenderChat writes Qwen2-Instruct's ChatML (the default system prompt when
// the first message is not a system message, and the generation prompt);
// EncodeChat encodes it. StopIDs are the ids that end a generation.
package tokenizer
