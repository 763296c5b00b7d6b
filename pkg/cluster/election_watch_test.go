package cluster

import (
	"context"
	"testing"
	"time"
)

type leaderReport struct {
	value string
	rev   int64
}

// TestWatchLeader: the watch reports no leader at first, the first
// candidate when it wins, the one queued behind it when it resigns, and
// nothing while etcd is stopped (the last leader stands); when etcd is
// back it watches again and reports the next change. Revisions grow, and
// LeaderAt agrees with the last report.
func TestWatchLeader(t *testing.T) {
	cp, err := freePort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	pp, err := freePort("127.0.0.1")
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	start := func() *EmbeddedEtcd {
		e, err := StartEmbeddedEtcdConfig(EmbeddedEtcdConfig{Dir: dir, ClientPort: cp, PeerPort: pp})
		if err != nil {
			t.Fatalf("etcd: %v", err)
		}
		t.Cleanup(func() { e.Close() })
		return e
	}
	e := start()
	s := connect(t, e)
	ctx := testCtx(t, 60*time.Second)
	wctx, stop := context.WithCancel(ctx)
	reports := make(chan leaderReport, 64)
	done := make(chan struct{})
	go func() {
		defer close(done)
		s.WatchLeader(wctx, func(v string, rev int64) { reports <- leaderReport{v, rev} })
	}()
	var last leaderReport
	next := func(want string, within time.Duration) {
		t.Helper()
		select {
		case r := <-reports:
			if r.value != want || r.rev < last.rev {
				t.Fatalf("reported %q at revision %d (after %d), want %q", r.value, r.rev, last.rev, want)
			}
			last = r
		case <-time.After(within):
			t.Fatalf("no report of %q within %v (last %q)", want, within, last.value)
		}
	}
	quiet := func(d time.Duration) {
		t.Helper()
		select {
		case r := <-reports:
			t.Fatalf("reported %q at revision %d, want nothing", r.value, r.rev)
		case <-time.After(d):
		}
	}
	next("", 5*time.Second)

	a, err := s.Campaign(ctx, "a:1", 2*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	next("a:1", 5*time.Second)
	type won struct {
		l   *Leadership
		err error
	}
	bc := make(chan won, 1)
	go func() {
		l, err := s.Campaign(ctx, "b:2", 30*time.Second) // outlives the outage
		bc <- won{l, err}
	}()
	quiet(300 * time.Millisecond) // b queues behind a: a still leads
	if v, rev, err := s.LeaderAt(ctx); err != nil || v != "a:1" || rev < last.rev {
		t.Fatalf("LeaderAt = %q, %d, %v; want a:1 at %d or later", v, rev, err, last.rev)
	}
	if err := a.Resign(ctx); err != nil {
		t.Fatal(err)
	}
	next("b:2", 5*time.Second)
	w := <-bc
	if w.err != nil {
		t.Fatal(w.err)
	}

	// An outage: nothing is reported; b stands.
	e.Close()
	quiet(1500 * time.Millisecond)
	if v, _, err := s.LeaderAt(testCtx(t, 500*time.Millisecond)); err == nil {
		t.Fatalf("LeaderAt with etcd stopped = %q", v)
	}
	start()
	// b's lease may have expired in the outage (reported "" then); c
	// campaigns and wins once b is gone.
	cc := make(chan won, 1)
	go func() {
		l, err := s.Campaign(ctx, "c:3", 2*time.Second)
		cc <- won{l, err}
	}()
	deadline := time.After(20 * time.Second)
	for last.value != "c:3" {
		select {
		case r := <-reports:
			if r.rev < last.rev || r.value != "" && r.value != "c:3" && r.value != "b:2" {
				t.Fatalf("after the outage: reported %q at %d (after %q at %d)", r.value, r.rev, last.value, last.rev)
			}
			last = r
			if r.value == "b:2" {
				w.l.Resign(ctx)
			}
		case <-time.After(3 * time.Second):
			w.l.Resign(ctx) // b still leads: let c win
		case <-deadline:
			t.Fatalf("c's leadership not reported after the outage (last %q)", last.value)
		}
	}
	if v, rev, err := s.LeaderAt(ctx); err != nil || v != "c:3" || rev < last.rev {
		t.Fatalf("LeaderAt = %q, %d, %v; want c:3 at %d or later", v, rev, err, last.rev)
	}
	if c := <-cc; c.err == nil {
		c.l.Resign(ctx)
	}
	stop()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("WatchLeader did not return after its context ended")
	}
}
