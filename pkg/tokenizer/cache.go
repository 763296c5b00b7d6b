package tokenizer

import "hash/maphash"

// pieceCache remembers the ids of pieces already merged. It holds no
// pointers into its callers' text (keys and ids are copied into arenas, so
// the garbage collector has nothing to scan and the text can be freed), and
// it is not safe for concurrent use: the tokenizer keeps a sync.Pool of them,
// one per concurrent Encode.
type pieceCache struct {
	slots []cacheSlot // open addressing, power-of-two size
	keys  []byte
	vals  []int32
	used  int
	bpe   bpeScratch // scratch of the merge loop, reused
}

type cacheSlot struct {
	hash       uint64 // 0 = empty
	koff, voff uint32
	klen, vlen uint16
}

const (
	cacheSlots    = 1 << 16
	cacheMaxProbe = 8
)

var cacheSeed = maphash.MakeSeed()

func newPieceCache() *pieceCache {
	return &pieceCache{slots: make([]cacheSlot, cacheSlots)}
}

func pieceHash(p string) uint64 { return maphash.String(cacheSeed, p) | 1 }

func (c *pieceCache) get(p string, h uint64) ([]int32, bool) {
	mask := uint64(len(c.slots) - 1)
	for k := uint64(0); k < cacheMaxProbe; k++ {
		s := &c.slots[(h+k)&mask]
		if s.hash == 0 {
			return nil, false
		}
		if s.hash == h && int(s.klen) == len(p) && string(c.keys[s.koff:s.koff+uint32(s.klen)]) == p {
			return c.vals[s.voff : s.voff+uint32(s.vlen)], true
		}
	}
	return nil, false
}

// put stores ids for p; when the cache is full it starts over.
func (c *pieceCache) put(p string, h uint64, ids []int32) {
	if len(p) > 1<<16-1 || len(ids) > 1<<16-1 {
		return
	}
	if c.used >= len(c.slots)*3/4 || len(c.keys)+len(p) > 1<<24 {
		clear(c.slots)
		c.keys, c.vals, c.used = c.keys[:0], c.vals[:0], 0
	}
	mask := uint64(len(c.slots) - 1)
	for k := uint64(0); k < cacheMaxProbe; k++ {
		s := &c.slots[(h+k)&mask]
		if s.hash != 0 {
			continue
		}
		*s = cacheSlot{hash: h, koff: uint32(len(c.keys)), voff: uint32(len(c.vals)), klen: uint16(len(p)), vlen: uint16(len(ids))}
		c.keys = append(c.keys, p...)
		c.vals = append(c.vals, ids...)
		c.used++
		return
	}
}
