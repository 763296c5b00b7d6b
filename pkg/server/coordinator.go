package server

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/placement"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/tokenizer"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// CoordinatorOptions configure a coordinator.
type CoordinatorOptions struct {
	ID        string // unique among coordinators
	Addr      string // public address (the leader's value in the election)
	ModelDir  string
	ModelName string // served name (default: the directory's base name)
	Store     *cluster.Store
	Gossip    *cluster.Gossip // optional: fast worker failure detection
	// EtcdEndpoints are reported by GetServerInfo.
	EtcdEndpoints []string
	LeaderTTL     time.Duration
	BlockSize     int
	// KVCacheBytes is the KV pool asked of each worker (0: the worker's default).
	KVCacheBytes int64
	// NumBlocks, when > 0, fixes the KV pool size in blocks (tests).
	NumBlocks int64
	Scheduler routing.SchedulerConfig
	// Quantize is passed to workers in their assignment ("", "q8" or "q8a").
	Quantize string
	// TP and PP force the parallel layout of every replica; 0 lets the
	// planner choose (pkg/placement).
	TP, PP int
	// EP forces the expert-parallel ranks of a MoE model's stages (0: the
	// planner's choice, 1: none); RedundantExperts are the extra expert
	// slots per rank and layer a rebalance may fill with replicas of hot
	// experts.
	EP, RedundantExperts int
	// EPLBInterval, when > 0, re-places every expert-parallel replica's
	// experts from their load that often.
	EPLBInterval time.Duration
	StepTimeout  time.Duration
	Logger       *slog.Logger
}

// Placement is what the leader writes to etcd: the replicas, each a
// pipeline of stages of tensor-parallel ranks. Workers read their own
// assignment from it (by the replica's generation).
type Placement struct {
	Version  int64              `json:"version"`
	Model    string             `json:"model"`
	Quantize string             `json:"quantize,omitempty"`
	Replicas []PlacementReplica `json:"replicas"`
}

// PlacementReplica is one replica of a placement.
type PlacementReplica struct {
	Index int `json:"index"`
	// Generation identifies this replica's layout: workers take it as their
	// assignment version, and steps of another generation are refused.
	Generation int64 `json:"generation"`
	TP         int   `json:"tp"`
	PP         int   `json:"pp"`
	EP         int   `json:"ep,omitempty"`
	// Experts is the expert placement (expertparallel.Table.Flat) of an
	// expert-parallel replica, ExpertsVersion its version.
	Experts        []int32          `json:"experts,omitempty"`
	ExpertsVersion int64            `json:"experts_version,omitempty"`
	Workers        []string         `json:"workers"` // every worker, stage by stage, rank by rank
	LayersBegin    int              `json:"layers_begin"`
	LayersEnd      int              `json:"layers_end"`
	Stages         []PlacementStage `json:"stages"`
}

// PlacementStage is a pipeline stage of a replica.
type PlacementStage struct {
	Index       int             `json:"index"`
	LayersBegin int             `json:"layers_begin"`
	LayersEnd   int             `json:"layers_end"`
	Ranks       []PlacementRank `json:"ranks"` // by tensor-parallel rank
}

// PlacementRank is one worker of a stage.
type PlacementRank struct {
	Worker string `json:"worker"`
	Addr   string `json:"addr"`
}

