package kvcache

import (
	"crypto/sha256"
	"encoding/binary"
)

// BlockHash names the content of a full KV block: a SHA-256 over the
// cache's identity and every token from position 0 to the block's end
// (chained block by block). Two blocks with the same hash hold the same
// KV, bit for bit, on the same model with batch-invariant kernels. A
// cryptographic hash, because a collision would silently hand one prompt
// another's KV.
type BlockHash [sha256.Size]byte

// RootHash is the parent of a sequence's first block: it binds the cache
// to identity (the model and adapter, and anything else that changes the
// KV of the same tokens).
func RootHash(identity string) BlockHash {
	return sha256.Sum256([]byte("qwenfleet kv prefix v1\x00" + identity))
}

// ChainHash is the hash of a full block of tokens following the prefix
// named parent.
func ChainHash(parent BlockHash, tokens []int32) BlockHash {
	h := sha256.New()
	h.Write(parent[:])
	var buf [4 * 64]byte
	for len(tokens) > 0 {
		n := min(len(tokens), 64)
		for i, t := range tokens[:n] {
			binary.LittleEndian.PutUint32(buf[4*i:], uint32(t))
		}
		h.Write(buf[:4*n])
		tokens = tokens[n:]
	}
	var out BlockHash
	h.Sum(out[:0])
	return out
}

// PrefixHashes extends have, the hashes of the first len(have) full blocks
// of tokens (of blockSize tokens each, chained from root), to every full
// block of tokens, and returns it. Hashes are computed once per block as a
// sequence grows.
func PrefixHashes(root BlockHash, have []BlockHash, tokens []int32, blockSize int) []BlockHash {
	parent := root
	if len(have) > 0 {
		parent = have[len(have)-1]
	}
	for i := len(have); (i+1)*blockSize <= len(tokens); i++ {
		parent = ChainHash(parent, tokens[i*blockSize:(i+1)*blockSize])
		have = append(have, parent)
	}
	return have
}
