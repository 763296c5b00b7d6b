// kernels.cu: the inference kernels of the CUDA backend, compiled at run
// time by NVRTC (no headers: only CUDA built-ins and intrinsics). The same
// file compiles with g++ through emu/cuda_emu.h, whose harness checks every
// kernel against double-precision loops (go test runs it).
//
// bf16 values are raw bits (unsigned short); activations are float. All
// launches use no dynamic shared memory. "flat(n)" below means grid
// min(ceil(n/256), 65535) (at least 1) blocks of 256 threads; those kernels
// are grid-stride loops and take any grid.
//
//   kernel            grid                      block  items / notes
//   qf_cvt_f32_bf16   flat(n)                   256    n; round to nearest even, NaN kept NaN
//   qf_gemv_bf16      min(N, 65535)             256    one block per output column n (looping n
//   qf_gemv_f32       min(N, 65535)             256      by gridDim.x); meant for T <= 8 (larger T
//                                                        works, 8 rows at a time, each 8 re-reading
//                                                        the weight row); blockDim a multiple of 32.
//                                                        16-byte weight loads when K % 8 == 0 (bf16)
//                                                        / K % 4 == 0 (f32) and x, w are 16-byte
//                                                        aligned; scalar loads otherwise
//   qf_add_bias       flat(T*N)                 256
//   qf_embed_bf16     flat(T*H)                 256
//   qf_embed_f32      flat(T*H)                 256
//   qf_rmsnorm        min(T, 65535)             256    one block per row (looping t by gridDim.x);
//                                                        blockDim a multiple of 32, <= 1024
//   qf_add            flat(n)                   256
//   qf_rope           flat(T*C/2)               256    T*(C/headDim)*(headDim/2) pairs
//   qf_rope_multi     flat(T*k*C/2)             256    y [T, k*C]: k rotated copies of each row of x
//   qf_swiglu         flat(n)                   256
//   qf_write_kv       flat(T*C)                 256    a negative slot skips its row
//   qf_attention      (T, heads)                128    blockIdx.x = query row, blockIdx.y = head;
//                                                        4 warps (any 1..8 warps work); head_dim <= 256;
//                                                        dca_chunk > 0: Dual Chunk Attention, q rows
//                                                        of 3*heads*head_dim (intra, succ, inter)
//   qf_gather         flat(n*H)                 256
//   qf_scatter_add    flat(n*H)                 256    atomicAdd; scale == 0 (null) means 1
//   qf_scale_rows     flat(T*H)                 256

// Helper names start with qf_k_ (the gemm source is appended to this one).
// Shared arrays live in the kernels (device functions get pointers): every
// template instance's own __shared__ array would add to the block's total.

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define QF_K_UNROLL _Pragma("unroll")
#else
#define QF_K_UNROLL
#endif

// 16-byte vectors of our own (alignas makes the loads single 128-bit ones).
struct alignas(16) qf_k_u32x4 {
	unsigned int x, y, z, w;
};
struct alignas(16) qf_k_f32x4 {
	float x, y, z, w;
};

__device__ inline float qf_k_bf16_f32(unsigned short h) {
	return __uint_as_float(((unsigned int)h) << 16);
}

// Round to nearest even; a NaN stays a NaN of the same sign, made quiet
// (its top mantissa bits kept, bit 6 of the bf16 set).
__device__ inline unsigned short qf_k_f32_bf16(float f) {
	unsigned int u = __float_as_uint(f);
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (unsigned short)((u >> 16) | 0x0040u);
	u += 0x7fffu + ((u >> 16) & 1u);
	return (unsigned short)(u >> 16);
}

__device__ inline float qf_k_neg_inf() { return __uint_as_float(0xff800000u); }

// Sum over the 32 lanes of a warp; every lane gets the total.
__device__ inline float qf_k_warp_sum(float v) {
	v += __shfl_xor_sync(0xffffffffu, v, 16);
	v += __shfl_xor_sync(0xffffffffu, v, 8);
	v += __shfl_xor_sync(0xffffffffu, v, 4);
	v += __shfl_xor_sync(0xffffffffu, v, 2);
	v += __shfl_xor_sync(0xffffffffu, v, 1);
	return v;
}

