package server

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/qwenfleet/qwenfleet/pkg/expertparallel"
	"github.com/qwenfleet/qwenfleet/pkg/kernels/cpu"
	"github.com/qwenfleet/qwenfleet/pkg/metrics"
	"github.com/qwenfleet/qwenfleet/pkg/model"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
	"github.com/qwenfleet/qwenfleet/pkg/shard"
	"github.com/qwenfleet/qwenfleet/pkg/steps"
	workerv1 "github.com/qwenfleet/qwenfleet/proto/worker/v1"
)

// WorkerOptions configure a worker service.
type WorkerOptions struct {
	ID           string
	Threads      int    // CPU threads (0: all)
	Kernels      string // CPU kernel set ("": best)
	Compute      string // products of bf16 weights when the assignment names none: "bf16" or "f32" ("": f32)
	Device       string // "cpu" (default) or "cuda:N"
	MemoryBytes  int64  // reported budget
	KVCacheBytes int64  // default KV pool when Warmup names none
	Mmap         bool
	Peer         PeerConfig // connections to the replica's other workers
	Logger       *slog.Logger
	// OnState is called when the worker's state changes (idle, loading,
	// ready, failed).
	OnState func(state, model string)
	// OnDrain is called by the Drain RPC (the coordinator asks the worker
	// to show it drains), OnLeave by Leave (it is drained: leave etcd and
	// exit). Both must not block.
	OnDrain func(timeout time.Duration)
	OnLeave func()
	// Assignments reads this worker's assignment of a replica generation
	// from the placement (in etcd); Load uses it when the request carries
	// only the version.
	Assignments func(ctx context.Context, version int64) (*workerv1.Assignment, error)
	// Auth is what the worker checks of its callers (see WorkerAuth); nil
	// checks nothing.
	Auth *WorkerAuth
}

// WorkerService implements the internal Worker API.
type WorkerService struct {
	workerv1.UnimplementedWorkerServer
	opts WorkerOptions

	// life is held shared by a running Step and exclusively by whatever
	// replaces or frees the model or its KV pool (Load, Warmup, Close), so
	// a step never runs on freed memory. mu guards the fields below and is
	// only held briefly (Info and Health never wait for a load).
	life      sync.RWMutex
	mu        sync.Mutex
	backend   gpuBackend // the kernels backend (CPU or GPU) of the loaded model
	exec      *shard.Executor
	modelDir  string
	version   int64
	blockSize int
	quantize  string
	compute   string
	assign    *workerv1.Assignment
	peers     *peers // nil unless sharded
	box       mailbox
	// With expert parallelism: placements a SetExperts loaded, by version,
	// until a step uses a newer one; expVersion is the one in use.
	tables     map[int64]*expertparallel.Table
	expVersion int64
	metrics    *metrics.Worker
	// Bounds of steps, set by Warmup: the most tokens (and sequences) one
	// step may carry, the KV pool's blocks (0 before Warmup: unbounded), and
	// the window of step ids (see admitStep).
	stepTokens int
	poolBlocks int64
	steps      stepWindow
	// state (idle, loading, loaded, ready, failed) is written under w.mu
	// (setState) and read without it: a health check (the coordinator
	// confirming a gossip report) answers at once even while a load
	// holds w.mu.
	state atomic.Pointer[string]
}

// NewWorkerService makes an idle worker.
func NewWorkerService(opts WorkerOptions) *WorkerService {
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	if opts.KVCacheBytes <= 0 {
		opts.KVCacheBytes = 512 << 20
	}
	w := &WorkerService{opts: opts}
	idle := "idle"
	w.state.Store(&idle)
	w.metrics = metrics.NewWorker(opts.ID, newWorkerCollector(w))
	return w
}

// Metrics are the worker's Prometheus instruments.
func (w *WorkerService) Metrics() *metrics.Worker { return w.metrics }

func (w *WorkerService) setAssignments(f func(ctx context.Context, version int64) (*workerv1.Assignment, error)) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.opts.Assignments = f
}

// closePeers ends the streams to the other workers of the replica.
func (w *WorkerService) closePeers() {
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.peers != nil {
		w.peers.close()
		w.peers = nil
	}
}

// Close frees the model and backend (after any running step).
func (w *WorkerService) Close() {
	w.life.Lock()
	defer w.life.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.unload()
}

