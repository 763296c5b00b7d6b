package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/cluster/schema"
	"github.com/qwenfleet/qwenfleet/pkg/control"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	"github.com/qwenfleet/qwenfleet/pkg/model"
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
	// WorkerCreds are the transport credentials of every connection to a
	// worker (nil: plaintext): with TLS, the coordinator's certificate
	// (credentials.NewTLS(security.TLS.ClientConfig(""))). Every call
	// also claims the leadership (metadata qwenfleet-leader: Addr), which
	// workers with a WorkerAuth check.
	WorkerCreds credentials.TransportCredentials
	// EtcdEndpoints are reported by GetServerInfo.
	EtcdEndpoints []string
	LeaderTTL     time.Duration
	BlockSize     int
	// KVCacheBytes is the KV pool asked of each worker (0: the worker's default).
	KVCacheBytes int64
	// NumBlocks, when > 0, fixes the KV pool size in blocks (tests).
	NumBlocks int64
	// Scheduler bounds each replica's steps and queue; its NoPrefixCache
	// turns prefix caching off.
	Scheduler routing.SchedulerConfig
	// Routing is the router's policy: routing.RoutePrefix (the default,
	// "") or routing.RouteLeastLoaded; RouteLoadMargin its load margin in
	// sequences (0: routing.DefaultLoadMargin; < 0: none).
	Routing         string
	RouteLoadMargin int
	// Quantize is passed to workers in their assignment ("", "q8" or "q8a").
	Quantize string
	// Compute is passed to workers in their assignment ("", "bf16", "f32").
	Compute string
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
	// StepTimeout bounds each step of a replica: max(Min, Factor × its
	// median step), scaled by the step's tokens (routing.StepTimeout).
	StepTimeout routing.StepTimeout
	// QueueTimeout is how long a request may wait with no replica able to
	// serve it before it ends UNAVAILABLE (default 60 s).
	QueueTimeout time.Duration
	// DrainTimeout is how long a drained replica's requests may take to
	// finish when the drain names no timeout (default 30 s).
	DrainTimeout time.Duration
	// MaxQueueWait is how long a request may wait in a replica's queue
	// before its first step; one that would wait longer is refused
	// RESOURCE_EXHAUSTED (routing.Router.SetMaxQueueWait; 0: no limit).
	MaxQueueWait time.Duration
	// SendTimeout is how long a response may wait for a client that does
	// not read it before the request is aborted (0: DefaultSendTimeout).
	SendTimeout time.Duration
	Logger      *slog.Logger
	// Security is the public API's security mode that GetServerInfo
	// reports: "tls", "plaintext-loopback" or "insecure" (see ServerInfo).
	Security string
}

// tickEvery is how often the control loop tells the machine the time
// (backoffs, drain timeouts, the expert balancer) and looks for idle
// draining replicas.
const tickEvery = 250 * time.Millisecond

// etcdTimeout bounds every etcd call of the coordinator.
const etcdTimeout = 5 * time.Second

// Coordinator owns the router and carries out the control plane's
// decisions (pkg/control): one loop feeds the machine events (the etcd
// worker watch, gossip, the results of what it asked for, requests, a
// ticker) and carries out the actions it returns. It decides nothing
// itself.
type Coordinator struct {
	opts    CoordinatorOptions
	log     *slog.Logger
	cfg     *model.Config
	tok     *tokenizer.Tokenizer // nil when the model has none
	router  *routing.Router
	started time.Time
	metrics *metrics.Coordinator

	leaderCheck sync.Mutex // one checkLeadership at a time

	ready     chan struct{} // closed when the first replica is up
	readyOnce sync.Once
	events    chan control.Event // results and requests for the loop
	loopCtx   context.Context    // the loop's (done when it ends)

	mu        sync.Mutex // guards what status RPCs and metrics read:
	leader    bool
	status    control.Status
	placement schema.Placement // the last one written, with its version
	seen      map[string]time.Time
	reqs      map[int64]chan control.Action // answers awaited by ask
	lastList  []cluster.WorkerInfo          // the watch's last list (registered workers, by id)
	term      *cluster.Leadership           // while leading
	nextReq   int64

	// Owned by the loop goroutine.
	machine *control.Machine
	rt      map[int64]*replicaRT
	writer  *placementWriter
}

// replicaRT is what the adapter holds for a replica the machine made: its
// connections, and once it serves, its executor and engine.
type replicaRT struct {
	gen     int64
	tp, pp  int
	ep      int
	members []*member // stage by stage, rank by rank
	ctx     context.Context
	cancel  context.CancelFunc // on drop: its loads, warm-up, engine
	exec    *replicaExecutor
	engine  *routing.Engine
	drain   bool
}

func (rt *replicaRT) workerIDs() []string {
	ids := make([]string, len(rt.members))
	for i, m := range rt.members {
		ids[i] = m.id
	}
	return ids
}

