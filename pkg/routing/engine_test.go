package routing_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/shard"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

func root() string {
	_, f, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(f), "..", "..")
}

// wholeModel steps an in-process executor of a whole model (no link, the
// model's expert placement): a routing.Executor.
type wholeModel struct{ x *shard.Executor }

func (w wholeModel) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	return w.x.Step(ctx, b, nil, nil)
}

// newEngine runs an engine over an in-process executor of a reference model.
func newEngine(t *testing.T, blocks, blockSize int, cfg routing.SchedulerConfig) (*routing.Engine, *model.Model) {
	t.Helper()
	return newEngineWith(t, blocks, blockSize, cfg, nil)
}

// newEngineWith is newEngine with the executor wrapped by wrap (when not
// nil).
func newEngineWith(t *testing.T, blocks, blockSize int, cfg routing.SchedulerConfig, wrap func(routing.Executor) routing.Executor) (*routing.Engine, *model.Model) {
	t.Helper()
	b, err := cpu.New(cpu.Config{Threads: 2, BatchInvariant: true})
	if err != nil {
		t.Fatal(err)
	}
	m, err := model.Load(filepath.Join(root(), "testdata", "qwen2-ref", "dense-gqa-f32"), b, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	x := shard.NewExecutor(m)
	if err := x.Warmup(blocks, blockSize, 8); err != nil {
		t.Fatal(err)
	}
	var exec routing.Executor = wholeModel{x}
	if wrap != nil {
		exec = wrap(exec)
	}
	e := routing.NewEngine(exec, cfg, blocks, blockSize)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done; m.Close(); b.Close() })
	return e, m
}

func greedy(id string, prompt []int32, n int) *routing.Request {
	return &routing.Request{ID: id, Prompt: prompt, MaxTokens: n, Logprobs: -1,
		Sampling: sampling.Params{TopP: 1, RepetitionPenalty: 1}}
}

// receive reads s to its end (60 s at most) and returns the ids and the
// last event. Safe to call from any goroutine.
func receive(s *routing.Stream) ([]int32, routing.Event, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var ids []int32
	for {
		ev, err := s.Recv(ctx)
		if err != nil {
			return ids, ev, fmt.Errorf("recv: %w", err)
		}
		ids = append(ids, ev.Tokens...)
		if ev.Done {
			return ids, ev, nil
		}
	}
}

// collect is receive for the test's goroutine: it fails the test on an
// error (t.Fatal must not be called from other goroutines).
func collect(t *testing.T, s *routing.Stream) ([]int32, routing.Event) {
	t.Helper()
	ids, ev, err := receive(s)
	if err != nil {
		t.Fatal(err)
	}
	return ids, ev
}

func prompts(n int) [][]int32 {
	out := make([][]int32, n)
	for i := range out {
		p := make([]int32, 3+(i*7)%29)
		for j := range p {
			p[j] = int32((i*131 + j*17) % 512)
		}
		out[i] = p
	}
	return out
}

// run generates every prompt concurrently and returns the ids.
func run(t *testing.T, e *routing.Engine, ps [][]int32, lens func(int) int) [][]int32 {
	out := make([][]int32, len(ps))
	var wg sync.WaitGroup
	for i, p := range ps {
		s, err := e.Submit(greedy(fmt.Sprint("r", i), p, lens(i)))
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			ids, ev, err := receive(s)
			if err != nil {
				t.Errorf("request %d: %v", i, err)
				return
			}
			if ev.Finish != "length" || len(ids) != lens(i) {
				t.Errorf("request %d: %s after %d tokens", i, ev.Finish, len(ids))
			}
			out[i] = ids
		}()
	}
	wg.Wait()
	if t.Failed() {
		t.FailNow()
	}
	return out
}

func TestEngineBatchingChangesNothing(t *testing.T) {
	e, m := newEngine(t, 512, 16, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 32, MaxWaiting: 64})
	ps := prompts(32)
	lens := func(i int) int { return 1 + (i*5)%20 }
	got := run(t, e, ps, lens)
	for i, p := range ps {
		want, err := m.Greedy(p, lens(i), nil)
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(got[i], want) {
			t.Fatalf("request %d batched %v, alone %v", i, got[i], want)
		}
	}
	if st := e.Stats(); st.BlocksFree != st.BlocksTotal || st.Running+st.Waiting != 0 {
		t.Fatalf("after all finished: %+v", st)
	}
}