// Assignment finds worker id's assignment in the replica of generation gen.
func (p *Placement) Assignment(id string, gen int64) (*workerv1.Assignment, error) {
	for _, r := range p.Replicas {
		if r.Generation != gen {
			continue
		}
		for si, st := range r.Stages {
			for ri, rk := range st.Ranks {
				if rk.Worker != id {
					continue
				}
				a := &workerv1.Assignment{Version: gen, Model: p.Model, Replica: int32(r.Index), Stage: int32(si),
					LayersBegin: int32(st.LayersBegin), LayersEnd: int32(st.LayersEnd), TpRank: int32(ri), TpSize: int32(len(st.Ranks)),
					Quantize: p.Quantize, PpSize: int32(len(r.Stages))}
				if r.EP > 1 {
					if r.TP < 1 || r.EP%r.TP != 0 || len(st.Ranks) != r.EP {
						return nil, fmt.Errorf("replica %d: stage %d has %d ranks for ep=%d tp=%d", r.Index, si, len(st.Ranks), r.EP, r.TP)
					}
					a.TpRank, a.TpSize, a.EpRank, a.EpSize = int32(ri%r.TP), int32(r.TP), int32(ri), int32(r.EP)
					a.Experts, a.ExpertsVersion = r.Experts, r.ExpertsVersion
				}
				if len(st.Ranks) > 1 {
					for _, x := range st.Ranks {
						a.TpPeers = append(a.TpPeers, x.Addr)
					}
				}
				if si+1 < len(r.Stages) {
					next := r.Stages[si+1].Ranks
					if len(next) != len(st.Ranks) {
						return nil, fmt.Errorf("replica %d: stage %d has %d ranks, stage %d has %d", r.Index, si, len(st.Ranks), si+1, len(next))
					}
					a.NextStage = next[ri].Addr
				}
				return a, nil
			}
		}
		return nil, fmt.Errorf("worker %s is not in replica %d (generation %d)", id, r.Index, gen)
	}
	return nil, fmt.Errorf("placement version %d has no replica of generation %d", p.Version, gen)
}

// Coordinator owns the router and the cluster's lifecycle.
type Coordinator struct {
	opts    CoordinatorOptions
	log     *slog.Logger
	cfg     *model.Config
	tok     *tokenizer.Tokenizer // nil when the model has none
	router  *routing.Router
	started time.Time

	mu        sync.Mutex
	leader    bool
	workers   []cluster.WorkerInfo
	replicas  map[string]*replica // by key
	owner     map[string]*replica // worker id → the replica it serves in
	placement Placement
	failed    map[string]string // worker id → why it is not serving
	// suspect holds workers gossip reported dead, until their etcd key
	// goes (lease expiry) or changes (a restart) or gossip sees them again:
	// they are not planned meanwhile.
	suspect map[string]cluster.WorkerInfo
	// seen holds every worker registered now (zero time) or that left
	// (when), for the worker_up metric.
	seen      map[string]time.Time
	planErr   string        // why the free workers make no replica
	ready     chan struct{} // closed when the first replica is up
	readyOnce sync.Once
	retry     chan struct{} // asks Run to reconcile again
	metrics   *metrics.Coordinator
	pmu       sync.Mutex // serialises placement writes
	lastGen   int64
	// lastTable is the latest rebalanced expert placement: replicas formed
	// later with the same expert-parallel width start from it.
	lastTable *expertparallel.Table
}

// replica is a group of workers serving one copy of the model.
type replica struct {
	key    string // "g<generation>"
	gen    int64
	tp, pp int
	ep     int // expert-parallel ranks per stage (1: none)
	stages []placement.Stage
	exec   *replicaExecutor
	// With expert parallelism: the expert placement in use, its version,
	// and the cumulative expert counts when it was made (a rebalance uses
	// the counts since).
	table      *expertparallel.Table
	expVersion int64
	base       [][]int64
	rebalMu    sync.Mutex // one rebalance at a time
	members    []*member  // stage by stage, rank by rank
	engine     *routing.Engine
	cancel     context.CancelFunc
	state      string
}

type member struct {
	info        cluster.WorkerInfo
	stage, rank int
	conn        *grpc.ClientConn
	client      workerv1.WorkerClient
}

