package cuda

import (
	"encoding/binary"
	"fmt"
	"math"
	"runtime"
	"sync"
	"unsafe"

	"github.com/qwenfleet/qwenfleet/pkg/kernels"
	"github.com/qwenfleet/qwenfleet/pkg/safetensors"
)

// Config selects the device.
type Config struct {
	Device int // ordinal, as in --device cuda:N
}

// Info describes a device.
type Info struct {
	Name             string
	MemoryBytes      int64
	ComputeMajor     int
	ComputeMinor     int
	MultiProcessors  int
	BandwidthBytesPS float64 // theoretical HBM bandwidth: 2 × memory clock × bus width
}

// Probe reports device ordinal's name and memory without compiling
// anything (worker registration). The error wraps ErrNoDriver where there
// is no driver or no such device.
func Probe(ordinal int) (Info, error) {
	d, err := loadDriver()
	if err != nil {
		return Info{}, err
	}
	dev, err := d.device(ordinal)
	if err != nil {
		return Info{}, err
	}
	return d.info(dev), nil
}

func (d *driver) device(ordinal int) (int32, error) {
	var n int32
	if err := d.check("cuDeviceGetCount", d.deviceGetCount(&n)); err != nil {
		return 0, fmt.Errorf("%w: %v", ErrNoDriver, err)
	}
	if ordinal < 0 || ordinal >= int(n) {
		return 0, fmt.Errorf("%w: device cuda:%d does not exist (%d devices)", ErrNoDriver, ordinal, n)
	}
	var dev int32
	if err := d.check("cuDeviceGet", d.deviceGet(&dev, int32(ordinal))); err != nil {
		return 0, err
	}
	return dev, nil
}

func (d *driver) info(dev int32) Info {
	name := make([]byte, 256)
	d.deviceGetName(&name[0], int32(len(name)), dev)
	var total uint64
	d.deviceTotalMem(&total, dev)
	attr := func(a int32) int {
		var v int32
		d.deviceGetAttribute(&v, a, dev)
		return int(v)
	}
	in := Info{Name: goString(&name[0]), MemoryBytes: int64(total), ComputeMajor: attr(d.attrComputeMajor),
		ComputeMinor: attr(d.attrComputeMinor), MultiProcessors: attr(d.attrMultiProcessors)}
	in.BandwidthBytesPS = 2 * float64(attr(d.attrMemoryClockKHz)) * 1e3 * float64(attr(d.attrMemoryBusWidthBits)) / 8
	return in
}

// Backend runs the kernels on one GPU: weights uploaded once (matrices in
// bf16, vectors and router weights in float32), activations and the KV
// cache in float32, every op a kernel of Source on the default stream.
// Like the CPU backend it runs one op at a time; a CUDA failure (out of
// memory, a faulting kernel) panics with the driver's message.
type Backend struct {
	d    *driver
	dev  int32
	ctx  uintptr
	info Info
	fns  map[string]uintptr
	mu   sync.Mutex // the free lists
	free map[uint64][]uint64
	pc   paramCache
}

// paramCache keeps the small read-only arrays uploaded last (positions,
// KV slots, attention tables, RoPE frequencies): every layer of a step
// passes the same ones, and a copy from pageable host memory waits for the
// device to go idle, so each layer would otherwise stall the pipeline
// several times.
type paramCache struct {
	keys [][]byte
	ts   []*tensor
	next int
}

const paramSlots = 32

// New opens device cfg.Device, compiles the kernels for it with NVRTC and
// loads them.
func New(cfg Config) (*Backend, error) {
	d, err := loadDriver()
	if err != nil {
		return nil, err
	}
	dev, err := d.device(cfg.Device)
	if err != nil {
		return nil, err
	}
	b := &Backend{d: d, dev: dev, info: d.info(dev), fns: map[string]uintptr{}, free: map[uint64][]uint64{}}
	if err := d.check("cuDevicePrimaryCtxRetain", d.primaryCtxRetain(&b.ctx, dev)); err != nil {
		return nil, err
	}
	b.enter()
	n, err := loadNVRTC()
	if err != nil {
		return nil, err
	}
	ptx, err := n.compilePTX(Source(), compileOptions(b.info.ComputeMajor, b.info.ComputeMinor))
	if err != nil {
		return nil, err
	}
	var mod uintptr
	if err := d.check("cuModuleLoadData", d.moduleLoadData(&mod, unsafe.Pointer(&ptx[0]))); err != nil {
		return nil, err
	}
	for _, k := range kernelNames {
		var fn uintptr
		if err := d.check("cuModuleGetFunction "+k, d.moduleGetFunction(&fn, mod, cString(k))); err != nil {
			return nil, err
		}
		b.fns[k] = fn
	}
	return b, nil
}

// Info is the device's description.
func (b *Backend) Info() Info { return b.info }

// Name implements kernels.Backend.
func (b *Backend) Name() string { return "cuda/" + b.info.Name }