func TestEnginePreemptsAndCompletesEverything(t *testing.T) {
	// 12 blocks of 4 = 48 slots for 8 requests of up to 30 tokens each.
	e, m := newEngine(t, 12, 4, routing.SchedulerConfig{MaxBatchTokens: 32, MaxRunning: 8, MaxWaiting: 64})
	ps := prompts(8)
	lens := func(i int) int { return 12 }
	got := run(t, e, ps, lens)
	st := e.Stats()
	if st.Preemptions == 0 {
		t.Fatalf("no preemption with 48 slots for 8 requests: %+v", st)
	}
	for i, p := range ps {
		want, _ := m.Greedy(p, lens(i), nil)
		if !slices.Equal(got[i], want) {
			t.Fatalf("request %d after preemption %v, alone %v", i, got[i], want)
		}
	}
	if st.BlocksFree != st.BlocksTotal {
		t.Fatalf("blocks leaked: %+v", st)
	}
	t.Logf("%d preemptions", st.Preemptions)
}

func TestEngineAbortFreesBlocks(t *testing.T) {
	e, _ := newEngine(t, 64, 4, routing.SchedulerConfig{MaxBatchTokens: 32, MaxRunning: 8, MaxWaiting: 8})
	s, err := e.Submit(greedy("long", prompts(1)[0], 200))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := s.Recv(ctx); err != nil { // it is running
		t.Fatal(err)
	}
	if st := e.Stats(); st.BlocksFree == st.BlocksTotal {
		t.Fatalf("running request holds no blocks: %+v", st)
	}
	if _, err := e.Submit(greedy("long", []int32{1}, 1)); err == nil {
		t.Fatal("duplicate request id accepted")
	}
	if !e.Abort("long") || e.Abort("long") {
		t.Fatal("abort did not find the request exactly once")
	}
	if st := e.Stats(); st.BlocksFree != st.BlocksTotal || st.Running != 0 {
		t.Fatalf("after abort: %+v", st)
	}
	_, ev := collect(t, s)
	if ev.Finish != "abort" {
		t.Fatalf("finish %q", ev.Finish)
	}
}

func TestEngineSeededSamplingIsReproducible(t *testing.T) {
	e, _ := newEngine(t, 128, 16, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8})
	sample := func(id string, seed uint64) []int32 {
		r := greedy(id, []int32{5, 6, 7}, 24)
		r.Sampling = sampling.Params{Temperature: 1.5, TopP: 0.95, TopK: 50, RepetitionPenalty: 1.1, Seed: seed, HasSeed: true}
		r.Logprobs = 3
		s, err := e.Submit(r)
		if err != nil {
			t.Fatal(err)
		}
		ids, _ := collect(t, s)
		return ids
	}
	a, b, c := sample("a", 7), sample("b", 7), sample("c", 8)
	if !slices.Equal(a, b) {
		t.Fatalf("same seed: %v vs %v", a, b)
	}
	if slices.Equal(a, c) {
		t.Fatalf("different seeds gave the same 24 tokens %v", a)
	}
}

// TestEngineResumeContinues resumes greedy and seeded requests after k of
// their tokens: the rest is what the undisturbed run gave, and only the
// rest is sent.
func TestEngineResumeContinues(t *testing.T) {
	e, _ := newEngine(t, 128, 16, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8})
	run := func(id string, seeded bool, resume []int32) []int32 {
		r := greedy(id, []int32{5, 6, 7}, 24)
		if seeded {
			r.Sampling = sampling.Params{Temperature: 1.5, TopP: 0.95, TopK: 50, RepetitionPenalty: 1.1, PresencePenalty: 0.5, Seed: 3, HasSeed: true}
		}
		r.Resume = resume
		s, err := e.Submit(r)
		if err != nil {
			t.Fatal(err)
		}
		ids, ev := collect(t, s)
		if ev.Finish != "length" {
			t.Fatalf("%s: finish %q (%v)", id, ev.Finish, ev.Err)
		}
		return ids
	}
	for _, seeded := range []bool{false, true} {
		whole := run(fmt.Sprintf("whole-%v", seeded), seeded, nil)
		for _, k := range []int{1, 10, 23} {
			rest := run(fmt.Sprintf("resumed-%v-%d", seeded, k), seeded, whole[:k])
			if !slices.Equal(rest, whole[k:]) {
				t.Fatalf("seeded %v, resumed after %d: %v, want %v", seeded, k, rest, whole[k:])
			}
		}
	}
}

