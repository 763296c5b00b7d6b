package routing_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/routing"
)

// TestRouterCordon: a cordoned (draining) replica finishes what it has and
// gets no new request, nor requests moved from a lost replica; with every
// replica cordoned a request waits in the router; adding a replica under
// the name again lifts the cordon and takes it.
func TestRouterCordon(t *testing.T) {
	cfg := routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 16, MaxWaiting: 64}
	a, m := newEngine(t, 256, 16, cfg)
	b, _ := newEngine(t, 256, 16, cfg)
	r := routing.NewRouter()
	r.AddReplica("a", a)
	ps := prompts(4)
	first, err := r.Submit(greedy("first", ps[0], 16)) // on a: the only replica
	if err != nil {
		t.Fatal(err)
	}
	r.AddReplica("b", b)
	r.Cordon("a")
	var later []*routing.Stream
	for i := 1; i < len(ps); i++ {
		id := fmt.Sprint("r", i)
		s, err := r.Submit(greedy(id, ps[i], 8))
		if err != nil {
			t.Fatal(err)
		}
		if a.Has(id) {
			t.Fatalf("request %s went to the cordoned replica", id)
		}
		later = append(later, s)
	}
	ids, ev := collect(t, first)
	want, _ := m.Greedy(ps[0], 16, nil)
	if ev.Finish != "length" || !slices.Equal(ids, want) {
		t.Fatalf("the cordoned replica's request: %v (%s), want %v", ids, ev.Finish, want)
	}
	for _, s := range later {
		if _, ev := collect(t, s); ev.Finish != "length" {
			t.Fatalf("request on the other replica: %+v", ev)
		}
	}
	r.Cordon("b")
	waiting, err := r.Submit(greedy("waiting", ps[0], 4))
	if err != nil {
		t.Fatalf("every replica cordoned: %v, want the request to wait", err)
	}
	if a.Has("waiting") || b.Has("waiting") || r.Stats().Waiting != 1 {
		t.Fatalf("every replica cordoned: the request is not waiting in the router: %+v", r.Stats())
	}
	r.AddReplica("b", b) // the same engine again: serving fully
	if _, ev := collect(t, waiting); ev.Finish != "length" {
		t.Fatalf("the request that waited for a replica: %+v", ev)
	}
	s, err := r.Submit(greedy("again", ps[1], 4))
	if err != nil {
		t.Fatalf("after the cordon is lifted: %v", err)
	}
	if _, ev := collect(t, s); ev.Finish != "length" {
		t.Fatalf("after the cordon is lifted: %+v", ev)
	}
}

// TestRouterOrphanWaitsForAReplica: a request submitted with no replica
// waits (a duplicate id is refused) and runs, as it would have, on the
// replica added next.
func TestRouterOrphanWaitsForAReplica(t *testing.T) {
	r := routing.NewRouter()
	p := prompts(3)[2]
	s, err := r.Submit(greedy("o", p, 12))
	if err != nil {
		t.Fatalf("no replica: %v, want the request to wait", err)
	}
	if _, err := r.Submit(greedy("o", p, 1)); !errors.Is(err, routing.ErrDuplicate) {
		t.Fatalf("duplicate of a waiting request: err = %v", err)
	}
	if st := r.Stats(); st.Waiting != 1 {
		t.Fatalf("waiting: %+v", st)
	}
	e, m := newEngine(t, 256, 16, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 16, MaxWaiting: 64})
	r.AddReplica("a", e)
	ids, ev := collect(t, s)
	want, _ := m.Greedy(p, 12, nil)
	if ev.Finish != "length" || !slices.Equal(ids, want) || ev.Scheduled.IsZero() {
		t.Fatalf("the request that waited: %v %+v, want %v", ids, ev, want)
	}
	if st := r.Stats(); st.Waiting != 0 {
		t.Fatalf("after: %+v", st)
	}
}

