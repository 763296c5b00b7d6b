package placement

import (
	"errors"
	"fmt"
	"math"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/model"
)

// Worker is one device the planner may use: a GPU, or a whole machine for
// the CPU backend.
type Worker struct {
	ID   string `json:"id"`   // unique, non-empty
	Host string `json:"host"` // machine name; workers with "" share one unnamed host
	Addr string `json:"addr"` // passed through to the plan, never interpreted
	// MemoryBytes is the device memory (GPU) or RAM (CPU); must be > 0.
	MemoryBytes int64 `json:"memory_bytes"`
	// Backend is the kernel backend, "cpu" or "cuda". One replica never
	// mixes backends.
	Backend string `json:"backend"`
}

// Options tunes the planner. The zero value asks for every default.
type Options struct {
	// Model labels the plan and its messages ("qwen2-72b"); "" reads "the model".
	Model string
	// TP and PP force the tensor- and pipeline-parallel degrees; 0 lets the
	// planner choose. A forced degree that is invalid or does not fit is an
	// error, never silently changed.
	TP, PP int
	// EP forces expert parallelism for a qwen2_moe model: each stage has EP
	// ranks holding whole routed experts (⌈E/EP⌉ each), the shared expert,
	// dense MLPs and the vocabulary sliced EP ways, and the attention split
	// over groups of TP consecutive ranks (TP divides EP; TP 0 = the
	// largest valid degree dividing EP). 1 = no expert parallelism (experts
	// tensor-sliced over the TP ranks). 0 lets the planner choose: for a
	// MoE model with TP also 0, a stage of g > 1 workers is EP=g. Like TP
	// and PP, a forced EP that is invalid or does not fit is an error.
	EP int
	// RedundantExperts is the extra routed-expert slots every rank of an
	// expert-parallel stage holds per MoE layer, for the expert load
	// balancer to replicate hot experts into (pkg/expertparallel); they are
	// counted in the rank's weights. 0 = none. Needs expert parallelism: it
	// is an error when EP is forced to 1, TP is forced without EP, or the
	// model has no experts; a plan without EP (one worker per replica)
	// ignores it.
	RedundantExperts int
	// KVCacheTokens is the KV cache every replica must hold, in tokens
	// (summed over its sequences). 0 = the model's max context
	// (cfg.MaxContext()), like vLLM refusing to start when max_model_len
	// does not fit. More tokens, more concurrent long sequences, fewer
	// replicas.
	KVCacheTokens int
	// MaxBatchTokens sizes the activation estimate: tokens in one step
	// (prefill chunk plus decode rows). 0 = 8192.
	MaxBatchTokens int
	// MaxBatchSeqs sizes the logits buffer of the last stage: rows sampled
	// in one step. 0 = 256 (vLLM's max_num_seqs).
	MaxBatchSeqs int
	// Utilization is the usable fraction of a worker's memory, in (0, 1];
	// the rest is left for the runtime, fragmentation and other processes.
	// 0 = 0.9 (vLLM's gpu_memory_utilization).
	Utilization float64
	// WeightBytesPerParam is the stored size of one weight. 0 = from
	// cfg.TorchDtype: 2 for bfloat16/float16 (and when absent), 4 for
	// float32. Set 1 for an int8-quantized model.
	WeightBytesPerParam int
	// KVBytesPerValue is the stored size of one K or V value. 0 = 2 (bf16,
	// as on GPUs); the CPU backend stores float32 (4).
	KVBytesPerValue int
}

// Defaults of Options.
const (
	DefaultMaxBatchTokens = 8192
	DefaultMaxBatchSeqs   = 256
	DefaultUtilization    = 0.9
)

// Validate fills in the model-independent defaults and rejects values no
// model could use. New calls it on a copy.
func (o *Options) Validate() error {
	for _, f := range []struct {
		name string
		v    int
	}{{"TP", o.TP}, {"PP", o.PP}, {"EP", o.EP}, {"RedundantExperts", o.RedundantExperts}, {"KVCacheTokens", o.KVCacheTokens}, {"MaxBatchTokens", o.MaxBatchTokens},
		{"MaxBatchSeqs", o.MaxBatchSeqs}, {"WeightBytesPerParam", o.WeightBytesPerParam}, {"KVBytesPerValue", o.KVBytesPerValue}} {
		if f.v < 0 {
			return invalidf("%s must be >= 0 (0 = default), got %d", f.name, f.v)
		}
	}
	if math.IsNaN(o.Utilization) || o.Utilization < 0 || o.Utilization > 1 {
		return invalidf("Utilization must be in (0, 1] (0 = %v), got %v", DefaultUtilization, o.Utilization)
	}
	if o.MaxBatchTokens == 0 {
		o.MaxBatchTokens = DefaultMaxBatchTokens
	}
	if o.MaxBatchSeqs == 0 {
		o.MaxBatchSeqs = DefaultMaxBatchSeqs
	}
	if o.Utilization == 0 {
		o.Utilization = DefaultUtilization
	}
	if o.KVBytesPerValue == 0 {
		o.KVBytesPerValue = kvBytesPerElem
	}
	return nil
}

// fillFromModel sets the defaults that depend on cfg.
func (o *Options) fillFromModel(cfg *model.Config) error {
	if o.KVCacheTokens == 0 {
		o.KVCacheTokens = cfg.MaxContext()
	}
	if o.WeightBytesPerParam == 0 {
		switch strings.ToLower(cfg.TorchDtype) {
		case "bfloat16", "float16", "":
			o.WeightBytesPerParam = 2
		case "float32":
			o.WeightBytesPerParam = 4
		default:
			return invalidf("torch_dtype %q: set WeightBytesPerParam", cfg.TorchDtype)
		}
	}
	return nil
}

// Errors callers may branch on with errors.Is. The messages of the
// returned errors are whole sentences and do not repeat these.
var (
	// ErrNoWorkers: no worker was given.
	ErrNoWorkers = errors.New("placement: no workers")
	// ErrInvalid: a bad worker, option or forced TP/PP/EP degree.
	ErrInvalid = errors.New("placement: invalid request")
	// ErrNoFit: the model (with its KV cache) does not fit the workers.
	ErrNoFit = errors.New("placement: model does not fit")
)

// planError reads as its message alone and matches its kind with errors.Is.
type planError struct {
	kind error
	msg  string
}

func (e *planError) Error() string { return e.msg }
func (e *planError) Unwrap() error { return e.kind }

func invalidf(format string, args ...any) error {
	return &planError{ErrInvalid, fmt.Sprintf(format, args...)}
}