type member struct {
	id, addr    string
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
		ready: make(chan struct{}), events: make(chan control.Event, 256), seen: map[string]time.Time{},
		reqs: map[int64]chan control.Action{}, rt: map[int64]*replicaRT{}}
	c.router.SetQueueTimeout(opts.QueueTimeout, opts.Scheduler.MaxWaiting, c.whyNoReplica)
	c.router.SetMaxQueueWait(opts.MaxQueueWait)
	policy, margin := opts.Routing, opts.RouteLoadMargin
	if policy == "" {
		policy = routing.RoutePrefix
	}
	switch {
	case margin == 0:
		margin = routing.DefaultLoadMargin
	case margin < 0:
		margin = 0
	}
	if err := c.router.SetRouting(policy, margin); err != nil {
		return nil, fmt.Errorf("--routing: %w", err)
	}
	c.metrics = metrics.NewCoordinator(opts.ModelName, cfg.MaxContext(), newStateCollector(c, opts.ModelName))
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err == nil {
		if c.tok, err = tokenizer.Load(filepath.Join(dir, "tokenizer.json")); err != nil {
			return nil, fmt.Errorf("model %s: %w", dir, err)
		}
	}
	return c, nil
}

// controlConfig is the machine's view of the options.
func (c *Coordinator) controlConfig() control.Config {
	cc := control.Config{Model: c.cfg, ModelName: c.opts.ModelName, ModelDir: c.opts.ModelDir, Quantize: c.opts.Quantize, Compute: c.opts.Compute,
		TP: c.opts.TP, PP: c.opts.PP, EP: c.opts.EP, RedundantExperts: c.opts.RedundantExperts,
		MaxBatchTokens: c.opts.Scheduler.MaxBatchTokens, KVBytesPerValue: 4, // the CPU and CUDA backends keep the KV cache in float32
		EPLBInterval: c.opts.EPLBInterval, DrainTimeout: c.opts.DrainTimeout}
	if !c.cfg.IsMoE() {
		cc.EPLBInterval = 0
	}
	if c.opts.NumBlocks > 0 {
		cc.KVCacheTokens = int(c.opts.NumBlocks) * c.opts.BlockSize
	}
	return cc
}