// Threads implements kernels.Backend (the GPU's multiprocessors).
func (b *Backend) Threads() int { return b.info.MultiProcessors }

// Close releases the device context (the process's tensors go with it).
func (b *Backend) Close() {
	b.enter()
	b.trim()
	b.d.primaryCtxRelease(b.dev)
}

// enter makes the context current on this OS thread (goroutines move
// between threads; a context is current per thread).
func (b *Backend) enter() { b.d.ctxSetCurrent(b.ctx) }

func (b *Backend) must(call string, r result) {
	if err := b.d.check(call, r); err != nil {
		panic(err)
	}
}

// tensor is device memory with a shape.
type tensor struct {
	ptr   uint64
	shape []int
	dt    kernels.DType
	size  uint64 // bytes allocated (a free-list class)
}

func (t *tensor) DType() kernels.DType { return t.dt }
func (t *tensor) Shape() []int         { return t.shape }
func (t *tensor) n() int               { return kernels.NumElements(t.shape) }

func dev(t kernels.Tensor) *tensor {
	d, ok := t.(*tensor)
	if !ok {
		panic(fmt.Sprintf("cuda: a %T is not a CUDA tensor", t))
	}
	return d
}

// sizeClass rounds an allocation up so freed memory is reused: powers of
// two up to 1 MiB, then multiples of 1 MiB.
func sizeClass(n uint64) uint64 {
	switch {
	case n <= 256:
		return 256
	case n <= 1<<20:
		c := uint64(256)
		for c < n {
			c <<= 1
		}
		return c
	}
	return (n + 1<<20 - 1) &^ (1<<20 - 1)
}

func (b *Backend) alloc(dt kernels.DType, shape ...int) *tensor {
	n := uint64(kernels.NumElements(shape) * dt.Size())
	c := sizeClass(max(n, 4))
	t := &tensor{shape: append([]int(nil), shape...), dt: dt, size: c}
	b.mu.Lock()
	if l := b.free[c]; len(l) > 0 {
		t.ptr = l[len(l)-1]
		b.free[c] = l[:len(l)-1]
		b.mu.Unlock()
		return t
	}
	b.mu.Unlock()
	r := b.d.memAlloc(&t.ptr, c)
	if r != 0 {
		b.trim() // give cached blocks back and try once more
		r = b.d.memAlloc(&t.ptr, c)
	}
	b.must(fmt.Sprintf("cuMemAlloc(%d bytes)", c), r)
	return t
}

// trim frees every cached block.
func (b *Backend) trim() {
	b.d.ctxSynchronize()
	b.mu.Lock()
	defer b.mu.Unlock()
	for _, l := range b.free {
		for _, p := range l {
			b.d.memFree(p)
		}
	}
	b.free = map[uint64][]uint64{}
}

// Free implements kernels.Backend: the memory goes back to a free list
// (kernels on the default stream that still read it run before any later
// copy into it).
func (b *Backend) Free(t kernels.Tensor) {
	d := dev(t)
	if d.ptr == 0 {
		return
	}
	b.mu.Lock()
	b.free[d.size] = append(b.free[d.size], d.ptr)
	b.mu.Unlock()
	d.ptr = 0
}

func (b *Backend) upload(dt kernels.DType, shape []int, data []byte) *tensor {
	t := b.alloc(dt, shape...)
	if len(data) > 0 {
		b.must("cuMemcpyHtoD", b.d.memcpyHtoD(t.ptr, unsafe.Pointer(&data[0]), uint64(len(data))))
	}
	return t
}

// param returns raw (int32 or float32 values) on the device, from the
// cache when the same values were uploaded recently. The tensor belongs to
// the cache: callers do not free it.
func (b *Backend) param(raw []byte) *tensor {
	if b.pc.ts == nil {
		b.pc.keys, b.pc.ts = make([][]byte, paramSlots), make([]*tensor, paramSlots)
	}
	for i, k := range b.pc.keys {
		if k != nil && len(k) == len(raw) && string(k) == string(raw) {
			return b.pc.ts[i]
		}
	}
	i := b.pc.next
	b.pc.next = (i + 1) % paramSlots
	if old := b.pc.ts[i]; old != nil {
		b.Free(old) // later kernels on the stream run after the ones reading it
	}
	t := b.upload(kernels.F32, []int{max(len(raw)/4, 1)}, raw)
	b.pc.keys[i], b.pc.ts[i] = append([]byte(nil), raw...), t
	return t
}

func (b *Backend) paramI32(v []int32) *tensor {
	if len(v) == 0 {
		return b.param(nil)
	}
	return b.param(unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v)))
}

func (b *Backend) paramF32(v []float32) *tensor { return b.param(f32Bytes(v)) }

func (b *Backend) uploadI32(v []int32) *tensor {
	if len(v) == 0 {
		return b.alloc(kernels.F32, 1)
	}
	return b.upload(kernels.F32, []int{len(v)}, unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v)))
}