// ended receives a stream's final event and the time it came.
func ended(t *testing.T, s *routing.Stream) (routing.Event, time.Time) {
	t.Helper()
	_, ev := collect(t, s)
	return ev, time.Now()
}

// TestRouterOrphanTimesOut: a request no replica takes ends after the
// queue timeout with an error that matches ErrNoReplica and says why;
// each request has its own deadline.
func TestRouterOrphanTimesOut(t *testing.T) {
	const d = 60 * time.Millisecond
	r := routing.NewRouter()
	r.SetQueueTimeout(d, 0, func() string { return "no worker fits: 2 GPUs short" })
	t0 := time.Now()
	first, err := r.Submit(greedy("first", []int32{1, 2}, 4))
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(d / 2)
	t1 := time.Now()
	second, err := r.Submit(greedy("second", []int32{1, 2}, 4))
	if err != nil {
		t.Fatal(err)
	}
	ev, at := ended(t, first)
	if ev.Finish != "error" || !errors.Is(ev.Err, routing.ErrNoReplica) {
		t.Fatalf("first: %+v, want an error matching ErrNoReplica", ev)
	}
	msg := ev.Err.Error()
	if !strings.HasPrefix(msg, "routing: no replica is ready: waited ") || !strings.HasSuffix(msg, " for a replica: no worker fits: 2 GPUs short") {
		t.Fatalf("first: message %q", msg)
	}
	if at.Sub(t0) < d {
		t.Fatalf("first ended after %v, before the queue timeout %v", at.Sub(t0), d)
	}
	ev, at = ended(t, second)
	if ev.Finish != "error" || !errors.Is(ev.Err, routing.ErrNoReplica) {
		t.Fatalf("second: %+v", ev)
	}
	if at.Sub(t1) < d {
		t.Fatalf("second ended %v after it was submitted, before the queue timeout %v", at.Sub(t1), d)
	}
	if st := r.Stats(); st.Waiting != 0 {
		t.Fatalf("after the timeouts: %+v", st)
	}
}

// TestRouterRemovedReplicasRequestTimesOut: the requests of the only
// replica, removed, wait as orphans and end after the queue timeout,
// counted from when they became orphans (again).
func TestRouterRemovedReplicasRequestTimesOut(t *testing.T) {
	const d = 80 * time.Millisecond
	r := routing.NewRouter()
	r.SetQueueTimeout(d, 0, nil)
	s, err := r.Submit(greedy("x", []int32{1, 2, 3}, 4)) // an orphan
	if err != nil {
		t.Fatal(err)
	}
	time.Sleep(d / 2)
	// An engine that does not run: the request stays queued in it.
	e := routing.NewEngine(&instant{}, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 8, MaxWaiting: 8}, 64, 4)
	r.AddReplica("a", e)
	if !e.Has("x") {
		t.Fatal("the added replica did not take the waiting request")
	}
	time.Sleep(d / 2)
	t0 := time.Now()
	r.RemoveReplica("a") // an orphan again, from now
	if st := r.Stats(); st.Waiting != 1 {
		t.Fatalf("after the removal: %+v", st)
	}
	ev, at := ended(t, s)
	if ev.Finish != "error" || !errors.Is(ev.Err, routing.ErrNoReplica) {
		t.Fatalf("%+v, want an error matching ErrNoReplica", ev)
	}
	if !strings.HasSuffix(ev.Err.Error(), " for a replica") { // why is nil
		t.Fatalf("message %q", ev.Err)
	}
	if at.Sub(t0) < d {
		t.Fatalf("ended %v after it was orphaned again, before the queue timeout %v", at.Sub(t0), d)
	}
}

