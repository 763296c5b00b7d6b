package routing_test

import (
	"errors"
	"fmt"
	"slices"
	"testing"

	"github.com/qwenfleet/qwenfleet/pkg/routing"
)

// TestRouterCordon: a cordoned (draining) replica finishes what it has and
// gets no new request, nor requests moved from a lost replica; with every
// replica cordoned a request is refused; adding a replica under the name
// again lifts the cordon.
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
	if _, err := r.Submit(greedy("refused", ps[0], 4)); !errors.Is(err, routing.ErrNoReplica) {
		t.Fatalf("every replica cordoned: err = %v, want ErrNoReplica", err)
	}
	r.AddReplica("b", b) // the same engine again: serving fully
	s, err := r.Submit(greedy("again", ps[1], 4))
	if err != nil {
		t.Fatalf("after the cordon is lifted: %v", err)
	}
	if _, ev := collect(t, s); ev.Finish != "length" {
		t.Fatalf("after the cordon is lifted: %+v", ev)
	}
}
