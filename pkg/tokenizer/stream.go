package tokenizer

import "fmt"

// Detokenizer turns a stream of ids into text deltas. A character whose
// UTF-8 bytes span several tokens is held back until it is complete (or
// proven invalid), so the deltas of Add followed by Flush concatenate to
// exactly Decode of all the ids. Not safe for concurrent use; one per
// sequence.
type Detokenizer struct {
	t           *Tokenizer
	skipSpecial bool
	pending     []byte
}

// NewDetokenizer starts a stream; skipSpecial leaves special tokens out.
func (t *Tokenizer) NewDetokenizer(skipSpecial bool) *Detokenizer {
	return &Detokenizer{t: t, skipSpecial: skipSpecial}
}

// Add appends one token and returns the text it completes (possibly
// empty). An unknown id is an error and changes nothing.
func (d *Detokenizer) Add(id int32) (string, error) {
	if !d.t.Valid(id) {
		return "", fmt.Errorf("%w: %d (valid ids are below %d)", ErrUnknownID, id, len(d.t.tokens))
	}
	if d.skipSpecial && d.t.special[id] {
		return "", nil
	}
	d.pending = append(d.pending, d.t.tokens[id]...)
	keep := incompleteTail(d.pending)
	cut := len(d.pending) - keep
	if cut == 0 {
		return "", nil
	}
	out := string(lossy(nil, d.pending[:cut]))
	d.pending = append(d.pending[:0], d.pending[cut:]...)
	return out, nil
}

// Flush returns what is still held back (an incomplete character, as
// U+FFFD) and empties the stream.
func (d *Detokenizer) Flush() string {
	out := string(lossy(nil, d.pending))
	d.pending = d.pending[:0]
	return out
}

// Pending reports whether bytes are held back.
func (d *Detokenizer) Pending() bool { return len(d.pending) > 0 }
