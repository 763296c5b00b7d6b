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
	// EtcdEndpoints are reported by GetServerInfo.
	EtcdEndpoints []string
	LeaderTTL     time.Duration
	BlockSize     int
	// KVCacheBytes is the KV pool asked of each worker (0: the worker's default).
	KVCacheBytes int64
	// NumBlocks, when > 0, fixes the KV pool size in blocks (tests).
	NumBlocks int64
	Scheduler routing.SchedulerConfig
	// Quantize is passed to workers in their assignment ("" or "q8").
	Quantize    string
	StepTimeout time.Duration
	Logger      *slog.Logger
}

// Placement is what the leader writes to etcd: every ready worker is a
// replica holding the whole model (splitting comes with tensor and
// pipeline parallelism).
type Placement struct {
	Version  int64              `json:"version"`
	Model    string             `json:"model"`
	Replicas []PlacementReplica `json:"replicas"`
}

// PlacementReplica is one replica of a placement.
type PlacementReplica struct {
	Index       int      `json:"index"`
	Workers     []string `json:"workers"`
	LayersBegin int      `json:"layers_begin"`
	LayersEnd   int      `json:"layers_end"`
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
	replicas  map[string]*replica // by worker id
	placement Placement
	failed    map[string]string // worker id → why its bring-up failed
	ready     chan struct{}     // closed when the first replica is up
	readyOnce sync.Once
	retry     chan struct{} // asks Run to reconcile again
}

type replica struct {
	info   cluster.WorkerInfo
	conn   *grpc.ClientConn
	engine *routing.Engine
	cancel context.CancelFunc
	state  string
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
	c := &Coordinator{opts: opts, log: opts.Logger, cfg: cfg, router: routing.NewRouter(), started: time.Now(),
		replicas: map[string]*replica{}, failed: map[string]string{}, ready: make(chan struct{}), retry: make(chan struct{}, 1)}
	if _, err := os.Stat(filepath.Join(dir, "tokenizer.json")); err == nil {
		if c.tok, err = tokenizer.Load(filepath.Join(dir, "tokenizer.json")); err != nil {
			return nil, fmt.Errorf("model %s: %w", dir, err)
		}
	}
	return c, nil
}

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
				c.drop(ev.Name, "gossip reports it dead")
			} else {
				c.scheduleRetry() // back (or new): reconcile brings it up
			}
		}
	}
}

// reconcile turns the registered workers into replicas.
func (c *Coordinator) reconcile(ctx context.Context, ws []cluster.WorkerInfo) {
	c.mu.Lock()
	c.workers = ws
	live := map[string]cluster.WorkerInfo{}
	for _, w := range ws {
		live[w.ID] = w
	}
	var gone []string
	for id, r := range c.replicas {
		if w, ok := live[id]; !ok || w.Addr != r.info.Addr || w.PID != r.info.PID {
			gone = append(gone, id)
		}
	}
	c.mu.Unlock()
	for _, id := range gone {
		c.drop(id, "left etcd")
	}
	for _, w := range ws {
		c.mu.Lock()
		_, have := c.replicas[w.ID]
		r := &replica{info: w, state: "loading"}
		if !have {
			c.replicas[w.ID] = r
		}
		c.mu.Unlock()
		if !have {
			if c.opts.Gossip != nil && w.GossipAddr != "" {
				if err := c.opts.Gossip.Join([]string{w.GossipAddr}); err != nil {
					c.log.Warn("gossip join", "worker", w.ID, "err", err)
				}
			}
			go c.bringUp(ctx, w, r)
		}
	}
}

// bringUp loads and warms a worker and adds it as a replica; on failure the
// worker is forgotten and tried again after a backoff.
func (c *Coordinator) bringUp(ctx context.Context, w cluster.WorkerInfo, r *replica) {
	err := c.tryBringUp(ctx, w, r)
	if err != nil && ctx.Err() == nil {
		c.log.Error("worker not usable", "worker", w.ID, "addr", w.Addr, "err", err)
		c.mu.Lock()
		if c.replicas[w.ID] == r {
			delete(c.replicas, w.ID)
		}
		c.failed[w.ID] = "failed: " + err.Error()
		c.mu.Unlock()
		c.scheduleRetry()
	}
}