func TestEngineStopsAtStopIDAfterMinTokens(t *testing.T) {
	e, m := newEngine(t, 128, 16, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8})
	p := []int32{11, 12, 13}
	want, _ := m.Greedy(p, 10, nil)
	r := greedy("s", p, 10)
	r.StopIDs = []int32{want[3]}
	s, _ := e.Submit(r)
	ids, ev := collect(t, s)
	first := slices.Index(want, want[3])
	if ev.Finish != "stop" || ev.MatchedStop != want[3] || !slices.Equal(ids, want[:first+1]) {
		t.Fatalf("stop: %v %s %d, greedy %v", ids, ev.Finish, ev.MatchedStop, want)
	}
	// min_tokens suppresses the stop id: it can no longer be chosen early.
	r = greedy("m", p, 10)
	r.StopIDs, r.MinTokens = []int32{want[0]}, 5
	s, _ = e.Submit(r)
	ids, _ = collect(t, s)
	if len(ids) < 5 || slices.Contains(ids[:5], want[0]) {
		t.Fatalf("min_tokens 5 with stop id %d: %v", want[0], ids)
	}
}

// failing always fails its steps.
type failing struct{ n int }

func (f *failing) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	f.n++
	return nil, fmt.Errorf("worker gone (%d)", f.n)
}

func TestEngineGivesUpAfterRepeatedStepFailures(t *testing.T) {
	e := routing.NewEngine(&failing{}, routing.SchedulerConfig{MaxBatchTokens: 16, MaxRunning: 4, MaxWaiting: 4}, 16, 4)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go e.Run(ctx)
	s, err := e.Submit(greedy("x", []int32{1, 2, 3}, 4))
	if err != nil {
		t.Fatal(err)
	}
	_, ev := collect(t, s)
	if ev.Finish != "error" || ev.Err == nil || e.Stats().BlocksFree != 16 {
		t.Fatalf("after failing steps: %+v, %+v", ev, e.Stats())
	}
}

