package model

import (
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"io"
	"math"
	"math/rand/v2"
	"strings"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// RandomWeights is a WeightSource of deterministic random weights for cfg:
// norm weights are 1, every other tensor is uniform with the standard
// deviation of initializer_range (0.02 when unset), like HF's init. Each
// tensor depends only on the seed and its name, so a tensor reads the same
// whatever else is read, and a checkpoint can be streamed tensor by tensor in
// bounded memory.
type RandomWeights struct {
	dt     kernels.DType
	seed   uint64
	std    float64
	shapes map[string][]int
	order  []TensorShape
}

// NewRandomWeights makes random weights of dtype dt for cfg.
func NewRandomWeights(cfg *Config, dt kernels.DType, seed uint64) *RandomWeights {
	r := &RandomWeights{dt: dt, seed: seed, std: cfg.InitializerRange, shapes: map[string][]int{}, order: Shapes(cfg)}
	if r.std <= 0 {
		r.std = 0.02
	}
	for _, s := range r.order {
		r.shapes[s.Name] = s.Shape
	}
	return r
}

// Tensors lists the tensors in checkpoint order.
func (r *RandomWeights) Tensors() []TensorShape { return r.order }

// Lookup implements WeightSource.
func (r *RandomWeights) Lookup(name string) (kernels.DType, []int, bool) {
	s, ok := r.shapes[name]
	return r.dt, s, ok
}

// Read implements WeightSource.
func (r *RandomWeights) Read(name string) ([]byte, error) {
	s, ok := r.shapes[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrMissingTensor, name)
	}
	buf := make([]byte, 0, kernels.NumElements(s)*r.dt.Size())
	w := &appendWriter{buf: buf}
	if err := r.Stream(name, w); err != nil {
		return nil, err
	}
	return w.buf, nil
}

type appendWriter struct{ buf []byte }

func (a *appendWriter) Write(p []byte) (int, error) { a.buf = append(a.buf, p...); return len(p), nil }

// Stream writes a tensor's bytes to w in chunks of at most 1 MiB.
func (r *RandomWeights) Stream(name string, w io.Writer) error {
	s, ok := r.shapes[name]
	if !ok {
		return fmt.Errorf("%w: %q", ErrMissingTensor, name)
	}
	h := fnv.New64a()
	h.Write([]byte(name))
	rng := rand.New(rand.NewPCG(r.seed, h.Sum64()))
	isNorm := strings.HasSuffix(name, "norm.weight")
	a := r.std * math.Sqrt(3) // uniform on [-a, a] has std r.std
	n := kernels.NumElements(s)
	size := r.dt.Size()
	const chunk = 1 << 18
	buf := make([]byte, min(n, chunk)*size)
	for done := 0; done < n; {
		m := min(n-done, chunk)
		for i := 0; i < m; i++ {
			v := float32(1)
			if !isNorm {
				v = float32((rng.Float64()*2 - 1) * a)
			}
			switch r.dt {
			case kernels.F32:
				binary.LittleEndian.PutUint32(buf[4*i:], math.Float32bits(v))
			case kernels.BF16:
				binary.LittleEndian.PutUint16(buf[2*i:], safetensors.Float32ToBF16(v))
			case kernels.F16:
				binary.LittleEndian.PutUint16(buf[2*i:], safetensors.Float32ToF16(v))
			}
		}
		if _, err := w.Write(buf[:m*size]); err != nil {
			return err
		}
		done += m
	}
	return nil
}
