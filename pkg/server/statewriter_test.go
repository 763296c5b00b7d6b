package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
)

// fakeRegistration records the states written to it. Each write is sent on
// started as it begins; while hold is not nil, a write then waits until
// hold is closed (or its ctx ends). fail makes the first that many writes
// fail. Each write, once over, is signalled on ended.
type fakeRegistration struct {
	mu      sync.Mutex
	written []string
	infos   []cluster.WorkerInfo
	hold    chan struct{}
	fail    int
	started chan string
	ended   chan struct{}
}

func newFakeRegistration() *fakeRegistration {
	return &fakeRegistration{started: make(chan string, 10000), ended: make(chan struct{}, 10000)}
}

func (f *fakeRegistration) Update(ctx context.Context, info cluster.WorkerInfo) error {
	f.started <- info.State
	defer func() { f.ended <- struct{}{} }()
	f.mu.Lock()
	hold := f.hold
	f.mu.Unlock()
	if hold != nil {
		select {
		case <-hold:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fail > 0 {
		f.fail--
		return errors.New("etcd unavailable")
	}
	f.written = append(f.written, info.State)
	f.infos = append(f.infos, info)
	return nil
}

func (f *fakeRegistration) states() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return slices.Clone(f.written)
}

// waitWritten waits (with a deadline) until state is the last one written.
func (f *fakeRegistration) waitWritten(t *testing.T, state string) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		if w := f.states(); len(w) > 0 && w[len(w)-1] == state {
			return
		}
		select {
		case <-f.ended: // a write is over: look again
		case <-timeout:
			t.Fatalf("%q never written last; written: %q", state, f.states())
		}
	}
}

// startWriter runs s.run and returns a stop that ends it and waits for it.
func startWriter(t *testing.T, s *stateWriter, reg workerRegistration, info cluster.WorkerInfo) (stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.run(ctx, reg, info, slog.New(slog.DiscardHandler))
	}()
	stop = func() {
		cancel()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("the state writer did not stop with its ctx")
		}
	}
	t.Cleanup(stop)
	return stop
}

var testInfo = cluster.WorkerInfo{ID: "w0", Addr: "127.0.0.1:1", Host: "h", PID: 42, State: "idle"}

// A burst of states while a write is in flight: the writer then writes only
// the latest, last, and writes nothing after it.
func TestStateWriterBurstLatestLast(t *testing.T) {
	reg := newFakeRegistration()
	reg.hold = make(chan struct{})
	s := newStateWriter()
	stop := startWriter(t, s, reg, testInfo)
	s.set("loading")
	if got := <-reg.started; got != "loading" {
		t.Fatalf("first write %q", got)
	}
	for _, st := range []string{"loaded", "failed", "loading", "loaded", "ready"} {
		s.set(st)
	}
	reg.mu.Lock()
	close(reg.hold) // the "loading" write completes
	reg.hold = nil
	reg.mu.Unlock()
	reg.waitWritten(t, "ready")
	stop()
	if got := reg.states(); !slices.Equal(got, []string{"loading", "ready"}) {
		t.Fatalf("written %q, want [loading ready]", got)
	}
	for _, info := range reg.infos { // the rest of the entry is kept
		info.State = testInfo.State
		if info != testInfo {
			t.Fatalf("wrote %+v, want %+v with its state", info, testInfo)
		}
	}
}

// Many states set as fast as possible, by one goroutine after another:
// the writes come in the order set and the last one set is written last.
func TestStateWriterInOrder(t *testing.T) {
	reg := newFakeRegistration()
	s := newStateWriter()
	startWriter(t, s, reg, testInfo)
	var mu sync.Mutex // the worker service sets states under its lock
	var wg sync.WaitGroup
	n := 0
	for g := range 4 {
		wg.Go(func() {
			for range 250 {
				mu.Lock()
				s.set(fmt.Sprintf("s%d-%d", n, g))
				n++
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	last := s.latest()
	reg.waitWritten(t, last)
	got := reg.states()
	prev := -1
	for _, st := range got {
		i, err := strconv.Atoi(strings.TrimPrefix(strings.Split(st, "-")[0], "s"))
		if err != nil || i <= prev {
			t.Fatalf("write %q after state #%d: out of order (written: %d states)", st, prev, len(got))
		}
		prev = i
	}
	if prev != 999 {
		t.Fatalf("last write is state #%d, want #999", prev)
	}
	t.Logf("1000 states set, %d written", len(got))
}

// A state set before the writer starts is written when it starts; a state
// equal to the registered one is not written again.
func TestStateWriterEarlyAndUnchanged(t *testing.T) {
	reg := newFakeRegistration()
	s := newStateWriter()
	s.set("idle") // what the registration holds already
	s.set("loading")
	startWriter(t, s, reg, testInfo)
	reg.waitWritten(t, "loading")
	s.set("loading")
	s.set("ready")
	reg.waitWritten(t, "ready")
	if got := reg.states(); !slices.Equal(got, []string{"loading", "ready"}) {
		t.Fatalf("written %q, want [loading ready]", got)
	}
}

// A failed write is tried again, with the state that is latest by then.
func TestStateWriterRetries(t *testing.T) {
	reg := newFakeRegistration()
	reg.fail = 2
	s := newStateWriter()
	s.retry = time.Millisecond
	startWriter(t, s, reg, testInfo)
	s.set("loading")
	reg.waitWritten(t, "loading")
	if got := reg.states(); !slices.Equal(got, []string{"loading"}) {
		t.Fatalf("written %q", got)
	}
}

// The writer stops with its ctx even in the middle of a write.
func TestStateWriterStopsMidWrite(t *testing.T) {
	reg := newFakeRegistration()
	reg.hold = make(chan struct{}) // never released
	s := newStateWriter()
	stop := startWriter(t, s, reg, testInfo)
	s.set("loading")
	<-reg.started
	stop() // fails the test if run does not return
	if got := reg.states(); len(got) != 0 {
		t.Fatalf("written %q", got)
	}
}
