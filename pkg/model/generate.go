package model

import (
	"fmt"

	"github.com/qwenfleet/qwenfleet/pkg/kvcache"
)

// DefaultBlockSize is the number of token slots per KV block used by the
// single-sequence helpers here.
const DefaultBlockSize = 16

// NewCache allocates a block manager and storage able to hold tokens
// positions in total, in blocks of blockSize.
func (m *Model) NewCache(tokens, blockSize int) (*kvcache.BlockManager, *kvcache.Storage) {
	n := (tokens + blockSize - 1) / blockSize
	return kvcache.NewBlockManager(n, blockSize), kvcache.NewStorage(m.b, m.NumLayers(), n, blockSize, m.KVDim())
}

// Greedy runs prompt through the model in one prefill step and then decodes n
// tokens one step at a time through the KV cache, always taking the
// arg-max. It returns the generated ids; onToken, when not nil, is called
// with each new id and the logits it was picked from (step 0's are the last
// prompt position's) before the next step runs.
func (m *Model) Greedy(prompt []int32, n int, onToken func(step int, id int32, logits []float32)) ([]int32, error) {
	if len(prompt) == 0 {
		return nil, fmt.Errorf("%w: empty prompt", ErrBadBatch)
	}
	if n < 0 {
		return nil, fmt.Errorf("%w: %d tokens to generate", ErrBadBatch, n)
	}
	// The last new token is never run, so len(prompt)+n-1 positions are
	// needed (written without adding, which could overflow).
	if len(prompt) > m.cfg.MaxContext() || n > m.cfg.MaxContext()+1-len(prompt) {
		return nil, fmt.Errorf("%w: %d prompt + %d new tokens exceed the context of %d", ErrBadBatch, len(prompt), n, m.cfg.MaxContext())
	}
	var ids []int32
	bm, st := m.NewCache(len(prompt)+n, DefaultBlockSize)
	defer st.Free()
	const seq = 1
	tokens, pos := prompt, 0
	for len(ids) < n {
		if err := bm.Reserve(seq, pos+len(tokens)); err != nil {
			return nil, err
		}
		out, err := m.Forward(&Batch{Seqs: []Seq{{Tokens: tokens, Pos: pos, Blocks: bm.Table(seq)}}}, st)
		if err != nil {
			return nil, err
		}
		row := out.Logits[0]
		next := int32(Argmax(row))
		if onToken != nil {
			onToken(len(ids), next, row)
		}
		ids = append(ids, next)
		pos += len(tokens)
		tokens = []int32{next}
	}
	return ids, nil
}

// Argmax is the index of the largest value (the first one on ties).
func Argmax(v []float32) int {
	best := 0
	for i, x := range v {
		if x > v[best] {
			best = i
		}
	}
	return best
}