// whyNoReplica says why no replica serves (for requests that waited too
// long for one).
func (c *Coordinator) whyNoReplica() string {
	c.mu.Lock()
	defer c.mu.Unlock()
	st := c.status
	switch {
	case !c.leader:
		return "this coordinator no longer leads"
	case len(st.Workers) == 0:
		return "no worker is registered"
	case st.PlanError != "":
		return "no worker fits: " + st.PlanError
	}
	states := map[control.State]int{}
	for _, r := range st.Replicas {
		states[r.State]++
	}
	switch {
	case len(st.Replicas) == 0:
		return fmt.Sprintf("all replicas down (%d workers registered, none in a replica)", len(st.Workers))
	case states[control.Ready] == 0 && states[control.Draining] > 0:
		return fmt.Sprintf("every replica drains (%d)", states[control.Draining])
	}
	return fmt.Sprintf("all replicas down; %d forming again", len(st.Replicas)-states[control.Ready]-states[control.Draining])
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

// standbyRetry is the pause before campaigning again after a campaign
// failed (etcd away, or this candidate's own lease expired while it
// waited): long enough that a leader whose lease expired in the same
// outage, which campaigns again at once, keeps leading.
const standbyRetry = 2 * time.Second

// renewTimeout bounds a leader's campaign after its lease expired: it
// leads on only if it wins at once (no other candidate is ahead of it).
const renewTimeout = 2 * time.Second

// Run campaigns for leadership, leads while it holds it (see lead), and
// campaigns again after each term, until ctx ends. The process never exits
// for a lost term or an etcd outage.
func (c *Coordinator) Run(ctx context.Context) error {
	if _, err := control.New(c.controlConfig()); err != nil {
		return err
	}
	for ctx.Err() == nil {
		c.log.Info("campaigning for leadership", "id", c.opts.ID)
		l, err := c.opts.Store.Campaign(ctx, c.opts.Addr, c.opts.LeaderTTL)
		if err != nil {
			if ctx.Err() == nil {
				c.log.Warn("campaign failed; campaigning again", "err", err, "after", standbyRetry)
				sleepCtx(ctx, standbyRetry)
			}
			continue
		}
		if err := c.lead(ctx, l); err != nil && ctx.Err() == nil {
			c.log.Warn("term over: standing by", "err", err, "campaigning again after", standbyRetry)
			sleepCtx(ctx, standbyRetry)
		}
	}
	return nil
}

// lead runs the control loop for one term, until ctx ends (nil) or the
// term ends (an error): etcd said its lease expired and another candidate
// won, or a write was fenced off. While etcd does not answer, the term
// goes on: the replicas serve, requests are admitted, nothing is written
// (writes fail and are retried); see docs/failure-model.md for the rule.
// When etcd answers that the lease expired, it campaigns again at once and
// leads on with the same replicas if it wins (LeadershipRenewed).
func (c *Coordinator) lead(ctx context.Context, l *cluster.Leadership) error {
	defer func() {
		rctx, cancel := context.WithTimeout(context.Background(), etcdTimeout)
		defer cancel()
		l.Resign(rctx)
	}()
	m, err := control.New(c.controlConfig())
	if err != nil {
		return err
	}
	lastGen, secrets, err := c.storedGeneration(ctx)
	if err != nil {
		return err
	}
	c.machine = m
	wctx, cancel := context.WithCancel(ctx)
	defer cancel()
	c.mu.Lock()
	c.loopCtx = wctx
	c.mu.Unlock()
	c.setTerm(l)
	defer c.setTerm(nil)
	c.router.AcceptOrphans() // a new term: requests wait for its replicas
	c.log.Info("leader", "id", c.opts.ID, "addr", c.opts.Addr, "fence", l.Fence().Rev, "last_generation", lastGen)
	c.writer = newPlacementWriter(c.opts.Store, l.Fence(), c.log, func(p schema.Placement) {
		c.mu.Lock()
		c.placement = p
		c.mu.Unlock()
	}, c.send)
	c.writer.adopt(secrets)
	var wg sync.WaitGroup
	defer wg.Wait()
	defer cancel()
	wg.Go(func() { c.writer.run(wctx) })
	// Whatever ends the loop ends the term: the machine drops every
	// replica, and their requests end UNAVAILABLE at once (clients go to
	// the next leader; pkg/client resumes them there).
	defer func() {
		if n := c.router.FailOrphans("this coordinator stopped leading"); n > 0 {
			c.log.Warn("requests ended: this coordinator stopped leading", "requests", n)
		}
	}()
	defer c.step(control.LeadershipLost{})
	c.step(control.LeadershipGained{Fence: l.Fence().Rev, LastGeneration: lastGen})
	updates := c.opts.Store.WatchWorkers(wctx)
	var gossip <-chan cluster.MemberEvent
	if c.opts.Gossip != nil {
		gossip = c.opts.Gossip.Events()
	}
	tick := time.NewTicker(tickEvery)
	defer tick.Stop()
	for c.machine.Leader() {
		select {
		case <-ctx.Done():
			return nil
		case <-l.Lost():
			c.log.Warn("etcd says the leader lease expired; campaigning again")
			rctx, cancel := context.WithTimeout(ctx, renewTimeout)
			nl, err := c.opts.Store.Campaign(rctx, c.opts.Addr, c.opts.LeaderTTL)
			cancel()
			if err != nil {
				return fmt.Errorf("leadership lost, and not won again at once: %w", err)
			}
			l = nl
			c.setTerm(l)
			c.writer.setFence(l.Fence())
			c.log.Info("leader again, with the same replicas", "fence", l.Fence().Rev)
			c.step(control.LeadershipRenewed{Fence: l.Fence().Rev})
		case ws, ok := <-updates:
			if !ok {
				return nil // ctx ended
			}
			c.observeWorkers(ws)
			c.step(control.Workers{List: controlWorkers(ws)})
		case ev := <-gossip:
			if ev.Alive {
				c.step(control.GossipAlive{ID: ev.Name, Addr: ev.Addr})
			} else {
				go c.confirmGone(ev)
			}
		case ev := <-c.events:
			c.step(ev)
		case <-tick.C:
			for gen, rt := range c.rt {
				if rt.drain && rt.engine != nil && rt.engine.Load() == 0 {
					c.step(control.ReplicaIdle{Gen: gen})
				}
			}
			c.step(control.Tick{})
		}
	}
	return errors.New("deposed: a write was fenced off (another coordinator leads)")
}

func (c *Coordinator) setTerm(l *cluster.Leadership) {
	c.mu.Lock()
	c.term = l
	c.mu.Unlock()
}

// leaseUnconfirmed says whether etcd has not confirmed this leader's lease
// for longer than its TTL: another coordinator may lead by now.
func (c *Coordinator) leaseUnconfirmed() bool {
	c.mu.Lock()
	l := c.term
	c.mu.Unlock()
	return l != nil && time.Now().After(l.ValidUntil())
}

// etcdSilence is how long etcd has not answered this leader's lease
// renewals, beyond two renewal periods (0 while it answers, or when not
// leading).
func (c *Coordinator) etcdSilence() time.Duration {
	c.mu.Lock()
	l := c.term
	c.mu.Unlock()
	if l == nil {
		return 0
	}
	since := time.Since(l.ValidUntil().Add(-l.TTL()))
	if since < l.TTL()/3 {
		return 0
	}
	return since
}

// loop is the context of the current term's loop (done when it ends).
// Results of what an earlier term asked for may reach a later term's
// machine: they name replicas (generations) and writes (sequence numbers)
// the new machine never made, and it ignores them.
func (c *Coordinator) loop() context.Context {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.loopCtx
}

// sleepCtx waits d or until ctx ends; it reports whether ctx is live.
func sleepCtx(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

// confirmTimeout bounds the direct check of a worker gossip reports gone.
const confirmTimeout = 500 * time.Millisecond

// confirmGone checks a gossip report of a dead worker by asking the worker
// itself: one that answers its health check at once is not dead (gossip
// can be wrong for a moment, e.g. a member just back from a partition
// spreads its stale view that the others are dead), and is not suspected.
// One that does not answer (stopped, cut off, gone) is.
func (c *Coordinator) confirmGone(ev cluster.MemberEvent) {
	err := c.callWorker(ev.Name, confirmTimeout, func(ctx context.Context, w workerv1.WorkerClient) error {
		_, err := w.Health(ctx, &workerv1.HealthRequest{})
		return err
	})
	if err == nil {
		c.log.Info("gossip reports a worker gone, but it answers: not suspected", "worker", ev.Name, "gossip_addr", ev.Addr)
		if g := c.opts.Gossip; g != nil { // and have gossip see it again
			if err := g.Join([]string{ev.Addr}); err != nil {
				c.log.Warn("gossip join", "worker", ev.Name, "err", err)
			}
		}
		return
	}
	c.log.Warn("gossip: member gone", "name", ev.Name, "gossip_addr", ev.Addr)
	c.send(control.GossipSuspect{ID: ev.Name, Addr: ev.Addr})
}

// storedGeneration is the highest replica generation in the stored
// placement (0 when there is none): a new term starts above it; and the
// Exchange secrets of its generations, which the term keeps.
func (c *Coordinator) storedGeneration(ctx context.Context) (int64, map[int64]string, error) {
	gctx, cancel := context.WithTimeout(ctx, etcdTimeout)
	defer cancel()
	raw, ver, err := c.opts.Store.GetPlacement(gctx)
	if errors.Is(err, cluster.ErrNoPlacement) {
		return 0, nil, nil
	}
	if err != nil {
		return 0, nil, err
	}
	p, err := schema.Decode(raw, ver)
	if err != nil {
		c.log.Warn("stored placement unreadable; generations start from the clock", "err", err)
		return time.Now().UnixNano(), nil, nil
	}
	last := p.LastGeneration
	secrets := map[int64]string{}
	for _, r := range p.Replicas {
		last = max(last, r.Generation)
		if r.Secret != "" {
			secrets[r.Generation] = r.Secret
		}
	}
	return last, secrets, nil
}

func controlWorkers(ws []cluster.WorkerInfo) []control.Worker {
	out := make([]control.Worker, len(ws))
	for i, w := range ws {
		out[i] = control.Worker{ID: w.ID, Addr: w.Addr, GossipAddr: w.GossipAddr, Host: w.Host, Backend: w.Backend, PID: w.PID, MemoryBytes: w.MemoryBytes,
			Draining: w.State == "draining", DrainTimeout: time.Duration(w.DrainTimeoutSeconds * float64(time.Second)), Registered: w.Started}
	}
	return out
}

// send hands an event to the loop (from any goroutine); it gives up when
// the loop has ended.
func (c *Coordinator) send(ev control.Event) {
	select {
	case c.events <- ev:
	case <-c.loop().Done():
	}
}

// step feeds the machine one event and carries out its actions.
func (c *Coordinator) step(ev control.Event) {
	for _, a := range c.machine.Step(time.Now(), ev) {
		c.carryOut(a)
	}
	st := c.machine.Status()
	c.mu.Lock()
	c.status, c.leader = st, st.Leader
	c.mu.Unlock()
}

func (c *Coordinator) carryOut(a control.Action) {
	switch a := a.(type) {
	case control.Connect:
		c.connect(a)
	case control.WritePlacement:
		c.writer.submit(a)
	case control.Load:
		rt, m := c.member(a.Gen, a.Worker)
		if m == nil {
			return
		}
		go func() {
			if err := c.load(rt.ctx, rt, m); err != nil {
				c.send(control.LoadFailed{Gen: a.Gen, Worker: a.Worker, Err: err.Error()})
				return
			}
			c.send(control.Loaded{Gen: a.Gen, Worker: a.Worker})
		}()
	case control.Warmup:
		if rt := c.rt[a.Gen]; rt != nil {
			go func() {
				blocks, err := c.warmup(rt)
				if err != nil {
					c.send(control.WarmupFailed{Gen: a.Gen, Err: err.Error()})
					return
				}
				c.send(control.WarmedUp{Gen: a.Gen, Blocks: blocks})
			}()
		}
	case control.Serve:
		c.serve(a)
	case control.Drop:
		c.drop(a)
	case control.GossipJoin:
		if g := c.opts.Gossip; g != nil {
			go func() {
				if err := g.Join([]string{a.Addr}); err != nil {
					c.log.Warn("gossip join", "worker", a.Worker, "err", err)
				}
			}()
		}
	case control.ConfirmWorker:
		go func() {
			err := c.callAddr(a.Addr, confirmTimeout, func(ctx context.Context, w workerv1.WorkerClient) error {
				_, err := w.Health(ctx, &workerv1.HealthRequest{})
				return err
			})
			if err != nil {
				c.log.Warn("worker left etcd and does not answer: gone", "worker", a.Worker, "err", err)
			}
			c.send(control.WorkerConfirmed{ID: a.Worker, Alive: err == nil})
		}()
	case control.CheckHealth:
		if rt := c.rt[a.Gen]; rt != nil {
			go func() { c.send(control.HealthChecked{Gen: a.Gen, Unhealthy: c.unhealthy(rt)}) }()
		}
	case control.StopAdmitting:
		if rt := c.rt[a.Gen]; rt != nil {
			rt.drain = true
			c.router.Cordon(control.Key(a.Gen))
			c.log.Info("replica draining: no new requests", "replica", control.Key(a.Gen))
		}
	case control.Drained:
		c.log.Info("worker drained: it leaves", "worker", a.Worker)
		c.tellWorker(a.Worker, "leave", func(ctx context.Context, w workerv1.WorkerClient) error {
			_, err := w.Leave(ctx, &workerv1.LeaveRequest{})
			return err
		})
	case control.GatherExperts:
		if rt := c.rt[a.Gen]; rt != nil {
			go func() {
				counts, err := c.expertCounts(rt)
				ev := control.ExpertCounts{Gen: a.Gen, Counts: counts}
				if err != nil {
					ev.Err = err.Error()
				}
				c.send(ev)
			}()
		}
	case control.LoadExperts:
		if rt := c.rt[a.Gen]; rt != nil {
			go func() { c.send(c.loadExperts(rt, a)) }()
		}
	case control.CancelExperts:
		if rt := c.rt[a.Gen]; rt != nil {
			go c.cancelExperts(rt, a.Version)
		}
	case control.SwitchExperts:
		if rt := c.rt[a.Gen]; rt != nil && rt.exec != nil {
			rt.exec.switchExperts(a.Version)
		}
	case control.ExpertReport:
		c.answer(a.Req, a)
	case control.DrainAnswer:
		c.answer(a.Req, a)
		if a.Err == "" {
			// The worker shows the drain in etcd too (a no-op when it
			// asked for it).
			c.tellWorker(a.Worker, "drain", func(ctx context.Context, w workerv1.WorkerClient) error {
				_, err := w.Drain(ctx, &workerv1.DrainRequest{TimeoutSeconds: a.Timeout.Seconds()})
				return err
			})
		}
	case control.Note:
		c.log.Info(a.Msg)
	default:
		c.log.Error("unknown control action", "action", fmt.Sprintf("%T", a))
	}
}

// ask feeds the loop the event mk makes with a fresh request number and
// waits for the action that answers it.
func (c *Coordinator) ask(ctx context.Context, mk func(req int64) control.Event) (control.Action, error) {
	c.mu.Lock()
	loop, leader := c.loopCtx, c.leader
	c.nextReq++
	req := c.nextReq
	ch := make(chan control.Action, 1)
	c.reqs[req] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.reqs, req)
		c.mu.Unlock()
	}()
	if !leader || loop == nil {
		return nil, errors.New("not the leader")
	}
	select {
	case c.events <- mk(req):
	case <-loop.Done():
		return nil, errors.New("not the leader")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	select {
	case a := <-ch:
		return a, nil
	case <-loop.Done():
		return nil, errors.New("not the leader")
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// answer hands an answering action to the ask waiting for it.
func (c *Coordinator) answer(req int64, a control.Action) {
	c.mu.Lock()
	ch := c.reqs[req]
	delete(c.reqs, req)
	c.mu.Unlock()
	if ch != nil {
		ch <- a
	}
}

// Drain starts draining a worker (control.DrainRequested) and returns the
// replica that drains (nil when the worker served in none).
func (c *Coordinator) Drain(ctx context.Context, worker string, timeout time.Duration, force bool) (control.DrainAnswer, error) {
	a, err := c.ask(ctx, func(req int64) control.Event {
		return control.DrainRequested{Worker: worker, Timeout: timeout, Force: force, Req: req}
	})
	if err != nil {
		return control.DrainAnswer{}, err
	}
	return a.(control.DrainAnswer), nil
}

// callWorker makes one call to a registered worker, by id, on a
// connection of its own (the worker may serve in no replica), bounded by
// timeout.
func (c *Coordinator) callWorker(id string, timeout time.Duration, call func(context.Context, workerv1.WorkerClient) error) error {
	var addr string
	for _, w := range c.knownWorkers() {
		if w.ID == id {
			addr = w.Addr
		}
	}
	if addr == "" {
		return fmt.Errorf("worker %s: no address registered", id)
	}
	if err := c.callAddr(addr, timeout, call); err != nil {
		return fmt.Errorf("worker %s: %w", id, err)
	}
	return nil
}

// callAddr makes one call to the worker at addr on a connection of its
// own, bounded by timeout.
func (c *Coordinator) callAddr(addr string, timeout time.Duration, call func(context.Context, workerv1.WorkerClient) error) error {
	conn, err := c.dialWorker(addr)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(c.loop(), timeout)
	defer cancel()
	return call(ctx, workerv1.NewWorkerClient(conn))
}

// dialWorker makes a client of the worker at addr: the worker credentials,
// and every call claiming the leadership.
func (c *Coordinator) dialWorker(addr string, opts ...grpc.DialOption) (*grpc.ClientConn, error) {
	creds := c.opts.WorkerCreds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	opts = append(append([]grpc.DialOption{grpc.WithTransportCredentials(creds)}, leaderInterceptors(c.opts.Addr)...), opts...)
	return grpc.NewClient(addr, opts...)
}

// tellWorker is callWorker in the background, its failure logged.
func (c *Coordinator) tellWorker(id, what string, call func(context.Context, workerv1.WorkerClient) error) {
	go func() {
		if err := c.callWorker(id, etcdTimeout, call); err != nil {
			c.log.Warn("worker call", "worker", id, "call", what, "err", err)
		}
	}()
}

func (c *Coordinator) member(gen int64, id string) (*replicaRT, *member) {
	rt := c.rt[gen]
	if rt == nil {
		return nil, nil
	}
	for _, m := range rt.members {
		if m.id == id {
			return rt, m
		}
	}
	return nil, nil
}

// connect makes the clients of a new replica's workers. Connections are
// made before anything is sent, so a drop always finds (and closes) them;
// NewClient only fails on a malformed address, and then the load fails.
func (c *Coordinator) connect(a control.Connect) {
	ctx, cancel := context.WithCancel(c.loopCtx)
	rt := &replicaRT{gen: a.Gen, tp: a.TP, pp: a.PP, ep: a.EP, ctx: ctx, cancel: cancel}
	for _, mb := range a.Members {
		m := &member{id: mb.Worker.ID, addr: mb.Worker.Addr, stage: mb.Stage, rank: mb.Rank}
		if conn, err := c.dialWorker(m.addr,
			grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20))); err == nil {
			m.conn, m.client = conn, workerv1.NewWorkerClient(conn)
		}
		rt.members = append(rt.members, m)
	}
	c.rt[a.Gen] = rt
	c.log.Info("replica planned", "replica", control.Key(a.Gen), "tp", a.TP, "pp", a.PP, "ep", a.EP, "workers", rt.workerIDs())
}

// load has worker m load its slice; it reads its assignment from the
// placement in etcd.
func (c *Coordinator) load(ctx context.Context, rt *replicaRT, m *member) error {
	if m.client == nil {
		return fmt.Errorf("worker %s: bad address %q", m.id, m.addr)
	}
	lctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	ls, err := m.client.Load(lctx, &workerv1.LoadRequest{Version: rt.gen})
	if err != nil {
		return fmt.Errorf("load %s: %w", m.id, err)
	}
	for {
		p, err := ls.Recv()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("load %s: %w", m.id, err)
		}
		c.log.Info("worker loading", "worker", m.id, "stage", p.Stage, "bytes", p.BytesLoaded)
	}
}

