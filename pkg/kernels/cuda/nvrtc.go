package cuda

import (
	_ "embed"
	"fmt"
	"strings"
	"sync"
	"unsafe"
)

// The kernels' CUDA C source, compiled by NVRTC when a backend starts
// (no CUDA headers or toolkit at build time).
var (
	//go:embed kernels.cu
	kernelsSource string
	//go:embed gemm.cu
	gemmSource string
)

// Source is the CUDA C the backend compiles: every kernel it launches.
func Source() string { return kernelsSource + "\n" + gemmSource }

// kernelNames are the kernels the backend looks up after compiling.
var kernelNames = []string{
	"qf_cvt_f32_bf16", "qf_gemv_bf16", "qf_gemv_f32", "qf_gemm_bf16", "qf_gemm_f32", "qf_add_bias",
	"qf_embed_bf16", "qf_embed_f32", "qf_rmsnorm", "qf_add", "qf_rope", "qf_rope_multi", "qf_swiglu", "qf_write_kv",
	"qf_attention", "qf_gather", "qf_scatter_add", "qf_scale_rows",
}

type nvrtcLib struct {
	create    func(prog *uintptr, src, name *byte, nh int32, headers, includes unsafe.Pointer) result
	compile   func(prog uintptr, nopt int32, opts unsafe.Pointer) result
	logSize   func(prog uintptr, n *uint64) result
	log       func(prog uintptr, buf *byte) result
	ptxSize   func(prog uintptr, n *uint64) result
	ptx       func(prog uintptr, buf *byte) result
	destroy   func(prog *uintptr) result
	errString func(r result) *byte
	libName   string
}

var (
	nvrtcOnce sync.Once
	nvrtc     *nvrtcLib
	nvrtcErr  error
)

func loadNVRTC() (*nvrtcLib, error) {
	nvrtcOnce.Do(func() {
		lib, name, err := dlopen("libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so")
		if err != nil {
			nvrtcErr = fmt.Errorf("cuda: NVRTC (runtime compiler) not found: %v", err)
			return
		}
		n := &nvrtcLib{libName: name}
		if err := bind(lib, name, map[string]any{
			"nvrtcCreateProgram": &n.create, "nvrtcCompileProgram": &n.compile,
			"nvrtcGetProgramLogSize": &n.logSize, "nvrtcGetProgramLog": &n.log,
			"nvrtcGetPTXSize": &n.ptxSize, "nvrtcGetPTX": &n.ptx, "nvrtcDestroyProgram": &n.destroy,
			"nvrtcGetErrorString": &n.errString,
		}); err != nil {
			nvrtcErr = err
			return
		}
		nvrtc = n
	})
	return nvrtc, nvrtcErr
}

// compileOptions are NVRTC's options for a device of compute capability
// major.minor: PTX for that virtual architecture (the driver JITs it).
func compileOptions(major, minor int) []string {
	return []string{fmt.Sprintf("--gpu-arch=compute_%d%d", major, minor), "--std=c++17"}
}

// compilePTX compiles src to PTX, returning NVRTC's log in the error.
func (n *nvrtcLib) compilePTX(src string, opts []string) ([]byte, error) {
	var prog uintptr
	if r := n.create(&prog, cString(src), cString("qwenfleet.cu"), 0, nil, nil); r != 0 {
		return nil, fmt.Errorf("cuda: nvrtcCreateProgram: %s", goString(n.errString(r)))
	}
	defer n.destroy(&prog)
	cs := make([]*byte, len(opts))
	for i, o := range opts {
		cs[i] = cString(o)
	}
	r := n.compile(prog, int32(len(cs)), unsafe.Pointer(&cs[0]))
	var size uint64
	logText := ""
	if n.logSize(prog, &size) == 0 && size > 1 {
		buf := make([]byte, size)
		if n.log(prog, &buf[0]) == 0 {
			logText = strings.TrimRight(string(buf), "\x00\n")
		}
	}
	if r != 0 {
		return nil, fmt.Errorf("cuda: compiling the kernels (%s): %s\n%s", strings.Join(opts, " "), goString(n.errString(r)), logText)
	}
	if n.ptxSize(prog, &size) != 0 || size == 0 {
		return nil, fmt.Errorf("cuda: no PTX from NVRTC")
	}
	ptx := make([]byte, size)
	if r := n.ptx(prog, &ptx[0]); r != 0 {
		return nil, fmt.Errorf("cuda: nvrtcGetPTX: %s", goString(n.errString(r)))
	}
	return ptx, nil
}