func (c *Coordinator) tryBringUp(ctx context.Context, w cluster.WorkerInfo, r *replica) error {
	conn, err := grpc.NewClient(w.Addr, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(256<<20), grpc.MaxCallSendMsgSize(256<<20)))
	if err != nil {
		return err
	}
	client := workerv1.NewWorkerClient(conn)
	version := c.writePlacement(ctx, w.ID)
	lctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	ls, err := client.Load(lctx, &workerv1.LoadRequest{Assignment: &workerv1.Assignment{Version: version, Model: c.opts.ModelDir,
		LayersEnd: int32(c.cfg.NumHiddenLayers), TpSize: 1, Quantize: c.opts.Quantize}})
	if err != nil {
		conn.Close()
		return err
	}
	for {
		p, err := ls.Recv()
		if err == io.EOF {
			break
		}
		if err != nil {
			conn.Close()
			return fmt.Errorf("load: %w", err)
		}
		c.log.Info("worker loading", "worker", w.ID, "stage", p.Stage, "bytes", p.BytesLoaded)
	}
	wctx, wcancel := context.WithTimeout(ctx, 5*time.Minute)
	defer wcancel()
	wr, err := client.Warmup(wctx, &workerv1.WarmupRequest{BlockSize: int32(c.opts.BlockSize), NumBlocks: c.opts.NumBlocks,
		KvCacheBytes: c.opts.KVCacheBytes, MaxBatchTokens: int32(min(c.opts.Scheduler.MaxBatchTokens, 64))})
	if err != nil {
		conn.Close()
		return fmt.Errorf("warmup: %w", err)
	}
	eng := routing.NewEngine(&grpcExecutor{client: client, version: version}, c.opts.Scheduler, int(wr.NumBlocks), int(wr.BlockSize))
	eng.SetStepTimeout(c.opts.StepTimeout)
	ectx, ecancel := context.WithCancel(ctx)
	eng.OnStepError = func(err error) {
		c.log.Warn("step failed", "worker", w.ID, "err", err)
		if status.Code(err) == codes.FailedPrecondition { // another assignment, or lost its KV pool
			go c.drop(w.ID, "step refused: "+status.Convert(err).Message())
			return
		}
		hctx, hc := context.WithTimeout(ectx, 2*time.Second)
		defer hc()
		if h, herr := client.Health(hctx, &workerv1.HealthRequest{}); herr != nil || !h.Ready {
			go c.drop(w.ID, "step failed and health check failed")
		}
	}
	go eng.Run(ectx)
	c.mu.Lock()
	if c.replicas[w.ID] != r || ctx.Err() != nil {
		c.mu.Unlock()
		ecancel()
		eng.Close()
		conn.Close()
		return errors.New("worker dropped while loading")
	}
	r.conn, r.engine, r.cancel, r.state = conn, eng, ecancel, "ready"
	delete(c.failed, w.ID)
	// Added under c.mu: a drop of this worker (which removes it from
	// c.replicas first) cannot run between the check above and this.
	c.router.AddReplica(w.ID, eng)
	c.mu.Unlock()
	c.log.Info("replica ready", "worker", w.ID, "kv_blocks", wr.NumBlocks, "block_size", wr.BlockSize, "warmup_ms", wr.WarmupMs)
	c.readyOnce.Do(func() { close(c.ready) })
	return nil
}

// drop removes a worker's replica; its requests move to other replicas.
func (c *Coordinator) drop(id, why string) {
	c.mu.Lock()
	r, ok := c.replicas[id]
	delete(c.replicas, id)
	c.mu.Unlock()
	if !ok {
		return
	}
	c.log.Warn("replica removed", "worker", id, "why", why)
	c.router.RemoveReplica(id)
	if r.cancel != nil {
		r.cancel()
	}
	if r.conn != nil {
		r.conn.Close()
	}
	c.scheduleRetry() // still registered in etcd? then it is tried again
}

func (c *Coordinator) dropAll() {
	c.mu.Lock()
	ids := make([]string, 0, len(c.replicas))
	for id := range c.replicas {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	for _, id := range ids {
		c.drop(id, "coordinator stopping")
	}
}

// writePlacement stores the placement with every known replica plus
// newID, returning its version.
func (c *Coordinator) writePlacement(ctx context.Context, newID string) int64 {
	c.mu.Lock()
	ids := []string{}
	for id := range c.replicas {
		ids = append(ids, id)
	}
	c.mu.Unlock()
	sort.Strings(ids)
	p := Placement{Model: c.opts.ModelDir}
	for i, id := range ids {
		p.Replicas = append(p.Replicas, PlacementReplica{Index: i, Workers: []string{id}, LayersEnd: c.cfg.NumHiddenLayers})
	}
	raw, _ := json.Marshal(p)
	pctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	v, err := c.opts.Store.PutPlacement(pctx, raw)
	if err != nil {
		c.log.Warn("placement not written", "err", err)
		return 0
	}
	p.Version = v
	c.mu.Lock()
	c.placement = p
	c.mu.Unlock()
	return v
}
