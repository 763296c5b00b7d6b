// cuda_emu.h: a small CPU emulation of the CUDA C subset kernels.cu uses, so
// that g++ can compile the very source NVRTC compiles and run its kernels
// here (for tests on machines without a GPU). Include it before kernels.cu.
//
// Model: emu_launch runs a grid's blocks one after another; each block runs
// with one std::thread per CUDA thread (the same threads serve every block
// of a launch, and later launches: see EmuPool). __shared__ expands to `static`: function-local statics are
// shared by all threads, and since blocks run one at a time and every
// thread waits at a barrier between blocks, that is one copy per block.
// __syncthreads is a barrier over the block's threads; __shfl_xor_sync
// exchanges values through a per-warp buffer and a per-warp barrier. A
// thread that returns from the kernel drops out of both barriers (as exited
// threads do on the GPU). Warps are the linear thread index / 32; shuffles
// assume every lane of the warp takes part (the mask is not checked).
#pragma once

#include <atomic>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
#ifdef __linux__
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

struct uint3 {
	unsigned int x, y, z;
};

struct dim3 {
	unsigned int x, y, z;
	dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __shared__ static
#define __launch_bounds__(...)

inline thread_local uint3 threadIdx;
inline thread_local uint3 blockIdx;
inline thread_local dim3 blockDim;
inline thread_local dim3 gridDim;
constexpr int warpSize = 32;

// A reusable barrier for a fixed set of threads, some of which may leave
// (drop) before the others are done. The arrival count and the expected
// count share one atomic word (so an arrival and a drop never both release
// a phase); waiters sleep on the generation word (a futex on Linux).
class EmuBarrier {
public:
	// reset sets the number of threads; no thread may be waiting.
	void reset(int n) { state_.store(pack(0, n)); }
	void wait() {
		const uint32_t g = gen_.load(std::memory_order_acquire);
		uint64_t st = state_.load();
		for (;;) {
			const int c = count(st) + 1, e = expected(st);
			const uint64_t nst = c >= e ? pack(0, e) : pack(c, e);
			if (state_.compare_exchange_weak(st, nst)) {
				if (c >= e) {
					release();
					return;
				}
				break;
			}
		}
		while (gen_.load(std::memory_order_acquire) == g)
			sleep(g);
	}
	void drop() {
		uint64_t st = state_.load();
		for (;;) {
			const int c = count(st), e = expected(st) - 1;
			const bool rel = c > 0 && c >= e;
			if (state_.compare_exchange_weak(st, rel ? pack(0, e) : pack(c, e))) {
				if (rel)
					release();
				return;
			}
		}
	}

private:
	static uint64_t pack(int c, int e) { return ((uint64_t)(uint32_t)e << 32) | (uint32_t)c; }
	static int count(uint64_t st) { return (int)(uint32_t)st; }
	static int expected(uint64_t st) { return (int)(uint32_t)(st >> 32); }
	void release() {
		gen_.fetch_add(1, std::memory_order_acq_rel);
#ifdef __linux__
		syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAKE_PRIVATE, INT32_MAX, nullptr, nullptr, 0);
#else
		std::lock_guard<std::mutex> lk(cvmu_);
		cv_.notify_all();
#endif
	}
	void sleep(uint32_t g) {
#ifdef __linux__
		syscall(SYS_futex, reinterpret_cast<uint32_t*>(&gen_), FUTEX_WAIT_PRIVATE, g, nullptr, nullptr, 0);
#else
		std::unique_lock<std::mutex> lk(cvmu_);
		cv_.wait(lk, [&] { return gen_.load() != g; });
#endif
	}
	std::atomic<uint64_t> state_{0};
	std::atomic<uint32_t> gen_{0};
	static_assert(sizeof(std::atomic<uint32_t>) == 4, "futex word");
#ifndef __linux__
	std::mutex cvmu_;
	std::condition_variable cv_;
#endif
};

struct EmuWarp {
	EmuBarrier bar;
	uint64_t buf[2][32];
	int size = 32;
};

struct EmuLaunch {
	EmuBarrier block;            // __syncthreads
	EmuBarrier control;          // between blocks
	std::vector<std::unique_ptr<EmuWarp>> warps;
	int nthreads = 0;
};

inline thread_local EmuLaunch* emu_ctx = nullptr;
inline thread_local int emu_tid = 0;
inline thread_local int emu_shfl_parity = 0;

inline void __syncthreads() { emu_ctx->block.wait(); }

template <class T>
inline T __shfl_xor_sync(unsigned int /*mask*/, T v, int laneMask, int width = 32) {
	static_assert(sizeof(T) <= 8, "shuffle of a value over 8 bytes");
	EmuWarp& w = *emu_ctx->warps[emu_tid / 32];
	const int lane = emu_tid % 32;
	const int p = emu_shfl_parity;
	emu_shfl_parity ^= 1;
	std::memcpy(&w.buf[p][lane], &v, sizeof(T));
	w.bar.wait();
	int src = lane ^ laneMask;
	// A lane past the caller's width group (or the warp) reads its own value.
	if (src >= (lane / width + 1) * width || src >= w.size)
		src = lane;
	T r;
	std::memcpy(&r, &w.buf[p][src], sizeof(T));
	return r;
	// The next shuffle writes the other buffer; the one after that comes
	// after the next barrier, which every lane reaches only after reading.
}