// reset forgets everything the worker holds (model, KV pool, assignment,
// peers, messages) and makes it idle: a worker that lost its registration
// comes back as a new member with a fresh state.
func (w *WorkerService) reset() {
	w.life.Lock()
	defer w.life.Unlock()
	w.mu.Lock()
	defer w.mu.Unlock()
	w.unload()
	w.blockSize, w.quantize, w.tables, w.expVersion = 0, "", nil, 0
	w.box.keepOnly(0)
	w.box.setLimit(mailLimit{})
	w.setState("idle")
}

// unload frees the model; w.life and w.mu are held.
func (w *WorkerService) unload() {
	if w.exec != nil {
		w.exec.Model().Close()
		w.exec = nil
	}
	if w.backend != nil {
		w.backend.Close()
		w.backend = nil
	}
	if w.peers != nil {
		w.peers.close()
		w.peers = nil
	}
	w.modelDir, w.version, w.assign = "", 0, nil
	w.stepTokens, w.poolBlocks, w.steps = 0, 0, stepWindow{}
}

func (w *WorkerService) setState(s string) {
	w.state.Store(&s)
	if w.opts.OnState != nil {
		w.opts.OnState(s, w.modelDir)
	}
}

// Info describes the worker.
func (w *WorkerService) Info(ctx context.Context, _ *workerv1.InfoRequest) (*workerv1.InfoResponse, error) {
	if err := w.authorize(ctx, "Info", false); err != nil {
		return nil, err
	}
	host, _ := os.Hostname()
	w.mu.Lock()
	r := &workerv1.InfoResponse{Id: w.opts.ID, Backend: backendKind(w.opts.Device), Threads: int32(w.opts.Threads), MemoryBytes: w.opts.MemoryBytes,
		Pid: int32(os.Getpid()), Host: host, Model: w.modelDir, AssignmentVersion: w.version, KvBlockSize: int32(w.blockSize)}
	exec := w.exec
	w.mu.Unlock()
	if exec != nil { // outside w.mu: it waits for a running step
		r.NumKvBlocks = int64(exec.NumBlocks())
	}
	return r, nil
}

