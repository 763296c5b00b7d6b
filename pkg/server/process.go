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
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/reflection"

	"github.com/qwenfleet/qwenfleet"
	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
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
	Device        string // "cpu" (default) or "cuda:N"
	KVCacheBytes  int64
	MemoryBytes   int64
	LeaseTTL      time.Duration
	GossipBind    string // default: the listen host
	GossipFast    bool
	CPUProfile    string // file to write a CPU profile to, until exit
	// MetricsListen, when set, serves Prometheus /metrics there (port 0
	// picks one; the address is registered in etcd).
	MetricsListen string
	Logger        *slog.Logger
}

// RunWorker serves the worker API, registered in etcd, until ctx ends.
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
	if o.LeaseTTL <= 0 {
		o.LeaseTTL = 5 * time.Second
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
	states := newStateWriter()
	svc := NewWorkerService(WorkerOptions{ID: o.ID, Threads: o.Threads, Kernels: o.Kernels, Device: o.Device, KVCacheBytes: o.KVCacheBytes,
		MemoryBytes: o.MemoryBytes, Logger: log,
		OnState: func(state, _ string) {
			states.set(state)
			if state == "ready" {
				hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
			}
		}})
	defer svc.Close()
	var metricsAddr string
	if o.MetricsListen != "" {
		a, stopMetrics, err := metrics.Serve(o.MetricsListen, svc.Metrics().Registry)
		if err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		defer stopMetrics()
		metricsAddr = a
		log.Info("metrics", "addr", "http://"+a+"/metrics")
	}
	gs := grpc.NewServer(append(PeerServerOptions(), grpc.MaxRecvMsgSize(256<<20), grpc.MaxSendMsgSize(256<<20),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 5 * time.Second, PermitWithoutStream: true}))...)
	workerv1.RegisterWorkerServer(gs, svc)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	go gs.Serve(lis)
	defer func() {
		// Peers stream to each other: end this worker's streams first, or
		// every worker's graceful stop waits for the others'.
		svc.closePeers()
		stopServer(gs)
	}()

	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	store, err := cluster.Connect(cctx, o.EtcdEndpoints, o.Prefix)
	cancel()
	if err != nil {
		return err
	}
	defer store.Close()
	svc.setAssignments(func(ctx context.Context, version int64) (*workerv1.Assignment, error) {
		raw, ver, err := store.GetPlacement(ctx)
		if err != nil {
			return nil, err
		}
		return assignmentOf(raw, ver, o.ID, version)
	})
	gbind := o.GossipBind
	if gbind == "" {
		gbind, _, _ = net.SplitHostPort(lis.Addr().String())
	}
	gossip, err := cluster.JoinGossip(cluster.GossipConfig{Name: o.ID, BindAddr: gbind, Fast: o.GossipFast})
	if err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	defer gossip.Close()
	info := cluster.WorkerInfo{ID: o.ID, Addr: addr, GossipAddr: gossip.Addr(), MetricsAddr: metricsAddr, Backend: kind, DeviceName: devName, MemoryBytes: o.MemoryBytes,
		Devices: 1, PID: os.Getpid(), Host: host, State: "idle", Started: time.Now()}
	rctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	reg, err := store.RegisterWorker(rctx, info, o.LeaseTTL)
	cancel()
	if err != nil {
		return err
	}
	defer reg.Close()
	// One goroutine owns the registration's updates; it ends, and is
	// waited for, before the registration is closed.
	sctx, stopStates := context.WithCancel(ctx)
	statesDone := make(chan struct{})
	go func() {
		defer close(statesDone)
		states.run(sctx, reg, info, log)
	}()
	defer func() {
		stopStates()
		<-statesDone
	}()
	log.Info("worker registered", "id", o.ID, "addr", addr, "gossip", gossip.Addr())
	select {
	case <-ctx.Done():
		return nil
	case <-reg.Lost():
		return errors.New("etcd registration lost")
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
	// WorkerArgs are extra flags for local workers (e.g. --threads 2).
	WorkerArgs   []string
	BlockSize    int
	KVCacheBytes int64
	NumBlocks    int64
	LeaderTTL    time.Duration
	Scheduler    routing.SchedulerConfig
	Quantize     string
	GossipFast   bool
	Logger       *slog.Logger
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
	if o.DataDir == "" {
		base, err := os.UserCacheDir()
		if err != nil {
			base = os.TempDir()
		}
		o.DataDir = filepath.Join(base, "qwenfleet")
	}
	if err := os.MkdirAll(o.DataDir, 0o755); err != nil {
		return fmt.Errorf("--data-dir: %w", err)
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
		o.ModelDir = dir
	}
	lis, err := net.Listen("tcp", o.Listen)
	if err != nil {
		return fmt.Errorf("--listen: %w", err)
	}
	defer lis.Close()
	addr := lis.Addr().String()
	endpoints := o.EtcdEndpoints
	if len(endpoints) == 0 {
		e, err := cluster.StartEmbeddedEtcd(filepath.Join(o.DataDir, "etcd"))
		if err != nil {
			return fmt.Errorf("embedded etcd: %w", err)
		}
		defer e.Close()
		endpoints = e.Endpoints()
		log.Info("embedded etcd", "endpoints", strings.Join(endpoints, ","))
	}
	cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	store, err := cluster.Connect(cctx, endpoints, o.Prefix)
	cancel()
	if err != nil {
		return fmt.Errorf("--etcd-endpoints: %w", err)
	}
	defer store.Close()
	host, _, _ := net.SplitHostPort(addr)
	gossip, err := cluster.JoinGossip(cluster.GossipConfig{Name: "coordinator-" + addr, BindAddr: host, Fast: o.GossipFast})
	if err != nil {
		return fmt.Errorf("gossip: %w", err)
	}
	defer gossip.Close()
	if o.ID == "" {
		o.ID = "coordinator-" + addr
	}
	coord, err := NewCoordinator(CoordinatorOptions{ID: o.ID, Addr: addr, ModelDir: o.ModelDir, Store: store, Gossip: gossip,
		EtcdEndpoints: endpoints, LeaderTTL: o.LeaderTTL, BlockSize: o.BlockSize, KVCacheBytes: o.KVCacheBytes, NumBlocks: o.NumBlocks,
		Scheduler: o.Scheduler, Quantize: o.Quantize, Logger: log, TP: o.TP, PP: o.PP,
		EP: o.EP, RedundantExperts: o.RedundantExperts, EPLBInterval: o.EPLBInterval})
	if err != nil {
		return err
	}
	if o.MetricsListen != "" {
		a, stopMetrics, err := metrics.Serve(o.MetricsListen, coord.Metrics().Registry)
		if err != nil {
			return fmt.Errorf("--metrics-listen: %w", err)
		}
		defer stopMetrics()
		log.Info("metrics", "addr", "http://"+a+"/metrics")
		o.WorkerArgs = append(o.WorkerArgs, "--metrics-listen", "127.0.0.1:0")
	}
	gs := grpc.NewServer()
	pb.RegisterGeneratorServer(gs, NewGeneratorService(coord))
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_NOT_SERVING)
	hs.SetServingStatus(pb.Generator_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(gs, hs)
	reflection.Register(gs)
	go gs.Serve(lis)
	defer stopServer(gs)
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
		for i := 0; i < o.LocalWorkers; i++ {
			cfg := supervise.Config{
				Name:       fmt.Sprintf("local worker %d", i),
				Executable: exe,
				Args: append([]string{"--etcd-endpoints", strings.Join(endpoints, ","),
					"--id", fmt.Sprintf("local-%d-w%d", os.Getpid(), i), "--prefix", o.Prefix}, o.WorkerArgs...),
				Env:        append(os.Environ(), RoleEnv+"=worker"),
				MinBackoff: time.Second, MaxBackoff: 30 * time.Second, StopGrace: 5 * time.Second,
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