inline std::mutex& emu_atomic_mu() {
	static std::mutex mu;
	return mu;
}
inline float atomicAdd(float* a, float v) {
	std::lock_guard<std::mutex> lk(emu_atomic_mu());
	float old = *a;
	*a = old + v;
	return old;
}
inline int atomicAdd(int* a, int v) {
	std::lock_guard<std::mutex> lk(emu_atomic_mu());
	int old = *a;
	*a = old + v;
	return old;
}
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) {
	std::lock_guard<std::mutex> lk(emu_atomic_mu());
	unsigned int old = *a;
	*a = old + v;
	return old;
}

inline unsigned int __float_as_uint(float f) {
	unsigned int u;
	std::memcpy(&u, &f, 4);
	return u;
}
inline float __uint_as_float(unsigned int u) {
	float f;
	std::memcpy(&f, &u, 4);
	return f;
}
inline int __float_as_int(float f) {
	int u;
	std::memcpy(&u, &f, 4);
	return u;
}
inline float __int_as_float(int u) {
	float f;
	std::memcpy(&f, &u, 4);
	return f;
}
// expf, sqrtf, sinf, cosf, fmaxf, fminf, fabsf, … come from <cmath>.
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __sinf(float x) { return std::sin(x); }
inline float __cosf(float x) { return std::cos(x); }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __fdividef(float a, float b) { return a / b; }

// EmuPool keeps the worker threads between launches (starting 256 threads
// per launch costs more than most test kernels).
class EmuPool {
public:
	static EmuPool& get() {
		static EmuPool pool;
		return pool;
	}
	// run calls f(i) on threads 0..n-1 of the pool, each on its own thread,
	// and returns when all are done.
	void run(int n, const std::function<void(int)>& f) {
		std::unique_lock<std::mutex> lk(mu_);
		while ((int)threads_.size() < n) {
			const int i = (int)threads_.size();
			threads_.emplace_back([this, i] { work(i); });
		}
		job_ = &f;
		njob_ = n;
		remaining_ = n;
		gen_++;
		cv_.notify_all();
		done_.wait(lk, [&] { return remaining_ == 0; });
		job_ = nullptr;
	}
	~EmuPool() {
		{
			std::lock_guard<std::mutex> lk(mu_);
			quit_ = true;
		}
		cv_.notify_all();
		for (auto& t : threads_)
			t.join();
	}

private:
	void work(int i) {
		unsigned long seen = 0;
		std::unique_lock<std::mutex> lk(mu_);
		for (;;) {
			cv_.wait(lk, [&] { return quit_ || gen_ != seen; });
			if (quit_)
				return;
			seen = gen_;
			if (i >= njob_)
				continue;
			const std::function<void(int)>* f = job_;
			lk.unlock();
			(*f)(i);
			lk.lock();
			if (--remaining_ == 0)
				done_.notify_all();
		}
	}
	std::mutex mu_;
	std::condition_variable cv_, done_;
	std::vector<std::thread> threads_;
	const std::function<void(int)>* job_ = nullptr;
	int njob_ = 0, remaining_ = 0;
	unsigned long gen_ = 0;
	bool quit_ = false;
};

template <class T>
struct emu_identity {
	using type = T;
};

// emu_launch runs kernel<<<grid, block>>>(args...) and returns when it is
// done. The arguments convert to the kernel's parameter types.
template <class... P>
void emu_launch(void (*kernel)(P...), dim3 grid, dim3 block, typename emu_identity<P>::type... args) {
	const int nt = (int)(block.x * block.y * block.z);
	if (nt <= 0 || nt > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0) {
		std::fprintf(stderr, "emu_launch: bad launch grid (%u,%u,%u) block (%u,%u,%u)\n", grid.x, grid.y, grid.z,
		             block.x, block.y, block.z);
		std::abort();
	}
	EmuLaunch ctx;
	ctx.nthreads = nt;
	const int nw = (nt + 31) / 32;
	for (int i = 0; i < nw; i++) {
		ctx.warps.emplace_back(new EmuWarp);
		ctx.warps[i]->size = (i + 1) * 32 <= nt ? 32 : nt - i * 32;
	}
	auto resetBlock = [&] {
		ctx.block.reset(nt);
		for (auto& w : ctx.warps)
			w->bar.reset(w->size);
	};
	resetBlock();
	ctx.control.reset(nt);
	EmuPool::get().run(nt, [&](int tid) {
		emu_ctx = &ctx;
		emu_tid = tid;
		blockDim = block;
		gridDim = grid;
		threadIdx.x = tid % block.x;
		threadIdx.y = (tid / block.x) % block.y;
		threadIdx.z = tid / (block.x * block.y);
		for (unsigned int bz = 0; bz < grid.z; bz++)
			for (unsigned int by = 0; by < grid.y; by++)
				for (unsigned int bx = 0; bx < grid.x; bx++) {
					blockIdx.x = bx;
					blockIdx.y = by;
					blockIdx.z = bz;
					emu_shfl_parity = 0;
					ctx.control.wait(); // the block starts
					kernel(args...);
					ctx.block.drop();
					ctx.warps[tid / 32]->bar.drop();
					ctx.control.wait(); // every thread is done with it
					if (tid == 0)
						resetBlock(); // before anyone passes the next start
				}
		emu_ctx = nullptr;
	});
}