// Load loads the model an assignment names (a no-op when it is loaded).
func (w *WorkerService) Load(req *workerv1.LoadRequest, stream workerv1.Worker_LoadServer) error {
	if err := w.authorize(stream.Context(), "Load", true); err != nil {
		return err
	}
	a := req.GetAssignment()
	w.mu.Lock()
	read := w.opts.Assignments
	w.mu.Unlock()
	if a != nil && w.opts.Auth != nil && w.opts.Auth.StoredOnly {
		return status.Error(codes.PermissionDenied, "assignment: this worker takes its assignments from the placement in etcd only (send the version)")
	}
	if a == nil {
		if read == nil {
			return status.Error(codes.InvalidArgument, "assignment: empty, and this worker has no placement store to read it from")
		}
		var err error
		if a, err = read(stream.Context(), req.Version); err != nil {
			return status.Errorf(codes.FailedPrecondition, "assignment of generation %d: %v", req.Version, err)
		}
	}
	if a.Model == "" {
		return status.Error(codes.InvalidArgument, "assignment.model: empty")
	}
	if a.Quantize != "" && a.Quantize != "q8" && a.Quantize != "q8a" {
		return status.Errorf(codes.InvalidArgument, "assignment.quantize: %q is not q8 or q8a", a.Quantize)
	}
	if a.Compute != "" && a.Compute != "bf16" && a.Compute != "f32" {
		return status.Errorf(codes.InvalidArgument, "assignment.compute: %q is not bf16 or f32", a.Compute)
	}
	if a.Compute == "bf16" && a.Quantize != "" {
		return status.Errorf(codes.InvalidArgument, "assignment.compute: bf16 with quantize %q (choose one)", a.Quantize)
	}
	compute := a.Compute
	if compute == "" && a.Quantize == "" {
		compute = w.opts.Compute
	}
	group := max(a.TpSize, a.EpSize)
	if a.TpSize < 0 || a.EpSize < 0 || group > 1 && len(a.TpPeers) != int(group) {
		return status.Errorf(codes.InvalidArgument, "assignment.tp_peers: %d addresses for a stage of %d ranks", len(a.TpPeers), group)
	}
	sh := model.Shard{LayersBegin: int(a.LayersBegin), LayersEnd: int(a.LayersEnd), TPRank: int(a.TpRank), TPSize: int(a.TpSize)}
	var table *expertparallel.Table
	dir := filepath.Clean(a.Model)
	if au := w.opts.Auth; au != nil && au.ModelRoot != "" {
		var err error
		if dir, err = modelUnder(au.ModelRoot, dir); err != nil {
			return status.Errorf(codes.PermissionDenied, "assignment.model: %q: %v", a.Model, err)
		}
	}
	if a.EpSize > 1 {
		sh.EPRank, sh.EPSize = int(a.EpRank), int(a.EpSize)
		if len(a.Experts) > 0 {
			t, err := expertparallel.FromFlat(a.Experts)
			if err == nil && t.Ranks != int(a.EpSize) {
				err = fmt.Errorf("%d ranks for ep_size %d", t.Ranks, a.EpSize)
			}
			if err == nil { // (a config that does not load fails the load below)
				if cfg, cerr := model.LoadConfig(filepath.Join(dir, "config.json")); cerr == nil {
					err = t.Validate(cfg.NumHiddenLayers, cfg.NumExperts)
				}
			}
			if err != nil {
				return status.Errorf(codes.InvalidArgument, "assignment.experts: %v", err)
			}
			table, sh.Experts = t, t
		}
	}
	w.life.Lock()
	defer w.life.Unlock()
	w.mu.Lock()
	if w.exec != nil && w.modelDir == dir && w.quantize == a.Quantize && w.compute == compute && sameSlice(w.exec.Model(), sh) {
		// Same slice: keep the weights (take the assignment's experts),
		// take the new peers.
		if table != nil {
			if err := w.switchExperts(dir, table); err != nil {
				w.mu.Unlock()
				return status.Errorf(codes.Internal, "experts: %v", err)
			}
		}
		w.tables, w.expVersion = nil, a.ExpertsVersion
		if err := w.setPeers(a); err != nil {
			w.mu.Unlock()
			return status.Errorf(codes.InvalidArgument, "assignment: %v", err)
		}
		w.version = a.Version
		p := w.progress("ready")
		w.mu.Unlock()
		return stream.Send(p)
	}
	w.unload()
	w.setState("loading")
	w.mu.Unlock()
	if err := stream.Send(&workerv1.LoadProgress{Stage: "reading"}); err != nil {
		return err
	}
	fail := func() {
		w.mu.Lock()
		w.setState("failed")
		w.mu.Unlock()
	}
	mmap := req.Mmap || w.opts.Mmap
	if a.Quantize != "" || compute == "bf16" {
		mmap = false // quantised and pair-packed weights are copies
	}
	b, err := w.newBackend(mmap, a.Quantize, compute)
	if err != nil {
		fail()
		return status.Errorf(codes.FailedPrecondition, "backend: %v", err)
	}
	t0 := time.Now()
	m, err := model.Load(dir, b, model.LoadOptions{Mmap: mmap, Shard: sh})
	if err != nil {
		b.Close()
		fail()
		return status.Errorf(codes.InvalidArgument, "load %s: %v", dir, err)
	}
	w.opts.Logger.Info("model loaded", "model", dir, "bytes", m.WeightBytes(), "seconds", time.Since(t0).Seconds(),
		"layers", fmt.Sprintf("[%d,%d)", m.Shard().LayersBegin, m.Shard().LayersEnd), "tp_rank", m.Shard().TPRank, "tp_size", m.Shard().TPSize,
		"compute", computeName(b))
	w.mu.Lock()
	if err := w.setPeers(a); err != nil {
		m.Close()
		b.Close()
		w.setState("failed")
		w.mu.Unlock()
		return status.Errorf(codes.InvalidArgument, "assignment: %v", err)
	}
	w.backend, w.exec, w.modelDir, w.version, w.quantize, w.compute = b, shard.NewExecutor(m), dir, a.Version, a.Quantize, compute
	w.tables, w.expVersion = nil, a.ExpertsVersion
	w.setState("loaded")
	p := w.progress("ready")
	w.mu.Unlock()
	return stream.Send(p)
}

// backendKind is "cpu" or "cuda" for a --device value.
func backendKind(device string) string {
	if k, _, err := parseDevice(device); err == nil {
		return k
	}
	return "cpu"
}

// newBackend makes the kernels backend of the worker's device.
func (w *WorkerService) newBackend(mmap bool, quantize, compute string) (gpuBackend, error) {
	kind, ordinal, err := parseDevice(w.opts.Device)
	if err != nil {
		return nil, err
	}
	if kind == "cpu" {
		return cpu.New(cpu.Config{Threads: w.opts.Threads, Kernels: w.opts.Kernels, BatchInvariant: true, PackWeights: !mmap, Quantize: quantize, Compute: compute})
	}
	if quantize != "" {
		return nil, fmt.Errorf("quantize %q is for the CPU backend; this worker is %s", quantize, w.opts.Device)
	}
	if openCUDA == nil {
		_, _, err := probeDevice(kind, ordinal)
		return nil, err
	}
	return openCUDA(ordinal)
}

