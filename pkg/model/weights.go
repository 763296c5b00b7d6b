package model

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// WeightSource provides checkpoint tensors by HuggingFace name. A
// safetensors checkpoint is one; RandomWeights is another.
type WeightSource interface {
	// Lookup returns a tensor's dtype and shape; ok is false when absent.
	Lookup(name string) (dt kernels.DType, shape []int, ok bool)
	// Read returns the tensor's raw little-endian bytes. The caller may keep
	// them (and hand them to a backend that keeps them).
	Read(name string) ([]byte, error)
}

// ErrMissingTensor is wrapped by load errors for an absent tensor.
var ErrMissingTensor = errors.New("tensor missing from checkpoint")

// Checkpoint adapts a safetensors checkpoint to WeightSource.
type Checkpoint struct{ *safetensors.Checkpoint }

// Lookup implements WeightSource.
func (c Checkpoint) Lookup(name string) (kernels.DType, []int, bool) {
	info, ok := c.Info(name)
	if !ok {
		return 0, nil, false
	}
	return info.DType, info.Shape, true
}

// Names of the checkpoint tensors (qwen2.md section 3.2).
const (
	EmbedName = "model.embed_tokens.weight"
	NormName  = "model.norm.weight"
	LMHead    = "lm_head.weight"
)

// LayerName is "model.layers.<l>.<suffix>".
func LayerName(l int, suffix string) string { return fmt.Sprintf("model.layers.%d.%s", l, suffix) }

// ExpertName is "model.layers.<l>.mlp.experts.<e>.<proj>.weight".
func ExpertName(l, e int, proj string) string {
	return fmt.Sprintf("model.layers.%d.mlp.experts.%d.%s.weight", l, e, proj)
}

// Shapes lists every tensor a checkpoint of cfg holds, in HF order, with its
// shape. It is what a loader requires and what RandomWeights generates.
func Shapes(cfg *Config) []TensorShape {
	H, V, hd := cfg.HiddenSize, cfg.VocabSize, cfg.headDim()
	q, kv := cfg.NumAttentionHeads*hd, cfg.NumKeyValueHeads*hd
	out := []TensorShape{{EmbedName, []int{V, H}}}
	for l := 0; l < cfg.NumHiddenLayers; l++ {
		n := func(s string) string { return LayerName(l, s) }
		out = append(out,
			TensorShape{n("input_layernorm.weight"), []int{H}},
			TensorShape{n("self_attn.q_proj.weight"), []int{q, H}},
			TensorShape{n("self_attn.q_proj.bias"), []int{q}},
			TensorShape{n("self_attn.k_proj.weight"), []int{kv, H}},
			TensorShape{n("self_attn.k_proj.bias"), []int{kv}},
			TensorShape{n("self_attn.v_proj.weight"), []int{kv, H}},
			TensorShape{n("self_attn.v_proj.bias"), []int{kv}},
			TensorShape{n("self_attn.o_proj.weight"), []int{H, q}},
			TensorShape{n("post_attention_layernorm.weight"), []int{H}},
		)
		if !cfg.IsMoELayer(l) {
			I := cfg.IntermediateSize
			out = append(out,
				TensorShape{n("mlp.gate_proj.weight"), []int{I, H}},
				TensorShape{n("mlp.up_proj.weight"), []int{I, H}},
				TensorShape{n("mlp.down_proj.weight"), []int{H, I}},
			)
			continue
		}
		Im := cfg.MoeIntermediateSize
		out = append(out, TensorShape{n("mlp.gate.weight"), []int{cfg.NumExperts, H}})
		for e := 0; e < cfg.NumExperts; e++ {
			out = append(out,
				TensorShape{ExpertName(l, e, "gate_proj"), []int{Im, H}},
				TensorShape{ExpertName(l, e, "up_proj"), []int{Im, H}},
				TensorShape{ExpertName(l, e, "down_proj"), []int{H, Im}},
			)
		}
		if Is := cfg.SharedExpertIntermediateSize; Is > 0 {
			out = append(out,
				TensorShape{n("mlp.shared_expert.gate_proj.weight"), []int{Is, H}},
				TensorShape{n("mlp.shared_expert.up_proj.weight"), []int{Is, H}},
				TensorShape{n("mlp.shared_expert.down_proj.weight"), []int{H, Is}},
				TensorShape{n("mlp.shared_expert_gate.weight"), []int{1, H}},
			)
		}
	}
	out = append(out, TensorShape{NormName, []int{H}})
	if !cfg.TieWordEmbeddings {
		out = append(out, TensorShape{LMHead, []int{V, H}})
	}
	return out
}