// warmup sizes every worker's KV pool and returns the blocks each holds:
// every worker of a replica must hold the same number (the coordinator's
// block tables index all of them), so each is sized from its budget, then
// the larger pools are shrunk to the smallest.
func (c *Coordinator) warmup(rt *replicaRT) (int64, error) {
	sharded := len(rt.members) > 1
	warm := func(m *member, blocks int64) (*workerv1.WarmupResponse, error) {
		wctx, cancel := context.WithTimeout(rt.ctx, 5*time.Minute)
		defer cancel()
		req := &workerv1.WarmupRequest{BlockSize: int32(c.opts.BlockSize), NumBlocks: blocks, KvCacheBytes: c.opts.KVCacheBytes,
			MaxStepTokens: int32(c.opts.Scheduler.MaxBatchTokens)}
		if !sharded { // a shard cannot step alone: its first real step warms it
			req.MaxBatchTokens = int32(min(c.opts.Scheduler.MaxBatchTokens, 64))
		}
		wr, err := m.client.Warmup(wctx, req)
		if err != nil {
			return nil, fmt.Errorf("warmup %s: %w", m.id, err)
		}
		return wr, nil
	}
	pools := make([]*workerv1.WarmupResponse, len(rt.members))
	if err := forEachIndex(rt.members, func(i int, m *member) (err error) {
		pools[i], err = warm(m, c.opts.NumBlocks)
		return err
	}); err != nil {
		return 0, err
	}
	blocks := pools[0].NumBlocks
	for _, p := range pools {
		blocks = min(blocks, p.NumBlocks)
	}
	return blocks, forEachIndex(rt.members, func(i int, m *member) (err error) {
		if pools[i].NumBlocks != blocks {
			_, err = warm(m, blocks)
		}
		return err
	})
}

