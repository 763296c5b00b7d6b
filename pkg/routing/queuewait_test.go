package routing_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
)

// gate answers steps as instant does once open; until then a step waits.
type gate struct {
	open chan struct{}
	x    instant
}

func (g *gate) Step(ctx context.Context, b *steps.Batch) (*steps.Result, error) {
	select {
	case <-g.open:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	return g.x.Step(ctx, b)
}

// TestEngineMaxQueueWait: a request that waits longer than the max queue
// wait without being scheduled ends with ErrOverloaded and no token, even
// while a step hangs; the running request and a resumed one (exempt) are
// served.
func TestEngineMaxQueueWait(t *testing.T) {
	g := &gate{open: make(chan struct{})}
	e := routing.NewEngine(g, routing.SchedulerConfig{MaxBatchTokens: 64, MaxRunning: 1, MaxWaiting: 8}, 64, 4)
	e.SetStepTimeout(time.Minute)
	const limit = 50 * time.Millisecond
	e.SetMaxQueueWait(limit)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() { e.Run(ctx); close(done) }()
	defer func() { cancel(); <-done }()

	running, err := e.Submit(greedy("running", []int32{1, 2, 3}, 4))
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return e.Stats().Running == 1 })
	t0 := time.Now()
	late, err := e.Submit(greedy("late", []int32{1, 2, 3}, 4))
	if err != nil {
		t.Fatal(err)
	}
	r := greedy("resumed", []int32{1, 2, 3}, 4)
	r.Resume = []int32{7}
	resumed, err := e.Submit(r)
	if err != nil {
		t.Fatal(err)
	}
	ids, ev, _ := receive(late)
	if took := time.Since(t0); ev.Finish != "error" || !errors.Is(ev.Err, routing.ErrOverloaded) || len(ids) != 0 || took < limit || took > 5*time.Second {
		t.Fatalf("late request: %v %+v after %v, want ErrOverloaded and no token after about %v", ids, ev, took, limit)
	}
	t.Logf("late request: %v", ev.Err)
	close(g.open)
	if ids, ev := collect(t, running); ev.Finish != "length" || len(ids) != 4 {
		t.Fatalf("running request: %v %+v", ids, ev)
	}
	if ids, ev := collect(t, resumed); ev.Finish != "length" || len(ids) != 3 {
		t.Fatalf("resumed request (exempt): %v %+v", ids, ev)
	}
	if s := e.Stats(); s.BlocksFree != s.BlocksTotal || s.Waiting != 0 || s.Running != 0 {
		t.Fatalf("after: %+v", s)
	}
}

// waitFor polls cond for up to 10 s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for end := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(end) {
			t.Fatal("condition not met in 10s")
		}
	}
}