// Sum over the block (blockDim.x a multiple of 32); every thread gets the
// total. Every thread of the block must call it.
__device__ inline float qf_k_block_sum(float v) {
	__shared__ float part[32];
	const int tid = (int)threadIdx.x, nw = (int)(blockDim.x >> 5);
	v = qf_k_warp_sum(v);
	if ((tid & 31) == 0)
		part[tid >> 5] = v;
	__syncthreads();
	float s = 0.0f;
	for (int i = 0; i < nw; i++)
		s += part[i];
	__syncthreads(); // part may be reused at once
	return s;
}

extern "C" __global__ void qf_cvt_f32_bf16(const float* x, unsigned short* y, int n) {
	const long long stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
		y[i] = qf_k_f32_bf16(x[i]);
}

// ---- GEMV: y[t, n] = sum_k x[t, k] w[n, k] (+ bias[n]) ----

// Reduces each thread's TT partial sums over the block and stores
// y[t*N] = sum + b for t < TT (y already points at column n of row t0).
template <int TT>
__device__ inline void qf_k_gemv_store(float (&acc)[TT], float* y, int N, float b, float (*red)[32]) {
	const int tid = (int)threadIdx.x, nw = (int)(blockDim.x >> 5);
	QF_K_UNROLL
	for (int t = 0; t < TT; t++)
		acc[t] = qf_k_warp_sum(acc[t]);
	if ((tid & 31) == 0) {
		QF_K_UNROLL
		for (int t = 0; t < TT; t++)
			red[t][tid >> 5] = acc[t];
	}
	__syncthreads();
	if (tid < TT) {
		float s = 0.0f;
		for (int i = 0; i < nw; i++)
			s += red[tid][i];
		y[(long long)tid * N] = s + b;
	}
	__syncthreads(); // red is reused by the next column
}

// Weight row wr (K bf16) times TT rows of x (row stride K).
template <int TT>
__device__ inline void qf_k_gemv_tile(const float* __restrict__ x, const unsigned short* __restrict__ wr, int K,
                                           bool vec, float* y, int N, float b, float (*red)[32]) {
	float acc[TT];
	QF_K_UNROLL
	for (int t = 0; t < TT; t++)
		acc[t] = 0.0f;
	const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
	if (vec) {
		// 8 bf16 (16 bytes) per load, two loads in flight per thread.
		const int K8 = K >> 3;
		const qf_k_u32x4* w8 = (const qf_k_u32x4*)wr;
		int c = tid;
		for (; c + nt < K8; c += 2 * nt) {
			const qf_k_u32x4 p0 = w8[c], p1 = w8[c + nt];
			const float a[16] = {
			    __uint_as_float(p0.x << 16), __uint_as_float(p0.x & 0xffff0000u),
			    __uint_as_float(p0.y << 16), __uint_as_float(p0.y & 0xffff0000u),
			    __uint_as_float(p0.z << 16), __uint_as_float(p0.z & 0xffff0000u),
			    __uint_as_float(p0.w << 16), __uint_as_float(p0.w & 0xffff0000u),
			    __uint_as_float(p1.x << 16), __uint_as_float(p1.x & 0xffff0000u),
			    __uint_as_float(p1.y << 16), __uint_as_float(p1.y & 0xffff0000u),
			    __uint_as_float(p1.z << 16), __uint_as_float(p1.z & 0xffff0000u),
			    __uint_as_float(p1.w << 16), __uint_as_float(p1.w & 0xffff0000u)};
			QF_K_UNROLL
			for (int t = 0; t < TT; t++) {
				const qf_k_f32x4* xr = (const qf_k_f32x4*)(x + (long long)t * K);
				const qf_k_f32x4 u0 = xr[2 * c], u1 = xr[2 * c + 1];
				const qf_k_f32x4 v0 = xr[2 * (c + nt)], v1 = xr[2 * (c + nt) + 1];
				float s = acc[t];
				s += u0.x * a[0] + u0.y * a[1] + u0.z * a[2] + u0.w * a[3];
				s += u1.x * a[4] + u1.y * a[5] + u1.z * a[6] + u1.w * a[7];
				s += v0.x * a[8] + v0.y * a[9] + v0.z * a[10] + v0.w * a[11];
				s += v1.x * a[12] + v1.y * a[13] + v1.z * a[14] + v1.w * a[15];
				acc[t] = s;
			}
		}
		if (c < K8) {
			const qf_k_u32x4 p0 = w8[c];
			const float a[8] = {
			    __uint_as_float(p0.x << 16), __uint_as_float(p0.x & 0xffff0000u),
			    __uint_as_float(p0.y << 16), __uint_as_float(p0.y & 0xffff0000u),
			    __uint_as_float(p0.z << 16), __uint_as_float(p0.z & 0xffff0000u),
			    __uint_as_float(p0.w << 16), __uint_as_float(p0.w & 0xffff0000u)};
			QF_K_UNROLL
			for (int t = 0; t < TT; t++) {
				const qf_k_f32x4* xr = (const qf_k_f32x4*)(x + (long long)t * K);
				const qf_k_f32x4 u0 = xr[2 * c], u1 = xr[2 * c + 1];
				float s = acc[t];
				s += u0.x * a[0] + u0.y * a[1] + u0.z * a[2] + u0.w * a[3];
				s += u1.x * a[4] + u1.y * a[5] + u1.z * a[6] + u1.w * a[7];
				acc[t] = s;
			}
		}
	} else {
		for (int k = tid; k < K; k += nt) {
			const float wv = qf_k_bf16_f32(wr[k]);
			QF_K_UNROLL
			for (int t = 0; t < TT; t++)
				acc[t] += x[(long long)t * K + k] * wv;
		}
	}
	qf_k_gemv_store<TT>(acc, y, N, b, red);
}