// serve starts a warmed replica's engine and routes requests to it.
func (c *Coordinator) serve(a control.Serve) {
	rt := c.rt[a.Gen]
	if rt == nil {
		return
	}
	key := control.Key(a.Gen)
	exec := &replicaExecutor{members: rt.members, gen: rt.gen, pp: rt.pp, ranks: len(rt.members) / rt.pp, expVersion: a.ExpertsVersion}
	sc := c.opts.Scheduler
	// The KV of a prefix depends on the model and how the workers
	// compute it.
	sc.CacheIdentity = fmt.Sprintf("model=%s quantize=%s compute=%s", c.opts.ModelName, c.opts.Quantize, c.opts.Compute)
	eng := routing.NewEngine(exec, sc, int(a.Blocks), c.opts.BlockSize)
	eng.SetStepTimeouts(c.opts.StepTimeout)
	eng.SetDepth(rt.pp) // one micro-batch in flight per stage
	eng.OnStep = c.observeStep
	eng.OnStepError = func(err error) {
		c.log.Warn("step failed", "replica", key, "err", err)
		if notTheLeader(err) {
			// The worker names another leader: etcd decides (the engine
			// retries the step meanwhile).
			go c.checkLeadership(a.Gen, err)
			return
		}
		// Refused: another assignment, or its KV pool is gone, or the
		// worker does not take this coordinator's calls; superseded: a
		// newer assignment (ABORTED).
		code := status.Code(err)
		ev := control.StepFailed{Gen: a.Gen, Refused: code == codes.FailedPrecondition || code == codes.Aborted || code == codes.PermissionDenied,
			Err: err.Error(), Superseded: code == codes.Aborted, Unconfirmed: c.leaseUnconfirmed()}
		go c.send(ev) // not from the engine's goroutine: the loop may be closing this engine
	}
	rt.exec, rt.engine = exec, eng
	go eng.Run(rt.ctx)
	c.router.AddReplica(key, eng)
	c.log.Info("replica ready", "replica", key, "tp", rt.tp, "pp", rt.pp, "ep", rt.ep, "workers", rt.workerIDs(),
		"kv_blocks", a.Blocks, "block_size", c.opts.BlockSize)
	c.readyOnce.Do(func() { close(c.ready) })
}

