package server

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime/pprof"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"

	"github.com/qwenfleet/qwenfleet"
	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/security"
	"github.com/qwenfleet/qwenfleet/pkg/supervise"
	pb "github.com/qwenfleet/qwenfleet/proto/qwenfleet/v1"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// RoleEnv, set to "worker", makes the coordinator binary run as a worker:
// that is how it starts local workers as separate processes without a
// second binary.
const RoleEnv = "QWENFLEET_ROLE"

// WorkerProcessOptions configure RunWorker.
type WorkerProcessOptions struct {
	EtcdEndpoints []string
	Prefix        string
	Listen        string // default 127.0.0.1:0
	Advertise     string // default: the bound address
	ID            string // default host-pid
	Threads       int
	Kernels       string
	Compute       string // CPU arithmetic for bf16 weights when the assignment names none
	Device        string // "cpu" (default) or "cuda:N"
	KVCacheBytes  int64
	MemoryBytes   int64
	LeaseTTL      time.Duration
	GossipBind    string // default: the listen host
	GossipFast    bool
	Peer          PeerConfig
	// Drain, closed, drains the worker (SIGTERM); DrainTimeout is how long
	// its replica's requests may take to finish then (default 30 s).
	Drain        <-chan struct{}
	DrainTimeout time.Duration
	CPUProfile   string // file to write a CPU profile to, until exit
	// MetricsListen, when set, serves Prometheus /metrics there (port 0
	// picks one; the address is registered in etcd).
	MetricsListen string
	// HealthListen, when set, serves only the gRPC health service there,
	// plaintext (serveHealth).
	HealthListen string
	// GossipPort is the gossip port (0: any free one); Host the host name
	// registered for placement (default: os.Hostname; on Kubernetes, the
	// node's name, so the planner keeps a TP group on one node).
	GossipPort int
	Host       string
	Logger     *slog.Logger
	// Security: TLS on every listener and dial (see Security); ModelRoot,
	// when set, is the directory the placement's model must lie under.
	Security  Security
	ModelRoot string
}