// setPeers connects to the assignment's peers; w.mu is held.
func (w *WorkerService) setPeers(a *workerv1.Assignment) error {
	if w.peers != nil {
		w.peers.close()
		w.peers = nil
	}
	w.assign = a
	w.box.keepOnly(a.Version)
	w.box.setLimit(mailLimits(int(a.PpSize), 0, 0, w.opts.Peer)) // sized again by Warmup
	if a.TpSize <= 1 && a.EpSize <= 1 && a.NextStage == "" && a.Stage == 0 {
		return nil
	}
	p, err := dialPeers(a, w.opts.Peer)
	if err != nil {
		return err
	}
	w.peers = p
	return nil
}

// sameSlice says whether m holds the layers, heads and vocabulary of sh
// (its experts aside).
func sameSlice(m *model.Model, sh model.Shard) bool {
	n, err := sh.Normalize(m.Config())
	if err != nil {
		return false
	}
	have := m.Shard()
	n.Experts, have.Experts = nil, nil
	return n == have
}

// switchExperts makes t the placement of the loaded expert-parallel model:
// it reads the experts t adds and frees those it removes.
func (w *WorkerService) switchExperts(dir string, t *expertparallel.Table) error {
	if _, err := loadExperts(w.exec, dir, t); err != nil {
		return err
	}
	w.exec.DropExperts(t)
	return nil
}

func (w *WorkerService) progress(stage string) *workerv1.LoadProgress {
	cfg := w.exec.Model().Config()
	n := w.exec.Model().WeightBytes()
	return &workerv1.LoadProgress{BytesLoaded: n, BytesTotal: n, Stage: stage, ModelType: cfg.ModelType,
		VocabSize: int32(cfg.VocabSize), MaxContext: int32(min(cfg.MaxContext(), math.MaxInt32))}
}

// Warmup sizes the KV pool and runs one step.
func (w *WorkerService) Warmup(ctx context.Context, req *workerv1.WarmupRequest) (*workerv1.WarmupResponse, error) {
	if err := w.authorize(ctx, "Warmup", true); err != nil {
		return nil, err
	}
	w.life.Lock()
	defer w.life.Unlock()
	w.mu.Lock()
	exec := w.exec
	w.mu.Unlock()
	if exec == nil {
		return nil, status.Error(codes.FailedPrecondition, "no model loaded")
	}
	bs := int(req.BlockSize)
	if bs <= 0 || bs > 1024 {
		return nil, status.Errorf(codes.InvalidArgument, "block_size: %d is outside [1, 1024]", bs)
	}
	per := exec.BytesPerBlock(bs)
	if req.MaxStepTokens < 0 {
		return nil, status.Errorf(codes.InvalidArgument, "max_step_tokens: %d is negative", req.MaxStepTokens)
	}
	// What is asked must fit the worker's memory (when it knows it).
	if mem := w.opts.MemoryBytes; mem > 0 {
		if req.KvCacheBytes > mem {
			return nil, status.Errorf(codes.InvalidArgument, "kv_cache_bytes: %d is more than this worker's memory (%d bytes)", req.KvCacheBytes, mem)
		}
		if req.NumBlocks > mem/per {
			return nil, status.Errorf(codes.InvalidArgument, "num_blocks: %d blocks of %d bytes are more than this worker's memory (%d bytes)", req.NumBlocks, per, mem)
		}
	}
	n := req.NumBlocks
	if n <= 0 {
		budget := req.KvCacheBytes
		if budget <= 0 {
			budget = w.opts.KVCacheBytes
		}
		n = budget / per
	}
	// No more blocks than the context needs 64 sequences to hold, and a
	// hard cap against absurd requests.
	ctxBlocks := int64((exec.Model().Config().MaxContext() + bs - 1) / bs)
	n = min(n, 64*ctxBlocks, 1<<22)
	if n < 1 {
		return nil, status.Errorf(codes.ResourceExhausted, "KV budget too small for one block of %d bytes", per)
	}
	t0 := time.Now()
	if err := exec.Warmup(int(n), bs, int(max(req.MaxBatchTokens, 1))); err != nil {
		return nil, status.Errorf(codes.Internal, "warmup: %v", err)
	}
	w.mu.Lock()
	w.blockSize = bs
	// Steps carry at most what the pool holds, and the coordinator's batch
	// budget when it says it; step ids count from 1 again (the executor's
	// order starts over).
	w.poolBlocks, w.steps = n, stepWindow{}
	w.stepTokens = int(min(n*int64(bs), math.MaxInt32))
	if m := int(req.MaxStepTokens); m > 0 {
		w.stepTokens = min(w.stepTokens, m)
	}
	if w.assign != nil {
		w.box.setLimit(mailLimits(int(w.assign.PpSize), w.stepTokens, exec.Model().Config().HiddenSize, w.opts.Peer))
	}
	w.setState("ready")
	w.mu.Unlock()
	return &workerv1.WarmupResponse{NumBlocks: n, BlockSize: int32(bs), BytesPerBlock: per,
		WarmupMs: float64(time.Since(t0).Microseconds()) / 1000}, nil
}