// checkLeadership answers a worker's refusal of a step for its leader
// claim ("not the leader": the worker read another leader in etcd). The
// refusal alone does not depose this coordinator: right after an etcd
// outage the workers may see, for a moment, a standby's key first while
// both leases lapse, and this coordinator's own election (Lost, then a
// campaign it wins) settles that within a renewal. So it asks etcd: when
// etcd names this coordinator, or no one, the steps go on being retried
// (the worker's view catches up); when etcd names another coordinator
// twice a second apart, or does not answer while this coordinator's lease
// is unconfirmed (it is cut off from an etcd the workers reach), it steps
// down. One check runs at a time.
func (c *Coordinator) checkLeadership(gen int64, refusal error) {
	if !c.leaderCheck.TryLock() {
		return
	}
	defer c.leaderCheck.Unlock()
	ctx := c.loop()
	for i := range 2 {
		qctx, cancel := context.WithTimeout(ctx, time.Second)
		who, _, err := c.opts.Store.LeaderAt(qctx)
		cancel()
		switch {
		case ctx.Err() != nil:
			return
		case err != nil && !c.leaseUnconfirmed():
			return // its lease holds: the workers' view is stale
		case err == nil && (who == "" || who == c.opts.Addr):
			return
		case err == nil && i == 0:
			c.log.Info("a worker names another leader; asking etcd again", "leader", who)
			sleepCtx(ctx, time.Second)
			continue
		}
		c.log.Warn("workers take another leader's calls", "leader", who, "err", err, "refusal", refusal)
		c.send(control.StepFailed{Gen: gen, Refused: true, Superseded: true, Unconfirmed: true, Err: refusal.Error()})
		return
	}
}

