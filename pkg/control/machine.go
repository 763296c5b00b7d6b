package control

import (
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/placement"
)

// Config is what the control plane plans with.
type Config struct {
	// Model is the served model's config (required).
	Model *model.Config
	// ModelName labels plans and messages; ModelDir is what workers load
	// (written in the placement).
	ModelName, ModelDir string
	// Quantize is passed to workers in the placement ("", "q8" or "q8a").
	Quantize string
	// Compute is passed to workers in the placement ("", "bf16" or "f32").
	Compute string
	// TP, PP and EP force the layout of every replica (0: the planner's
	// choice; EP 1: no expert parallelism). RedundantExperts are the spare
	// expert slots per rank a rebalance may fill.
	TP, PP, EP, RedundantExperts int
	// KVCacheTokens is the KV cache a replica is planned to hold (0: the
	// model's context); MaxBatchTokens the tokens of one step;
	// KVBytesPerValue the size of a cached value (the CPU and CUDA backends
	// keep float32: 4).
	KVCacheTokens, MaxBatchTokens, KVBytesPerValue int
	// RetryBackoff is how long a worker that failed (a load, a step, a
	// health check) stays out of plans; it doubles on each failure in a row
	// up to MaxRetryBackoff, and starts again once the worker serves.
	// Defaults 1 s and 30 s.
	RetryBackoff, MaxRetryBackoff time.Duration
	// EPLBInterval, when > 0, re-places the experts of every
	// expert-parallel replica that routed tokens since, that often.
	EPLBInterval time.Duration
	// DrainTimeout is how long a draining replica's requests may take to
	// finish when the drain names no timeout (default 30 s).
	DrainTimeout time.Duration
	// LapseGrace is how long a worker that left etcd's list but answers a
	// direct check keeps its place, waiting to register again (default
	// 10 s: twice a worker's lease).
	LapseGrace time.Duration
}

// Validate fills in defaults and rejects what cannot be planned.
func (c *Config) Validate() error {
	switch {
	case c.Model == nil:
		return errors.New("control: no model config")
	case c.TP < 0 || c.PP < 0 || c.EP < 0 || c.RedundantExperts < 0:
		return fmt.Errorf("control: negative layout tp=%d pp=%d ep=%d redundant=%d", c.TP, c.PP, c.EP, c.RedundantExperts)
	case c.RetryBackoff < 0 || c.MaxRetryBackoff < 0 || c.EPLBInterval < 0 || c.DrainTimeout < 0 || c.LapseGrace < 0:
		return errors.New("control: negative durations")
	}
	if c.RetryBackoff == 0 {
		c.RetryBackoff = time.Second
	}
	if c.MaxRetryBackoff == 0 {
		c.MaxRetryBackoff = 30 * time.Second
	}
	c.MaxRetryBackoff = max(c.MaxRetryBackoff, c.RetryBackoff)
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 30 * time.Second
	}
	if c.LapseGrace == 0 {
		c.LapseGrace = 10 * time.Second
	}
	return nil
}

// State of a replica.
type State string

const (
	Placing  State = "placing"  // waiting for its placement write
	Loading  State = "loading"  // its workers load their slices
	Warming  State = "warming"  // KV pools sized, first step
	Ready    State = "ready"    // serving
	Draining State = "draining" // serving what it has, taking nothing new
)

type replica struct {
	gen        int64
	tp, pp, ep int
	stages     []placement.Stage
	members    []Member
	state      State
	waitSeq    int64           // Placing: the placement write it waits for
	loaded     map[string]bool // Loading: workers done
	blocks     int64
	checking   bool // a health check is out
	drainUntil time.Time
	// Expert parallelism: the table in use, its version, the counts when
	// it was made (a rebalance uses those since), and queued operations.
	table      *expertparallel.Table
	expVersion int64
	base       [][]int64
	expOps     []*expertOp // [0] is in progress
}

func (r *replica) workers() []string {
	ids := make([]string, len(r.members))
	for i, m := range r.members {
		ids[i] = m.Worker.ID
	}
	return ids
}

type retry struct {
	until time.Time
	delay time.Duration
}