// Step runs one forward step.
func (w *WorkerService) Step(ctx context.Context, req *workerv1.StepRequest) (*workerv1.StepResponse, error) {
	t0 := time.Now()
	if err := w.authorize(ctx, "Step", true); err != nil {
		return nil, err
	}
	w.life.RLock()
	defer w.life.RUnlock()
	w.mu.Lock()
	exec, version, prs := w.exec, w.version, w.peers
	if exec != nil && (req.AssignmentVersion == 0 || req.AssignmentVersion == version) {
		if err := w.admitStep(req); err != nil {
			w.mu.Unlock()
			return nil, err
		}
	}
	var em model.ExpertMap
	var newTable *expertparallel.Table
	if v := req.ExpertsVersion; v != 0 && v != w.expVersion {
		if newTable = w.tables[v]; newTable == nil {
			cur := w.expVersion
			w.mu.Unlock()
			return nil, status.Errorf(codes.FailedPrecondition, "experts_version: %d is not loaded here (%d is)", v, cur)
		}
		em = newTable
	}
	w.mu.Unlock()
	if exec == nil {
		return nil, status.Error(codes.FailedPrecondition, "no model loaded")
	}
	if req.AssignmentVersion != 0 && req.AssignmentVersion < version {
		// A newer placement took this worker (ABORTED: the one proof a
		// coordinator gets that another leader acts, when etcd is away).
		return nil, status.Errorf(codes.Aborted, "assignment_version: %d is superseded: this worker holds %d", req.AssignmentVersion, version)
	}
	if req.AssignmentVersion != 0 && req.AssignmentVersion != version {
		return nil, status.Errorf(codes.FailedPrecondition, "assignment_version: %d, this worker holds %d", req.AssignmentVersion, version)
	}
	b := &steps.Batch{ID: req.StepId, Seqs: make([]steps.Seq, len(req.Seqs))}
	for _, c := range req.Copies {
		b.Copies = append(b.Copies, steps.BlockCopy{Src: c.Src, Dst: c.Dst})
	}
	tokens := 0
	for i, s := range req.Seqs {
		b.Seqs[i] = steps.Seq{ID: s.SeqId, Tokens: s.Tokens, Start: int(s.Start), Blocks: s.BlockTable,
			Sample: s.Sample, TopN: int(s.TopN), FullRow: s.FullRow, PromptTargets: s.PromptTargets, WantLogSumExp: s.WantLogsumexp}
		tokens += len(s.Tokens)
	}
	var link *stepLink
	var sl shard.Link
	if prs != nil {
		link = &stepLink{ctx: ctx, box: &w.box, p: prs, version: version, step: req.StepId, m: w.metrics}
		sl = link
		if prs.ep > 1 {
			sl = &stageLink{stepLink: link, st: &expertparallel.Stage{Exchanger: link, Rank: prs.rank, Size: prs.ep}}
		}
	}
	res, err := exec.Step(ctx, b, sl, em)
	if err == nil && newTable != nil {
		w.switchedTo(exec, req.ExpertsVersion, newTable)
	}
	if err == nil {
		w.metrics.Steps.Inc()
		w.metrics.Tokens.Add(float64(tokens))
		w.metrics.StepDuration.Observe(time.Since(t0).Seconds())
		w.metrics.Forward.Observe(res.Forward.Seconds())
	}
	if log := w.opts.Logger; log.Enabled(ctx, slog.LevelDebug) {
		ids := make([]string, len(req.Seqs))
		for i, s := range req.Seqs {
			ids[i] = s.RequestId
		}
		log.Debug("step", "step_id", req.StepId, "seqs", len(req.Seqs), "tokens", tokens, "ms", ms(time.Since(t0)),
			"request_ids", ids, "err", err)
	}
	switch {
	case errors.Is(err, model.ErrBadBatch):
		return nil, status.Error(codes.InvalidArgument, err.Error())
	case errors.Is(err, shard.ErrNotReady), errors.Is(err, shard.ErrMissingKV):
		return nil, status.Error(codes.FailedPrecondition, err.Error())
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return nil, status.FromContextError(err).Err()
	case err != nil:
		return nil, status.Errorf(codes.Internal, "step: %v", err)
	}
	out := &workerv1.StepResponse{StepId: req.StepId, Results: make([]*workerv1.SeqResult, len(res.Seqs)), Tokens: int32(tokens),
		ForwardMs: float64(res.Forward.Microseconds()) / 1000}
	if link != nil {
		out.CommMs = float64(link.commTime.Microseconds()) / 1000
		out.WaitMs = float64(link.waitTime.Microseconds()) / 1000
		out.SentBytes = link.sent
	}
	for i, r := range res.Seqs {
		pr := &workerv1.SeqResult{SeqId: req.Seqs[i].SeqId, Logsumexp: r.LogSumExp, Row: r.Row, PromptLogprobs: r.PromptLogprobs,
			Candidates: make([]*workerv1.Candidate, len(r.Candidates)), PromptLse: r.PromptLSE,
			VocabBegin: int32(r.VocabBegin), VocabEnd: int32(r.VocabEnd)}
		for j, c := range r.Candidates {
			pr.Candidates[j] = &workerv1.Candidate{Id: c.ID, Logit: c.Logit}
		}
		out.Results[i] = pr
	}
	out.TotalMs = float64(time.Since(t0).Microseconds()) / 1000
	return out, nil
}