// NewCoordinator reads the model's config and tokenizer; it does not start
// anything.
func NewCoordinator(opts CoordinatorOptions) (*Coordinator, error) {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.BlockSize <= 0 {
		opts.BlockSize = 16
	}
	if opts.Scheduler.MaxBatchTokens == 0 {
		opts.Scheduler = routing.DefaultSchedulerConfig()
	}
	if opts.StepTimeout <= 0 {
		opts.StepTimeout = 60 * time.Second
	}
	dir, err := filepath.Abs(opts.ModelDir)
	if err != nil {
		return nil, err
	}
	opts.ModelDir = dir
	if opts.ModelName == "" {
		opts.ModelName = filepath.Base(dir)
	}
	cfg, err := model.LoadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, fmt.Errorf("model %s: %w", dir, err)
	}
	if opts.TP > 0 {
		if err := model.CheckTP(cfg, opts.TP); err != nil {
			return nil, fmt.Errorf("--tp: %v", err)
		}
	}
	if opts.EP > 1 {
		tp := opts.TP
		if tp == 0 {
			tp = 1 // the planner may choose more; this checks the rest
		}
		if err := model.CheckEP(cfg, opts.EP, tp); err != nil {
			return nil, fmt.Errorf("--ep: %v", err)
		}
	}
	switch r := opts.RedundantExperts; {
	case r < 0 || r > 0 && !cfg.IsMoE():
		return nil, fmt.Errorf("--redundant-experts: %d for a model with %d experts", r, cfg.NumExperts)
	case r > 0 && (opts.EP == 1 || opts.EP == 0 && opts.TP > 0):
		return nil, fmt.Errorf("--redundant-experts: %d needs expert parallelism (--ep > 1, or no --tp so the planner may choose it)", r)
	}
	if opts.PP > cfg.NumHiddenLayers || opts.PP < 0 {
		return nil, fmt.Errorf("--pp: %d stages for %d layers", opts.PP, cfg.NumHiddenLayers)
	}
	c := &Coordinator{opts: opts, log: opts.Logger, cfg: cfg, router: routing.NewRouter(), started: time.Now(),
		replicas: map[string]*replica{}, owner: map[string]*replica{}, failed: map[string]string{},
		suspect: map[string]cluster.WorkerInfo{}, seen: map[string]time.Time{}, ready: make(chan struct{}), retry: make(chan struct{}, 1)}
	c.metrics = metrics.NewCoordinator(opts.ModelName, cfg.MaxContext(), newStateCollector(c, opts.ModelName))
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err == nil {
		if c.tok, err = tokenizer.Load(filepath.Join(dir, "tokenizer.json")); err != nil {
			return nil, fmt.Errorf("model %s: %w", dir, err)
		}
	}
	return c, nil
}

// Metrics are the coordinator's Prometheus instruments.
func (c *Coordinator) Metrics() *metrics.Coordinator { return c.metrics }

// Router is the coordinator's router (tests read its counters).
func (c *Coordinator) Router() *routing.Router { return c.router }

// Ready is closed once a replica can serve.
func (c *Coordinator) Ready() <-chan struct{} { return c.ready }

// IsLeader reports whether this coordinator leads.
func (c *Coordinator) IsLeader() bool {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.leader
}

// Run campaigns for leadership and, once leader, manages the workers until
// ctx ends or leadership is lost (then it returns an error: the process
// should exit and restart as a standby).
func (c *Coordinator) Run(ctx context.Context) error {
	c.log.Info("campaigning for leadership", "id", c.opts.ID)
	lead, err := c.opts.Store.Campaign(ctx, c.opts.Addr, c.opts.LeaderTTL)
	if err != nil {
		return err
	}
	defer lead.Resign(context.Background())
	c.mu.Lock()
	c.leader = true
	c.mu.Unlock()
	c.log.Info("leader", "id", c.opts.ID, "addr", c.opts.Addr)
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer c.dropAll()
	if c.opts.Gossip != nil {
		go c.watchGossip(wctx)
	}
	if c.opts.EPLBInterval > 0 && c.cfg.IsMoE() {
		go c.balanceExperts(wctx, c.opts.EPLBInterval)
	}
	updates := c.opts.Store.WatchWorkers(wctx)
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-lead.Lost():
			return errors.New("leadership lost")
		case ws, ok := <-updates:
			if !ok {
				if ctx.Err() != nil {
					return nil
				}
				return errors.New("worker watch ended")
			}
			c.reconcile(wctx, ws)
		case <-c.retry:
			c.mu.Lock()
			ws := c.workers
			c.mu.Unlock()
			c.reconcile(wctx, ws)
		}
	}
}

