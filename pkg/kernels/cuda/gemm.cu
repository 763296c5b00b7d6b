// qf_gemm_bf16 and qf_gemm_f32: y[T, N] = x[T, K] · w[N, K]ᵀ (+ bias[N]),
// x and y float, w bf16 (raw bits) or float; float accumulation. For the
// rows of a prefill chunk (T > 8; qf_gemv_* handles decode rows).
//
// Launch: grid (ceil(N/64), ceil(T/64)), block (16, 16), no dynamic shared
// memory. Each block computes a 64×64 tile of y, each thread 4×4 of it,
// walking K in steps of 16 through shared memory.

#define QF_GT 64
#define QF_GK 16

__device__ __forceinline__ float qf_gemm_load(const unsigned short* w, long i) {
	return __uint_as_float(((unsigned)w[i]) << 16);
}
__device__ __forceinline__ float qf_gemm_load(const float* w, long i) { return w[i]; }

template <typename W>
__device__ void qf_gemm(const float* x, const W* w, const float* bias, float* y, int T, int N, int K) {
	__shared__ float xs[QF_GK][QF_GT + 1];
	__shared__ float ws[QF_GK][QF_GT + 1];
	int tx = threadIdx.x, ty = threadIdx.y; // 16 × 16
	int n0 = blockIdx.x * QF_GT, t0 = blockIdx.y * QF_GT;
	int tid = ty * 16 + tx;
	float acc[4][4];
	for (int i = 0; i < 4; i++)
		for (int j = 0; j < 4; j++)
			acc[i][j] = 0.0f;
	for (int k0 = 0; k0 < K; k0 += QF_GK) {
		// 64 rows × 16 columns of x and of w: 1024 values each, 4 per thread.
		for (int e = tid; e < QF_GT * QF_GK; e += 256) {
			int r = e / QF_GK, c = e % QF_GK;
			int t = t0 + r, n = n0 + r, k = k0 + c;
			xs[c][r] = (t < T && k < K) ? x[(long)t * K + k] : 0.0f;
			ws[c][r] = (n < N && k < K) ? qf_gemm_load(w, (long)n * K + k) : 0.0f;
		}
		__syncthreads();
		for (int c = 0; c < QF_GK; c++) {
			float a[4], b[4];
			for (int i = 0; i < 4; i++) {
				a[i] = xs[c][ty + 16 * i];
				b[i] = ws[c][tx + 16 * i];
			}
			for (int i = 0; i < 4; i++)
				for (int j = 0; j < 4; j++)
					acc[i][j] += a[i] * b[j];
		}
		__syncthreads();
	}
	for (int i = 0; i < 4; i++) {
		int t = t0 + ty + 16 * i;
		if (t >= T)
			continue;
		for (int j = 0; j < 4; j++) {
			int n = n0 + tx + 16 * j;
			if (n < N)
				y[(long)t * N + n] = acc[i][j] + (bias ? bias[n] : 0.0f);
		}
	}
}

extern "C" __global__ void qf_gemm_bf16(const float* x, const unsigned short* w, const float* bias, float* y, int T, int N, int K) {
	qf_gemm(x, w, bias, y, T, N, K);
}

extern "C" __global__ void qf_gemm_f32(const float* x, const float* w, const float* bias, float* y, int T, int N, int K) {
	qf_gemm(x, w, bias, y, T, N, K);
}