// Exchange takes the messages another worker of the replica streams to
// this one. Messages of another generation (a step of a replica this
// worker no longer serves in) are dropped.
func (w *WorkerService) Exchange(stream workerv1.Worker_ExchangeServer) error {
	authGen := int64(-1) // the generation whose secret the stream presents (-1: none checked)
	if w.opts.Auth != nil {
		var err error
		if authGen, err = w.authorizePeer(stream.Context()); err != nil {
			return err
		}
	}
	for {
		req, err := stream.Recv()
		if err == io.EOF {
			return stream.SendAndClose(&workerv1.ExchangeResponse{})
		}
		if err != nil {
			return err
		}
		if req.Kind != kindAllReduce && req.Kind != kindHidden && req.Kind != kindAllToAll {
			return status.Errorf(codes.InvalidArgument, "kind: %d is not 0 (all-reduce), 1 (hidden states) or 2 (all-to-all)", req.Kind)
		}
		if len(req.Data)%4 != 0 {
			return status.Errorf(codes.InvalidArgument, "data: %d bytes is not whole float32s", len(req.Data))
		}
		w.mu.Lock()
		version, a := w.version, w.assign
		w.mu.Unlock()
		if req.Version != version || authGen >= 0 && req.Version != authGen {
			continue
		}
		if a != nil && a.Version == version {
			if err := checkFromRank(a, req); err != nil {
				return err
			}
		}
		if err := w.box.put(mailKey{req.Version, req.StepId, req.Kind, req.Index, req.FromRank}, req.Data); err != nil {
			if errors.Is(err, errMailFull) {
				return status.Error(codes.ResourceExhausted, err.Error())
			}
			return status.Error(codes.AlreadyExists, err.Error())
		}
	}
}

// loadExperts has exec read, from the checkpoint in dir, the experts t
// places on it that it does not hold; it returns how many.
func loadExperts(exec *shard.Executor, dir string, t *expertparallel.Table) (int, error) {
	ck, err := safetensors.Open(dir, safetensors.Options{})
	if err != nil {
		return 0, err
	}
	defer ck.Close()
	return exec.LoadExperts(model.Checkpoint{Checkpoint: ck}, t)
}

// switchedTo records that a step ran on expert placement v: steps run in
// id order and later ones name v or a newer one, so the experts only older
// placements held can go (those of placements loaded for later switches
// stay). The experts are freed without w.mu held: a step in flight holds
// the executor while it waits for messages that Exchange delivers under
// w.mu.
func (w *WorkerService) switchedTo(exec *shard.Executor, v int64, t *expertparallel.Table) {
	w.mu.Lock()
	if v <= w.expVersion {
		w.mu.Unlock()
		return
	}
	w.expVersion = v
	var later []model.ExpertMap
	for u, pt := range w.tables {
		switch {
		case u <= v:
			delete(w.tables, u)
		default:
			later = append(later, pt)
		}
	}
	w.mu.Unlock()
	n := exec.DropExperts(t, later...)
	w.opts.Logger.Info("expert placement switched", "experts_version", v, "dropped", n,
		"weight_bytes", exec.Model().WeightBytes())
}

