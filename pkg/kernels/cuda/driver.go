package cuda

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"unsafe"

	"github.com/ebitengine/purego"
)

// ErrNoDriver is wrapped by New where no CUDA driver (libcuda.so.1) can be
// loaded or it finds no device: the worker refuses to start as a GPU
// worker, never falling back to the CPU silently.
var ErrNoDriver = errors.New("no CUDA driver")

// LibPathEnv names extra directories (colon-separated) searched first for
// libcuda.so.1 and libnvrtc (e.g. a PyTorch install's nvidia/*/lib).
const LibPathEnv = "QWENFLEET_CUDA_LIBS"

// dlopen opens the first of names found in $QWENFLEET_CUDA_LIBS, then by
// the system's search path.
func dlopen(names ...string) (uintptr, string, error) {
	var errs []string
	var dirs []string
	for _, d := range strings.Split(os.Getenv(LibPathEnv), ":") {
		if d != "" {
			dirs = append(dirs, d)
		}
	}
	for _, n := range names {
		cands := []string{n}
		for _, d := range dirs {
			cands = append([]string{filepath.Join(d, n)}, cands...)
		}
		for _, c := range cands {
			h, err := purego.Dlopen(c, purego.RTLD_NOW|purego.RTLD_GLOBAL)
			if err == nil {
				return h, c, nil
			}
			errs = append(errs, err.Error())
		}
	}
	return 0, "", fmt.Errorf("%s: %s", strings.Join(names, ", "), strings.Join(errs, "; "))
}

// bind resolves each symbol into its function pointer; a missing one is an
// error naming it (a driver too old for a versioned symbol).
func bind(lib uintptr, libName string, fns map[string]any) error {
	for name, fn := range fns {
		sym, err := purego.Dlsym(lib, name)
		if err != nil {
			return fmt.Errorf("%s: symbol %s: %v", libName, name, err)
		}
		purego.RegisterFunc(fn, sym)
	}
	return nil
}

// result is a CUresult or nvrtcResult.
type result int32

// driver holds the CUDA driver API functions used, bound to their
// versioned symbols (cuMemAlloc_v2, ...).
type driver struct {
	init                   func(flags uint32) result
	deviceGetCount         func(n *int32) result
	deviceGet              func(dev *int32, ordinal int32) result
	deviceGetName          func(name *byte, n int32, dev int32) result
	deviceTotalMem         func(bytes *uint64, dev int32) result
	deviceGetAttribute     func(v *int32, attr int32, dev int32) result
	primaryCtxRetain       func(ctx *uintptr, dev int32) result
	primaryCtxRelease      func(dev int32) result
	ctxSetCurrent          func(ctx uintptr) result
	ctxSynchronize         func() result
	memAlloc               func(ptr *uint64, bytes uint64) result
	memFree                func(ptr uint64) result
	memGetInfo             func(free, total *uint64) result
	memcpyHtoD             func(dst uint64, src unsafe.Pointer, bytes uint64) result
	memcpyDtoH             func(dst unsafe.Pointer, src uint64, bytes uint64) result
	memcpyDtoD             func(dst, src uint64, bytes uint64) result
	memsetD32              func(dst uint64, v uint32, n uint64) result
	moduleLoadData         func(mod *uintptr, image unsafe.Pointer) result
	moduleGetFunction      func(fn *uintptr, mod uintptr, name *byte) result
	launchKernel           func(fn uintptr, gx, gy, gz, bx, by, bz, shared uint32, stream uintptr, params unsafe.Pointer, extra unsafe.Pointer) result
	getErrorString         func(r result, s **byte) result
	libName                string
	attrComputeMajor       int32
	attrComputeMinor       int32
	attrMultiProcessors    int32
	attrMemoryClockKHz     int32
	attrMemoryBusWidthBits int32
}

var (
	drvOnce sync.Once
	drv     *driver
	drvErr  error
)

// loadDriver loads libcuda.so.1 once and initialises it.
func loadDriver() (*driver, error) {
	drvOnce.Do(func() {
		lib, name, err := dlopen("libcuda.so.1", "libcuda.so")
		if err != nil {
			drvErr = fmt.Errorf("%w: %v", ErrNoDriver, err)
			return
		}
		d := &driver{libName: name, attrComputeMajor: 75, attrComputeMinor: 76, attrMultiProcessors: 16,
			attrMemoryClockKHz: 36, attrMemoryBusWidthBits: 37}
		if err := bind(lib, name, map[string]any{
			"cuInit": &d.init, "cuDeviceGetCount": &d.deviceGetCount, "cuDeviceGet": &d.deviceGet,
			"cuDeviceGetName": &d.deviceGetName, "cuDeviceTotalMem_v2": &d.deviceTotalMem,
			"cuDeviceGetAttribute": &d.deviceGetAttribute, "cuDevicePrimaryCtxRetain": &d.primaryCtxRetain,
			"cuDevicePrimaryCtxRelease_v2": &d.primaryCtxRelease, "cuCtxSetCurrent": &d.ctxSetCurrent,
			"cuCtxSynchronize": &d.ctxSynchronize, "cuMemAlloc_v2": &d.memAlloc, "cuMemFree_v2": &d.memFree,
			"cuMemGetInfo_v2": &d.memGetInfo, "cuMemcpyHtoD_v2": &d.memcpyHtoD, "cuMemcpyDtoH_v2": &d.memcpyDtoH,
			"cuMemcpyDtoD_v2": &d.memcpyDtoD, "cuMemsetD32_v2": &d.memsetD32, "cuModuleLoadData": &d.moduleLoadData,
			"cuModuleGetFunction": &d.moduleGetFunction, "cuLaunchKernel": &d.launchKernel,
			"cuGetErrorString": &d.getErrorString,
		}); err != nil {
			drvErr = fmt.Errorf("%w: %v", ErrNoDriver, err)
			return
		}
		if r := d.init(0); r != 0 {
			drvErr = fmt.Errorf("%w: cuInit: %s", ErrNoDriver, d.errString(r))
			return
		}
		drv = d
	})
	return drv, drvErr
}

// errString is the driver's name for r.
func (d *driver) errString(r result) string {
	var s *byte
	if d.getErrorString != nil && d.getErrorString(r, &s) == 0 && s != nil {
		return fmt.Sprintf("%s (%d)", goString(s), r)
	}
	return fmt.Sprintf("CUDA error %d", r)
}

// check turns a CUresult into an error naming the call.
func (d *driver) check(call string, r result) error {
	if r == 0 {
		return nil
	}
	return fmt.Errorf("cuda: %s: %s", call, d.errString(r))
}

// goString copies a NUL-terminated C string.
func goString(p *byte) string {
	if p == nil {
		return ""
	}
	var b []byte
	for q := unsafe.Pointer(p); *(*byte)(q) != 0; q = unsafe.Add(q, 1) {
		b = append(b, *(*byte)(q))
	}
	return string(b)
}

// cString is s NUL-terminated.
func cString(s string) *byte {
	b := append([]byte(s), 0)
	return &b[0]
}
