package routing_test

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// sharedPrompts are prompts made of a few shared prefixes (some exactly
// block-aligned, so a repeat is cached whole) and distinct tails, each
// twice: every way a prompt can meet the cache.
func sharedPrompts() [][]int32 {
	var out [][]int32
	for pre := range 3 {
		prefix := make([]int32, 16*(2+pre)) // 32, 48, 64 tokens: whole blocks of 16
		for j := range prefix {
			prefix[j] = int32((pre*977 + j*31) % 512)
		}
		for tail := range 3 {
			p := slices.Clone(prefix)
			for j := range tail * 5 { // tail 0: the prefix alone
				p = append(p, int32((tail*53+j*7)%512))
			}
			out = append(out, p, slices.Clone(p))
		}
	}
	return out
}

// TestEnginePrefixCacheChangesNothing: greedy outputs with the prefix
// cache (sequences running concurrently share blocks; later ones find
// them cached; whole-prompt repeats copy their last block) equal those
// without, token for token, and the cache was used.
func TestEnginePrefixCacheChangesNothing(t *testing.T) {
	ps := sharedPrompts()
	lens := func(i int) int { return 3 + i%5 }
	cfg := routing.SchedulerConfig{MaxBatchTokens: 40, MaxRunning: 8, MaxWaiting: 64}
	off := cfg
	off.NoPrefixCache = true
	eOff, _ := newEngine(t, 256, 16, off)
	want := run(t, eOff, ps, lens)
	if st := eOff.Stats(); st.Cache.Queries != 0 || st.Cache.Hits != 0 {
		t.Fatalf("cache off counted lookups: %+v", st.Cache)
	}
	var copies atomic.Int64
	eOn, _ := newEngineWith(t, 256, 16, cfg, func(x routing.Executor) routing.Executor {
		return execFunc(func(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
			copies.Add(int64(len(b.Copies)))
			time.Sleep(time.Millisecond) // the long request below is still running when its repeat comes
			return x.Step(ctx, b)
		})
	})
	// Concurrently (blocks shared while running), then once more one by
	// one (everything found cached).
	got := run(t, eOn, ps, lens)
	for i := range ps {
		if !slices.Equal(got[i], want[i]) {
			t.Fatalf("prompt %d (%d tokens): %v with the cache, %v without", i, len(ps[i]), got[i], want[i])
		}
	}
	for i, p := range ps {
		ids, ev := collect(t, mustSubmit(t, eOn, greedy(fmt.Sprint("again", i), p, lens(i))))
		if !slices.Equal(ids, want[i]) {
			t.Fatalf("prompt %d again: %v, want %v", i, ids, want[i])
		}
		if wantCached := (len(p) - 1) / 16 * 16; ev.CachedTokens < wantCached {
			t.Fatalf("prompt %d again: %d tokens cached, want ≥ %d", i, ev.CachedTokens, wantCached)
		}
	}
	// A whole-prompt repeat while the first still runs: the last block
	// is shared, so the repeat computes its last token in a copy.
	p := ps[0] // 32 tokens, 2 whole blocks
	const long = 200
	wantLong := run(t, eOff, [][]int32{p}, func(int) int { return long })[0]
	first := mustSubmit(t, eOn, greedy("long", p, long))
	ev0, err := first.Recv(t.Context())
	if err != nil || ev0.Done {
		t.Fatalf("the long request: %v, done %v", err, ev0.Done)
	}
	before := copies.Load()
	ids, ev := collect(t, mustSubmit(t, eOn, greedy("repeat", p, 12)))
	if !slices.Equal(ids, wantLong[:12]) || ev.CachedTokens != len(p) || copies.Load() != before+1 {
		t.Fatalf("repeat while the first runs: %v (%d cached, %d copies), want %v", ids, ev.CachedTokens, copies.Load()-before, wantLong[:12])
	}
	rest, _ := collect(t, first)
	if got := append(ev0.Tokens, rest...); !slices.Equal(got, wantLong) {
		t.Fatalf("the first, after its block was copied: %v, want %v", got, wantLong)
	}
	st := eOn.Stats()
	if st.Cache.Hits == 0 || st.Cache.HitSeqs == 0 || st.Cache.Hits > st.Cache.Queries {
		t.Fatalf("cache stats %+v", st.Cache)
	}
	if st.BlocksFree != st.BlocksTotal {
		t.Fatalf("%d of %d blocks free after every request ended", st.BlocksFree, st.BlocksTotal)
	}
}