// SetExperts loads a new expert placement next to the one in use; the
// first step that names its version switches to it.
func (w *WorkerService) SetExperts(ctx context.Context, req *workerv1.SetExpertsRequest) (*workerv1.SetExpertsResponse, error) {
	if err := w.authorize(ctx, "SetExperts", true); err != nil {
		return nil, err
	}
	w.life.RLock()
	defer w.life.RUnlock()
	w.mu.Lock()
	exec, a, dir, cur := w.exec, w.assign, w.modelDir, w.expVersion
	w.mu.Unlock()
	switch {
	case exec == nil || a == nil:
		return nil, status.Error(codes.FailedPrecondition, "no model loaded")
	case a.EpSize <= 1:
		return nil, status.Error(codes.FailedPrecondition, "this worker's assignment has no expert parallelism")
	case req.AssignmentVersion != a.Version:
		return nil, status.Errorf(codes.FailedPrecondition, "assignment_version: %d, this worker holds %d", req.AssignmentVersion, a.Version)
	case req.ExpertsVersion <= cur:
		return nil, status.Errorf(codes.InvalidArgument, "experts_version: %d is not newer than %d", req.ExpertsVersion, cur)
	case req.Cancel:
		w.mu.Lock()
		delete(w.tables, req.ExpertsVersion)
		keep := []model.ExpertMap{}
		for _, pt := range w.tables {
			keep = append(keep, pt)
		}
		w.mu.Unlock()
		n := exec.DropExperts(nil, keep...) // nil: the placement in use
		w.opts.Logger.Info("expert placement cancelled", "experts_version", req.ExpertsVersion, "dropped", n)
		return &workerv1.SetExpertsResponse{WeightBytes: exec.Model().WeightBytes()}, nil
	}
	cfg := exec.Model().Config()
	t, err := expertparallel.FromFlat(req.Experts)
	if err == nil {
		err = t.Validate(cfg.NumHiddenLayers, cfg.NumExperts)
	}
	if err == nil && t.Ranks != int(a.EpSize) {
		err = fmt.Errorf("%d ranks for ep_size %d", t.Ranks, a.EpSize)
	}
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "experts: %v", err)
	}
	t0 := time.Now()
	n, err := loadExperts(exec, dir, t)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "load experts: %v", err)
	}
	w.mu.Lock()
	if w.tables == nil {
		w.tables = map[int64]*expertparallel.Table{}
	}
	w.tables[req.ExpertsVersion] = t
	w.mu.Unlock()
	w.opts.Logger.Info("experts loaded", "experts_version", req.ExpertsVersion, "experts", n, "ms", ms(time.Since(t0)))
	return &workerv1.SetExpertsResponse{Loaded: int32(n), WeightBytes: exec.Model().WeightBytes(),
		LoadMs: float64(time.Since(t0).Microseconds()) / 1000}, nil
}

// ExpertLoad returns the routed-token counts of this worker's layers.
func (w *WorkerService) ExpertLoad(ctx context.Context, _ *workerv1.ExpertLoadRequest) (*workerv1.ExpertLoadResponse, error) {
	if err := w.authorize(ctx, "ExpertLoad", false); err != nil {
		return nil, err
	}
	w.mu.Lock()
	exec, cur := w.exec, w.expVersion
	w.mu.Unlock()
	if exec == nil {
		return nil, status.Error(codes.FailedPrecondition, "no model loaded")
	}
	m := exec.Model()
	out := &workerv1.ExpertLoadResponse{LayersBegin: int32(m.Shard().LayersBegin), Layers: int32(m.NumLayers()),
		Experts: int32(m.Config().NumExperts), ExpertsVersion: cur}
	for _, row := range m.ExpertLoad() {
		out.Counts = append(out.Counts, row...)
	}
	return out, nil
}

// Release forgets finished sequences: a later Step for one must start at
// position 0.
func (w *WorkerService) Release(ctx context.Context, req *workerv1.ReleaseRequest) (*workerv1.ReleaseResponse, error) {
	if err := w.authorize(ctx, "Release", true); err != nil {
		return nil, err
	}
	w.mu.Lock()
	exec := w.exec
	w.mu.Unlock()
	if exec == nil {
		return nil, status.Error(codes.FailedPrecondition, "no model loaded")
	}
	exec.Release(req.SeqIds)
	return &workerv1.ReleaseResponse{}, nil
}