// drop removes a replica: its requests move to the other replicas (or
// wait for one), what runs for it is cancelled, its connections closed.
func (c *Coordinator) drop(a control.Drop) {
	rt := c.rt[a.Gen]
	delete(c.rt, a.Gen)
	c.log.Warn("replica removed", "replica", control.Key(a.Gen), "why", a.Why)
	c.router.RemoveReplica(control.Key(a.Gen))
	if rt == nil {
		return
	}
	rt.cancel()
	for _, m := range rt.members {
		if m.conn != nil {
			m.conn.Close()
		}
	}
}

// unhealthy asks every worker of a replica for its health and names the
// first that is not ready ("" when all are).
func (c *Coordinator) unhealthy(rt *replicaRT) string {
	hctx, cancel := context.WithTimeout(rt.ctx, 2*time.Second)
	defer cancel()
	for _, m := range rt.members {
		if m.client == nil {
			return m.id
		}
		if h, err := m.client.Health(hctx, &workerv1.HealthRequest{}); err != nil || !h.Ready {
			return m.id
		}
	}
	return ""
}

// forEachIndex runs f on every member concurrently and returns the errors
// joined.
func forEachIndex(ms []*member, f func(int, *member) error) error {
	errs := make([]error, len(ms))
	var wg sync.WaitGroup
	for i, m := range ms {
		wg.Go(func() { errs[i] = f(i, m) })
	}
	wg.Wait()
	return errors.Join(errs...)
}