// TestRouterFailOrphans: FailOrphans ends the waiting requests at once,
// with an error matching ErrNoReplica that says why.
func TestRouterFailOrphans(t *testing.T) {
	r := routing.NewRouter()
	r.SetQueueTimeout(time.Minute, 0, nil)
	s, err := r.Submit(greedy("x", []int32{1, 2, 3}, 4))
	if err != nil {
		t.Fatal(err)
	}
	if n := r.FailOrphans("stepped down"); n != 1 {
		t.Fatalf("ended %d", n)
	}
	ev, _ := ended(t, s)
	if ev.Finish != "error" || !errors.Is(ev.Err, routing.ErrNoReplica) || !strings.Contains(ev.Err.Error(), "stepped down") {
		t.Fatalf("%+v", ev)
	}
	if st := r.Stats(); st.Waiting != 0 {
		t.Fatalf("after: %+v", st)
	}
	if r.FailOrphans("again") != 0 {
		t.Fatal("ended one twice")
	}
	// Until AcceptOrphans, a request with no replica is refused at once.
	if _, err := r.Submit(greedy("y", []int32{1}, 2)); !errors.Is(err, routing.ErrNoReplica) || !strings.Contains(err.Error(), "again") {
		t.Fatalf("submit after FailOrphans: %v", err)
	}
	r.AcceptOrphans()
	if _, err := r.Submit(greedy("y", []int32{1}, 2)); err != nil {
		t.Fatalf("submit after AcceptOrphans: %v", err)
	}
}

// TestRouterOrphanAbortAndLimit: waiting requests can be aborted, by id or
// stream; Submit refuses more than maxOrphans waiting with ErrQueueFull.
func TestRouterOrphanAbortAndLimit(t *testing.T) {
	r := routing.NewRouter()
	r.SetQueueTimeout(time.Minute, 2, nil)
	a, err := r.Submit(greedy("a", []int32{1}, 2))
	if err != nil {
		t.Fatal(err)
	}
	b, err := r.Submit(greedy("b", []int32{1}, 2))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.Submit(greedy("c", []int32{1}, 2)); !errors.Is(err, routing.ErrQueueFull) {
		t.Fatalf("a third waiting request with maxOrphans 2: err = %v, want ErrQueueFull", err)
	}
	if !r.Abort("a") || r.Abort("a") {
		t.Fatal("abort by id did not find the waiting request exactly once")
	}
	if _, ev := collect(t, a); ev.Finish != "abort" {
		t.Fatalf("aborted by id: %+v", ev)
	}
	c, err := r.Submit(greedy("c", []int32{1}, 2))
	if err != nil {
		t.Fatalf("after an abort, room for one more: %v", err)
	}
	if !r.AbortStream(b) || !r.AbortStream(c) || r.AbortStream(c) {
		t.Fatal("abort by stream did not find the waiting requests exactly once")
	}
	for _, s := range []*routing.Stream{b, c} {
		if _, ev := collect(t, s); ev.Finish != "abort" {
			t.Fatalf("aborted by stream: %+v", ev)
		}
	}
	if st := r.Stats(); st.Waiting != 0 {
		t.Fatalf("after the aborts: %+v", st)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := a.Recv(ctx); !errors.Is(err, routing.ErrStreamDone) {
		t.Fatalf("after the final event: %v", err)
	}
}

// TestRouterOrphanRunsOnAFakeReplica: the engines' step timeouts
// show in the router's stats (the largest), and a request that waited
// runs on a replica over a fake executor.
func TestRouterOrphanRunsOnAFakeReplica(t *testing.T) {
	r := routing.NewRouter()
	s, err := r.Submit(greedy("x", []int32{1, 2, 3}, 5))
	if err != nil {
		t.Fatal(err)
	}
	e := startEngine(t, &instant{})
	e.SetStepTimeout(time.Second)
	f := startEngine(t, &instant{})
	f.SetStepTimeout(3 * time.Second)
	r.AddReplica("e", e)
	r.AddReplica("f", f)
	ids, ev := collect(t, s)
	if ev.Finish != "length" || !slices.Equal(ids, []int32{7, 7, 7, 7, 7}) {
		t.Fatalf("%v %+v", ids, ev)
	}
	if got := r.Stats().StepTimeout; got != 3*time.Second {
		t.Fatalf("router's step timeout %v, want the largest, 3s", got)
	}
}