// Drain has the worker show, in etcd, that it drains (its coordinator then
// drains the replica it serves in).
func (w *WorkerService) Drain(ctx context.Context, req *workerv1.DrainRequest) (*workerv1.DrainResponse, error) {
	if err := w.authorize(ctx, "Drain", true); err != nil {
		return nil, err
	}
	if w.opts.OnDrain == nil {
		return nil, status.Error(codes.Unimplemented, "this worker cannot drain (it has no etcd registration)")
	}
	t := req.TimeoutSeconds
	if math.IsNaN(t) || t < 0 || t > 7*24*3600 {
		return nil, status.Errorf(codes.InvalidArgument, "timeout_seconds: %v is outside [0, 604800]", t)
	}
	w.opts.OnDrain(time.Duration(t * float64(time.Second)))
	return &workerv1.DrainResponse{}, nil
}

// Leave ends a drained worker: after answering, it leaves etcd and exits.
func (w *WorkerService) Leave(ctx context.Context, _ *workerv1.LeaveRequest) (*workerv1.LeaveResponse, error) {
	if err := w.authorize(ctx, "Leave", true); err != nil {
		return nil, err
	}
	if w.opts.OnLeave == nil {
		return nil, status.Error(codes.Unimplemented, "this worker cannot leave (it has no etcd registration)")
	}
	w.opts.OnLeave()
	return &workerv1.LeaveResponse{}, nil
}

// Health reports whether the worker can run steps; it takes no lock.
func (w *WorkerService) Health(ctx context.Context, _ *workerv1.HealthRequest) (*workerv1.HealthResponse, error) {
	if err := w.authorize(ctx, "Health", false); err != nil {
		return nil, err
	}
	state := *w.state.Load()
	return &workerv1.HealthResponse{Ready: state == "ready", State: state}, nil
}

// workerCollector reads a worker's state at scrape time: its KV pool, its
// assignment, and per-expert token counts of a MoE model.
type workerCollector struct {
	w                       *WorkerService
	blocks, info, expertTok *prometheus.Desc
}

func newWorkerCollector(w *WorkerService) *workerCollector {
	l := prometheus.Labels{"worker": w.opts.ID}
	return &workerCollector{w: w,
		blocks: prometheus.NewDesc(metrics.Prefix+"worker_kv_cache_blocks", "The worker's KV pool, in blocks.", nil, l),
		info: prometheus.NewDesc(metrics.Prefix+"worker_assignment", "1, labelled with what the worker holds.",
			[]string{"model", "stage", "layers", "tp_rank", "tp_size", "state"}, l),
		expertTok: prometheus.NewDesc(metrics.Prefix+"expert_tokens_total", "Token rows routed to each expert (summed over the worker's layers).",
			[]string{"expert"}, l),
	}
}

func (c *workerCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.blocks
	ch <- c.info
	ch <- c.expertTok
}

func (c *workerCollector) Collect(ch chan<- prometheus.Metric) {
	w := c.w
	w.mu.Lock()
	exec, a, state, dir := w.exec, w.assign, *w.state.Load(), w.modelDir
	w.mu.Unlock()
	if exec == nil {
		ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, "", "", "", "", "", state)
		return
	}
	sh := exec.Model().Shard()
	stage, tpSize := "0", "1"
	if a != nil {
		stage, tpSize = strconv.Itoa(int(a.Stage)), strconv.Itoa(max(int(a.TpSize), 1))
	}
	ch <- prometheus.MustNewConstMetric(c.info, prometheus.GaugeValue, 1, filepath.Base(dir), stage,
		fmt.Sprintf("%d-%d", sh.LayersBegin, sh.LayersEnd), strconv.Itoa(sh.TPRank), tpSize, state)
	ch <- prometheus.MustNewConstMetric(c.blocks, prometheus.GaugeValue, float64(exec.NumBlocks()))
	for e, n := range exec.Model().ExpertTokens() {
		ch <- prometheus.MustNewConstMetric(c.expertTok, prometheus.CounterValue, float64(n), strconv.Itoa(e))
	}
}

// computeName is how a backend multiplies bf16 weights, for logs: "bf16"
// (bf16-rounded activations) or "f32".
func computeName(b any) string {
	if c, ok := b.(interface{ ComputesBF16() bool }); ok && c.ComputesBF16() {
		return "bf16"
	}
	return "f32"
}