// TestRouterMovesRequests: requests of a replica removed mid-generation
// finish on another with the tokens they would have produced anyway;
// with no replica left they wait, and the next replica added serves them.
func TestRouterMovesRequests(t *testing.T) {
	cfg := routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 16, MaxWaiting: 64}
	a, m := newEngine(t, 256, 16, cfg)
	r := routing.NewRouter()
	r.AddReplica("a", a)
	ps := prompts(6)
	var streams []*routing.Stream
	for i, p := range ps {
		s, err := r.Submit(greedy(fmt.Sprint("r", i), p, 24))
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	if _, err := r.Submit(greedy("r0", []int32{1}, 1)); err == nil {
		t.Fatal("duplicate id accepted")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	first := make([][]int32, len(ps))
	for i, s := range streams {
		ev, err := s.Recv(ctx) // every request has started
		if err != nil {
			t.Fatal(err)
		}
		first[i] = ev.Tokens
	}
	r.RemoveReplica("a") // no replica: the requests wait
	if st := r.Stats(); st.Waiting != len(ps) {
		t.Fatalf("orphans: %+v", st)
	}
	b, _ := newEngine(t, 256, 16, cfg)
	r.AddReplica("b", b)
	for i, s := range streams {
		ids, ev := collect(t, s)
		ids = append(first[i], ids...)
		want, _ := m.Greedy(ps[i], 24, nil)
		if ev.Finish != "length" || !slices.Equal(ids, want) {
			t.Fatalf("request %d: %v (%s), want %v", i, ids, ev.Finish, want)
		}
	}
	// A replica removed while a second one serves: its requests move there.
	s, _ := r.Submit(greedy("late", ps[0], 30))
	c, _ := newEngine(t, 256, 16, cfg)
	r.AddReplica("c", c)
	r.RemoveReplica("b")
	ids, ev := collect(t, s)
	want, _ := m.Greedy(ps[0], 30, nil)
	if ev.Finish != "length" || !slices.Equal(ids, want) {
		t.Fatalf("moved request: %v, want %v", ids, want)
	}
	if r.AbortStream(s) || r.Abort("late") {
		t.Fatal("a finished request was found to abort")
	}
}

// overlapExec wraps an executor: the first step is held until a second
// one is in flight, so that steps overlap, and it checks that no sequence
// is in two steps at once and that step ids are issued in order.
type overlapExec struct {
	x         routing.Executor
	mu        sync.Mutex
	busy      map[uint64]bool
	ids       map[uint64]bool
	maxOut    int
	out       int
	problem   error
	first     bool          // the first step has been issued
	overlap   chan struct{} // closed when two steps are in flight
	overlapOK sync.Once
}

func (o *overlapExec) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	o.mu.Lock()
	for _, s := range b.Seqs {
		if o.busy[s.ID] && o.problem == nil {
			o.problem = fmt.Errorf("sequence %d in two steps at once", s.ID)
		}
		o.busy[s.ID] = true
	}
	if (b.ID == 0 || o.ids[b.ID]) && o.problem == nil {
		o.problem = fmt.Errorf("step id %d reused", b.ID)
	}
	o.ids[b.ID] = true
	o.out++
	o.maxOut = max(o.maxOut, o.out)
	hold := !o.first
	o.first = true
	if o.out >= 2 {
		o.overlapOK.Do(func() { close(o.overlap) })
	}
	o.mu.Unlock()
	if hold {
		select {
		case <-o.overlap:
		case <-ctx.Done():
		case <-time.After(30 * time.Second):
			o.mu.Lock()
			if o.problem == nil {
				o.problem = fmt.Errorf("no second step was issued while step %d was in flight", b.ID)
			}
			o.mu.Unlock()
		}
	}
	res, err := o.x.Step(ctx, b)
	o.mu.Lock()
	for _, s := range b.Seqs {
		delete(o.busy, s.ID)
	}
	o.out--
	o.mu.Unlock()
	return res, err
}

// TestEngineDepth: with two steps in flight (a two-stage pipeline), the
// running sequences step in two disjoint groups that overlap, and every
// request still produces what it produces alone.
func TestEngineDepth(t *testing.T) {
	b, err := cpu.New(cpu.Config{Threads: 1, BatchInvariant: true})
	if err != nil {
		t.Fatal(err)
	}
	defer b.Close()
	m, err := model.Load(filepath.Join(root(), "testdata", "qwen2-ref", "dense-gqa-f32"), b, model.LoadOptions{})
	if err != nil {
		t.Fatal(err)
	}
	x := shard.NewExecutor(m)
	if err := x.Warmup(256, 16, 0); err != nil {
		t.Fatal(err)
	}
	ps := prompts(8)
	want := make([][]int32, len(ps)) // before the engine runs: one backend, one op at a time
	for i, p := range ps {
		want[i], _ = m.Greedy(p, 12, nil)
	}
	ox := &overlapExec{x: wholeModel{x}, busy: map[uint64]bool{}, ids: map[uint64]bool{}, overlap: make(chan struct{})}
	e := routing.NewEngine(ox, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 16, MaxWaiting: 64}, 256, 16)
	e.SetDepth(2)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	var streams []*routing.Stream
	for i, p := range ps {
		s, err := e.Submit(greedy(fmt.Sprint("d", i), p, 12))
		if err != nil {
			t.Fatal(err)
		}
		streams = append(streams, s)
	}
	for i, s := range streams {
		ids, ev := collect(t, s)
		if ev.Finish != "length" || !slices.Equal(ids, want[i]) {
			t.Fatalf("request %d: %v, want %v", i, ids, want[i])
		}
	}
	ox.mu.Lock()
	defer ox.mu.Unlock()
	if ox.problem != nil {
		t.Fatal(ox.problem)
	}
	if ox.maxOut != 2 {
		t.Fatalf("at most %d steps were in flight, want 2", ox.maxOut)
	}
}

// instant answers every step at once: token 7 for every sampled sequence.
// With hang set, a step waits for its context to end instead.
type instant struct {
	mu   sync.Mutex
	hang bool
}

func (x *instant) setHang(h bool) {
	x.mu.Lock()
	x.hang = h
	x.mu.Unlock()
}