// retryBackoff is how long a worker dropped for a reason other than
// leaving etcd (gossip, a failed step, a failed load) waits before it is
// tried again.
const retryBackoff = time.Second

// scheduleRetry reconciles again after retryBackoff: a worker dropped while
// its etcd key stays is brought up again if it still answers.
func (c *Coordinator) scheduleRetry() {
	time.AfterFunc(retryBackoff, func() {
		select {
		case c.retry <- struct{}{}:
		default:
		}
	})
}

func (c *Coordinator) watchGossip(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case ev := <-c.opts.Gossip.Events():
			if !ev.Alive {
				c.log.Warn("gossip: member gone", "name", ev.Name)
				c.mu.Lock()
				for _, w := range c.workers {
					if w.ID == ev.Name {
						c.suspect[w.ID] = w
						c.failed[w.ID] = "gossip reports it dead"
					}
				}
				c.mu.Unlock()
				c.dropWorker(ev.Name, "gossip reports worker "+ev.Name+" dead")
			} else {
				c.mu.Lock()
				delete(c.suspect, ev.Name)
				c.mu.Unlock()
				c.scheduleRetry() // back (or new): reconcile brings it up
			}
		}
	}
}

// newGeneration returns a replica generation, unique and increasing.
func (c *Coordinator) newGeneration() int64 {
	g := time.Now().UnixNano()
	if g <= c.lastGen {
		g = c.lastGen + 1
	}
	c.lastGen = g
	return g
}

// reconcile drops replicas that lost a worker and plans replicas on the
// workers that serve in none.
func (c *Coordinator) reconcile(ctx context.Context, ws []cluster.WorkerInfo) {
	c.mu.Lock()
	c.workers = ws
	live := map[string]cluster.WorkerInfo{}
	for _, w := range ws {
		live[w.ID] = w
		c.seen[w.ID] = time.Time{}
	}
	for id, at := range c.seen {
		if _, ok := live[id]; !ok && at.IsZero() {
			c.seen[id] = time.Now()
		}
	}
	var gone []string
	for key, r := range c.replicas {
		for _, m := range r.members {
			if w, ok := live[m.info.ID]; !ok || w.Addr != m.info.Addr || w.PID != m.info.PID {
				gone = append(gone, key)
				break
			}
		}
	}
	c.mu.Unlock()
	for _, key := range gone {
		c.drop(key, "a worker left etcd")
	}
	c.mu.Lock()
	var free []placement.Worker
	byID := map[string]cluster.WorkerInfo{}
	for id, sw := range c.suspect {
		if w, ok := live[id]; !ok || w.Addr != sw.Addr || w.PID != sw.PID {
			delete(c.suspect, id) // gone, or back as a new process
		}
	}
	for _, w := range ws {
		if _, busy := c.owner[w.ID]; busy {
			continue
		}
		if _, dead := c.suspect[w.ID]; dead {
			continue
		}
		byID[w.ID] = w
		mem := w.MemoryBytes
		if mem <= 0 {
			mem = 1 << 50 // unknown: do not let memory decide
		}
		free = append(free, placement.Worker{ID: w.ID, Host: w.Host, Addr: w.Addr, MemoryBytes: mem, Backend: w.Backend})
	}
	if len(free) == 0 {
		c.planErr = ""
		c.mu.Unlock()
		return
	}
	opts := placement.Options{Model: c.opts.ModelName, TP: c.opts.TP, PP: c.opts.PP, EP: c.opts.EP,
		KVCacheTokens: c.kvTokens(), MaxBatchTokens: c.opts.Scheduler.MaxBatchTokens}
	if c.opts.EP != 1 {
		opts.RedundantExperts = c.opts.RedundantExperts
	}
	opts.KVBytesPerValue = 4 // the CPU and CUDA backends keep the KV cache in float32
	plan, err := placement.New(c.cfg, free, opts)
	if err != nil {
		if c.planErr != err.Error() {
			c.log.Warn("free workers make no replica", "workers", len(free), "why", err)
		}
		c.planErr = err.Error()
		for _, w := range free {
			c.failed[w.ID] = "waiting: " + err.Error()
		}
		c.mu.Unlock()
		return
	}
	c.planErr = ""
	var start []*replica
	for _, pr := range plan.Replicas {
		gen := c.newGeneration()
		r := &replica{key: fmt.Sprintf("g%d", gen), gen: gen, tp: plan.TP, pp: plan.PP, ep: max(plan.EP, 1), stages: pr.Stages, state: "loading"}
		if r.ep > 1 {
			// The last rebalanced placement of this width, if any: a
			// replica formed again keeps its balance.
			t := c.lastTable
			if t == nil || t.Ranks != r.ep {
				var err error
				if t, err = expertparallel.Contiguous(c.cfg.NumHiddenLayers, c.cfg.NumExperts, r.ep); err != nil {
					c.log.Error("expert placement", "err", err) // the planner checked ep against the experts
					continue
				}
			}
			r.table, r.expVersion = t, 1
		}
		for si, st := range pr.Stages {
			for ri, rk := range st.Ranks {
				m := &member{info: byID[rk.Worker], stage: si, rank: ri}
				// Connections are made before the replica is published, so a
				// drop always finds (and closes) them; NewClient only fails
				// on a malformed address, and then the first call fails.
				if conn, err := grpc.NewClient(m.info.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
					grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20))); err == nil {
					m.conn, m.client = conn, workerv1.NewWorkerClient(conn)
				}
				r.members = append(r.members, m)
				c.owner[rk.Worker] = r
				delete(c.failed, rk.Worker)
			}
		}
		c.replicas[r.key] = r
		start = append(start, r)
	}
	for _, id := range plan.Unused {
		c.failed[id] = "spare: the plan (" + fmt.Sprintf("tp=%d pp=%d", plan.TP, plan.PP) + ") has no use for it"
	}
	c.mu.Unlock()
	for _, r := range start {
		c.log.Info("replica planned", "replica", r.key, "tp", r.tp, "pp", r.pp, "ep", r.ep, "workers", r.workerIDs())
		if c.opts.Gossip != nil {
			for _, m := range r.members {
				if m.info.GossipAddr != "" {
					if err := c.opts.Gossip.Join([]string{m.info.GossipAddr}); err != nil {
						c.log.Warn("gossip join", "worker", m.info.ID, "err", err)
					}
				}
			}
		}
		go c.bringUp(ctx, r)
	}
}