template <int TT>
__device__ inline void qf_k_gemv_tile(const float* __restrict__ x, const float* __restrict__ wr, int K, bool vec,
                                          float* y, int N, float b, float (*red)[32]) {
	float acc[TT];
	QF_K_UNROLL
	for (int t = 0; t < TT; t++)
		acc[t] = 0.0f;
	const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
	if (vec) {
		// 4 floats (16 bytes) per load, two loads in flight per thread.
		const int K4 = K >> 2;
		const qf_k_f32x4* w4 = (const qf_k_f32x4*)wr;
		int c = tid;
		for (; c + nt < K4; c += 2 * nt) {
			const qf_k_f32x4 p0 = w4[c], p1 = w4[c + nt];
			QF_K_UNROLL
			for (int t = 0; t < TT; t++) {
				const qf_k_f32x4* xr = (const qf_k_f32x4*)(x + (long long)t * K);
				const qf_k_f32x4 u = xr[c], v = xr[c + nt];
				float s = acc[t];
				s += u.x * p0.x + u.y * p0.y + u.z * p0.z + u.w * p0.w;
				s += v.x * p1.x + v.y * p1.y + v.z * p1.z + v.w * p1.w;
				acc[t] = s;
			}
		}
		if (c < K4) {
			const qf_k_f32x4 p0 = w4[c];
			QF_K_UNROLL
			for (int t = 0; t < TT; t++) {
				const qf_k_f32x4 u = ((const qf_k_f32x4*)(x + (long long)t * K))[c];
				acc[t] += u.x * p0.x + u.y * p0.y + u.z * p0.z + u.w * p0.w;
			}
		}
	} else {
		for (int k = tid; k < K; k += nt) {
			const float wv = wr[k];
			QF_K_UNROLL
			for (int t = 0; t < TT; t++)
				acc[t] += x[(long long)t * K + k] * wv;
		}
	}
	qf_k_gemv_store<TT>(acc, y, N, b, red);
}

