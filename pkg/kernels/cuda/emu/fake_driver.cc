// fake_driver.cc: the CUDA driver and NVRTC entry points the Go backend
// binds, implemented on the CPU emulator, so that the whole backend
// (pkg/kernels/cuda: allocation, copies, argument packing, launch shapes,
// the kernels themselves) runs here without a GPU. Built as a shared
// library named libcuda.so.1 (and libnvrtc.so.13) by TestEmulatedDevice.
// "Device" memory is host memory; kernels are the ones compiled into this
// library from the same kernels.cu and gemm.cu the Go package embeds (the
// NVRTC stand-in ignores the source it is handed).
#include "cuda_emu.h"

#include "../kernels.cu"
#include "../gemm.cu"

#include <cstdlib>
#include <string>
#include <type_traits>
#include <utility>

namespace {

template <class... P, std::size_t... I>
void launch_impl(void (*k)(P...), dim3 g, dim3 b, void** p, std::index_sequence<I...>) {
	emu_launch(k, g, b, *static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(p[I])...);
}

template <class... P>
void launch_any(void (*k)(P...), dim3 g, dim3 b, void** p) {
	launch_impl(k, g, b, p, std::index_sequence_for<P...>{});
}

struct Kernel {
	const char* name;
	void (*launch)(dim3, dim3, void**);
};

#define QF_K(k) {#k, [](dim3 g, dim3 b, void** p) { launch_any(k, g, b, p); }}
const Kernel kernels[] = {
	QF_K(qf_cvt_f32_bf16), QF_K(qf_gemv_bf16), QF_K(qf_gemv_f32),  QF_K(qf_gemm_bf16),   QF_K(qf_gemm_f32),
	QF_K(qf_add_bias),     QF_K(qf_embed_bf16), QF_K(qf_embed_f32), QF_K(qf_rmsnorm),     QF_K(qf_add),
	QF_K(qf_rope),         QF_K(qf_swiglu),    QF_K(qf_write_kv),  QF_K(qf_attention),   QF_K(qf_gather),
	QF_K(qf_scatter_add),  QF_K(qf_scale_rows),  QF_K(qf_rope_multi),
};

const char ptx[] = "// emulated";

} // namespace

extern "C" {

typedef unsigned long long CUdeviceptr;

int cuInit(unsigned) { return 0; }
int cuDeviceGetCount(int* n) {
	*n = 1;
	return 0;
}
int cuDeviceGet(int* d, int ordinal) {
	if (ordinal != 0)
		return 101; // CUDA_ERROR_INVALID_DEVICE
	*d = 0;
	return 0;
}
int cuDeviceGetName(char* name, int n, int) {
	std::snprintf(name, n, "Emulated CUDA device (CPU)");
	return 0;
}
int cuDeviceTotalMem_v2(std::size_t* b, int) {
	*b = std::size_t(8) << 30;
	return 0;
}
int cuDeviceGetAttribute(int* v, int attr, int) {
	switch (attr) {
	case 75: *v = 9; break;       // compute capability major
	case 76: *v = 0; break;       // minor
	case 16: *v = 4; break;       // multiprocessors
	case 36: *v = 1000000; break; // memory clock, kHz
	case 37: *v = 1024; break;    // bus width, bits
	default: *v = 0;
	}
	return 0;
}
int cuDevicePrimaryCtxRetain(void** ctx, int) {
	*ctx = (void*)0x1;
	return 0;
}
int cuDevicePrimaryCtxRelease_v2(int) { return 0; }
int cuCtxSetCurrent(void*) { return 0; }
int cuCtxSynchronize() { return 0; }
int cuMemAlloc_v2(CUdeviceptr* p, std::size_t n) {
	void* q = std::aligned_alloc(256, (n + 255) / 256 * 256);
	if (!q)
		return 2; // CUDA_ERROR_OUT_OF_MEMORY
	*p = (CUdeviceptr)q;
	return 0;
}
int cuMemFree_v2(CUdeviceptr p) {
	std::free((void*)p);
	return 0;
}
int cuMemGetInfo_v2(std::size_t* free, std::size_t* total) {
	*free = *total = std::size_t(8) << 30;
	return 0;
}
int cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, std::size_t n) {
	std::memcpy((void*)dst, src, n);
	return 0;
}
int cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, std::size_t n) {
	std::memcpy(dst, (const void*)src, n);
	return 0;
}
int cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, std::size_t n) {
	std::memmove((void*)dst, (const void*)src, n);
	return 0;
}
int cuMemsetD32_v2(CUdeviceptr dst, unsigned v, std::size_t n) {
	unsigned* d = (unsigned*)dst;
	for (std::size_t i = 0; i < n; i++)
		d[i] = v;
	return 0;
}
int cuModuleLoadData(void** mod, const void* image) {
	if (std::strcmp((const char*)image, ptx) != 0)
		return 218; // CUDA_ERROR_INVALID_PTX
	*mod = (void*)0x2;
	return 0;
}
int cuModuleGetFunction(std::uintptr_t* f, void*, const char* name) {
	for (std::size_t i = 0; i < sizeof kernels / sizeof kernels[0]; i++)
		if (std::strcmp(kernels[i].name, name) == 0) {
			*f = i + 1;
			return 0;
		}
	return 500; // CUDA_ERROR_NOT_FOUND
}
int cuLaunchKernel(std::uintptr_t f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                   unsigned shared, void*, void** params, void**) {
	if (f == 0 || f > sizeof kernels / sizeof kernels[0] || shared != 0)
		return 400; // CUDA_ERROR_INVALID_HANDLE
	kernels[f - 1].launch(dim3(gx, gy, gz), dim3(bx, by, bz), params);
	return 0;
}
int cuGetErrorString(int, const char** s) {
	*s = "emulated CUDA error";
	return 0;
}

// NVRTC
int nvrtcCreateProgram(void** prog, const char* src, const char*, int, const char**, const char**) {
	*prog = new std::string(src);
	return 0;
}
int nvrtcCompileProgram(void* prog, int, const char**) { return static_cast<std::string*>(prog)->empty() ? 6 : 0; }
int nvrtcGetProgramLogSize(void*, std::size_t* n) {
	*n = 1;
	return 0;
}
int nvrtcGetProgramLog(void*, char* log) {
	*log = 0;
	return 0;
}
int nvrtcGetPTXSize(void*, std::size_t* n) {
	*n = sizeof ptx;
	return 0;
}
int nvrtcGetPTX(void*, char* out) {
	std::memcpy(out, ptx, sizeof ptx);
	return 0;
}
int nvrtcDestroyProgram(void** prog) {
	delete static_cast<std::string*>(*prog);
	*prog = nullptr;
	return 0;
}
const char* nvrtcGetErrorString(int) { return "NVRTC error"; }

} // extern "C"