// kvTokens is the KV cache a replica is planned to hold.
func (c *Coordinator) kvTokens() int {
	if c.opts.NumBlocks > 0 {
		return int(c.opts.NumBlocks) * c.opts.BlockSize
	}
	return 0 // the model's context
}

func (r *replica) workerIDs() []string {
	ids := make([]string, len(r.members))
	for i, m := range r.members {
		ids[i] = m.info.ID
	}
	return ids
}

// bringUp loads and warms a replica's workers and starts its engine; on
// failure the replica is dropped (its workers are planned again after a
// backoff).
func (c *Coordinator) bringUp(ctx context.Context, r *replica) {
	err := c.tryBringUp(ctx, r)
	if err != nil && ctx.Err() == nil {
		c.log.Error("replica not usable", "replica", r.key, "workers", r.workerIDs(), "err", err)
		c.drop(r.key, "bring-up failed: "+err.Error())
		c.mu.Lock()
		for _, m := range r.members {
			c.failed[m.info.ID] = "failed: " + err.Error()
		}
		c.mu.Unlock()
	}
}

func (c *Coordinator) tryBringUp(ctx context.Context, r *replica) error {
	for _, m := range r.members {
		if m.client == nil {
			return fmt.Errorf("worker %s: bad address %q", m.info.ID, m.info.Addr)
		}
	}
	if err := c.writePlacement(ctx); err != nil {
		return fmt.Errorf("placement: %w", err)
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	if err := forEach(r.members, func(m *member) error { return c.load(lctx, r, m) }); err != nil {
		return err
	}
	sharded := len(r.members) > 1
	warm := func(m *member, blocks int64) (*workerv1.WarmupResponse, error) {
		wctx, wcancel := context.WithTimeout(ctx, 5*time.Minute)
		defer wcancel()
		req := &workerv1.WarmupRequest{BlockSize: int32(c.opts.BlockSize), NumBlocks: blocks, KvCacheBytes: c.opts.KVCacheBytes}
		if !sharded { // a shard cannot step alone: its first real step warms it
			req.MaxBatchTokens = int32(min(c.opts.Scheduler.MaxBatchTokens, 64))
		}
		wr, err := m.client.Warmup(wctx, req)
		if err != nil {
			return nil, fmt.Errorf("warmup %s: %w", m.info.ID, err)
		}
		return wr, nil
	}
	// Every worker of a replica must hold the same number of blocks (the
	// coordinator's block tables index all of them): size each from its
	// budget, then shrink the larger pools to the smallest.
	pools := make([]*workerv1.WarmupResponse, len(r.members))
	if err := forEachIndex(r.members, func(i int, m *member) (err error) {
		pools[i], err = warm(m, c.opts.NumBlocks)
		return err
	}); err != nil {
		return err
	}
	blocks, warmMs := pools[0].NumBlocks, 0.0
	for _, p := range pools {
		blocks = min(blocks, p.NumBlocks)
		warmMs = max(warmMs, p.WarmupMs)
	}
	if err := forEachIndex(r.members, func(i int, m *member) (err error) {
		if pools[i].NumBlocks != blocks {
			_, err = warm(m, blocks)
		}
		return err
	}); err != nil {
		return err
	}
	exec := &replicaExecutor{members: r.members, gen: r.gen, pp: r.pp, ranks: len(r.members) / r.pp}
	exec.expVersion = r.expVersion
	eng := routing.NewEngine(exec, c.opts.Scheduler, int(blocks), c.opts.BlockSize)
	eng.SetStepTimeout(c.opts.StepTimeout)
	eng.SetDepth(r.pp) // one micro-batch in flight per stage
	eng.OnStep = c.observeStep
	ectx, ecancel := context.WithCancel(ctx)
	eng.OnStepError = func(err error) {
		c.log.Warn("step failed", "replica", r.key, "err", err)
		if status.Code(err) == codes.FailedPrecondition { // another assignment, or lost its KV pool
			go c.drop(r.key, "step refused: "+status.Convert(err).Message())
			return
		}
		if len(r.members) > 1 {
			// Its workers may now disagree on which steps ran (they run
			// steps strictly in id order, and this one may have reached
			// some of them only): form the replica again.
			go c.drop(r.key, "step failed in a sharded replica: "+err.Error())
			return
		}
		hctx, hc := context.WithTimeout(ectx, 2*time.Second)
		defer hc()
		for _, m := range r.members {
			if h, herr := m.client.Health(hctx, &workerv1.HealthRequest{}); herr != nil || !h.Ready {
				go c.drop(r.key, "step failed and worker "+m.info.ID+" failed its health check")
				return
			}
		}
	}
	go eng.Run(ectx)
	c.mu.Lock()
	if c.replicas[r.key] != r || ctx.Err() != nil {
		c.mu.Unlock()
		ecancel()
		eng.Close()
		return errors.New("replica dropped while loading")
	}
	r.engine, r.cancel, r.state, r.exec = eng, ecancel, "ready", exec
	// Added under c.mu: a drop of this replica (which removes it from
	// c.replicas first) cannot run between the check above and this.
	c.router.AddReplica(r.key, eng)
	c.mu.Unlock()
	c.log.Info("replica ready", "replica", r.key, "tp", r.tp, "pp", r.pp, "workers", r.workerIDs(),
		"kv_blocks", blocks, "block_size", c.opts.BlockSize, "warmup_ms", warmMs)
	c.readyOnce.Do(func() { close(c.ready) })
	return nil
}

// load has worker m load its slice; it reads its assignment from the
// placement in etcd.
func (c *Coordinator) load(ctx context.Context, r *replica, m *member) error {
	ls, err := m.client.Load(ctx, &workerv1.LoadRequest{Version: r.gen})
	if err != nil {
		return fmt.Errorf("load %s: %w", m.info.ID, err)
	}
	for {
		p, err := ls.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("load %s: %w", m.info.ID, err)
		}
		c.log.Info("worker loading", "worker", m.info.ID, "stage", p.Stage, "bytes", p.BytesLoaded)
	}
}

