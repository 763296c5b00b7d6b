package server

import (
	"context"
	"log/slog"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
	"github.com/qwenfleet/qwenfleet/pkg/control"
	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// TestDeposedLeaderDropFenced runs the control machine with the placement
// writer on a real (embedded) etcd. The leader serves a replica; its
// session then expires (its client is closed) and a standby takes over and
// writes. The old leader, not yet aware, drops its replica (its worker left)
// and asks to write the placement without it: etcd refuses the write by its
// fence, and the new leader's placement stays. A key gone is left to the
// campaign that follows; a fence that fails on a live key deposes the
// machine at once, and it writes nothing more.
func TestDeposedLeaderDropFenced(t *testing.T) {
	e, err := cluster.StartEmbeddedEtcd(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	connect := func() *cluster.Store {
		s, err := cluster.Connect(ctx, e.Endpoints(), "/fence-test/")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	session, writes, standby := connect(), connect(), connect()
	old, err := session.Campaign(ctx, "old", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	cfg, _ := model.Preset("tiny")
	m, err := control.New(control.Config{Model: cfg, ModelName: "tiny", ModelDir: "/models/tiny", KVCacheTokens: 1024, KVBytesPerValue: 4})
	if err != nil {
		t.Fatal(err)
	}
	var stored []schema.Placement
	w := newPlacementWriter(writes, old.Fence(), slog.New(slog.DiscardHandler), func(p schema.Placement) { stored = append(stored, p) }, nil)
	now := time.Now()
	// step feeds an event and carries out the writes it asks for (in this
	// goroutine), feeding their answers back.
	var step func(ev control.Event) []control.Action
	step = func(ev control.Event) []control.Action {
		acts := m.Step(now, ev)
		for _, a := range acts {
			if wp, ok := a.(control.WritePlacement); ok {
				acts = append(acts, step(w.write(ctx, wp))...)
			}
		}
		return acts
	}
	step(control.LeadershipGained{Fence: old.Fence().Rev})
	step(control.WorkerUp{Worker: control.Worker{ID: "w1", Addr: "127.0.0.1:1", PID: 1, MemoryBytes: 8 << 30}})
	step(control.Loaded{Gen: 1, Worker: "w1"})
	step(control.WarmedUp{Gen: 1, Blocks: 64})
	if len(stored) != 1 || len(stored[0].Replicas) != 1 {
		t.Fatalf("the leader wrote %+v, want one placement of one replica", stored)
	}

	session.Close() // its keep-alive stops: the session expires after its TTL
	lead, err := standby.Campaign(ctx, "new", time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer lead.Resign(context.Background())
	newDoc := schema.Placement{Model: "by the new leader", LastGeneration: 100}
	if _, err := standby.PutPlacement(ctx, newDoc.Encode(), lead.Fence()); err != nil {
		t.Fatal(err)
	}

	var got []string
	for _, a := range step(control.WorkerGone{ID: "w1"}) {
		got = append(got, a.String())
	}
	want := []string{
		"drop g1: worker w1 left etcd",
		"write-placement seq=2 fence=" + itoa(old.Fence().Rev) + " last-gen=1 replicas=",
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Fatalf("actions of the deposed leader's drop:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	raw, _, err := writes.GetPlacement(ctx)
	if err != nil {
		t.Fatal(err)
	}
	p, err := schema.Decode(raw, 0)
	if err != nil || p.Model != "by the new leader" {
		t.Fatalf("stored placement %s (%v), want the new leader's", raw, err)
	}
	// Its key is gone (its lease expired): not proof of another leader by
	// itself (etcd may have been away), so the write fails unfenced and
	// the campaign that follows the lost lease decides. A write refused by
	// a key that is there, with another revision, deposes at once.
	ev := w.write(ctx, control.WritePlacement{Seq: 2, Fence: old.Fence().Rev, Doc: m.Doc()})
	if f, ok := ev.(control.PlacementWriteFailed); !ok || f.Fenced || !strings.Contains(f.Err, "key is gone") {
		t.Fatalf("write under an expired key: %#v", ev)
	}
	other := newPlacementWriter(writes, cluster.Fence{Key: lead.Fence().Key, Rev: lead.Fence().Rev + 1}, slog.New(slog.DiscardHandler), nil, nil)
	ev = other.write(ctx, control.WritePlacement{Seq: 2, Fence: old.Fence().Rev, Doc: m.Doc()})
	if f, ok := ev.(control.PlacementWriteFailed); !ok || !f.Fenced {
		t.Fatalf("write under another revision of a live key: %#v", ev)
	}
	step(ev)
	if m.Leader() {
		t.Fatal("still leads after a fenced write")
	}
	if acts := step(control.WorkerUp{Worker: control.Worker{ID: "w2", Addr: "127.0.0.1:2", PID: 2, MemoryBytes: 8 << 30}}); len(acts) != 0 {
		t.Fatalf("a follower acted: %v", acts)
	}
}

func itoa(n int64) string { return strconv.FormatInt(n, 10) }