// RunWorker serves the worker API, registered in etcd, until ctx ends (nil)
// or it is drained (o.Drain, or the coordinator's drain: nil once it left
// etcd); see workerLife.
func RunWorker(ctx context.Context, o WorkerProcessOptions) error {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	if len(o.EtcdEndpoints) == 0 {
		return errors.New("--etcd-endpoints: required")
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:0"
	}
	host, _ := os.Hostname()
	if o.ID == "" {
		o.ID = fmt.Sprintf("%s-%d", host, os.Getpid())
	}
	if o.Host != "" {
		host = o.Host
	}
	if strings.Contains(o.ID, "/") {
		return fmt.Errorf("--id: %q contains a /", o.ID)
	}
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 5 * time.Second
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = 30 * time.Second
	}
	kind, ordinal, err := parseDevice(o.Device)
	if err != nil {
		return fmt.Errorf("--device: %v", err)
	}
	devName, devMem, err := probeDevice(kind, ordinal)
	if err != nil { // a GPU worker without its GPU does not start
		return fmt.Errorf("--device %s: %w", o.Device, err)
	}
	if o.MemoryBytes == 0 && kind == "cuda" {
		o.MemoryBytes = devMem
	}
	if o.MemoryBytes == 0 { // report the machine's memory (0: unknown, off Linux)
		o.MemoryBytes = machineMemory()
	}
	if o.CPUProfile != "" {
		pf, err := os.Create(o.CPUProfile)
		if err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pf.Close()
		if err := pprof.StartCPUProfile(pf); err != nil {
			return fmt.Errorf("--cpuprofile: %w", err)
		}
		defer pprof.StopCPUProfile()
	}
	if err := security.CheckListeners(o.Security.TLSDir, o.Security.Insecure,
		security.Listener{Flag: "--listen", Addr: o.Listen}, security.Listener{Flag: "--metrics-listen", Addr: o.MetricsListen}); err != nil {
		return err
	}
	ptls, err := o.Security.open(security.RoleWorker, log)
	if err != nil {
		return err
	}
	o.Peer.Creds = ptls.dialCreds()
	if ptls.own != nil {
		go watchReloads(ctx, log, "the certificates of --tls-dir", ptls.own.Err)
	}
	etcdCfg, err := ptls.etcdConfig(o.EtcdEndpoints)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	addr := o.Advertise
	if addr == "" {
		addr = lis.Addr().String()
	}
	// The service reports its state changes from the start (before the
	// server serves): into states, which a writer started once the worker
	// is registered carries to etcd, and "ready" to the health service.
	hs := health.NewServer()
	hs.SetServingStatus(LivenessService, healthpb.HealthCheckResponse_SERVING)
	states := newStateWriter()
	life := newWorkerLife()
	// Who may call what (workerauth.go): the leader it reads from etcd
	// (watched once connected), assignments from etcd only.
	leader := NewLeaderView(nil)
	svc := NewWorkerService(WorkerOptions{ID: o.ID, Threads: o.Threads, Kernels: o.Kernels, Compute: o.Compute, Device: o.Device, KVCacheBytes: o.KVCacheBytes,
		MemoryBytes: o.MemoryBytes, Peer: o.Peer, Logger: log,
		Auth:    &WorkerAuth{RequireCerts: ptls.own != nil, Leader: leader, ModelRoot: o.ModelRoot, StoredOnly: true},
		OnDrain: life.askDrain, OnLeave: func() { poke(life.leave) },
		OnState: func(state, _ string) {
			if !life.draining.Load() { // etcd keeps showing the drain
				states.set(state)
			}
			if state == "ready" {
				hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			}
		}})
	defer svc.Close()
	var metricsAddr string
	if o.MetricsListen != "" {
		a, stopMetrics, err := ptls.serveMetrics(o.MetricsListen, svc.Metrics().Registry)
		if err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		defer stopMetrics()
		metricsAddr = a
	}
	gs := grpc.NewServer(append(append(PeerServerOptions(o.Peer), grpc.MaxRecvMsgSize(256<<20), grpc.MaxSendMsgSize(256<<20)),
		ptls.serverOptions("worker", true)...)...)
	workerv1.RegisterWorkerServer(gs, svc)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	go gs.Serve(lis)
	if o.HealthListen != "" {
		stop, err := serveHealth(o.HealthListen, hs, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	defer func() {
		// Peers stream to each other: end this worker's streams first, or
		// every worker's graceful stop waits for the others'.
		svc.closePeers()
		stopServer(gs)
	}()

	store, err := connectEtcd(ctx, o.EtcdEndpoints, o.Prefix, etcdCfg, log)
	if err != nil {
		return err
	}
	defer store.Close()
	leader.Watch(ctx, store)
	svc.setAssignments(func(ctx context.Context, version int64) (*workerv1.Assignment, error) {
		ctx, cancel := context.WithTimeout(ctx, etcdTimeout)
		defer cancel()
		raw, ver, err := store.GetPlacement(ctx)
		if err != nil {
			return nil, err
		}
		return assignmentOf(raw, ver, o.ID, version)
	})
	gbind, gadv := gossipHosts(lis.Addr().String(), addr)
	if o.GossipBind != "" {
		gbind = o.GossipBind
	}
	gossip, err := cluster.JoinGossip(cluster.GossipConfig{Name: o.ID, BindAddr: gbind, AdvertiseAddr: gadv, BindPort: o.GossipPort, Fast: o.GossipFast, KeyFile: ptls.gossipKeyFile(), Log: log})
	if err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	defer gossip.Close()
	if ptls.gossipKeyFile() != "" {
		go gossip.WatchKeys(ctx, gossipKeyPoll)
	}
	info := cluster.WorkerInfo{ID: o.ID, Addr: addr, GossipAddr: gossip.Addr(), MetricsAddr: metricsAddr, Backend: kind, DeviceName: devName, MemoryBytes: o.MemoryBytes,
		Devices: 1, PID: os.Getpid(), Host: host, State: "idle", Started: time.Now(), DrainTimeoutSeconds: o.DrainTimeout.Seconds()}
	reg, err := registerAgain(ctx, store, info, o.LeaseTTL, log)
	if err != nil {
		return nil // ctx ended
	}
	log.Info("worker registered", "id", o.ID, "addr", addr, "gossip", gossip.Addr())
	return life.run(ctx, o, log, store, reg, info, states, svc)
}

// workerLife is a registered worker's life after it started: it keeps the
// etcd registration (which outlives etcd outages: cluster.Registration
// writes it again if etcd let its lease expire, and the worker keeps its
// assignment), registers again with a fresh state when the process did not
// run for pauseLimit (a worker stopped comes back as a new member), and
// drains when asked: its state in etcd becomes "draining",
// the coordinator drains its replica and calls Leave; then it leaves etcd
// and the process exits 0. A drain that no coordinator completes in
// DrainTimeout + drainGrace ends the same way.
type workerLife struct {
	draining atomic.Bool
	drain    chan time.Duration // the Drain RPC, with the drain's timeout
	leave    chan struct{}      // the Leave RPC
}

// askDrain is the Drain RPC: drain, with the coordinator's timeout (0: the
// worker's own).
func (l *workerLife) askDrain(timeout time.Duration) {
	select {
	case l.drain <- timeout:
	default: // one is pending already
	}
}

// pauseLimit is how long a worker process may go without running before
// it takes itself for found dead (gossip declares a silent member dead in
// under a second) and registers again with a fresh state.
const pauseLimit = 2 * time.Second

// drainGrace is what a draining worker waits beyond its drain timeout for
// the coordinator to release it (the coordinator's drain ends at the
// timeout; releasing the replica takes a moment more).
const drainGrace = 15 * time.Second

func newWorkerLife() *workerLife {
	return &workerLife{drain: make(chan time.Duration, 1), leave: make(chan struct{}, 1)}
}

func poke(ch chan struct{}) {
	select {
	case ch <- struct{}{}:
	default:
	}
}

func (l *workerLife) run(ctx context.Context, o WorkerProcessOptions, log *slog.Logger, store *cluster.Store, reg *cluster.Registration,
	info cluster.WorkerInfo, states *stateWriter, svc *WorkerService) error {
	sigDrain := o.Drain
	var deadline <-chan time.Time
	startDrain := func(why string, timeout time.Duration) {
		if timeout <= 0 {
			timeout = o.DrainTimeout
		}
		if l.draining.Swap(true) {
			return
		}
		sigDrain = nil
		states.set("draining")
		deadline = time.After(timeout + drainGrace)
		log.Info("draining: the coordinator finishes or moves this worker's requests, then releases it", "why", why, "timeout", timeout)
	}
	tick := time.NewTicker(pauseLimit / 8)
	defer tick.Stop()
	last := time.Now()
	for {
		// One goroutine owns the registration's updates; it ends, and is
		// waited for, before the registration is closed.
		sctx, stopStates := context.WithCancel(ctx)
		statesDone := make(chan struct{})
		go func() {
			defer close(statesDone)
			states.run(sctx, reg, info, log)
		}()
		closeReg := func() error {
			stopStates()
			<-statesDone
			return reg.Close()
		}
		leave := func(why string) error {
			log.Info("leaving etcd", "why", why)
			return closeReg()
		}
	wait:
		for {
			select {
			case <-ctx.Done():
				closeReg()
				return nil
			case <-sigDrain:
				startDrain("signal", 0)
			case timeout := <-l.drain:
				startDrain("asked by the coordinator", timeout)
			case <-l.leave:
				if err := leave("drained"); err != nil {
					log.Warn("leaving etcd", "err", err)
				}
				return nil
			case <-deadline:
				leave("no coordinator released this worker within its drain's timeout")
				return nil
			case now := <-tick.C:
				// A process stopped (SIGSTOP) or starved this long has
				// been found dead by gossip and its replica re-formed:
				// it comes back as a new member, not as its old self.
				paused := now.Sub(last)
				last = now
				if paused > pauseLimit && !l.draining.Load() {
					log.Warn("this process did not run for a while (stopped, or starved): registering again with a fresh state", "paused", paused.Round(time.Millisecond))
					break wait
				}
			}
		}
		closeReg()
		svc.reset() // its state, idle, reaches states through OnState
		info.State, info.Started = "idle", time.Now()
		var err error
		if reg, err = registerAgain(ctx, store, info, o.LeaseTTL, log); err != nil {
			return nil // ctx ended
		}
		log.Info("worker registered again", "id", o.ID)
		last = time.Now()
	}
}

// connectEtcd connects to etcd, waiting for it (a process started while
// etcd is away, or before it, does not exit): it retries with backoff until
// etcd answers or ctx ends.
func connectEtcd(ctx context.Context, endpoints []string, prefix string, cfg cluster.ConnectConfig, log *slog.Logger) (*cluster.Store, error) {
	if len(endpoints) == 0 {
		return cluster.ConnectWith(ctx, endpoints, prefix, cfg) // its error says so
	}
	return retryEtcd(ctx, 500*time.Millisecond, log, "etcd does not answer; trying again", func() (*cluster.Store, error) {
		return cluster.ConnectWith(ctx, endpoints, prefix, cfg)
	}, "endpoints", strings.Join(endpoints, ","))
}

// registerAgain registers info until it succeeds or ctx ends.
func registerAgain(ctx context.Context, store *cluster.Store, info cluster.WorkerInfo, ttl time.Duration, log *slog.Logger) (*cluster.Registration, error) {
	return retryEtcd(ctx, 250*time.Millisecond, log, "registering in etcd", func() (*cluster.Registration, error) {
		rctx, cancel := context.WithTimeout(ctx, etcdTimeout)
		defer cancel()
		return store.RegisterWorker(rctx, info, ttl)
	})
}

// retryEtcd calls try until it succeeds or ctx ends (ctx's error), logging
// each failure as msg with attrs, and waiting first, then twice as long
// each time, up to 5 s.
func retryEtcd[T any](ctx context.Context, first time.Duration, log *slog.Logger, msg string, try func() (T, error), attrs ...any) (T, error) {
	backoff := first
	for {
		v, err := try()
		if err == nil {
			return v, nil
		}
		log.Warn(msg, append(attrs, "err", err, "retry", backoff)...)
		select {
		case <-ctx.Done():
			var zero T
			return zero, ctx.Err()
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

func stopServer(gs *grpc.Server) {
	done := make(chan struct{})
	go func() { gs.GracefulStop(); close(done) }()
	select {
	case <-done:
	case <-time.After(3 * time.Second):
		gs.Stop()
	}
}

// CoordinatorProcessOptions configure RunCoordinator.
type CoordinatorProcessOptions struct {
	Listen        string // default 127.0.0.1:50051
	ModelDir      string // default: a demo model made under DataDir
	DataDir       string
	EtcdEndpoints []string // default: embedded etcd under DataDir
	Prefix        string
	ID            string
	LocalWorkers  int
	TP, PP        int // forced layout (0: the planner's)
	// EP, RedundantExperts and EPLBInterval: see CoordinatorOptions.
	EP, RedundantExperts int
	EPLBInterval         time.Duration
	// MetricsListen, when set, serves the coordinator's Prometheus
	// /metrics there; local workers then serve theirs on loopback ports
	// (registered in etcd, listed by GetServerInfo).
	MetricsListen string
	// HealthListen, when set, serves only the gRPC health service there,
	// plaintext (serveHealth).
	HealthListen string
	// HTTPListen, when set, serves the OpenAI-compatible HTTP API there
	// (NewOpenAIHandler); HTTPOptional says it is only the default
	// address, which a taken port turns off with a warning.
	HTTPListen   string
	HTTPOptional bool
	// Advertise is the address clients, the election and gossip know this
	// coordinator by (default: the bound --listen address); GossipPort
	// its gossip port (0: any free one).
	Advertise  string
	GossipPort int
	// WorkerArgs are extra flags for local workers (e.g. --threads 2).
	WorkerArgs   []string
	BlockSize    int
	KVCacheBytes int64
	NumBlocks    int64
	LeaderTTL    time.Duration
	Scheduler    routing.SchedulerConfig
	// Routing, RouteLoadMargin: see CoordinatorOptions.
	Routing         string
	RouteLoadMargin int
	Quantize        string
	Compute         string // passed to workers in the placement ("", "bf16", "f32")
	GossipFast      bool
	// Gossip timings of the coordinator's memberlist node (0: GossipFast's).
	GossipProbeInterval, GossipProbeTimeout time.Duration
	GossipSuspicionMult                     int
	// StepTimeout, QueueTimeout, DrainTimeout: see CoordinatorOptions.
	StepTimeout                routing.StepTimeout
	QueueTimeout, DrainTimeout time.Duration
	// MaxQueueWait, SendTimeout: see CoordinatorOptions; Limits: the
	// public server's (PublicServerOptions).
	MaxQueueWait, SendTimeout time.Duration
	Limits                    Limits
	// Security: TLS on every listener and dial (see Security); APIKeysFile
	// the public API's keys (security.LoadAPIKeys), MaxStreamsPerKey the
	// default per-key stream limit.
	Security         Security
	APIKeysFile      string
	MaxStreamsPerKey int
	Logger           *slog.Logger
	// OnReady is called once a replica can serve, with the public address.
	OnReady func(addr string)
}

// DemoPreset is the model made when no --model is given.
const DemoPreset = "tiny"

// EnsureDemoModel makes (once) the demo model under dataDir and returns its
// directory: the tiny preset's shape with random weights and the real
// Qwen2 tokenizer.
func EnsureDemoModel(dataDir string) (string, error) {
	return EnsurePresetModel(filepath.Join(dataDir, "demo-"+DemoPreset), DemoPreset)
}

// EnsurePresetModel makes (once) a random-weight bf16 checkpoint of a preset
// shape, with the real tokenizer, in dir.
func EnsurePresetModel(dir, preset string) (string, error) {
	if _, err := os.Stat(filepath.Join(dir, "config.json")); err == nil {
		return dir, nil
	}
	cfg, err := model.Preset(preset)
	if err != nil {
		return "", err
	}
	cfg.TorchDtype = "bfloat16"
	tok, err := qwenfleet.Qwen2TokenizerJSON()
	if err != nil {
		return "", err
	}
	tmp := dir + ".partial"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return "", err
	}
	err = model.WriteCheckpoint(tmp, cfg, model.NewRandomWeights(cfg, kernels.BF16, 0), model.WriteOptions{
		Tokenizer: tok, TokenizerConfig: []byte(qwenfleet.Qwen2TokenizerConfigJSON)})
	if err != nil {
		return "", err
	}
	return dir, os.Rename(tmp, dir)
}

// RunCoordinator runs a coordinator process until ctx ends.
func RunCoordinator(ctx context.Context, o CoordinatorProcessOptions) error {
	log := o.Logger
	if log == nil {
		log = slog.Default()
	}
	if o.Listen == "" {
		o.Listen = "127.0.0.1:50051"
	}
	if err := security.CheckListeners(o.Security.TLSDir, o.Security.Insecure,
		security.Listener{Flag: "--listen", Addr: o.Listen}, security.Listener{Flag: "--metrics-listen", Addr: o.MetricsListen},
		security.Listener{Flag: "--http-listen", Addr: o.HTTPListen}); err != nil {
		return err
	}
	if o.DataDir == "" {
		d, err := security.DefaultDataDir()
		if err != nil {
			return err
		}
		o.DataDir = d
	}
	if err := security.PrepareDataDir(o.DataDir); err != nil {
		return err
	}
	if o.LocalWorkers < 0 {
		return fmt.Errorf("--local-workers: %d < 0", o.LocalWorkers)
	}
	if o.ModelDir == "" {
		log.Info("no --model: using the demo model (made once)", "dir", filepath.Join(o.DataDir, "demo-"+DemoPreset))
		dir, err := EnsureDemoModel(o.DataDir)
		if err != nil {
			return fmt.Errorf("demo model: %w", err)
		}
		if err := security.Tighten(dir); err != nil {
			return fmt.Errorf("demo model: %w", err)
		}
		o.ModelDir = dir
	}
	ptls, err := o.Security.open(security.RoleCoordinator, log)
	if err != nil {
		return err
	}
	if ptls.own != nil {
		go watchReloads(ctx, log, "the certificates of --tls-dir", ptls.own.Err)
	}
	lis, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	defer lis.Close()
	addr := lis.Addr().String()
	endpoints := o.EtcdEndpoints
	if len(endpoints) == 0 {
		e, err := cluster.StartEmbeddedEtcdConfig(cluster.EmbeddedEtcdConfig{Dir: filepath.Join(o.DataDir, "etcd"), TLSDir: o.Security.TLSDir, Log: log})
		if err != nil {
			return fmt.Errorf("embedded etcd: %w", err)
		}
		defer e.Close()
		endpoints = e.Endpoints()
		log.Info("embedded etcd", "endpoints", strings.Join(endpoints, ","))
	}
	etcdCfg, err := ptls.etcdConfig(endpoints)
	if err != nil {
		return err
	}
	store, err := connectEtcd(ctx, endpoints, o.Prefix, etcdCfg, log)
	if err != nil {
		return fmt.Errorf("--etcd-endpoints: %w", err)
	}
	defer store.Close()
	if o.Advertise != "" { // the address clients and the election know it by
		addr = o.Advertise
	}
	gbind, gadv := gossipHosts(lis.Addr().String(), addr)
	gossip, err := cluster.JoinGossip(cluster.GossipConfig{Name: "coordinator-" + addr, BindAddr: gbind, AdvertiseAddr: gadv, BindPort: o.GossipPort, Fast: o.GossipFast,
		ProbeInterval: o.GossipProbeInterval, ProbeTimeout: o.GossipProbeTimeout, SuspicionMult: o.GossipSuspicionMult,
		KeyFile: ptls.gossipKeyFile(), Log: log})
	if err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	defer gossip.Close()
	if ptls.gossipKeyFile() != "" {
		go gossip.WatchKeys(ctx, gossipKeyPoll)
	}
	if o.ID == "" {
		o.ID = "coordinator-" + addr
	}
	coord, err := NewCoordinator(CoordinatorOptions{ID: o.ID, Addr: addr, ModelDir: o.ModelDir, Store: store, Gossip: gossip,
		EtcdEndpoints: endpoints, LeaderTTL: o.LeaderTTL, BlockSize: o.BlockSize, KVCacheBytes: o.KVCacheBytes, NumBlocks: o.NumBlocks,
		Scheduler: o.Scheduler, Routing: o.Routing, RouteLoadMargin: o.RouteLoadMargin, Quantize: o.Quantize, Compute: o.Compute, Logger: log, TP: o.TP, PP: o.PP,
		EP: o.EP, RedundantExperts: o.RedundantExperts, EPLBInterval: o.EPLBInterval,
		StepTimeout: o.StepTimeout, QueueTimeout: o.QueueTimeout, DrainTimeout: o.DrainTimeout,
		MaxQueueWait: o.MaxQueueWait, SendTimeout: o.SendTimeout, WorkerCreds: ptls.dialCreds(), Security: o.Security.Mode()})
	if err != nil {
		return err
	}
	if o.MetricsListen != "" {
		_, stopMetrics, err := ptls.serveMetrics(o.MetricsListen, coord.Metrics().Registry)
		if err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		defer stopMetrics()
		o.WorkerArgs = append(o.WorkerArgs, "--metrics-listen", "127.0.0.1:0")
	}
	var auth *PublicAuth
	if o.APIKeysFile != "" {
		keys, err := security.LoadAPIKeys(o.APIKeysFile)
		if err != nil {
			return fmt.Errorf("--api-keys: %w", err)
		}
		auth = &PublicAuth{Keys: keys, MaxStreamsPerKey: o.MaxStreamsPerKey}
		log.Info("API keys required on the public API", "file", o.APIKeysFile, "keys", keys.Len())
		go watchReloads(ctx, log, "the API keys of --api-keys", keys.Err)
	} else if !security.IsLoopback(o.Listen) {
		log.Warn("no --api-keys: any client that reaches the public API is an admin (it may drain workers, abort any request and read worker addresses)", "listen", o.Listen)
	}
	gs := grpc.NewServer(append(PublicServerOptionsWith(o.Limits, auth), ptls.serverOptions("public", false)...)...)
	svc := NewGeneratorService(coord)
	pb.RegisterGeneratorServer(gs, svc)
	hs := health.NewServer()
	hs.SetServingStatus(LivenessService, healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	hs.SetServingStatus(pb.Generator_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	go gs.Serve(lis)
	defer stopServer(gs)
	if o.HTTPListen != "" {
		stopHTTP, err := ptls.serveOpenAI(o.HTTPListen, o.HTTPOptional, svc, auth)
		if err != nil {
			return err
		}
		defer stopHTTP()
	}
	if o.HealthListen != "" {
		stop, err := serveHealth(o.HealthListen, hs, log)
		if err != nil {
			return err
		}
		defer stop()
	}
	log.Info("coordinator serving", "addr", addr, "model", o.ModelDir)

	rctx, stop := context.WithCancel(ctx)
	defer stop()
	var wg sync.WaitGroup
	defer wg.Wait()
	defer stop()
	if o.LocalWorkers > 0 {
		// Local workers are this binary in worker mode, each kept running
		// (restarted with backoff, stopped with ctx) by pkg/supervise.
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("local workers: %w", err)
		}
		env := append(os.Environ(), RoleEnv+"=worker")
		if o.Security.Etcd.Password != "" { // read from a file, maybe
			env = append(env, "QWENFLEET_ETCD_PASSWORD="+o.Security.Etcd.Password)
		}
		for i := 0; i < o.LocalWorkers; i++ {
			cfg := supervise.Config{
				Name:       fmt.Sprintf("local worker %d", i),
				Executable: exe,
				Args: append(append([]string{"--etcd-endpoints", strings.Join(endpoints, ","),
					"--id", fmt.Sprintf("local-%d-w%d", os.Getpid(), i), "--prefix", o.Prefix}, o.WorkerArgs...), o.Security.workerArgs()...),
				Env:        env,
				MinBackoff: time.Second, MaxBackoff: 30 * time.Second, StopGrace: 5 * time.Second,
				// The cluster stops: no drain (a worker drains on SIGTERM).
				// A worker drained by the coordinator exits 0 and is not
				// started again.
				StopSignal: syscall.SIGINT,
			}
			wg.Go(func() { supervise.Run(rctx, cfg, log) })
		}
	}
	go func() {
		select {
		case <-coord.Ready():
			hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			hs.SetServingStatus(pb.Generator_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
			log.Info("cluster ready", "addr", addr)
			if o.OnReady != nil {
				o.OnReady(addr)
			}
		case <-rctx.Done():
		}
	}()
	return coord.Run(rctx)
}

// serveHealth serves hs, and nothing else, plaintext on addr: kubelet's
// gRPC probes speak no TLS, and the serving status is all it tells (so
// the secure-by-default rule does not count this listener).
func serveHealth(addr string, hs *health.Server, log *slog.Logger) (func(), error) {
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("--health-listen: %w", err)
	}
	gs := grpc.NewServer()
	healthpb.RegisterHealthServer(gs, hs)
	go gs.Serve(lis)
	log.Info("health (gRPC, plaintext, health service only)", "addr", lis.Addr().String())
	return gs.Stop, nil
}

// LivenessService is the health service name that is SERVING as long as
// the process serves (liveness and startup probes); "" is SERVING only
// while the process can do its work (a coordinator: leading with a ready
// replica).
const LivenessService = "qwenfleet.live"

// gossipHosts are the gossip bind and advertise addresses of a process
// listening on bound and known to the cluster as advertised (host:port
// both): gossip binds where the listener does, and every interface
// ("0.0.0.0") when that one does (the listener's address then reads
// "[::]"); it announces the advertised host when that is, or resolves
// to, an IP address other than an unspecified one, and otherwise lets
// memberlist pick a private address ("").
func gossipHosts(bound, advertised string) (bind, advertise string) {
	bind, _, _ = net.SplitHostPort(bound)
	if ip := net.ParseIP(bind); bind == "" || ip != nil && ip.IsUnspecified() {
		bind = "0.0.0.0"
	}
	host, _, err := net.SplitHostPort(advertised)
	if err != nil || host == "" {
		return bind, ""
	}
	ip := net.ParseIP(host)
	if ip == nil {
		if ips, err := net.LookupIP(host); err == nil {
			for _, a := range ips {
				if a.To4() != nil {
					ip = a
					break
				}
			}
		}
	}
	if ip == nil || ip.IsUnspecified() || bind != "0.0.0.0" {
		return bind, "" // bound to one address: that is the one announced
	}
	return bind, ip.String()
}