func forEach(ms []*member, f func(*member) error) error {
	return forEachIndex(ms, func(_ int, m *member) error { return f(m) })
}

// forEachIndex runs f on every member concurrently and returns the first
// error.
func forEachIndex(ms []*member, f func(int, *member) error) error {
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() { errs[i] = f(i, m) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

// dropWorker drops the replica worker id serves in.
func (c *Coordinator) dropWorker(id, why string) {
	c.mu.Lock()
	r := c.owner[id]
	c.mu.Unlock()
	if r != nil {
		c.drop(r.key, why)
	}
}

// drop removes a replica; its requests move to other replicas and its
// workers are planned again.
func (c *Coordinator) drop(key, why string) {
	c.mu.Lock()
	r, ok := c.replicas[key]
	delete(c.replicas, key)
	if ok {
		for _, m := range r.members {
			if c.owner[m.info.ID] == r {
				delete(c.owner, m.info.ID)
			}
		}
	}
	c.mu.Unlock()
	if !ok {
		return
	}
	c.log.Warn("replica removed", "replica", key, "workers", r.workerIDs(), "why", why)
	c.router.RemoveReplica(key)
	if r.cancel != nil {
		r.cancel()
	}
	for _, m := range r.members {
		if m.conn != nil {
			m.conn.Close()
		}
	}
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		c.writePlacement(ctx)
	}()
	c.scheduleRetry() // its workers still registered? then they are planned again
}

func (c *Coordinator) dropAll() {
	c.mu.Lock()
	keys := make([]string, 0, len(c.replicas))
	for k := range c.replicas {
		keys = append(keys, k)
	}
	c.mu.Unlock()
	for _, k := range keys {
		c.drop(k, "coordinator stopping")
	}
}

// writePlacement stores the current replicas (loading or ready) in etcd.
func (c *Coordinator) writePlacement(ctx context.Context) error {
	c.pmu.Lock()
	defer c.pmu.Unlock()
	c.mu.Lock()
	rs := make([]*replica, 0, len(c.replicas))
	for _, r := range c.replicas {
		rs = append(rs, r)
	}
	c.mu.Unlock()
	sort.Slice(rs, func(i, j int) bool { return rs[i].gen < rs[j].gen })
	p := Placement{Model: c.opts.ModelDir, Quantize: c.opts.Quantize}
	for i, r := range rs {
		pr := PlacementReplica{Index: i, Generation: r.gen, TP: r.tp, PP: r.pp, LayersEnd: c.cfg.NumHiddenLayers, Workers: r.workerIDs()}
		if r.ep > 1 {
			c.mu.Lock()
			pr.EP, pr.Experts, pr.ExpertsVersion = r.ep, r.table.Flat(), r.expVersion
			c.mu.Unlock()
		}
		for _, st := range r.stages {
			ps := PlacementStage{Index: st.Index, LayersBegin: st.LayersBegin, LayersEnd: st.LayersEnd}
			for _, rk := range st.Ranks {
				ps.Ranks = append(ps.Ranks, PlacementRank{Worker: rk.Worker, Addr: rk.Addr})
			}
			pr.Stages = append(pr.Stages, ps)
		}
		p.Replicas = append(p.Replicas, pr)
	}
	raw, _ := json.Marshal(p)
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	v, err := c.opts.Store.PutPlacement(pctx, raw)
	if err != nil {
		c.log.Warn("placement not written", "err", err)
		return err
	}
	p.Version = v
	c.mu.Lock()
	c.placement = p
	c.mu.Unlock()
	return nil
}