// NumParams is the number of parameters of a checkpoint of cfg (tied
// models count the embedding once).
func NumParams(cfg *Config) int64 {
	var n int64
	for _, s := range Shapes(cfg) {
		p := int64(1)
		for _, d := range s.Shape {
			p *= int64(d)
		}
		n += p
	}
	return n
}

// TensorShape is a tensor name and its shape.
type TensorShape struct {
	Name  string
	Shape []int
}

// loader reads tensors from a source into a backend, checking shapes.
type loader struct {
	src WeightSource
	b   kernels.Backend
}

// SliceSource is a WeightSource that can read part of a tensor, so that a
// shard reads only its own bytes (a safetensors Checkpoint can).
type SliceSource interface {
	// ReadRows returns rows [r0, r1) of a tensor (elements of a 1-D one).
	ReadRows(name string, r0, r1 int) ([]byte, error)
	// ReadCols returns columns [c0, c1) of a 2-D tensor, packed row-major.
	ReadCols(name string, c0, c1 int) ([]byte, error)
}

// load reads tensor name, whose checkpoint shape must be shape: whole when
// dim < 0, else the span sp of dimension dim (0 rows, 1 columns).
func (ld *loader) load(name string, shape []int, dim int, sp span, precise bool) (kernels.Tensor, error) {
	dt, got, ok := ld.src.Lookup(name)
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrMissingTensor, name)
	}
	if dt == 0 {
		return nil, fmt.Errorf("tensor %q: unsupported dtype", name)
	}
	if !slices.Equal(got, shape) {
		return nil, fmt.Errorf("tensor %q: shape %v, config says %v", name, got, shape)
	}
	if dim >= 0 && sp.begin == 0 && sp.end == shape[dim] {
		dim = -1 // the slice is the whole tensor
	}
	var data []byte
	var err error
	out := slices.Clone(shape)
	switch {
	case dim < 0:
		data, err = ld.src.Read(name)
	default:
		out[dim] = sp.end - sp.begin
		data, err = ld.slice(name, dt, shape, dim, sp)
	}
	if err != nil {
		return nil, err
	}
	weight := ld.b.Weight
	if pw, ok := ld.b.(kernels.PreciseWeights); ok && precise {
		weight = pw.WeightPrecise
	}
	t, err := weight(dt, out, data)
	if err != nil {
		return nil, fmt.Errorf("tensor %q: %w", name, err)
	}
	return t, nil
}

func (ld *loader) slice(name string, dt kernels.DType, shape []int, dim int, sp span) ([]byte, error) {
	if ss, ok := ld.src.(SliceSource); ok {
		if dim == 0 {
			return ss.ReadRows(name, sp.begin, sp.end)
		}
		return ss.ReadCols(name, sp.begin, sp.end)
	}
	all, err := ld.src.Read(name)
	if err != nil {
		return nil, err
	}
	es := dt.Size()
	rowLen := es // bytes of one row of dimension 0
	for _, d := range shape[1:] {
		rowLen *= d
	}
	if dim == 0 {
		return all[sp.begin*rowLen : sp.end*rowLen], nil
	}
	w := (sp.end - sp.begin) * es
	out := make([]byte, 0, shape[0]*w)
	for r := 0; r < shape[0]; r++ {
		out = append(out, all[r*rowLen+sp.begin*es:r*rowLen+sp.end*es]...)
	}
	return out, nil
}

// LoadOptions configures Load.
type LoadOptions struct {
	// Mmap maps the safetensors files and hands the backend views of the
	// mapping instead of reading copies into memory. On the machines
	// measured, decoding from copies was faster (see README), so the
	// default is false.
	Mmap bool
	// Shard is the part of the model to load (zero: all of it).
	Shard Shard
}

// Load reads dir/config.json and the safetensors weights in dir (one file or
// shards with an index) onto backend b.
func Load(dir string, b kernels.Backend, opts LoadOptions) (*Model, error) {
	cfg, err := LoadConfig(filepath.Join(dir, "config.json"))
	if err != nil {
		return nil, err
	}
	ck, err := safetensors.Open(dir, safetensors.Options{Mmap: opts.Mmap})
	if err != nil {
		return nil, err
	}
	m, err := NewShard(cfg, b, Checkpoint{ck}, opts.Shard)
	if err != nil {
		ck.Close()
		return nil, fmt.Errorf("%s: %w", dir, err)
	}
	if opts.Mmap {
		m.closer = ck.Close // the weights are views of the mapping
	} else {
		ck.Close()
	}
	return m, nil
}
