package server

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"runtime"
	"strings"
	"syscall"
	"time"

	"github.com/qwenfleet/qwenfleet/pkg/cluster"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/routing"
	"github.com/qwenfleet/qwenfleet/pkg/units"
)

// The flag sets of the two commands live here so that the coordinator
// binary can run as a worker too (RoleEnv).

func splitList(s string) []string {
	var out []string
	for _, p := range strings.Split(s, ",") {
		if p = strings.TrimSpace(p); p != "" {
			out = append(out, p)
		}
	}
	return out
}

func newLogger(level, format string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("--log-level: %q is not debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("--log-format: %q is not text or json", format)
}

func signalContext() (context.Context, context.CancelFunc) {
	return signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
}

// workerSignals: the first SIGTERM drains the worker (drain is closed);
// SIGINT, or a second SIGTERM, stops it at once (ctx ends).
func workerSignals() (ctx context.Context, drain <-chan struct{}, stop func()) {
	ctx, cancel := context.WithCancel(context.Background())
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, os.Interrupt, syscall.SIGTERM)
	d := make(chan struct{})
	go func() {
		drained := false
		for {
			select {
			case <-ctx.Done():
				return
			case s := <-sigs:
				if s == syscall.SIGTERM && !drained {
					drained = true
					close(d)
					continue
				}
				cancel()
				return
			}
		}
	}()
	return ctx, d, func() { signal.Stop(sigs); cancel() }
}

func parseFlags(fs *flag.FlagSet, args []string) int {
	fs.SetOutput(io.Discard)
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fs.SetOutput(os.Stdout)
			fs.PrintDefaults()
			return 0
		}
		fmt.Fprintf(os.Stderr, "%s: %v\n", fs.Name(), err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "%s: unexpected argument %q\n", fs.Name(), fs.Arg(0))
		return 2
	}
	return -1
}