// Machine is the control plane's state. Not safe for concurrent use: one
// loop owns it.
type Machine struct {
	cfg      Config
	now      time.Time
	leader   bool
	fence    int64
	lastGen  int64
	workers  map[string]Worker
	suspect  map[string]Worker    // gossip says dead; this process is not planned
	unlisted map[string]time.Time // not in etcd's list: kept (not planned) until then, unless a check fails
	backoff  map[string]retry
	draining map[string]bool
	why      map[string]string // worker → why it serves in no replica
	owner    map[string]*replica
	replicas map[int64]*replica
	planErr  string
	dirty    bool  // the placement changed in this step: write it at its end
	seq      int64 // last placement write asked for
	written  int64 // last placement write stored
	rewrite  time.Time
	// lastTable is the latest rebalanced expert table: replicas formed
	// later with its width start from it.
	lastTable *expertparallel.Table
	nextEPLB  time.Time
	rejoinAt  time.Time // when suspects are probed again
	requests  map[int64]*expertRequest
	out       []Action
}

// New makes a follower with no workers.
func New(cfg Config) (*Machine, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &Machine{cfg: cfg, workers: map[string]Worker{}, suspect: map[string]Worker{}, unlisted: map[string]time.Time{}, backoff: map[string]retry{},
		draining: map[string]bool{}, why: map[string]string{}, owner: map[string]*replica{}, replicas: map[int64]*replica{},
		requests: map[int64]*expertRequest{}}, nil
}

// Step applies ev at time now and returns what to do, in order.
func (m *Machine) Step(now time.Time, ev Event) []Action {
	if now.After(m.now) {
		m.now = now
	}
	m.out = nil
	switch e := ev.(type) {
	case Workers:
		m.onWorkers(e.List)
	case WorkerUp:
		m.up(e.Worker)
		m.reconcile()
	case WorkerGone:
		m.gone(e.ID)
		m.reconcile()
	case WorkerConfirmed:
		if _, ok := m.unlisted[e.ID]; ok {
			if !e.Alive {
				m.gone(e.ID)
				m.reconcile()
			} else {
				m.note("worker %s left etcd's list but answers: it keeps its place for %s, to register again", e.ID, m.cfg.LapseGrace)
			}
		}
	case GossipSuspect:
		if m.aboutRegistered(e.ID, e.Addr) {
			m.onSuspect(e.ID)
		}
	case GossipAlive:
		if _, ok := m.suspect[e.ID]; ok && m.aboutRegistered(e.ID, e.Addr) {
			delete(m.suspect, e.ID)
			delete(m.why, e.ID)
			m.reconcile()
		}
	case PlacementWritten:
		m.onWritten(e.Seq)
	case PlacementWriteFailed:
		m.onWriteFailed(e)
	case Loaded:
		m.onLoaded(e)
	case LoadFailed:
		if r := m.replicas[e.Gen]; r != nil && r.state == Loading {
			m.fail(e.Worker, "load failed: "+e.Err)
			m.drop(r, fmt.Sprintf("worker %s did not load: %s", e.Worker, e.Err))
			m.reconcile()
		}
	case WarmedUp:
		m.onWarmedUp(e)
	case WarmupFailed:
		if r := m.replicas[e.Gen]; r != nil && r.state == Warming {
			for _, id := range r.workers() {
				m.fail(id, "warm-up failed: "+e.Err)
			}
			m.drop(r, "warm-up failed: "+e.Err)
			m.reconcile()
		}
	case StepFailed:
		m.onStepFailed(e)
	case HealthChecked:
		if r := m.replicas[e.Gen]; r != nil && r.checking {
			r.checking = false
			if e.Unhealthy != "" {
				m.fail(e.Unhealthy, "failed its health check")
				m.drop(r, "step failed and worker "+e.Unhealthy+" failed its health check")
				m.reconcile()
			}
		}
	case LeadershipGained:
		m.leader, m.fence = true, e.Fence
		m.lastGen = max(m.lastGen, e.LastGeneration)
		m.nextEPLB = m.now.Add(m.cfg.EPLBInterval)
		m.reconcile()
	case LeadershipLost:
		m.depose("leadership lost")
	case LeadershipRenewed:
		if m.leader {
			m.fence = e.Fence
			m.note("leadership renewed under fence %d: the placement is written again", e.Fence)
			m.dirty = true
		}
	case DrainRequested:
		m.onDrain(e)
	case ReplicaIdle:
		if r := m.replicas[e.Gen]; r != nil && r.state == Draining {
			m.drop(r, "drained")
			m.reconcile()
		}
	case RebalanceRequested:
		m.onRebalance(e)
	case ExpertCounts:
		m.onExpertCounts(e)
	case ExpertsLoaded:
		m.onExpertsLoaded(e)
	case Tick:
		m.onTick()
	default:
		panic(fmt.Sprintf("control: unknown event %T", ev))
	}
	if m.dirty && m.leader {
		m.writePlacement()
	}
	m.dirty = false
	out := m.out
	m.out = nil
	return out
}

