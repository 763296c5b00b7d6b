package control

import (
	"fmt"
	"math/rand/v2"
	"testing"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// TestInvariants drives machines with long random event sequences (workers
// coming, going, restarting and suspected; writes, loads, warm-ups and
// steps succeeding or failing; drains; leadership changes; time passing)
// and checks after every event what must always hold:
//
//   - a worker serves in at most one replica, and only while registered and
//     not suspected; a draining worker only in a draining replica; a
//     worker missing from etcd's list is planned into no new replica;
//   - a follower holds no replica and asks for nothing but drops;
//   - every placement write carries the current term's fence and lists
//     exactly the machine's replicas; generations only grow, also across
//     terms;
//   - a worker loads only after a write listing its replica was stored, a
//     replica warms up only when all its workers loaded, serves only after
//     it warmed up.
func TestInvariants(t *testing.T) {
	layouts := []struct{ tp, pp int }{{0, 0}, {2, 1}, {2, 2}}
	for _, lay := range layouts {
		for seed := uint64(1); seed <= 8; seed++ {
			t.Run(fmt.Sprintf("tp%d-pp%d-seed%d", lay.tp, lay.pp, seed), func(t *testing.T) {
				runRandom(t, lay.tp, lay.pp, seed, 20000)
			})
		}
	}
}

type checker struct {
	t        *testing.T
	m        *Machine
	fence    int64
	maxGen   int64
	inDoc    map[int64]int64 // generation → first write seq that listed it
	stored   int64           // highest write seq acknowledged
	loaded   map[int64]map[string]bool
	warming  map[int64]bool
	warmed   map[int64]bool
	lastStep string
	count    map[string]int // actions by kind, to show the run reached them
}

func runRandom(t *testing.T, tp, pp int, seed uint64, steps int) {
	cfg, _ := model.Preset("tiny")
	m, err := New(Config{Model: cfg, ModelName: "tiny", ModelDir: "/m", TP: tp, PP: pp, KVCacheTokens: 1024, KVBytesPerValue: 4})
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 42))
	c := &checker{t: t, m: m, inDoc: map[int64]int64{}, loaded: map[int64]map[string]bool{}, warming: map[int64]bool{}, warmed: map[int64]bool{}, count: map[string]int{}}
	now := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pids := map[string]int{}
	ids := []string{"w1", "w2", "w3", "w4", "w5", "w6"}
	worker := func(id string) Worker {
		return Worker{ID: id, Addr: id + ":1", PID: pids[id], Host: "h" + id[1:2], MemoryBytes: 8 << 30}
	}
	term := int64(0)
	lastWrite := int64(0)
	apply := func(ev Event) {
		c.lastStep = fmt.Sprintf("%T%+v", ev, ev)
		for _, a := range m.Step(now, ev) {
			c.action(a)
			if w, ok := a.(WritePlacement); ok {
				lastWrite = w.Seq
			}
		}
		c.state()
	}
	term++
	c.fence = term * 10
	apply(LeadershipGained{Fence: c.fence})
	for i := 0; i < steps; i++ {
		st := m.Status()
		pick := func() (ReplicaStatus, bool) {
			if len(st.Replicas) == 0 {
				return ReplicaStatus{}, false
			}
			return st.Replicas[rng.IntN(len(st.Replicas))], true
		}
		id := ids[rng.IntN(len(ids))]
		switch r := rng.IntN(1000); {
		case r < 80:
			if pids[id] == 0 || rng.IntN(3) == 0 {
				pids[id] += 1 + rng.IntN(3) // new, or back as a new process
			}
			apply(WorkerUp{Worker: worker(id)})
		case r < 100:
			if pids[id] != 0 {
				delete(pids, id)
				apply(WorkerGone{ID: id})
			}
		case r < 130:
			var list []Worker
			for _, w := range ids {
				if pids[w] != 0 && rng.IntN(8) != 0 { // some keys missing (leases expired)
					list = append(list, worker(w))
				}
			}
			apply(Workers{List: list})
		case r < 140:
			apply(WorkerConfirmed{ID: id, Alive: rng.IntN(2) == 0})
		case r < 150:
			apply(GossipSuspect{ID: id})
		case r < 180:
			apply(GossipAlive{ID: id})
		case r < 380:
			apply(PlacementWritten{Seq: lastWrite - int64(rng.IntN(2))})
		case r < 390:
			apply(PlacementWriteFailed{Seq: lastWrite, Fenced: rng.IntN(4) == 0, Err: "x"})
		case r < 600:
			if rp, ok := pick(); ok {
				w := rp.Workers[rng.IntN(len(rp.Workers))]
				if rng.IntN(30) == 0 {
					apply(LoadFailed{Gen: rp.Gen, Worker: w, Err: "x"})
				} else {
					apply(Loaded{Gen: rp.Gen, Worker: w})
				}
			}
		case r < 720:
			if rp, ok := pick(); ok {
				if rng.IntN(30) == 0 {
					apply(WarmupFailed{Gen: rp.Gen, Err: "x"})
				} else {
					apply(WarmedUp{Gen: rp.Gen, Blocks: 64})
				}
			}
		case r < 740:
			if rp, ok := pick(); ok {
				apply(StepFailed{Gen: rp.Gen, Refused: rng.IntN(2) == 0, Err: "x"})
			}
		case r < 760:
			if rp, ok := pick(); ok {
				u := ""
				if rng.IntN(2) == 0 {
					u = rp.Workers[0]
				}
				apply(HealthChecked{Gen: rp.Gen, Unhealthy: u})
			}
		case r < 770:
			apply(DrainRequested{Worker: id, Timeout: time.Duration(rng.IntN(5)) * time.Second, Force: rng.IntN(2) == 0, Req: int64(rng.IntN(2))})
		case r < 800:
			if rp, ok := pick(); ok {
				apply(ReplicaIdle{Gen: rp.Gen})
			}
		case r < 808:
			if m.Leader() && rng.IntN(3) == 0 {
				term++
				c.fence = term * 10
				apply(LeadershipRenewed{Fence: c.fence})
			} else if m.Leader() {
				apply(LeadershipLost{})
			} else {
				term++
				c.fence = term * 10
				apply(LeadershipGained{Fence: c.fence, LastGeneration: c.maxGen - int64(rng.IntN(3))})
			}
		default:
			now = now.Add(time.Duration(rng.IntN(1500)) * time.Millisecond)
			apply(Tick{})
		}
		if t.Failed() {
			return
		}
	}
	// A run that never served, dropped or changed term checked little.
	for _, k := range []string{"control.Serve", "control.Drop", "control.Load", "control.Warmup"} {
		if c.count[k] == 0 {
			t.Errorf("the run made no %s (%v): the generator misses it", k, c.count)
		}
	}
	if term < 2 {
		t.Errorf("the run kept one term")
	}
	t.Logf("terms %d, actions %v", term, c.count)
}

