package bench

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"strconv"
	"strings"
)

// SharedPrefix is the shape of a shared-prefix workload: N distinct system
// prompts of L tokens each, every request one of them followed by a short
// user turn. Its text form, read by ParseSharedPrefix and given back by
// String, is "N:L".
type SharedPrefix struct {
	N, L int
}

// MaxSharedPrefixTokens bounds N×L, the tokens the prefixes of a run hold
// in memory together (256 MiB of ids).
const MaxSharedPrefixTokens = 1 << 26

// ErrBadSharedPrefix is wrapped by every ParseSharedPrefix error.
var ErrBadSharedPrefix = errors.New("bad shared prefix")

// ParseSharedPrefix parses "N:L": N >= 1 prefixes of L >= 1 tokens.
func ParseSharedPrefix(s string) (SharedPrefix, error) {
	a, b, ok := strings.Cut(strings.TrimSpace(s), ":")
	n, err1 := strconv.Atoi(strings.TrimSpace(a))
	l, err2 := strconv.Atoi(strings.TrimSpace(b))
	switch {
	case !ok || err1 != nil || err2 != nil:
		return SharedPrefix{}, fmt.Errorf("%w %q: want N:L, N system prompts of L tokens (integers, as in 8:512)", ErrBadSharedPrefix, s)
	case n < 1:
		return SharedPrefix{}, fmt.Errorf("%w %q: N (the number of prefixes) must be >= 1", ErrBadSharedPrefix, s)
	case l < 1:
		return SharedPrefix{}, fmt.Errorf("%w %q: L (the tokens of a prefix) must be >= 1", ErrBadSharedPrefix, s)
	case n > MaxSharedPrefixTokens/l:
		return SharedPrefix{}, fmt.Errorf("%w %q: N×L must be at most %d tokens", ErrBadSharedPrefix, s, MaxSharedPrefixTokens)
	}
	return SharedPrefix{N: n, L: l}, nil
}

// String gives the text form ParseSharedPrefix reads.
func (p SharedPrefix) String() string { return strconv.Itoa(p.N) + ":" + strconv.Itoa(p.L) }

// MarshalText writes the text form, so a SharedPrefix is a string in JSON.
func (p SharedPrefix) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads the text form.
func (p *SharedPrefix) UnmarshalText(b []byte) error {
	v, err := ParseSharedPrefix(string(b))
	if err != nil {
		return err
	}
	*p = v
	return nil
}

// SharedPrefixes makes the prompts of a shared-prefix workload, the load
// that prefix caching serves: request i is one of N distinct synthetic
// prefixes of L token ids (a system prompt), chosen at random, followed by
// a synthetic user turn drawn as User draws a prompt. The choice and the
// user turn come from request i's random stream under User.Seed, so a seed
// fixes the whole sequence of requests. Make one with NewSharedPrefixes.
type SharedPrefixes struct {
	// Prefixes are the N prefixes, each drawn from its own stream of the
	// seed, distinct from every other.
	Prefixes [][]int32
	// User draws the user turns; its MaxInput is the room the prefix leaves
	// in the model's context.
	User Synthetic
}

// NewSharedPrefixes draws the prefixes of shape for user turns drawn by
// user (its Input the user turn's length, its Limit, Avoid and Seed also
// the prefixes'). user.MaxInput, when > 0, is the model's context, which
// caps the whole prompt: it must leave room for a user turn after L tokens.
// Shape must also be drawable: N distinct sequences of L tokens from the
// ids user draws.
func NewSharedPrefixes(shape SharedPrefix, user Synthetic) (*SharedPrefixes, error) {
	if shape.N < 1 || shape.L < 1 {
		return nil, fmt.Errorf("%w %q: want N >= 1 and L >= 1", ErrBadSharedPrefix, shape)
	}
	if user.MaxInput > 0 {
		if shape.L >= user.MaxInput {
			return nil, fmt.Errorf("prefixes of %d tokens leave no room for a user turn in a context of %d tokens", shape.L, user.MaxInput)
		}
		user.MaxInput -= shape.L
	}
	ids := user.ids()
	if ids < 1 {
		return nil, errors.New("no ids to draw prefixes from")
	}
	// ids^L >= N, or there are not N distinct prefixes to draw.
	room := 1
	for range shape.L {
		if room >= shape.N {
			break
		}
		room *= ids
	}
	if room < shape.N {
		return nil, fmt.Errorf("%d ids make only %d distinct prefixes of %d tokens, not %d", ids, room, shape.L, shape.N)
	}
	s := &SharedPrefixes{Prefixes: make([][]int32, shape.N), User: user}
	seen := map[uint64][]int{} // prefixes by hash
	for k := range s.Prefixes {
		// Prefix k's stream counts down from the top, where the requests'
		// (counting up from 1, see rngFor) never reach.
		r := rand.New(rand.NewPCG(user.Seed, ^uint64(k)))
		p := make([]int32, shape.L)
		var h uint64
		for dup := true; dup; {
			for j := range p {
				p[j] = user.id(r)
			}
			h = hashIDs(p)
			// Rare but for tiny L: a prefix drawn before is drawn again
			// from the same stream.
			dup = slices.ContainsFunc(seen[h], func(other int) bool { return slices.Equal(s.Prefixes[other], p) })
		}
		seen[h] = append(seen[h], k)
		s.Prefixes[k] = p
	}
	return s, nil
}

// hashIDs is FNV-1a over ids.
func hashIDs(ids []int32) uint64 {
	h := uint64(14695981039346656037)
	for _, id := range ids {
		h ^= uint64(uint32(id))
		h *= 1099511628211
	}
	return h
}

// Prompt makes the prompt of request i: its prefix (Prompt.Prefix says
// which), then its user turn.
func (s *SharedPrefixes) Prompt(i int) Prompt {
	r := rngFor(s.User.Seed, i)
	k := r.IntN(len(s.Prefixes))
	u := s.User.draw(r)
	ids := make([]int32, 0, len(s.Prefixes[k])+len(u.TokenIDs))
	ids = append(append(ids, s.Prefixes[k]...), u.TokenIDs...)
	return Prompt{TokenIDs: ids, MaxTokens: u.MaxTokens, Prefix: &k}
}