func (m *Machine) emit(a Action) { m.out = append(m.out, a) }

func (m *Machine) note(format string, args ...any) { m.emit(Note{fmt.Sprintf(format, args...)}) }

// onWorkers diffs the registered set against what the machine knows, then
// plans once.
func (m *Machine) onWorkers(list []Worker) {
	now := map[string]bool{}
	for _, w := range list {
		now[w.ID] = true
	}
	for _, id := range sortedKeys(m.workers) {
		if _, known := m.unlisted[id]; !now[id] && !known {
			// Gone, or its lease expired while etcd was away: ask.
			m.unlisted[id] = m.now.Add(m.cfg.LapseGrace)
			m.emit(ConfirmWorker{Worker: id, Addr: m.workers[id].Addr})
		}
	}
	for _, w := range list {
		m.up(w)
	}
	m.reconcile()
}

func (m *Machine) up(w Worker) {
	old, known := m.workers[w.ID]
	m.workers[w.ID] = w
	delete(m.unlisted, w.ID)
	defer func() {
		// A worker that asks to be drained is going away: nothing to
		// refuse.
		if w.Draining && !m.draining[w.ID] {
			m.onDrain(DrainRequested{Worker: w.ID, Timeout: w.DrainTimeout, Force: true})
		}
	}()
	if !known || old.sameProcess(w) {
		return
	}
	// A new process under the same id: what the old one held is gone.
	delete(m.suspect, w.ID)
	delete(m.backoff, w.ID)
	delete(m.draining, w.ID)
	delete(m.why, w.ID)
	if r := m.owner[w.ID]; r != nil {
		m.drop(r, fmt.Sprintf("worker %s restarted (pid %d)", w.ID, w.PID))
	}
}

func (m *Machine) gone(id string) {
	if _, ok := m.workers[id]; !ok {
		return
	}
	delete(m.workers, id)
	delete(m.unlisted, id)
	delete(m.suspect, id)
	delete(m.backoff, id)
	delete(m.draining, id)
	delete(m.why, id)
	if r := m.owner[id]; r != nil {
		m.drop(r, "worker "+id+" left etcd")
	}
}

// aboutRegistered says whether a gossip report about worker id at addr is
// about its registered process (not an earlier one under the same id).
func (m *Machine) aboutRegistered(id, addr string) bool {
	w, ok := m.workers[id]
	if ok && addr != "" && w.GossipAddr != "" && addr != w.GossipAddr {
		m.note("gossip about %s at %s ignored: it is registered at %s now", id, addr, w.GossipAddr)
		return false
	}
	return ok
}

func (m *Machine) onSuspect(id string) {
	w, ok := m.workers[id]
	if !ok {
		return
	}
	m.suspect[id] = w
	m.why[id] = "gossip reports it dead"
	if r := m.owner[id]; r != nil {
		m.drop(r, "gossip reports worker "+id+" dead")
		m.reconcile()
	}
}

// fail keeps a worker out of plans for its backoff.
func (m *Machine) fail(id, why string) {
	if _, ok := m.workers[id]; !ok {
		return
	}
	b := m.backoff[id]
	b.delay = min(max(2*b.delay, m.cfg.RetryBackoff), m.cfg.MaxRetryBackoff)
	b.until = m.now.Add(b.delay)
	m.backoff[id] = b
	m.why[id] = fmt.Sprintf("failed (%s); retried after %s", why, b.delay)
}

// drop removes a replica and frees its workers (to be planned again by the
// caller's reconcile).
func (m *Machine) drop(r *replica, why string) {
	if m.replicas[r.gen] != r {
		return
	}
	delete(m.replicas, r.gen)
	for _, id := range r.workers() {
		if m.owner[id] == r {
			delete(m.owner, id)
		}
	}
	m.emit(Drop{Gen: r.gen, Why: why})
	for _, op := range r.expOps {
		m.finishOp(r, op, nil, "replica "+Key(r.gen)+" dropped: "+why)
	}
	r.expOps = nil
	for _, id := range r.workers() {
		if m.draining[id] {
			m.emit(Drained{Worker: id})
		}
	}
	m.dirty = true
}