// qf_k_gemv is the block loop of both GEMV kernels: output columns n by
// blockIdx.x, rows in tiles of up to 8 (qf_k_gemv_tile overloads pick the
// bf16 or float weight loads).
template <class W>
__device__ inline void qf_k_gemv(const float* __restrict__ x, const W* __restrict__ w, const float* __restrict__ bias,
                                 float* __restrict__ y, int T, int N, int K, bool vec, float (*red)[32]) {
	for (int n = (int)blockIdx.x; n < N; n += (int)gridDim.x) {
		const W* wr = w + (long long)n * K;
		const float b = bias ? bias[n] : 0.0f;
		for (int t0 = 0; t0 < T; t0 += 8) {
			const float* xt = x + (long long)t0 * K;
			float* yt = y + (long long)t0 * N + n;
			switch (T - t0) {
			case 1: qf_k_gemv_tile<1>(xt, wr, K, vec, yt, N, b, red); break;
			case 2: qf_k_gemv_tile<2>(xt, wr, K, vec, yt, N, b, red); break;
			case 3: qf_k_gemv_tile<3>(xt, wr, K, vec, yt, N, b, red); break;
			case 4: qf_k_gemv_tile<4>(xt, wr, K, vec, yt, N, b, red); break;
			case 5: qf_k_gemv_tile<5>(xt, wr, K, vec, yt, N, b, red); break;
			case 6: qf_k_gemv_tile<6>(xt, wr, K, vec, yt, N, b, red); break;
			case 7: qf_k_gemv_tile<7>(xt, wr, K, vec, yt, N, b, red); break;
			default: qf_k_gemv_tile<8>(xt, wr, K, vec, yt, N, b, red); break;
			}
		}
	}
}

extern "C" __global__ void qf_gemv_bf16(const float* __restrict__ x, const unsigned short* __restrict__ w,
                                        const float* __restrict__ bias, float* __restrict__ y, int T, int N, int K) {
	__shared__ float red[8][32];
	const bool vec = (K & 7) == 0 && ((((unsigned long long)x) | ((unsigned long long)w)) & 15ull) == 0;
	qf_k_gemv(x, w, bias, y, T, N, K, vec, red);
}

extern "C" __global__ void qf_gemv_f32(const float* __restrict__ x, const float* __restrict__ w,
                                       const float* __restrict__ bias, float* __restrict__ y, int T, int N, int K) {
	__shared__ float red[8][32];
	const bool vec = (K & 3) == 0 && ((((unsigned long long)x) | ((unsigned long long)w)) & 15ull) == 0;
	qf_k_gemv(x, w, bias, y, T, N, K, vec, red);
}

// ---- elementwise ----

extern "C" __global__ void qf_add_bias(float* y, const float* bias, int T, int N) {
	const long long n = (long long)T * N, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
		y[i] += bias[i % N];
}

extern "C" __global__ void qf_embed_bf16(const unsigned short* table, const int* ids, float* out, int T, int H) {
	const long long n = (long long)T * H, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		const long long t = i / H, c = i - t * H;
		out[i] = qf_k_bf16_f32(table[(long long)ids[t] * H + c]);
	}
}

extern "C" __global__ void qf_embed_f32(const float* table, const int* ids, float* out, int T, int H) {
	const long long n = (long long)T * H, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		const long long t = i / H, c = i - t * H;
		out[i] = table[(long long)ids[t] * H + c];
	}
}

extern "C" __global__ void qf_rmsnorm(const float* x, const float* w, float* y, int T, int H, float eps) {
	const int tid = (int)threadIdx.x, nt = (int)blockDim.x;
	for (int t = (int)blockIdx.x; t < T; t += (int)gridDim.x) {
		const float* xr = x + (long long)t * H;
		float* yr = y + (long long)t * H;
		float ss = 0.0f;
		for (int i = tid; i < H; i += nt)
			ss += xr[i] * xr[i];
		ss = qf_k_block_sum(ss);
		const float r = 1.0f / sqrtf(ss / (float)H + eps);
		for (int i = tid; i < H; i += nt)
			yr[i] = w[i] * (xr[i] * r);
	}
}

extern "C" __global__ void qf_add(float* dst, const float* src, int n) {
	const long long stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
		dst[i] += src[i];
}