func (x *instant) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	x.mu.Lock()
	hang := x.hang
	x.mu.Unlock()
	if hang {
		<-ctx.Done()
		return nil, ctx.Err()
	}
	res := &steps.Result{Seqs: make([]steps.SeqResult, len(b.Seqs))}
	for i, s := range b.Seqs {
		if s.Sample {
			res.Seqs[i].Candidates = []steps.Candidate{{ID: 7}}
		}
	}
	return res, nil
}

// startEngine runs an engine over x until the test ends.
func startEngine(t *testing.T, x routing.Executor) *routing.Engine {
	e := routing.NewEngine(x, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8}, 64, 4)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	t.Cleanup(func() { cancel(); <-done })
	return e
}

// TestEngineStepTimeoutAdapts: before MinStepHistory steps a step may take
// Initial; after fast steps it may take only Min, so a hung step is given
// up in Min, not Initial, and the request survives it.
func TestEngineStepTimeoutAdapts(t *testing.T) {
	x := &instant{}
	e := routing.NewEngine(x, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8}, 64, 4)
	if got, want := e.Stats().StepTimeout, routing.DefaultStepTimeout().Initial; got != want {
		t.Fatalf("new engine's step timeout %v, want %v", got, want)
	}
	const minimum = 50 * time.Millisecond
	e.SetStepTimeouts(routing.StepTimeout{Min: minimum, Initial: 30 * time.Second}) // Factor: the default
	if got := e.Stats().StepTimeout; got != 30*time.Second {
		t.Fatalf("before any step: step timeout %v, want Initial 30s", got)
	}
	failed := make(chan error, 8)
	e.OnStepError = func(err error) {
		x.setHang(false) // the worker is back
		failed <- err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	s, err := e.Submit(greedy("warm", []int32{1, 2, 3}, 8)) // 8 fast steps
	if err != nil {
		t.Fatal(err)
	}
	if _, ev := collect(t, s); ev.Finish != "length" {
		t.Fatalf("warm-up request: %+v", ev)
	}
	if got := e.Stats().StepTimeout; got < minimum || got >= time.Second { // Min, unless the machine is very slow
		t.Fatalf("after fast steps: step timeout %v, want about Min %v", got, minimum)
	}
	x.setHang(true)
	t0 := time.Now()
	s, err = e.Submit(greedy("hung", []int32{1, 2, 3}, 4))
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-failed:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("hung step failed with %v, want a deadline", err)
		}
		if took := time.Since(t0); took < minimum || took > 10*time.Second {
			t.Fatalf("hung step given up after %v, want about %v", took, minimum)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a hung step was not given up")
	}
	if ids, ev := collect(t, s); ev.Finish != "length" || len(ids) != 4 {
		t.Fatalf("request of the hung step: %v %+v", ids, ev)
	}
}

// TestEngineFixedStepTimeout: SetStepTimeout(d) bounds every step by d,
// before any history too.
func TestEngineFixedStepTimeout(t *testing.T) {
	x := &instant{hang: true}
	e := routing.NewEngine(x, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8}, 64, 4)
	e.SetStepTimeout(30 * time.Millisecond)
	if got := e.Stats().StepTimeout; got != 30*time.Millisecond {
		t.Fatalf("step timeout %v, want 30ms", got)
	}
	failed := make(chan error, 8)
	e.OnStepError = func(err error) {
		x.setHang(false)
		failed <- err
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()
	s, err := e.Submit(greedy("x", []int32{1, 2, 3}, 4)) // 4 steps after the failed one
	if err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-failed:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("hung step failed with %v, want a deadline", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a hung step was not given up")
	}
	if _, ev := collect(t, s); ev.Finish != "length" {
		t.Fatalf("after the timeout: %+v", ev)
	}
	if got := e.Stats().StepTimeout; got != 30*time.Millisecond {
		t.Fatalf("after steps: step timeout %v, want 30ms (fixed)", got)
	}
	e.SetStepTimeouts(routing.StepTimeout{}) // the defaults: adaptive again
	if got, want := e.Stats().StepTimeout, routing.DefaultStepTimeout().Min; got != want {
		t.Fatalf("defaults after fast steps: step timeout %v, want Min %v", got, want)
	}
}
