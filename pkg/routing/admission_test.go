package routing

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/sampling"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

var t0 = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)

// feed observes steps every `every` from `from` for `dur`, admitting n per
// step with `waiting` left waiting; it returns the time after the last.
func feed(a *admission, from time.Time, dur, every time.Duration, n, waiting int) time.Time {
	now := from
	for end := from.Add(dur); now.Before(end); now = now.Add(every) {
		a.observe(now, n, waiting)
	}
	return now
}

func near(got, want time.Duration, tol float64) bool {
	return math.Abs(float64(got-want)) <= tol*float64(want)
}

func TestAdmissionEstimate(t *testing.T) {
	t.Run("no history: no estimate, unless the queue is empty", func(t *testing.T) {
		var a admission
		if _, ok := a.wait(5); ok {
			t.Fatal("an estimate with no history")
		}
		if d, ok := a.wait(0); !ok || d != 0 {
			t.Fatalf("empty queue: %v %v, want 0", d, ok)
		}
		// Admissions without a backlog (arrivals taken at once) say
		// nothing about the capacity.
		feed(&a, t0, time.Minute, 10*time.Millisecond, 1, 0)
		if _, ok := a.wait(5); ok {
			t.Fatal("an estimate from admissions without a backlog")
		}
	})
	t.Run("steady backlog: waiting+1 over the rate", func(t *testing.T) {
		var a admission
		feed(&a, t0, 5*time.Second, 10*time.Millisecond, 1, 20) // 100/s
		d, ok := a.wait(20)
		if !ok || !near(d, 210*time.Millisecond, 0.01) {
			t.Fatalf("wait %v %v, want 210ms (21 at 100/s)", d, ok)
		}
	})
	t.Run("idle time is not backlog", func(t *testing.T) {
		var a admission
		now := feed(&a, t0, 5*time.Second, 10*time.Millisecond, 1, 20)
		a.observe(now, 1, 0) // the queue empties
		now = now.Add(time.Hour)
		a.observe(now, 3, 2) // a burst an hour later
		d, ok := a.wait(2)
		if !ok || !near(d, 30*time.Millisecond, 0.05) {
			t.Fatalf("after an idle hour: wait %v %v, want about 30ms (the rate before it)", d, ok)
		}
	})
	t.Run("the rate follows the capacity within a few decay times", func(t *testing.T) {
		var a admission
		now := feed(&a, t0, 30*time.Second, 10*time.Millisecond, 1, 10)    // 100/s
		now = feed(&a, now, 5*AdmissionDecay, 100*time.Millisecond, 1, 10) // 10/s
		d, ok := a.wait(9)
		if !ok || !near(d, time.Second, 0.1) {
			t.Fatalf("after the slowdown: wait %v %v, want about 1s (10 at 10/s)", d, ok)
		}
	})
	t.Run("a stuck queue: forever", func(t *testing.T) {
		var a admission
		now := feed(&a, t0, time.Second, 10*time.Millisecond, 0, 3)
		a.observe(now, 0, 3)
		if d, ok := a.wait(3); !ok || d != math.MaxInt64 {
			t.Fatalf("nothing admitted through the backlog: %v %v, want forever", d, ok)
		}
	})
	t.Run("too little backlog: no estimate", func(t *testing.T) {
		var a admission
		feed(&a, t0, MinAdmissionHistory/2, 10*time.Millisecond, 1, 3)
		if _, ok := a.wait(3); ok {
			t.Fatal("an estimate from less than MinAdmissionHistory of backlog")
		}
	})
}

// stopped is an Executor never called: the engines of these tests do not
// run, so what is submitted stays queued.
type stopped struct{}

func (stopped) Step(context.Context, *steps.Batch) (*steps.Result, error) {
	panic("stopped executor stepped")
}

func req(id string, resume ...int32) *Request {
	return &Request{ID: id, Prompt: []int32{1, 2, 3}, MaxTokens: 8, Logprobs: -1, Resume: resume,
		Sampling: sampling.Params{TopP: 1, RepetitionPenalty: 1}}
}

// history gives e a steady admission rate of perSec.
func history(e *Engine, perSec int) {
	e.mu.Lock()
	defer e.mu.Unlock()
	feed(&e.adm, t0, 5*time.Second, time.Second/time.Duration(perSec), 1, 1)
}

// TestRouterRefusesWhatWouldWaitTooLong: with a max queue wait, Submit
// refuses at once (ErrOverloaded, naming the estimate and the limit) a
// request every replica would keep waiting longer; it sends one to the
// replica that drains its queue in time; resumed requests, engines with no
// history, and a router with no limit take it.
func TestRouterRefusesWhatWouldWaitTooLong(t *testing.T) {
	cfg := SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 1, MaxWaiting: 100}
	slow := NewEngine(stopped{}, cfg, 64, 4)
	r := NewRouter()
	r.SetMaxQueueWait(time.Second)
	r.AddReplica("slow", slow)
	for i := range 20 { // no history: queued, whatever the wait
		if _, err := r.Submit(req(fmt.Sprint("q", i))); err != nil {
			t.Fatalf("request %d with no history: %v", i, err)
		}
	}
	history(slow, 10) // 20 waiting at 10/s: 2.1 s
	_, err := r.Submit(req("over"))
	if !errors.Is(err, ErrOverloaded) || !strings.Contains(err.Error(), "2.1s") || !strings.Contains(err.Error(), "1s") {
		t.Fatalf("over the limit: %v, want ErrOverloaded naming 2.1s and 1s", err)
	}
	if _, err := r.Submit(req("resumed", 5, 6)); err != nil {
		t.Fatalf("a resumed request: %v", err)
	}
	// A second replica that drains in time takes new requests, though it
	// has more waiting (the least loaded one would keep them too long).
	fast := NewEngine(stopped{}, cfg, 64, 4)
	r.AddReplica("fast", fast)
	for i := range 25 {
		if _, err := fast.Submit(req(fmt.Sprint("f", i))); err != nil {
			t.Fatal(err)
		}
	}
	history(fast, 100) // 25 waiting at 100/s: 0.26 s
	if _, err := r.Submit(req("to-fast")); err != nil || !fast.Has("to-fast") {
		t.Fatalf("with a replica that drains in time: %v (on fast: %v)", err, fast.Has("to-fast"))
	}
	r.Cordon("fast")
	if _, err := r.Submit(req("cordoned")); !errors.Is(err, ErrOverloaded) {
		t.Fatalf("the fast replica cordoned: %v, want ErrOverloaded", err)
	}
	r.SetMaxQueueWait(0)
	if _, err := r.Submit(req("no-limit")); err != nil {
		t.Fatalf("no limit: %v", err)
	}
}