// Rotates pair j of one head v (in place or from src to dst) at position
// p: both qf_rope and qf_rope_multi, so the same bits.
__device__ inline void qf_k_rope_pair(float* dst, const float* src, int j, int half, int p, const float* inv_freq,
                                      float scale) {
	const float a = (float)p * inv_freq[j];
	const float c = cosf(a) * scale, s = sinf(a) * scale;
	const float v0 = src[j], v1 = src[j + half];
	dst[j] = v0 * c - v1 * s;
	dst[j + half] = v1 * c + v0 * s;
}

extern "C" __global__ void qf_rope(float* x, const int* pos, const float* inv_freq, int T, int C, int headDim,
                                   float scale) {
	const int half = headDim / 2, nh = C / headDim;
	const long long n = (long long)T * nh * half, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		const int j = (int)(i % half);
		const long long th = i / half; // t * nh + h
		const long long t = th / nh;
		float* v = x + t * C + (th - t * nh) * headDim;
		qf_k_rope_pair(v, v, j, half, pos[t], inv_freq, scale);
	}
}

// y [T, k*C]: columns [u*C, (u+1)*C) of row t are row t of x rotated at
// pos[t*k + u] (DCA's query variants, k = 3).
extern "C" __global__ void qf_rope_multi(const float* x, float* y, const int* pos, const float* inv_freq, int T,
                                         int C, int headDim, int k, float scale) {
	const int half = headDim / 2, nh = C / headDim;
	const long long n = (long long)T * k * nh * half, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		const int j = (int)(i % half);
		const long long th = i / half;  // (t * k + u) * nh + h
		const long long tu = th / nh;   // t * k + u
		const long long h = th - tu * nh, t = tu / k;
		qf_k_rope_pair(y + tu * C + h * headDim, x + t * C + h * headDim, j, half, pos[tu], inv_freq, scale);
	}
}

extern "C" __global__ void qf_swiglu(const float* g, const float* u, float* y, int n) {
	const long long stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		const float gv = g[i];
		y[i] = gv / (1.0f + expf(-gv)) * u[i];
	}
}

extern "C" __global__ void qf_write_kv(float* cache, const float* x, const int* slots, int T, int C) {
	const long long n = (long long)T * C, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
		const long long t = i / C, c = i - t * C;
		const int s = slots[t];
		if (s >= 0)
			cache[(long long)s * C + c] = x[i];
	}
}

// ---- attention ----

#define QF_K_ATT_U 4