func (b *Backend) uploadF32(v []float32) *tensor {
	if len(v) == 0 {
		return b.alloc(kernels.F32, 1)
	}
	return b.upload(kernels.F32, []int{len(v)}, unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v)))
}

// Weight implements kernels.Backend: bf16 matrices stay bf16 (the GEMV
// kernels read 2 bytes a weight); vectors (norms, biases) and matrices of
// other dtypes are stored in float32.
func (b *Backend) Weight(dt kernels.DType, shape []int, data []byte) (kernels.Tensor, error) {
	return b.weight(dt, shape, data, len(shape) < 2 || dt != kernels.BF16)
}

// WeightPrecise implements kernels.PreciseWeights: float32 on the device
// (MoE routers, whose choices bf16 rounding could flip).
func (b *Backend) WeightPrecise(dt kernels.DType, shape []int, data []byte) (kernels.Tensor, error) {
	return b.weight(dt, shape, data, true)
}

func (b *Backend) weight(dt kernels.DType, shape []int, data []byte, f32 bool) (kernels.Tensor, error) {
	n := kernels.NumElements(shape)
	if dt.Size() == 0 || len(data) != n*dt.Size() {
		return nil, fmt.Errorf("cuda: %d bytes for a %v tensor of %v", len(data), dt, shape)
	}
	b.enter()
	if f32 || dt != kernels.BF16 {
		return b.upload(kernels.F32, shape, f32Bytes(toFloat32(dt, data))), nil
	}
	return b.upload(kernels.BF16, shape, data), nil
}

// Zeros implements kernels.Backend.
func (b *Backend) Zeros(shape ...int) kernels.Tensor {
	b.enter()
	t := b.alloc(kernels.F32, shape...)
	if n := t.n(); n > 0 {
		b.must("cuMemsetD32", b.d.memsetD32(t.ptr, 0, uint64(n)))
	}
	return t
}

// FromFloat32 implements kernels.Backend.
func (b *Backend) FromFloat32(shape []int, data []float32) kernels.Tensor {
	if len(data) != kernels.NumElements(shape) {
		panic(fmt.Sprintf("cuda: %d values for shape %v", len(data), shape))
	}
	b.enter()
	return b.upload(kernels.F32, shape, f32Bytes(data))
}

// ToFloat32 implements kernels.Backend (it waits for the kernels that
// write t).
func (b *Backend) ToFloat32(t kernels.Tensor) []float32 {
	d := dev(t)
	b.enter()
	n := d.n()
	raw := make([]byte, n*d.dt.Size())
	if n > 0 {
		b.must("cuMemcpyDtoH", b.d.memcpyDtoH(unsafe.Pointer(&raw[0]), d.ptr, uint64(len(raw))))
	}
	return toFloat32(d.dt, raw)
}

// launch runs kernel name on grid × block with args: *tensor (its device
// pointer), int (as a C int), float32.
func (b *Backend) launch(name string, grid, block [3]uint32, args ...any) {
	fn, ok := b.fns[name]
	if !ok {
		panic("cuda: no kernel " + name)
	}
	vals := make([]uint64, len(args))
	params := make([]unsafe.Pointer, len(args))
	for i, a := range args {
		switch v := a.(type) {
		case *tensor:
			if v != nil {
				vals[i] = v.ptr
			}
		case int:
			vals[i] = uint64(uint32(int32(v)))
		case float32:
			vals[i] = uint64(math.Float32bits(v))
		default:
			panic(fmt.Sprintf("cuda: kernel argument %T", a))
		}
		params[i] = unsafe.Pointer(&vals[i])
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	var pp unsafe.Pointer
	if len(params) > 0 {
		pin.Pin(&vals[0])
		pin.Pin(&params[0])
		pp = unsafe.Pointer(&params[0])
	}
	b.must("cuLaunchKernel "+name, b.d.launchKernel(fn, grid[0], grid[1], grid[2], block[0], block[1], block[2], 0, 0, pp, nil))
}

// flat is the launch of an elementwise kernel over n items.
func flat(n int) (grid, block [3]uint32) {
	g := min((n+255)/256, 65535)
	return [3]uint32{uint32(max(g, 1)), 1, 1}, [3]uint32{256, 1, 1}
}

// toFloat32 widens raw values of dt.
func toFloat32(dt kernels.DType, raw []byte) []float32 {
	n := len(raw) / max(dt.Size(), 1)
	out := make([]float32, n)
	for i := range out {
		switch dt {
		case kernels.F32:
			out[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		case kernels.BF16:
			out[i] = safetensors.BF16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		case kernels.F16:
			out[i] = safetensors.F16ToFloat32(binary.LittleEndian.Uint16(raw[2*i:]))
		}
	}
	return out
}

func f32Bytes(v []float32) []byte {
	if len(v) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&v[0])), 4*len(v))
}