func (c *checker) fail(format string, args ...any) {
	c.t.Helper()
	c.t.Fatalf("after %s: %s", c.lastStep, fmt.Sprintf(format, args...))
}

func (c *checker) action(a Action) {
	c.t.Helper()
	leader := c.m.Leader()
	c.count[fmt.Sprintf("%T", a)]++
	switch a := a.(type) {
	case Connect:
		if !leader {
			c.fail("a follower connects %s", Key(a.Gen))
		}
		for _, mb := range a.Members {
			if _, ok := c.m.unlisted[mb.Worker.ID]; ok {
				c.fail("%s planned into %s while not in etcd's list", mb.Worker.ID, Key(a.Gen))
			}
		}
		if a.Gen <= c.maxGen {
			c.fail("generation %d after %d", a.Gen, c.maxGen)
		}
		c.maxGen = a.Gen
	case WritePlacement:
		if !leader || a.Fence != c.fence {
			c.fail("write with fence %d (leader %v, term fence %d)", a.Fence, leader, c.fence)
		}
		for _, r := range a.Doc.Replicas {
			if _, ok := c.inDoc[r.Generation]; !ok {
				c.inDoc[r.Generation] = a.Seq
			}
		}
		st := c.m.Status()
		if len(st.Replicas) != len(a.Doc.Replicas) {
			c.fail("write lists %d replicas, the machine holds %d", len(a.Doc.Replicas), len(st.Replicas))
		}
		for i, r := range st.Replicas {
			if a.Doc.Replicas[i].Generation != r.Gen {
				c.fail("write lists %s where the machine holds %s", Key(a.Doc.Replicas[i].Generation), Key(r.Gen))
			}
		}
	case Load:
		if !leader {
			c.fail("a follower loads")
		}
		if seq, ok := c.inDoc[a.Gen]; !ok || seq > c.m.written {
			c.fail("load %s %s before a write listing it was stored (first listed in %d, stored %d)", Key(a.Gen), a.Worker, seq, c.m.written)
		}
		if c.loaded[a.Gen] == nil {
			c.loaded[a.Gen] = map[string]bool{}
		}
		c.loaded[a.Gen][a.Worker] = true
	case Warmup:
		for _, r := range c.m.Status().Replicas {
			if r.Gen == a.Gen {
				for _, w := range r.Workers {
					if !c.loaded[a.Gen][w] {
						c.fail("warm-up of %s before %s was asked to load", Key(a.Gen), w)
					}
				}
			}
		}
		c.warming[a.Gen] = true
	case Serve:
		if !c.warming[a.Gen] || c.warmed[a.Gen] {
			c.fail("serve %s (warm-up asked %v, served before %v)", Key(a.Gen), c.warming[a.Gen], c.warmed[a.Gen])
		}
		c.warmed[a.Gen] = true
	case GossipJoin, CheckHealth, StopAdmitting, GatherExperts, LoadExperts, SwitchExperts, CancelExperts:
		if !leader {
			c.fail("a follower asks %s", a)
		}
	}
}

func (c *checker) state() {
	c.t.Helper()
	st := c.m.Status()
	if !st.Leader && len(st.Replicas) > 0 {
		c.fail("a follower holds %d replicas", len(st.Replicas))
	}
	seen := map[string]int64{}
	for _, r := range st.Replicas {
		for _, w := range r.Workers {
			if g, ok := seen[w]; ok {
				c.fail("worker %s in %s and %s", w, Key(g), Key(r.Gen))
			}
			seen[w] = r.Gen
			if _, ok := c.m.workers[w]; !ok {
				c.fail("%s serves in %s but is not registered", w, Key(r.Gen))
			}
			if _, ok := c.m.suspect[w]; ok {
				c.fail("%s serves in %s but is suspect", w, Key(r.Gen))
			}
			if c.m.draining[w] && r.State != Draining {
				c.fail("draining %s serves in %s, %s", w, Key(r.Gen), r.State)
			}
		}
	}
}