// D = dims per lane: lane l holds dims l, l+32, …, l+32(D-1) (those below
// head_dim). Each warp walks keys warp, warp+nw, … with an online softmax
// (running max m, sum l, acc); the warps' states are merged through shared
// memory.
//
// With DCA (dca_chunk = c > 0) the keys of a query at position p in chunk
// i = p / c are three segments walked in turn by the same online softmax
// (which is the log-sum-exp merge of the partial attentions): [0, (i-1)c)
// with the inter query (columns 2*heads*head_dim on), [(i-1)c, ic) with
// the successive one (heads*head_dim on), [ic, p] with the intra one;
// empty segments are skipped. Scores are scaled by the row's scale:
// scale * tau(p+1) when dca_orig > 0 (kernels.AttnBatch.RowScale).
template <int D>
__device__ inline void qf_k_attention(const float* __restrict__ q, const float* __restrict__ kc,
                                      const float* __restrict__ vc, float* __restrict__ out, const int* row_seq,
                                      const int* seq_row, const int* seq_start, const int* seq_boff,
                                      const int* blocks, int heads, int kv_heads, int head_dim, int block_size,
                                      float scale, int dca_chunk, int dca_orig, float* sm_m, float* sm_l,
                                      float (*sm_acc)[256]) {
	const int r = (int)blockIdx.x, h = (int)blockIdx.y;
	const int tid = (int)threadIdx.x, lane = tid & 31, warp = tid >> 5;
	const int nw = (int)(blockDim.x >> 5);
	const int s = row_seq[r];
	const int p = seq_start[s] + (r - seq_row[s]); // keys 0..p
	const int kvh = h / (heads / kv_heads);
	const long long ostride = (long long)heads * head_dim, kvstride = (long long)kv_heads * head_dim;
	const long long qstride = dca_chunk > 0 ? 3 * ostride : ostride;
	const float* qr = q + r * qstride + (long long)h * head_dim;
	const int* bt = blocks + seq_boff[s];

	// Segments of keys [lo, hi) and the query variant (column offset) each
	// is scored with.
	int seg_lo[3], seg_hi[3];
	long long seg_q[3];
	int nseg = 0;
	if (dca_chunk > 0) {
		const int c = dca_chunk, i = p / c;
		const int b_succ = i >= 1 ? (i - 1) * c : 0, b_intra = i * c;
		if (b_succ > 0) {
			seg_lo[nseg] = 0, seg_hi[nseg] = b_succ, seg_q[nseg] = 2 * ostride;
			nseg++;
		}
		if (b_intra > b_succ) {
			seg_lo[nseg] = b_succ, seg_hi[nseg] = b_intra, seg_q[nseg] = ostride;
			nseg++;
		}
		seg_lo[nseg] = b_intra, seg_hi[nseg] = p + 1, seg_q[nseg] = 0;
		nseg++;
		if (dca_orig > 0 && p + 1 > dca_orig)
			scale = (float)((double)scale * (0.1 * log((double)(p + 1) / (double)dca_orig) + 1.0));
	} else {
		seg_lo[0] = 0, seg_hi[0] = p + 1, seg_q[0] = 0;
		nseg = 1;
	}

	float qv[D], acc[D];
	QF_K_UNROLL
	for (int i = 0; i < D; i++)
		acc[i] = 0.0f;
	float m = qf_k_neg_inf(), l = 0.0f;
	for (int sg = 0; sg < nseg; sg++) {
		const int lo = seg_lo[sg], hi = seg_hi[sg];
		QF_K_UNROLL
		for (int i = 0; i < D; i++) {
			const int d = lane + 32 * i;
			qv[i] = d < head_dim ? qr[seg_q[sg] + d] : 0.0f;
		}
		// Keys go QF_K_ATT_U at a time (warp w: lo+w, lo+w+nw, …,
		// lo+w+(U-1)nw, then lo+w+U·nw, …) so that each lane has U loads and
		// U reductions in flight.
		for (int j0 = lo + warp; j0 < hi; j0 += QF_K_ATT_U * nw) {
			float kv[QF_K_ATT_U][D], vv[QF_K_ATT_U][D], sc[QF_K_ATT_U];
			QF_K_UNROLL
			for (int u = 0; u < QF_K_ATT_U; u++) {
				const int j = j0 + u * nw;
				const bool ok = j < hi; // warp-uniform
				const float* kr = kc;
				const float* vr = vc;
				if (ok) {
					const int blk = j / block_size;
					const long long slot = (long long)bt[blk] * block_size + (j - blk * block_size);
					kr = kc + slot * kvstride + (long long)kvh * head_dim;
					vr = vc + slot * kvstride + (long long)kvh * head_dim;
				}
				QF_K_UNROLL
				for (int i = 0; i < D; i++) {
					const int d = lane + 32 * i;
					kv[u][i] = ok && d < head_dim ? kr[d] : 0.0f;
					vv[u][i] = ok && d < head_dim ? vr[d] : 0.0f;
				}
			}
			QF_K_UNROLL
			for (int u = 0; u < QF_K_ATT_U; u++) {
				float dot = 0.0f;
				QF_K_UNROLL
				for (int i = 0; i < D; i++)
					dot += qv[i] * kv[u][i];
				sc[u] = dot;
			}
			QF_K_UNROLL
			for (int off = 16; off > 0; off >>= 1) {
				QF_K_UNROLL
				for (int u = 0; u < QF_K_ATT_U; u++)
					sc[u] += __shfl_xor_sync(0xffffffffu, sc[u], off);
			}
			float mn = m;
			QF_K_UNROLL
			for (int u = 0; u < QF_K_ATT_U; u++) {
				sc[u] = j0 + u * nw < hi ? sc[u] * scale : qf_k_neg_inf();
				mn = fmaxf(mn, sc[u]);
			}
			const float corr = expf(m - mn); // 0 for the first keys (m = -inf)
			l *= corr;
			QF_K_UNROLL
			for (int i = 0; i < D; i++)
				acc[i] *= corr;
			QF_K_UNROLL
			for (int u = 0; u < QF_K_ATT_U; u++) {
				const float pe = expf(sc[u] - mn); // 0 past the segment
				l += pe;
				QF_K_UNROLL
				for (int i = 0; i < D; i++)
					acc[i] += pe * vv[u][i];
			}
			m = mn;
		}
	}

	if (lane == 0) {
		sm_m[warp] = m;
		sm_l[warp] = l;
	}
	QF_K_UNROLL
	for (int i = 0; i < D; i++) {
		const int d = lane + 32 * i;
		if (d < head_dim)
			sm_acc[warp][d] = acc[i];
	}
	__syncthreads();
	float M = qf_k_neg_inf();
	for (int w = 0; w < nw; w++)
		if (sm_l[w] > 0.0f)
			M = fmaxf(M, sm_m[w]);
	float L = 0.0f;
	for (int w = 0; w < nw; w++)
		if (sm_l[w] > 0.0f)
			L += sm_l[w] * expf(sm_m[w] - M);
	const float inv = L > 0.0f ? 1.0f / L : 0.0f;
	float* orow = out + r * ostride + (long long)h * head_dim;
	for (int d = tid; d < head_dim; d += (int)blockDim.x) {
		float o = 0.0f;
		for (int w = 0; w < nw; w++)
			if (sm_l[w] > 0.0f)
				o += sm_acc[w][d] * expf(sm_m[w] - M);
		orow[d] = o * inv;
	}
}