// WorkerMain is cmd/worker's main; it returns the exit code.
func WorkerMain(args []string) int {
	fs := flag.NewFlagSet("worker", flag.ContinueOnError)
	etcd := fs.String("etcd-endpoints", "", "etcd endpoints, comma separated (required)")
	prefix := fs.String("prefix", "/qwenfleet/", "etcd key prefix")
	listen := fs.String("listen", "127.0.0.1:0", "gRPC listen address")
	advertise := fs.String("advertise", "", "address the coordinator dials (default: the bound address)")
	id := fs.String("id", "", "worker id (default: host-pid)")
	threads := fs.Int("threads", 0, "CPU threads (0: all)")
	kernels := fs.String("kernels", "", "CPU kernel set: generic, avx2, avx512 (default: best)")
	compute := fs.String("compute", "f32", "products of bf16 weights when the coordinator names none: bf16 (the fastest the CPU has: VDPBF16PS on bf16-rounded activations where it outruns float32 FMA, as on AMD Zen 4/5; float32 elsewhere) or f32")
	device := fs.String("device", "cpu", "compute device: cpu, or cuda:N (a binary built with -tags cuda; no CUDA driver: refuses to start)")
	kv := fs.String("kv-cache", "512MiB", "KV pool size when the coordinator names none")
	mem := fs.String("memory", "0", "memory reported in etcd for placement (0: the machine's RAM on Linux, unknown elsewhere)")
	gossipFast := fs.Bool("gossip-fast", true, "sub-second gossip failure detection (loopback/LAN)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "text", "log lines as text or json")
	metricsListen := fs.String("metrics-listen", "", "serve Prometheus /metrics on this address (e.g. 0.0.0.0:9091; empty: off)")
	healthListen := fs.String("health-listen", "", "serve only the gRPC health service, plaintext, on this address (for kubelet gRPC probes, which speak no TLS; empty: off)")
	gossipPort := fs.Int("gossip-port", 0, "gossip (memberlist) UDP and TCP port (0: any free one)")
	hostName := fs.String("host", "", "host name registered for placement: workers with the same host are kept together (default: the hostname; on Kubernetes, the node's name)")
	cpuProfile := fs.String("cpuprofile", "", "write a CPU profile to this file until exit")
	drainTimeout := fs.Duration("drain-timeout", 30*time.Second, "on SIGTERM, how long the worker's replica may take to finish its requests before they move to other replicas")
	peerWindow := fs.String("peer-window", "16MiB", "flow-control window of the streams to the replica's other workers (at least 64KiB)")
	modelRoot := fs.String("model-root", "", "load models only from under this directory (the placement's model path must lie under it)")
	secFlags := securityFlags(fs)
	if rc := parseFlags(fs, args); rc >= 0 {
		return rc
	}
	fail := func(format string, a ...any) int { fmt.Fprintf(os.Stderr, "worker: "+format+"\n", a...); return 2 }
	sec, err := secFlags()
	if err != nil {
		return fail("%v", err)
	}
	if *modelRoot != "" {
		if fi, err := os.Stat(*modelRoot); err != nil || !fi.IsDir() {
			return fail("--model-root: %s is not a directory", *modelRoot)
		}
	}
	if *drainTimeout <= 0 {
		return fail("--drain-timeout: must be > 0")
	}
	if strings.Contains(*id, "/") {
		return fail("--id: %q contains a /", *id)
	}
	if *gossipPort < 0 || *gossipPort > 65535 {
		return fail("--gossip-port: %d is not a port", *gossipPort)
	}
	window, err := units.ParseBytes(*peerWindow)
	if err != nil || window < 64<<10 || window > 1<<30 {
		return fail("--peer-window: %q is not a size in [64KiB, 1GiB]", *peerWindow)
	}
	if *threads < 0 || *threads > cpu.MaxThreads {
		return fail("--threads: %d is outside [0, %d]", *threads, cpu.MaxThreads)
	}
	if *compute != "bf16" && *compute != "f32" {
		return fail("--compute: %q is not bf16 or f32", *compute)
	}
	kvBytes, err := units.ParseBytes(*kv)
	if err != nil {
		return fail("--kv-cache: %v", err)
	}
	memBytes, err := units.ParseBytes(*mem)
	if err != nil {
		return fail("--memory: %v", err)
	}
	log, err := newLogger(*level, *format)
	if err != nil {
		return fail("%v", err)
	}
	ctx, drain, cancel := workerSignals()
	defer cancel()
	err = RunWorker(ctx, WorkerProcessOptions{EtcdEndpoints: splitList(*etcd), Prefix: *prefix, Listen: *listen, Advertise: *advertise,
		ID: *id, Threads: *threads, Kernels: *kernels, Compute: *compute, Device: *device, KVCacheBytes: kvBytes, MemoryBytes: memBytes, GossipFast: *gossipFast,
		CPUProfile: *cpuProfile, MetricsListen: *metricsListen, HealthListen: *healthListen, GossipPort: *gossipPort, Host: *hostName, Logger: log, Drain: drain, DrainTimeout: *drainTimeout,
		Peer: PeerConfig{Window: int32(window)}, Security: sec, ModelRoot: *modelRoot})
	if err != nil {
		fmt.Fprintf(os.Stderr, "worker: %v\n", err)
		return 1
	}
	return 0
}

// CoordinatorMain is cmd/coordinator's main; it returns the exit code.
func CoordinatorMain(args []string) int {
	fs := flag.NewFlagSet("coordinator", flag.ContinueOnError)
	listen := fs.String("listen", "127.0.0.1:50051", "public gRPC address")
	modelDir := fs.String("model", "", "model directory in HuggingFace layout (default: a demo model made under --data-dir)")
	dataDir := fs.String("data-dir", "", "embedded etcd data and the demo model (default: the user cache dir /qwenfleet)")
	localWorkers := fs.Int("local-workers", 1, "worker processes to start on this machine (default: 1, or max(tp, ep)×pp when those are given)")
	tp := fs.Int("tp", 0, "tensor-parallel degree of every replica (0: the planner's choice)")
	pp := fs.Int("pp", 0, "pipeline-parallel stages of every replica (0: the planner's choice)")
	ep := fs.Int("ep", 0, "expert-parallel ranks per stage of a MoE model (0: the planner's choice, 1: none); attention is split over --tp of them")
	redundant := fs.Int("redundant-experts", 0, "extra expert slots per rank and layer that an expert rebalance fills with replicas of hot experts")
	eplb := fs.Duration("eplb-interval", 0, "re-place the experts from their load this often (0: only when asked, qwenctl experts --rebalance)")
	etcd := fs.String("etcd-endpoints", "", "external etcd endpoints, comma separated (default: embedded etcd)")
	prefix := fs.String("prefix", "/qwenfleet/", "etcd key prefix")
	id := fs.String("id", "", "coordinator id (default: from --listen)")
	threads := fs.Int("worker-threads", 0, "CPU threads of each local worker (0: the machine's CPUs shared among them)")
	kv := fs.String("kv-cache", "0", "KV pool asked of each worker (0: the worker's default, 512MiB)")
	blocks := fs.Int64("kv-blocks", 0, "KV pool size in blocks (overrides --kv-cache)")
	blockSize := fs.Int("block-size", 16, "tokens per KV block")
	batchTokens := fs.Int("max-batch-tokens", 512, "tokens computed per step (prefill chunks + decodes)")
	maxRunning := fs.Int("max-running", 64, "sequences decoding together")
	maxWaiting := fs.Int("max-waiting", 1024, "queued requests before RESOURCE_EXHAUSTED")
	noPrefixCache := fs.Bool("no-prefix-cache", false, "turn prefix caching off (on by default: full KV blocks are kept by the hash of their token prefix and shared by later requests that start with it)")
	routingPolicy := fs.String("routing", routing.RoutePrefix, "how a request's replica is chosen: prefix (the replica caching the longest prefix of it, within --route-load-margin of the least loaded) or least-loaded")
	routeMargin := fs.Int("route-load-margin", routing.DefaultLoadMargin, "with --routing prefix: a replica holding more than this many sequences beyond the least loaded one loses its prefix preference")
	quantize := fs.String("quantize", "", "quantisation on the workers: q8 (int8 weights, groups of 32), q8a (int8 weights and activations, VNNI), or none")
	compute := fs.String("compute", "", "the workers' products of bf16 weights: bf16 (the fastest each CPU has: VDPBF16PS on bf16-rounded activations where it outruns float32 FMA, as on AMD Zen 4/5; float32 elsewhere), f32, or empty for each worker's own --compute (default f32)")
	leaderTTL := fs.Duration("leader-ttl", cluster.DefaultLeaderTTL, "leader lease TTL: a standby takes over this long after the leader dies (a leader cut off from etcd longer serves on; see docs/failure-model.md)")
	level := fs.String("log-level", "info", "debug, info, warn or error")
	format := fs.String("log-format", "text", "log lines as text or json (local workers too)")
	metricsListen := fs.String("metrics-listen", "", "serve Prometheus /metrics on this address (e.g. 127.0.0.1:9090; empty: off); local workers then serve theirs too")
	healthListen := fs.String("health-listen", "", "serve only the gRPC health service, plaintext, on this address (for kubelet gRPC probes, which speak no TLS; empty: off)")
	httpListen := fs.String("http-listen", DefaultHTTPListen, "serve the OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /v1/models, /health, /metrics) on this address, with TLS and API keys as the gRPC API (empty: off; the default is skipped with a warning when its port is taken)")
	advertise := fs.String("advertise", "", "the address clients and the other coordinators reach this one at (default: the bound --listen address; needed when --listen is 0.0.0.0)")
	gossipPort := fs.Int("gossip-port", 0, "gossip (memberlist) UDP and TCP port (0: any free one)")
	stepTimeout := fs.Duration("step-timeout", 5*time.Second, "least time a replica's step may take before its workers count as hung")
	stepFactor := fs.Float64("step-timeout-factor", 10, "a step may take this many times the replica's median step (scaled by its tokens), if more than --step-timeout")
	queueTimeout := fs.Duration("queue-timeout", 60*time.Second, "how long a request may wait with no replica able to serve it before it ends UNAVAILABLE")
	drainTimeout := fs.Duration("drain-timeout", 30*time.Second, "how long a drained replica's requests may take to finish (when the drain names no timeout) before they move")
	maxQueueWait := fs.Duration("max-queue-wait", DefaultMaxQueueWait, "refuse at once (RESOURCE_EXHAUSTED) a request estimated to wait longer than this in a replica's queue, and end one that did, before its first token (0: no limit)")
	sendTimeout := fs.Duration("send-timeout", DefaultSendTimeout, "how long a response may wait for a client that does not read it before its request is aborted")
	maxStreams := fs.Int("max-concurrent-streams", DefaultMaxConcurrentStreams, "calls one client connection may have open at once")
	probeInterval := fs.Duration("gossip-probe-interval", 200*time.Millisecond, "how often gossip probes each worker (failure detection)")
	probeTimeout := fs.Duration("gossip-probe-timeout", 100*time.Millisecond, "a gossip probe unanswered this long fails (then indirect probes)")
	suspicion := fs.Int("gossip-suspicion-mult", 2, "a suspected worker is dead after this × max(1, log10(members)) × the probe interval")
	apiKeys := fs.String("api-keys", "", "API keys file (`qwenctl apikey`): the public API then needs `authorization: Bearer KEY`; re-read when it changes")
	keyStreams := fs.Int("max-streams-per-key", 0, "concurrent Generate streams of one API key when its entry names no max_streams (0: no limit)")
	modelRoot := fs.String("model-root", "", "local workers load models only from under this directory")
	secFlags := securityFlags(fs)
	if rc := parseFlags(fs, args); rc >= 0 {
		return rc
	}
	fail := func(format string, a ...any) int { fmt.Fprintf(os.Stderr, "coordinator: "+format+"\n", a...); return 2 }
	sec, err := secFlags()
	if err != nil {
		return fail("%v", err)
	}
	switch {
	case *tp < 0 || *tp > 64:
		return fail("--tp: %d is outside [0, 64]", *tp)
	case *pp < 0 || *pp > 64:
		return fail("--pp: %d is outside [0, 64]", *pp)
	case *ep < 0 || *ep > 64:
		return fail("--ep: %d is outside [0, 64]", *ep)
	case *redundant < 0 || *redundant > 1024:
		return fail("--redundant-experts: %d is outside [0, 1024]", *redundant)
	case *eplb < 0:
		return fail("--eplb-interval: must be >= 0")
	case *localWorkers < 0 || *localWorkers > 64:
		return fail("--local-workers: %d is outside [0, 64]", *localWorkers)
	case *threads < 0 || *threads > cpu.MaxThreads:
		return fail("--worker-threads: %d is outside [0, %d]", *threads, cpu.MaxThreads)
	case *blockSize < 1 || *blockSize > 1024:
		return fail("--block-size: %d is outside [1, 1024]", *blockSize)
	case *batchTokens < 1:
		return fail("--max-batch-tokens: must be >= 1")
	case *maxRunning < 1:
		return fail("--max-running: must be >= 1")
	case *maxWaiting < 0:
		return fail("--max-waiting: must be >= 0")
	case *blocks < 0:
		return fail("--kv-blocks: must be >= 0")
	case *routingPolicy != routing.RoutePrefix && *routingPolicy != routing.RouteLeastLoaded:
		return fail("--routing: %q is not %s or %s", *routingPolicy, routing.RoutePrefix, routing.RouteLeastLoaded)
	case *routeMargin < 0:
		return fail("--route-load-margin: must be >= 0")
	case *leaderTTL < 2*time.Second:
		return fail("--leader-ttl: must be >= 2s (etcd grants no shorter lease)")
	case *quantize != "" && *quantize != "q8" && *quantize != "q8a":
		return fail("--quantize: %q is not q8 or q8a", *quantize)
	case *compute != "" && *compute != "bf16" && *compute != "f32":
		return fail("--compute: %q is not bf16 or f32", *compute)
	case *compute == "bf16" && *quantize != "":
		return fail("--compute: bf16 with --quantize %s: choose one", *quantize)
	case *stepTimeout < 100*time.Millisecond:
		return fail("--step-timeout: must be >= 100ms")
	case !(*stepFactor >= 1 && *stepFactor <= 1000):
		return fail("--step-timeout-factor: %v is outside [1, 1000]", *stepFactor)
	case *queueTimeout <= 0:
		return fail("--queue-timeout: must be > 0")
	case *drainTimeout <= 0:
		return fail("--drain-timeout: must be > 0")
	case *maxQueueWait < 0:
		return fail("--max-queue-wait: must be >= 0")
	case *maxQueueWait > 0 && *maxQueueWait < 100*time.Millisecond:
		return fail("--max-queue-wait: %v is below 100ms (0 turns the limit off)", *maxQueueWait)
	case *sendTimeout < 100*time.Millisecond:
		return fail("--send-timeout: must be >= 100ms")
	case *maxStreams < 1 || *maxStreams > 1<<20:
		return fail("--max-concurrent-streams: %d is outside [1, %d]", *maxStreams, 1<<20)
	case *probeInterval < 10*time.Millisecond:
		return fail("--gossip-probe-interval: must be >= 10ms")
	case *probeTimeout <= 0 || *probeTimeout > *probeInterval:
		return fail("--gossip-probe-timeout: %v is not in (0, --gossip-probe-interval]", *probeTimeout)
	case *suspicion < 1 || *suspicion > 100:
		return fail("--gossip-suspicion-mult: %d is outside [1, 100]", *suspicion)
	case *keyStreams < 0:
		return fail("--max-streams-per-key: must be >= 0")
	case *gossipPort < 0 || *gossipPort > 65535:
		return fail("--gossip-port: %d is not a port", *gossipPort)
	case *advertise != "" && !advertisable(*advertise):
		return fail("--advertise: %q is not host:port with a host others can dial", *advertise)
	}
	kvBytes, err := units.ParseBytes(*kv)
	if err != nil {
		return fail("--kv-cache: %v", err)
	}
	if *modelDir != "" {
		if _, err := os.Stat(*modelDir + "/config.json"); err != nil {
			return fail("--model: %s has no config.json", *modelDir)
		}
	}
	log, err := newLogger(*level, *format)
	if err != nil {
		return fail("%v", err)
	}
	explicit := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { explicit[f.Name] = true })
	if n := max(*tp, *ep, 1) * max(*pp, 1); !explicit["local-workers"] && n > 1 {
		*localWorkers = n
	}
	var wargs []string
	switch {
	case *threads > 0:
		wargs = append(wargs, "--threads", fmt.Sprint(*threads))
	case *localWorkers > 1: // share the CPUs rather than oversubscribe them
		wargs = append(wargs, "--threads", fmt.Sprint(max(runtime.NumCPU() / *localWorkers, 1)))
	}
	wargs = append(wargs, "--log-level", *level, "--log-format", *format)
	if *modelRoot != "" {
		wargs = append(wargs, "--model-root", *modelRoot)
	}
	ctx, cancel := signalContext()
	defer cancel()
	err = RunCoordinator(ctx, CoordinatorProcessOptions{Listen: *listen, ModelDir: *modelDir, DataDir: *dataDir, EtcdEndpoints: splitList(*etcd),
		Prefix: *prefix, ID: *id, LocalWorkers: *localWorkers, WorkerArgs: wargs, BlockSize: *blockSize, KVCacheBytes: kvBytes, NumBlocks: *blocks,
		LeaderTTL: *leaderTTL, GossipFast: true, Quantize: *quantize, Compute: *compute, Logger: log, TP: *tp, PP: *pp, MetricsListen: *metricsListen, HealthListen: *healthListen, HTTPListen: *httpListen, HTTPOptional: !explicit["http-listen"], Advertise: *advertise, GossipPort: *gossipPort,
		EP: *ep, RedundantExperts: *redundant, EPLBInterval: *eplb,
		StepTimeout: routing.StepTimeout{Min: *stepTimeout, Factor: *stepFactor}, QueueTimeout: *queueTimeout, DrainTimeout: *drainTimeout,
		MaxQueueWait: *maxQueueWait, SendTimeout: *sendTimeout, Limits: Limits{MaxConcurrentStreams: uint32(*maxStreams)},
		Security: sec, APIKeysFile: *apiKeys, MaxStreamsPerKey: *keyStreams,
		GossipProbeInterval: *probeInterval, GossipProbeTimeout: *probeTimeout, GossipSuspicionMult: *suspicion,
		Scheduler: routing.SchedulerConfig{MaxBatchTokens: *batchTokens, MaxRunning: *maxRunning, MaxWaiting: *maxWaiting, NoPrefixCache: *noPrefixCache},
		Routing:   *routingPolicy, RouteLoadMargin: marginOption(*routeMargin)})
	if err != nil && ctx.Err() == nil {
		fmt.Fprintf(os.Stderr, "coordinator: %v\n", err)
		return 1
	}
	return 0
}

// advertisable says whether addr is host:port with a port and a host
// other processes can dial (not empty, not 0.0.0.0 or ::).
func advertisable(addr string) bool {
	h, p, err := net.SplitHostPort(addr)
	if err != nil || h == "" || p == "" || p == "0" {
		return false
	}
	ip := net.ParseIP(h)
	return ip == nil || !ip.IsUnspecified()
}

// marginOption is --route-load-margin as CoordinatorOptions.RouteLoadMargin
// (where 0 means the default and a negative value none).
func marginOption(m int) int {
	if m == 0 {
		return -1
	}
	return m
}