func mustSubmit(t *testing.T, e *routing.Engine, r *routing.Request) *routing.Stream {
	t.Helper()
	s, err := e.Submit(r)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestEnginePrefixCachePromptLogprobs: prompt logprobs after the prompt
// was cached equal those computed before, bit for bit.
func TestEnginePrefixCachePromptLogprobs(t *testing.T) {
	e, _ := newEngine(t, 256, 16, routing.SchedulerConfig{MaxBatchTokens: 24, MaxRunning: 8, MaxWaiting: 64})
	p := sharedPrompts()[4]
	ask := func(id string) []float32 {
		r := greedy(id, p, 2)
		r.PromptLogprobs = true
		_, ev := collect(t, mustSubmit(t, e, r))
		return ev.PromptLogprobs
	}
	a := ask("a")
	collect(t, mustSubmit(t, e, greedy("warm", p, 2))) // found cached
	b := ask("b")
	if len(a) != len(p) || len(b) != len(p) {
		t.Fatalf("%d and %d prompt logprobs for %d tokens", len(a), len(b), len(p))
	}
	for i := 1; i < len(p); i++ {
		if math.Float32bits(a[i]) != math.Float32bits(b[i]) || math.IsNaN(float64(a[i])) {
			t.Fatalf("position %d: %v before caching, %v after", i, a[i], b[i])
		}
	}
}

// execFunc is a routing.Executor from a function.
type execFunc func(context.Context, *steps.Batch) (*steps.Result, error)

func (f execFunc) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) { return f(ctx, b) }

// TestRouterPrefersCachedPrefix: a request goes to the replica that
// caches the longest prefix of it, unless that replica is busier than
// the least loaded by more than the margin; the least-loaded policy
// ignores the cache. Outputs are the same wherever a request runs.
func TestRouterPrefersCachedPrefix(t *testing.T) {
	cfg := routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 16, MaxWaiting: 64}
	slow := func(x routing.Executor) routing.Executor {
		return execFunc(func(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
			time.Sleep(time.Millisecond)
			return x.Step(ctx, b)
		})
	}
	a, m := newEngineWith(t, 256, 16, cfg, slow)
	b, _ := newEngineWith(t, 256, 16, cfg, slow)
	r := routing.NewRouter()
	r.AddReplica("a", a)
	r.AddReplica("b", b)
	ps := sharedPrompts() // ps[0..5] share prefix 0 (32 tokens), ps[6..11] prefix 1 (48)
	// The expected outputs, computed before the engines use the model.
	want := map[int][]int32{}
	for _, i := range []int{2, 4, 8, 10} {
		want[i], _ = m.Greedy(ps[i], 4, nil)
	}
	gen := func(id string, i int) routing.Event {
		t.Helper()
		s, err := r.Submit(greedy(id, ps[i], 4))
		if err != nil {
			t.Fatal(err)
		}
		ids, ev := collect(t, s)
		if !slices.Equal(ids, want[i]) {
			t.Fatalf("%s on %s: %v, want %v", id, ev.Route.Replica, ids, want[i])
		}
		return ev
	}
	// Prefix 0 lands on a (both idle and empty: the first by name).
	if ev := gen("p0", 2); ev.Route.Replica != "a" || ev.Route.Policy != "room" {
		t.Fatalf("first request: %+v", ev.Route)
	}
	// Prefix 1 while a is busy: b, which caches less.
	busy, err := r.Submit(greedy("busy", ps[0], 300))
	if err != nil {
		t.Fatal(err)
	}
	if ev := gen("p1", 8); ev.Route.Replica != "b" || ev.Route.Policy != "room" {
		t.Fatalf("second prefix went to %+v", ev.Route)
	}
	// With a still busy (1 sequence, within the margin), prefix 0 goes
	// back to a, prefix 1 to b: by their caches.
	if ev := gen("p0b", 4); ev.Route != (routing.Route{Replica: "a", Policy: "prefix", PrefixTokens: 32}) || ev.CachedTokens != 32 {
		t.Fatalf("prefix 0 again: %+v, %d cached", ev.Route, ev.CachedTokens)
	}
	if ev := gen("p1b", 10); ev.Route != (routing.Route{Replica: "b", Policy: "prefix", PrefixTokens: 48}) {
		t.Fatalf("prefix 1 again: %+v", ev.Route)
	}
	// Margin 0: a, one sequence busier than b, loses its preference.
	if err := r.SetRouting(routing.RoutePrefix, 0); err != nil {
		t.Fatal(err)
	}
	if ev := gen("p0c", 4); ev.Route.Replica != "b" || ev.Route.Policy != "room" {
		t.Fatalf("prefix 0, a busier than the margin: %+v", ev.Route)
	}
	// Least loaded: the cache does not count.
	if err := r.SetRouting(routing.RouteLeastLoaded, 4); err != nil {
		t.Fatal(err)
	}
	if ev := gen("p0d", 2); ev.Route.Replica != "b" || ev.Route.Policy != "load" {
		t.Fatalf("least loaded: %+v", ev.Route)
	}
	if err := r.SetRouting("random", 1); err == nil {
		t.Fatal("unknown policy accepted")
	}
	r.Abort("busy")
	collect(t, busy)
	if got := r.Routed(); got["prefix"] != 3 || got["room"] != 3 || got["load"] != 1 { // busy went to a by its prefix
		t.Fatalf("decisions %v", got)
	}
}