extern "C" __global__ void qf_attention(const float* q, const float* kc, const float* vc, float* out,
                                        const int* row_seq, const int* seq_row, const int* seq_start,
                                        const int* seq_boff, const int* blocks, int heads, int kv_heads,
                                        int head_dim, int block_size, float scale, int dca_chunk, int dca_orig) {
	__shared__ float sm_m[8], sm_l[8]; // per warp: running max, sum
	__shared__ float sm_acc[8][256];   // per warp: unnormalised output
	switch ((head_dim + 31) >> 5) {
#define QF_K_ATT(D)                                                                                             \
	case D:                                                                                                     \
		qf_k_attention<D>(q, kc, vc, out, row_seq, seq_row, seq_start, seq_boff, blocks, heads, kv_heads,         \
		                  head_dim, block_size, scale, dca_chunk, dca_orig, sm_m, sm_l, sm_acc);                 \
		break;
		QF_K_ATT(1)
		QF_K_ATT(2)
		QF_K_ATT(3)
		QF_K_ATT(4)
		QF_K_ATT(5)
		QF_K_ATT(6)
		QF_K_ATT(7)
		QF_K_ATT(8)
#undef QF_K_ATT
	default: break;
	}
}

// ---- rows ----

extern "C" __global__ void qf_gather(const float* x, const int* rows, float* y, int n, int H) {
	const long long total = (long long)n * H, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
		const long long r = i / H, c = i - r * H;
		y[i] = x[(long long)rows[r] * H + c];
	}
}

extern "C" __global__ void qf_scatter_add(float* dst, const float* src, const int* rows, const float* scale, int n,
                                          int H) {
	const long long total = (long long)n * H, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += stride) {
		const long long r = i / H, c = i - r * H;
		const float sv = scale ? scale[r] : 1.0f;
		atomicAdd(dst + (long long)rows[r] * H + c, sv * src[i]);
	}
}

extern "C" __global__ void qf_scale_rows(float* x, const float* s, int T, int H) {
	const long long n = (long long)T * H, stride = (long long)gridDim.x * blockDim.x;
	for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
		x[i] *= s[i / H];
}