func forEach(ms []*member, f func(*member) error) error {
	return forEachIndex(ms, func(_ int, m *member) error { return f(m) })
}

// knownWorkers are the workers the etcd watch last listed (for status
// while etcd is away).
func (c *Coordinator) knownWorkers() []cluster.WorkerInfo {
	c.mu.Lock()
	defer c.mu.Unlock()
	return slices.Clone(c.lastList)
}

// observeWorkers keeps, for the worker_up metric, every worker registered
// now (zero time) or that left (when).
func (c *Coordinator) observeWorkers(ws []cluster.WorkerInfo) {
	c.mu.Lock()
	defer c.mu.Unlock()
	live := map[string]bool{}
	c.lastList = ws
	for _, w := range ws {
		live[w.ID] = true
		c.seen[w.ID] = time.Time{}
	}
	for id, at := range c.seen {
		if !live[id] && at.IsZero() {
			c.seen[id] = time.Now()
		}
	}
}

// placementWriter writes the placements the machine asks for, in order,
// one at a time, each conditioned on the leadership's fence; when several
// wait, only the latest is written (it supersedes the others). It answers
// every write it makes with PlacementWritten or PlacementWriteFailed.
type placementWriter struct {
	store     *cluster.Store
	fence     cluster.Fence // the term's election key and its revision
	log       *slog.Logger
	onWritten func(schema.Placement)
	answer    func(control.Event)

	mu   sync.Mutex // guards next and fence
	next *control.WritePlacement
	wake chan struct{}

	// secrets are the Exchange secrets of the generations written (and
	// adopted from the stored placement), by generation: one is made for
	// a generation's first write and kept for the term. Owned by run.
	secrets map[int64]string
}

// adopt takes the secrets of the stored placement's generations (before
// run): a generation keeps its secret across terms.
func (w *placementWriter) adopt(secrets map[int64]string) {
	for gen, s := range secrets {
		if s != "" {
			if w.secrets == nil {
				w.secrets = map[int64]string{}
			}
			w.secrets[gen] = s
		}
	}
}

// withSecrets is doc with every replica's secret: the one its generation
// has, or a new one. Generations no longer in doc are forgotten (a
// generation is never placed again once dropped).
func (w *placementWriter) withSecrets(doc schema.Placement) schema.Placement {
	doc.Replicas = slices.Clone(doc.Replicas)
	keep := make(map[int64]string, len(doc.Replicas))
	for i := range doc.Replicas {
		r := &doc.Replicas[i]
		switch s, ok := w.secrets[r.Generation]; {
		case r.Secret != "":
		case ok:
			r.Secret = s
		default:
			r.Secret = newSecret()
		}
		keep[r.Generation] = r.Secret
	}
	w.secrets = keep
	return doc
}

func newPlacementWriter(s *cluster.Store, fence cluster.Fence, log *slog.Logger, onWritten func(schema.Placement), answer func(control.Event)) *placementWriter {
	return &placementWriter{store: s, fence: fence, log: log, onWritten: onWritten, answer: answer, wake: make(chan struct{}, 1)}
}

// setFence has later writes conditioned on a new election key (the term
// goes on under a new lease).
func (w *placementWriter) setFence(f cluster.Fence) {
	w.mu.Lock()
	w.fence = f
	w.mu.Unlock()
}

func (w *placementWriter) submit(a control.WritePlacement) {
	w.mu.Lock()
	w.next = &a
	w.mu.Unlock()
	select {
	case w.wake <- struct{}{}:
	default:
	}
}

func (w *placementWriter) run(ctx context.Context) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.wake:
		}
		w.mu.Lock()
		a := w.next
		w.next = nil
		w.mu.Unlock()
		if a != nil {
			w.answer(w.write(ctx, *a))
		}
	}
}

func (w *placementWriter) write(ctx context.Context, a control.WritePlacement) control.Event {
	wctx, cancel := context.WithTimeout(ctx, etcdTimeout)
	defer cancel()
	// The term's current fence: a write asked for before the term was
	// renewed under a new lease (LeadershipRenewed) goes under the new one.
	w.mu.Lock()
	fence := w.fence
	w.mu.Unlock()
	doc := w.withSecrets(a.Doc)
	v, err := w.store.PutPlacement(wctx, doc.Encode(), fence)
	if err != nil {
		w.log.Warn("placement not written", "seq", a.Seq, "err", err)
		// A write fenced off because this term's key is gone is not proof
		// of another leader: the lease expired (etcd was away), and the
		// campaign that follows (Leadership.Lost) says whether this
		// coordinator leads on. Until then the write is retried.
		fenced := errors.Is(err, cluster.ErrFenced) && !errors.Is(err, cluster.ErrFenceGone)
		return control.PlacementWriteFailed{Seq: a.Seq, Fenced: fenced, Err: err.Error()}
	}
	doc.Version = v
	w.onWritten(doc)
	return control.PlacementWritten{Seq: a.Seq}
}