// depose ends the term: every replica goes, and no write follows.
func (m *Machine) depose(why string) {
	if !m.leader {
		return
	}
	m.leader = false
	m.fence = 0
	for _, gen := range sortedKeys(m.replicas) {
		m.drop(m.replicas[gen], why)
	}
	m.note("follower: %s", why)
}

// reconcile plans replicas on the free workers.
func (m *Machine) reconcile() {
	if !m.leader {
		return
	}
	var free []placement.Worker
	byID := map[string]Worker{}
	for _, id := range sortedKeys(m.workers) {
		w := m.workers[id]
		if m.owner[id] != nil || m.draining[id] {
			continue
		}
		if _, dead := m.suspect[id]; dead {
			continue
		}
		if _, gone := m.unlisted[id]; gone {
			continue
		}
		if b, ok := m.backoff[id]; ok && m.now.Before(b.until) {
			continue
		}
		byID[id] = w
		mem := w.MemoryBytes
		if mem <= 0 {
			mem = 1 << 50 // unknown: do not let memory decide
		}
		free = append(free, placement.Worker{ID: w.ID, Host: w.Host, Addr: w.Addr, MemoryBytes: mem, Backend: w.Backend})
	}
	if len(free) == 0 {
		m.planErr = ""
		return
	}
	opts := placement.Options{Model: m.cfg.ModelName, TP: m.cfg.TP, PP: m.cfg.PP, EP: m.cfg.EP,
		KVCacheTokens: m.cfg.KVCacheTokens, MaxBatchTokens: m.cfg.MaxBatchTokens, KVBytesPerValue: m.cfg.KVBytesPerValue}
	if m.cfg.EP != 1 {
		opts.RedundantExperts = m.cfg.RedundantExperts
	}
	plan, err := placement.New(m.cfg.Model, free, opts)
	if err != nil {
		if m.planErr != err.Error() {
			m.note("no replica from %d free workers: %v", len(free), err)
		}
		m.planErr = err.Error()
		for _, w := range free {
			m.why[w.ID] = "waiting: " + err.Error()
		}
		return
	}
	m.planErr = ""
	var made []*replica
	for _, pr := range plan.Replicas {
		m.lastGen++
		r := &replica{gen: m.lastGen, tp: plan.TP, pp: plan.PP, ep: max(plan.EP, 1), stages: pr.Stages, state: Placing}
		if r.ep > 1 {
			t := m.lastTable
			if t == nil || t.Ranks != r.ep {
				if t, err = expertparallel.Contiguous(m.cfg.Model.NumHiddenLayers, m.cfg.Model.NumExperts, r.ep); err != nil {
					m.note("no expert table for ep=%d: %v", r.ep, err) // the planner checked ep against the experts
					continue
				}
			}
			r.table, r.expVersion = t, 1
		}
		for si, st := range pr.Stages {
			for ri, rk := range st.Ranks {
				r.members = append(r.members, Member{Worker: byID[rk.Worker], Stage: si, Rank: ri})
				m.owner[rk.Worker] = r
				delete(m.why, rk.Worker)
			}
		}
		m.replicas[r.gen] = r
		made = append(made, r)
		m.emit(Connect{Gen: r.gen, TP: r.tp, PP: r.pp, EP: r.ep, Members: r.members})
		for _, mb := range r.members {
			if mb.Worker.GossipAddr != "" {
				m.emit(GossipJoin{Worker: mb.Worker.ID, Addr: mb.Worker.GossipAddr})
			}
		}
	}
	for _, id := range plan.Unused {
		m.why[id] = fmt.Sprintf("spare: the plan (tp=%d pp=%d) has no use for it", plan.TP, plan.PP)
	}
	if len(made) > 0 {
		m.dirty = true
	}
}

// Doc is the placement document of the replicas now (loading or serving).
func (m *Machine) Doc() schema.Placement {
	p := schema.Placement{Model: m.cfg.ModelDir, Quantize: m.cfg.Quantize, Compute: m.cfg.Compute, LastGeneration: m.lastGen}
	for i, gen := range sortedKeys(m.replicas) {
		r := m.replicas[gen]
		pr := schema.Replica{Index: i, Generation: r.gen, TP: r.tp, PP: r.pp, LayersEnd: m.cfg.Model.NumHiddenLayers, Workers: r.workers()}
		if r.ep > 1 {
			pr.EP, pr.Experts, pr.ExpertsVersion = r.ep, r.table.Flat(), r.expVersion
		}
		for _, st := range r.stages {
			ps := schema.Stage{Index: st.Index, LayersBegin: st.LayersBegin, LayersEnd: st.LayersEnd}
			for _, rk := range st.Ranks {
				ps.Ranks = append(ps.Ranks, schema.Rank{Worker: rk.Worker, Addr: rk.Addr})
			}
			pr.Stages = append(pr.Stages, ps)
		}
		p.Replicas = append(p.Replicas, pr)
	}
	return p
}

// writePlacement asks for the placement to be written (once per step, at
// its end); replicas placed in the step wait for this write.
func (m *Machine) writePlacement() {
	m.seq++
	for _, r := range m.replicas {
		if r.state == Placing && r.waitSeq == 0 {
			r.waitSeq = m.seq
		}
	}
	m.emit(WritePlacement{Seq: m.seq, Fence: m.fence, Doc: m.Doc()})
}

func (m *Machine) onWritten(seq int64) {
	if seq <= m.written || seq > m.seq {
		return
	}
	m.written = seq
	if seq == m.seq {
		m.rewrite = time.Time{}
	}
	for _, gen := range sortedKeys(m.replicas) {
		r := m.replicas[gen]
		if r.state != Placing || r.waitSeq > seq {
			continue
		}
		r.state, r.loaded = Loading, map[string]bool{}
		for _, id := range r.workers() {
			m.emit(Load{Gen: r.gen, Worker: id})
		}
	}
}

func (m *Machine) onWriteFailed(e PlacementWriteFailed) {
	if !m.leader || e.Seq <= m.written || e.Seq > m.seq { // old, or not asked by this machine
		return
	}
	if e.Fenced {
		m.depose("placement write fenced off: another coordinator leads")
		return
	}
	for _, gen := range sortedKeys(m.replicas) {
		if r := m.replicas[gen]; r.state == Placing && r.waitSeq <= e.Seq {
			m.drop(r, "placement not written: "+e.Err)
		}
	}
	// What is stored is stale: write again after a backoff (a drop above
	// already asked for a newer write).
	if e.Seq == m.seq {
		m.rewrite = m.now.Add(m.cfg.RetryBackoff)
	}
	m.reconcile()
}

func (m *Machine) onLoaded(e Loaded) {
	r := m.replicas[e.Gen]
	if r == nil || r.state != Loading || m.owner[e.Worker] != r {
		return
	}
	r.loaded[e.Worker] = true
	if len(r.loaded) == len(r.members) {
		r.state = Warming
		m.emit(Warmup{Gen: r.gen})
	}
}

func (m *Machine) onWarmedUp(e WarmedUp) {
	r := m.replicas[e.Gen]
	if r == nil || r.state != Warming {
		return
	}
	r.state, r.blocks = Ready, e.Blocks
	for _, id := range r.workers() {
		delete(m.backoff, id)
	}
	m.emit(Serve{Gen: r.gen, Blocks: e.Blocks, ExpertsVersion: r.expVersion})
	for _, id := range r.workers() {
		if m.draining[id] { // asked while it loaded
			m.startDrain(r, 0)
			break
		}
	}
}

func (m *Machine) onStepFailed(e StepFailed) {
	r := m.replicas[e.Gen]
	if r == nil || (r.state != Ready && r.state != Draining) {
		return
	}
	switch {
	case e.Superseded && e.Unconfirmed:
		m.depose("a worker refused a step while etcd could not confirm this coordinator's lease: another coordinator leads")
	case e.Refused:
		for _, id := range r.workers() {
			m.fail(id, "refused a step")
		}
		m.drop(r, "step refused: "+e.Err)
		m.reconcile()
	case len(r.members) > 1:
		// Its workers may now disagree on which steps ran (they run steps
		// strictly in id order, and this one may have reached some only):
		// form the replica again.
		for _, id := range r.workers() {
			m.fail(id, "a step failed")
		}
		m.drop(r, "step failed in a split replica: "+e.Err)
		m.reconcile()
	case !r.checking:
		r.checking = true
		m.emit(CheckHealth{Gen: r.gen})
	}
}

func (m *Machine) onDrain(e DrainRequested) {
	timeout := e.Timeout
	if timeout <= 0 {
		timeout = m.cfg.DrainTimeout
	}
	answer := func(a DrainAnswer) {
		if e.Req > 0 {
			a.Req, a.Worker, a.Timeout = e.Req, e.Worker, timeout
			m.emit(a)
		}
	}
	if _, ok := m.workers[e.Worker]; !ok {
		m.note("drain %s: no such worker registered", e.Worker)
		answer(DrainAnswer{NotFound: true, Err: "no worker " + e.Worker + " is registered"})
		return
	}
	r := m.owner[e.Worker]
	var started DrainAnswer // the replica that drains, if any
	if r != nil {
		started.Gen, started.Workers = r.gen, r.workers()
	}
	if m.draining[e.Worker] {
		answer(started)
		return
	}
	if r != nil && r.state == Ready && !e.Force && m.serving(r) == 0 {
		answer(DrainAnswer{Err: fmt.Sprintf("worker %s serves in %s, the only replica serving requests: draining it would leave none "+
			"(new requests would wait for another); force it to drain anyway", e.Worker, Key(r.gen))})
		return
	}
	m.draining[e.Worker] = true
	m.why[e.Worker] = "draining"
	answer(started)
	switch {
	case r == nil:
		m.emit(Drained{Worker: e.Worker})
	case r.state == Ready:
		m.startDrain(r, timeout)
	case r.state == Draining:
	default: // not serving yet: nothing to finish
		m.drop(r, "worker "+e.Worker+" drains")
		m.reconcile()
	}
}

// serving counts the ready replicas other than r (those that take new
// requests).
func (m *Machine) serving(r *replica) int {
	n := 0
	for _, o := range m.replicas {
		if o != r && o.state == Ready {
			n++
		}
	}
	return n
}

func (m *Machine) startDrain(r *replica, timeout time.Duration) {
	r.state = Draining
	r.drainUntil = m.now.Add(timeout)
	m.emit(StopAdmitting{Gen: r.gen})
}

func (m *Machine) onTick() {
	if !m.leader {
		return
	}
	plan := false
	for _, id := range sortedKeys(m.backoff) {
		if b := m.backoff[id]; !b.until.IsZero() && !m.now.Before(b.until) {
			b.until = time.Time{} // due: plan it again (the delay is kept for the next failure)
			m.backoff[id] = b
			plan = true
		}
	}
	for _, id := range sortedKeys(m.unlisted) {
		if !m.now.Before(m.unlisted[id]) {
			m.note("worker %s did not register again within %s", id, m.cfg.LapseGrace)
			m.gone(id)
			plan = true
		}
	}
	for _, gen := range sortedKeys(m.replicas) {
		if r := m.replicas[gen]; r.state == Draining && !m.now.Before(r.drainUntil) {
			m.drop(r, "drain timed out: its requests move")
			plan = true
		}
	}
	// Gossip does not probe a member it declared dead again: while a
	// suspect stays registered (cut off, or stopped, for less than its
	// lease), have gossip try it now and then, so that it comes back
	// (GossipAlive) once it answers.
	if len(m.suspect) > 0 && !m.now.Before(m.rejoinAt) {
		m.rejoinAt = m.now.Add(rejoinEvery)
		for _, id := range sortedKeys(m.suspect) {
			if w := m.suspect[id]; w.GossipAddr != "" {
				m.emit(GossipJoin{Worker: id, Addr: w.GossipAddr})
			}
		}
	}
	if !m.rewrite.IsZero() && !m.now.Before(m.rewrite) {
		m.rewrite = time.Time{}
		m.dirty = true
	}
	if m.cfg.EPLBInterval > 0 && !m.now.Before(m.nextEPLB) {
		m.nextEPLB = m.now.Add(m.cfg.EPLBInterval)
		m.balanceExperts()
	}
	if plan {
		m.reconcile()
	}
}

// rejoinEvery is how often gossip is asked to probe the suspects again.
const rejoinEvery = 2 * time.Second

// Leader reports whether the machine leads.
func (m *Machine) Leader() bool { return m.leader }

func sortedKeys[K int64 | string, V any](mp map[K]V) []K {
	ks := make([]K, 0, len(mp))
	for k := range mp {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}
