// harness.cc: runs every kernel of ../kernels.cu through the CPU emulator
// (cuda_emu.h) on random and edge-case inputs and checks it against naive
// double-precision loops. Prints one line per kernel, then "ALL OK" (exit
// 0) or "FAILED" (exit 1).
//
//   g++ -std=c++17 -O1 -pthread emu/harness.cc -o harness && ./harness
#include "cuda_emu.h"

#include "../kernels.cu"
#include "../gemm.cu"

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <numeric>
#include <random>
#include <string>

namespace {

bool g_ok = true;

struct Rng {
	std::mt19937_64 g{12345};
	float uni(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(g); }
	int intn(int n) { return (int)(g() % (uint64_t)n); }
	uint32_t bits() { return (uint32_t)g(); }
};
Rng rng;

std::vector<float> rand_vec(size_t n, float lo = -1.0f, float hi = 1.0f) {
	std::vector<float> v(n);
	for (auto& x : v)
		x = rng.uni(lo, hi);
	return v;
}

float bf16_to_f32(uint16_t h) { return __uint_as_float((uint32_t)h << 16); }

// Nearest-even bf16 worked out from the two neighbours (independent of the
// kernel's bit trick); NaN: sign and top bits kept, quiet bit set.
uint16_t ref_bf16(uint32_t u) {
	if ((u & 0x7fffffffu) > 0x7f800000u)
		return (uint16_t)((u >> 16) | 0x40u);
	const uint32_t lo = u & 0xffff0000u;
	if (lo == u)
		return (uint16_t)(u >> 16);
	const uint32_t hi = lo + 0x10000u; // next bf16 away from zero
	const double f = __uint_as_float(u);
	const double lov = __uint_as_float(lo);
	double hiv;
	if ((hi & 0x7fffffffu) == 0x7f800000u)
		hiv = std::ldexp(f < 0 ? -1.0 : 1.0, 128); // rounding to inf: the next step up
	else
		hiv = __uint_as_float(hi);
	const double dlo = std::fabs(f - lov), dhi = std::fabs(hiv - f);
	if (dlo < dhi)
		return (uint16_t)(lo >> 16);
	if (dhi < dlo)
		return (uint16_t)(hi >> 16);
	return ((lo >> 16) & 1u) == 0 ? (uint16_t)(lo >> 16) : (uint16_t)(hi >> 16);
}

uint16_t to_bf16(float f) { return ref_bf16(__float_as_uint(f)); }

dim3 flat(long long n) {
	long long g = std::min((n + 255) / 256, 65535LL);
	return dim3((unsigned)std::max(g, 1LL));
}

// Compares got with ref within tol (per element); reports the first miss.
// Returns the largest |got-ref|/tol seen (> 1 on failure).
double check(const std::string& what, const float* got, const std::vector<double>& ref,
             const std::vector<double>& tol) {
	double worst = 0;
	for (size_t i = 0; i < ref.size(); i++) {
		const double e = std::fabs((double)got[i] - ref[i]);
		const double ratio = e / tol[i];
		if (!(e <= tol[i])) { // also NaN
			std::printf("  %s: [%zu] got %.9g want %.9g (tolerance %.3g)\n", what.c_str(), i, (double)got[i], ref[i],
			            tol[i]);
			g_ok = false;
			return std::isnan(ratio) ? 1e30 : ratio;
		}
		worst = std::max(worst, ratio);
	}
	return worst;
}

struct Report {
	const char* name;
	int cases = 0;
	double worst = 0;
	bool ok = true;
	std::chrono::steady_clock::time_point t0 = std::chrono::steady_clock::now();
	explicit Report(const char* n) : name(n) {}
	void add(double w) {
		cases++;
		worst = std::max(worst, w);
		if (w > 1)
			ok = false;
	}
	~Report() {
		const double ms =
		    std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
		std::printf("%-16s %s  %3d cases, worst error %.3f of tolerance (%.0f ms)\n", name, ok ? "ok  " : "FAIL", cases,
		            worst, ms);
		std::fflush(stdout);
	}
};

std::vector<double> rel_tol(const std::vector<double>& scale, double rel, double abs = 1e-30) {
	std::vector<double> t(scale.size());
	for (size_t i = 0; i < t.size(); i++)
		t[i] = rel * scale[i] + abs;
	return t;
}

// ---- bf16 conversion ----

void test_cvt() {
	Report rep("qf_cvt_f32_bf16");
	std::vector<uint32_t> u = {
	    0x00000000u, 0x80000000u, 0x3f800000u, 0xbf800000u,
	    0x3f808000u, // tie, even below: 0x3f80
	    0x3f818000u, // tie, odd below: up to 0x3f82
	    0x3f808001u, 0x3f807fffu, 0xbf818000u, 0xbf808000u,
	    0x7f7fffffu, // max float: rounds to +inf
	    0x7f7f7fffu, 0x7f7f8000u, // below / at the tie to inf (tie: odd 0x7f7f goes up, to inf)
	    0x7f7e8000u,              // tie with even below
	    0xff7fffffu, 0x7f800000u, 0xff800000u,
	    0x7fc00000u, 0xffc00000u, 0x7f800001u, // NaN with only the lowest bit: stays NaN
	    0xff800001u, 0x7fa00000u, 0x7fffffffu, 0xffffffffu, 0x7f80ffffu, 0x7fbf8000u,
	    0x00000001u, 0x00008000u, 0x00018000u, 0x007fffffu, 0x80008000u, 0x00808000u};
	for (int i = 0; i < 20000; i++)
		u.push_back(rng.bits());
	for (int i = 0; i < 2000; i++) // ties
		u.push_back((rng.bits() & 0xffff0000u) | 0x8000u);
	const int n = (int)u.size();
	std::vector<float> x(n);
	for (int i = 0; i < n; i++)
		x[i] = __uint_as_float(u[i]);
	for (dim3 g : {flat(n), dim3(3)}) {
		std::vector<uint16_t> y(n, 0xdeadu);
		emu_launch(qf_cvt_f32_bf16, g, dim3(256), x.data(), y.data(), n);
		int bad = 0;
		for (int i = 0; i < n; i++) {
			const uint16_t want = ref_bf16(u[i]);
			const bool nan_in = (u[i] & 0x7fffffffu) > 0x7f800000u;
			const bool nan_out = (y[i] & 0x7fffu) > 0x7f80u;
			if (y[i] != want || nan_in != nan_out) {
				if (bad++ < 5)
					std::printf("  cvt %08" PRIx32 ": got %04x want %04x\n", u[i], y[i], want);
			}
		}
		rep.add(bad ? 2.0 : 0.0);
		if (bad)
			g_ok = false;
	}
}

// ---- GEMV ----

template <class W>
void gemv_case(Report& rep, void (*kern)(const float*, const W*, const float*, float*, int, int, int), int T, int N,
               int K, bool bias, unsigned grid, int wmis, int xmis, bool tiled = false) {
	std::vector<float> xs = rand_vec((size_t)T * K + 8);
	std::vector<W> ws((size_t)N * K + 8);
	std::vector<float> wf((size_t)N * K);
	for (size_t i = 0; i < wf.size(); i++) {
		const float v = rng.uni(-1, 1);
		if constexpr (sizeof(W) == 2) {
			ws[i + wmis] = to_bf16(v);
			wf[i] = bf16_to_f32(ws[i + wmis]);
		} else {
			ws[i + wmis] = v;
			wf[i] = v;
		}
	}
	const float* x = xs.data() + xmis;
	std::vector<float> b = rand_vec(N);
	std::vector<float> y((size_t)T * N, NAN);
	std::vector<double> ref((size_t)T * N), mag((size_t)T * N);
	for (int t = 0; t < T; t++)
		for (int n = 0; n < N; n++) {
			double s = 0, a = 0;
			for (int k = 0; k < K; k++) {
				const double p = (double)x[(size_t)t * K + k] * wf[(size_t)n * K + k];
				s += p;
				a += std::fabs(p);
			}
			if (bias) {
				s += b[n];
				a += std::fabs(b[n]);
			}
			ref[(size_t)t * N + n] = s;
			mag[(size_t)t * N + n] = a;
		}
	if (tiled) // qf_gemm_*: 64×64 tiles of 16×16 threads
		emu_launch(kern, dim3((N + 63) / 64, (T + 63) / 64), dim3(16, 16), x, ws.data() + wmis, bias ? b.data() : nullptr,
		           y.data(), T, N, K);
	else
		emu_launch(kern, dim3(grid), dim3(256), x, ws.data() + wmis, bias ? b.data() : nullptr, y.data(), T, N, K);
	char what[128];
	std::snprintf(what, sizeof what, "%s T=%d N=%d K=%d bias=%d grid=%u misaligned w %d x %d", rep.name, T, N, K,
	              (int)bias, grid, wmis, xmis);
	rep.add(check(what, y.data(), ref, rel_tol(mag, 1e-5)));
}

template <class W>
void gemm_case_list(Report& rep, void (*kern)(const float*, const W*, const float*, float*, int, int, int)) {
	gemv_case(rep, kern, 9, 5, 37, true, 0, 0, 0, true);
	gemv_case(rep, kern, 64, 64, 16, false, 0, 0, 0, true);
	gemv_case(rep, kern, 70, 130, 100, true, 0, 0, 0, true);
	gemv_case(rep, kern, 130, 3, 1, false, 0, 0, 0, true);
}

template <class W>
void test_gemv(const char* name, void (*kern)(const float*, const W*, const float*, float*, int, int, int)) {
	Report rep(name);
	const int Ks[] = {8, 64, 1000, 4104, 37, 200, 12, 1};
	for (int T = 1; T <= 8; T++)
		gemv_case(rep, kern, T, 5, Ks[T - 1], T % 2 == 1, 5, 0, 0);
	gemv_case(rep, kern, 3, 67, 1000, true, 16, 0, 0); // grid < N
	gemv_case(rep, kern, 1, 40, 2048, false, 40, 0, 0);
	gemv_case(rep, kern, 11, 4, 256, true, 4, 0, 0); // T > 8: chunks
	gemv_case(rep, kern, 2, 4, 512, true, 4, 1, 0);  // misaligned w: scalar path
	gemv_case(rep, kern, 2, 4, 512, false, 4, 0, 1); // misaligned x
	gemv_case(rep, kern, 4, 3, 20, false, 3, 0, 0);  // K % 8 = 4
}

// test_gemm checks the tiled prefill GEMM on ragged shapes (tails in T, N
// and K) through the same reference as gemv.
template <class W>
void test_gemm(const char* name, void (*kern)(const float*, const W*, const float*, float*, int, int, int)) {
	Report rep(name);
	gemm_case_list(rep, kern);
}

// ---- elementwise ----

void test_add_bias() {
	Report rep("qf_add_bias");
	for (auto [T, N, g] : {std::tuple{3, 37, 0u}, std::tuple{8, 1000, 2u}, std::tuple{1, 1, 0u}}) {
		std::vector<float> y = rand_vec((size_t)T * N), b = rand_vec(N);
		std::vector<double> ref(y.size()), mag(y.size());
		for (size_t i = 0; i < y.size(); i++) {
			ref[i] = (double)y[i] + b[i % N];
			mag[i] = std::fabs(y[i]) + std::fabs(b[i % N]);
		}
		emu_launch(qf_add_bias, g ? dim3(g) : flat((long long)T * N), dim3(256), y.data(), b.data(), T, N);
		rep.add(check("qf_add_bias", y.data(), ref, rel_tol(mag, 1e-7)));
	}
}

void test_embed() {
	{
		Report rep("qf_embed_bf16");
		for (auto [T, H, g] : {std::tuple{5, 37, 0u}, std::tuple{9, 896, 2u}}) {
			const int V = 11;
			std::vector<uint16_t> tab((size_t)V * H);
			for (auto& v : tab)
				v = to_bf16(rng.uni(-3, 3));
			std::vector<int> ids(T);
			for (auto& i : ids)
				i = rng.intn(V);
			std::vector<float> out((size_t)T * H, NAN);
			std::vector<double> ref(out.size());
			for (int t = 0; t < T; t++)
				for (int i = 0; i < H; i++)
					ref[(size_t)t * H + i] = bf16_to_f32(tab[(size_t)ids[t] * H + i]);
			emu_launch(qf_embed_bf16, g ? dim3(g) : flat((long long)T * H), dim3(256), tab.data(), ids.data(),
			           out.data(), T, H);
			rep.add(check("qf_embed_bf16", out.data(), ref, std::vector<double>(ref.size(), 0.0) /*exact*/) );
		}
	}
	{
		Report rep("qf_embed_f32");
		for (auto [T, H, g] : {std::tuple{5, 37, 0u}, std::tuple{9, 896, 2u}}) {
			const int V = 11;
			std::vector<float> tab = rand_vec((size_t)V * H);
			std::vector<int> ids(T);
			for (auto& i : ids)
				i = rng.intn(V);
			std::vector<float> out((size_t)T * H, NAN);
			std::vector<double> ref(out.size());
			for (int t = 0; t < T; t++)
				for (int i = 0; i < H; i++)
					ref[(size_t)t * H + i] = tab[(size_t)ids[t] * H + i];
			emu_launch(qf_embed_f32, g ? dim3(g) : flat((long long)T * H), dim3(256), tab.data(), ids.data(),
			           out.data(), T, H);
			rep.add(check("qf_embed_f32", out.data(), ref, std::vector<double>(ref.size(), 0.0)));
		}
	}
}

void test_rmsnorm() {
	Report rep("qf_rmsnorm");
	for (auto [T, H, g] : {std::tuple{3, 896, 3u}, std::tuple{5, 100, 2u}, std::tuple{2, 1, 2u},
	                       std::tuple{1, 3000, 1u}, std::tuple{4, 4096, 4u}}) {
		const float eps = 1e-6f;
		std::vector<float> x = rand_vec((size_t)T * H, -2, 2), w = rand_vec(H, 0.5f, 1.5f);
		std::vector<float> y(x.size(), NAN);
		std::vector<double> ref(x.size());
		for (int t = 0; t < T; t++) {
			double ss = 0;
			for (int i = 0; i < H; i++)
				ss += (double)x[(size_t)t * H + i] * x[(size_t)t * H + i];
			const double r = 1.0 / std::sqrt(ss / H + eps);
			for (int i = 0; i < H; i++)
				ref[(size_t)t * H + i] = w[i] * (x[(size_t)t * H + i] * r);
		}
		std::vector<double> mag(ref.size());
		for (size_t i = 0; i < ref.size(); i++)
			mag[i] = std::fabs(ref[i]);
		emu_launch(qf_rmsnorm, dim3(g), dim3(256), x.data(), w.data(), y.data(), T, H, eps);
		rep.add(check("qf_rmsnorm", y.data(), ref, rel_tol(mag, 1e-5)));
	}
}

void test_add() {
	Report rep("qf_add");
	for (int n : {1, 255, 257, 10000}) {
		std::vector<float> d = rand_vec(n), s = rand_vec(n);
		std::vector<double> ref(n), mag(n);
		for (int i = 0; i < n; i++) {
			ref[i] = (double)d[i] + s[i];
			mag[i] = std::fabs(d[i]) + std::fabs(s[i]);
		}
		emu_launch(qf_add, flat(n), dim3(256), d.data(), s.data(), n);
		rep.add(check("qf_add", d.data(), ref, rel_tol(mag, 1e-7)));
	}
}

void test_rope() {
	Report rep("qf_rope");
	for (auto [T, heads, hd, scale] : {std::tuple{4, 3, 64, 1.0f}, std::tuple{3, 2, 128, 0.9f},
	                                   std::tuple{5, 4, 16, 1.0f}, std::tuple{2, 3, 48, 1.1f}}) {
		const int C = heads * hd, half = hd / 2;
		std::vector<float> x = rand_vec((size_t)T * C), x0 = x;
		std::vector<int> pos(T);
		for (auto& p : pos)
			p = rng.intn(5000);
		pos[0] = 0;
		std::vector<float> inv(half);
		for (int j = 0; j < half; j++)
			inv[j] = (float)std::pow(1000000.0, -2.0 * j / hd);
		std::vector<double> ref(x.size()), mag(x.size());
		for (int t = 0; t < T; t++)
			for (int h = 0; h < heads; h++)
				for (int j = 0; j < half; j++) {
					const float a = (float)pos[t] * inv[j];
					const double c = (double)(float)std::cos((double)a) * scale;
					const double s = (double)(float)std::sin((double)a) * scale;
					const size_t i0 = (size_t)t * C + (size_t)h * hd + j, i1 = i0 + half;
					ref[i0] = x0[i0] * c - x0[i1] * s;
					ref[i1] = x0[i1] * c + x0[i0] * s;
					mag[i0] = mag[i1] = (std::fabs(x0[i0]) + std::fabs(x0[i1])) * scale;
				}
		emu_launch(qf_rope, flat((long long)T * C / 2), dim3(256), x.data(), pos.data(), inv.data(), T, C, hd, scale);
		rep.add(check("qf_rope", x.data(), ref, rel_tol(mag, 1e-6)));
		x = x0;
		emu_launch(qf_rope, dim3(1), dim3(256), x.data(), pos.data(), inv.data(), T, C, hd, scale);
		rep.add(check("qf_rope grid 1", x.data(), ref, rel_tol(mag, 1e-6)));
	}
}

// qf_rope_multi: k rotated copies of each row, each bit-identical to
// qf_rope at its position.
void test_rope_multi() {
	Report rep("qf_rope_multi");
	for (auto [T, heads, hd, k] : {std::tuple{4, 3, 64, 3}, std::tuple{5, 2, 16, 3}, std::tuple{3, 1, 8, 2}}) {
		const int C = heads * hd, half = hd / 2;
		const float scale = 1.05f;
		std::vector<float> x = rand_vec((size_t)T * C), x0 = x, y((size_t)T * k * C, NAN);
		std::vector<int> pos((size_t)T * k);
		for (auto& p : pos)
			p = rng.intn(300);
		std::vector<float> inv(half);
		for (int j = 0; j < half; j++)
			inv[j] = (float)std::pow(1000000.0, -2.0 * j / hd);
		emu_launch(qf_rope_multi, flat((long long)T * k * C / 2), dim3(256), x.data(), y.data(), pos.data(),
		           inv.data(), T, C, hd, k, scale);
		std::vector<double> ref(y.size()), zero(y.size(), 0.0);
		for (int u = 0; u < k; u++) {
			std::vector<float> xr = x0;
			std::vector<int> pu(T);
			for (int t = 0; t < T; t++)
				pu[t] = pos[(size_t)t * k + u];
			emu_launch(qf_rope, flat((long long)T * C / 2), dim3(256), xr.data(), pu.data(), inv.data(), T, C, hd,
			           scale);
			for (int t = 0; t < T; t++)
				for (int i = 0; i < C; i++)
					ref[((size_t)t * k + u) * C + i] = xr[(size_t)t * C + i];
		}
		rep.add(check("qf_rope_multi (= qf_rope)", y.data(), ref, zero));
		bool same = true;
		for (size_t i = 0; i < x.size(); i++)
			same = same && x[i] == x0[i];
		if (!same) {
			std::printf("  qf_rope_multi modified its input\n");
			g_ok = false;
		}
	}
}

void test_swiglu() {
	Report rep("qf_swiglu");
	const int n = 3000;
	std::vector<float> g = rand_vec(n, -20, 20), u = rand_vec(n, -2, 2), y(n, NAN);
	const float edge[] = {0.0f, -0.0f, 100.0f, -100.0f, 88.0f, -88.0f, 89.0f, -89.0f, 1e-30f};
	for (int i = 0; i < 9; i++)
		g[i] = edge[i];
	std::vector<double> ref(n), mag(n);
	for (int i = 0; i < n; i++) {
		ref[i] = (double)g[i] / (1.0 + std::exp(-(double)g[i])) * u[i];
		mag[i] = std::fabs(ref[i]);
	}
	emu_launch(qf_swiglu, flat(n), dim3(256), g.data(), u.data(), y.data(), n);
	rep.add(check("qf_swiglu", y.data(), ref, rel_tol(mag, 1e-5, 1e-30)));
}

void test_write_kv() {
	Report rep("qf_write_kv");
	const int slots = 40, C = 96, T = 7;
	std::vector<float> cache = rand_vec((size_t)slots * C), x = rand_vec((size_t)T * C);
	std::vector<int> sl = {5, 39, 0, 17, -1, 18, 6};
	std::vector<double> ref(cache.begin(), cache.end());
	for (int t = 0; t < T; t++)
		if (sl[t] >= 0)
			for (int c = 0; c < C; c++)
				ref[(size_t)sl[t] * C + c] = x[(size_t)t * C + c];
	emu_launch(qf_write_kv, dim3(2), dim3(256), cache.data(), x.data(), sl.data(), T, C);
	rep.add(check("qf_write_kv", cache.data(), ref, std::vector<double>(ref.size(), 0.0)));
}

// ---- attention ----

struct Seq {
	int rows, start; // query rows, position of the first
};

// attention_case checks qf_attention on random q, K, V; with dca_chunk > 0
// q has three variants per row (intra, succ, inter) and each key is scored
// with the one its chunk calls for (qwen2.md 2.8), scores times tau(p+1)
// when dca_orig > 0.
void attention_case(Report& rep, int heads, int kv, int hd, int bs, const std::vector<Seq>& seqs, float qscale,
                    int dca_chunk = 0, int dca_orig = 0) {
	std::vector<int> row_seq, seq_row, seq_start, seq_boff, blocks;
	int T = 0, nblk = 0;
	for (auto& s : seqs)
		nblk += (s.start + s.rows + bs - 1) / bs;
	nblk += 3; // unused blocks
	std::vector<int> perm(nblk);
	std::iota(perm.begin(), perm.end(), 0);
	std::shuffle(perm.begin(), perm.end(), rng.g);
	int used = 0;
	for (size_t si = 0; si < seqs.size(); si++) {
		seq_row.push_back(T);
		seq_start.push_back(seqs[si].start);
		seq_boff.push_back((int)blocks.size());
		const int need = (seqs[si].start + seqs[si].rows + bs - 1) / bs;
		for (int b = 0; b < need; b++)
			blocks.push_back(perm[used++]);
		for (int r = 0; r < seqs[si].rows; r++)
			row_seq.push_back((int)si);
		T += seqs[si].rows;
	}
	const int nslots = nblk * bs, C = heads * hd, KC = kv * hd, QC = dca_chunk > 0 ? 3 * C : C;
	std::vector<float> q = rand_vec((size_t)T * QC, -qscale, qscale);
	std::vector<float> kc = rand_vec((size_t)nslots * KC), vc = rand_vec((size_t)nslots * KC);
	std::vector<float> out((size_t)T * C, NAN);
	const float scale = 1.0f / std::sqrt((float)hd);
	std::vector<double> ref(out.size()), mag(out.size());
	for (int r = 0; r < T; r++) {
		const int s = row_seq[r], p = seq_start[s] + r - seq_row[s];
		double tau = 1;
		if (dca_chunk > 0 && dca_orig > 0 && p + 1 > dca_orig)
			tau = 0.1 * std::log((double)(p + 1) / dca_orig) + 1;
		for (int h = 0; h < heads; h++) {
			const int g = h / (heads / kv);
			std::vector<double> sc(p + 1);
			std::vector<size_t> slot(p + 1);
			double mx = -1e300;
			for (int j = 0; j <= p; j++) {
				slot[j] = (size_t)blocks[seq_boff[s] + j / bs] * bs + j % bs;
				int variant = 0; // intra: the query's own chunk
				if (dca_chunk > 0) {
					const int dc = p / dca_chunk - j / dca_chunk;
					variant = dc == 0 ? 0 : dc == 1 ? 1 : 2;
				}
				double d = 0;
				for (int i = 0; i < hd; i++)
					d += (double)q[(size_t)r * QC + (size_t)variant * C + (size_t)h * hd + i] *
					     kc[slot[j] * KC + (size_t)g * hd + i];
				sc[j] = d * (double)(float)((double)scale * tau);
				mx = std::max(mx, sc[j]);
			}
			double sum = 0;
			for (auto& v : sc)
				sum += (v = std::exp(v - mx));
			for (int i = 0; i < hd; i++) {
				double o = 0, a = 0;
				for (int j = 0; j <= p; j++) {
					const double v = vc[slot[j] * KC + (size_t)g * hd + i];
					o += sc[j] * v;
					a += sc[j] * std::fabs(v);
				}
				ref[(size_t)r * C + (size_t)h * hd + i] = o / sum;
				mag[(size_t)r * C + (size_t)h * hd + i] = a / sum;
			}
		}
	}
	emu_launch(qf_attention, dim3(T, heads), dim3(128), q.data(), kc.data(), vc.data(), out.data(), row_seq.data(),
	           seq_row.data(), seq_start.data(), seq_boff.data(), blocks.data(), heads, kv, hd, bs, scale, dca_chunk,
	           dca_orig);
	char what[160];
	std::snprintf(what, sizeof what, "qf_attention heads %d/%d dim %d block %d rows %d DCA chunk %d orig %d", heads,
	              kv, hd, bs, T, dca_chunk, dca_orig);
	rep.add(check(what, out.data(), ref, rel_tol(mag, 1e-5, 1e-7)));
}

void test_attention() {
	Report rep("qf_attention");
	// prefill from 0, one decode row deep in its sequence, a chunk mid-way
	const std::vector<Seq> mixed = {{5, 0}, {1, 37}, {3, 10}};
	attention_case(rep, 4, 2, 64, 4, mixed, 4.0f);
	attention_case(rep, 4, 2, 16, 16, mixed, 4.0f);
	attention_case(rep, 4, 2, 48, 8, mixed, 4.0f);
	attention_case(rep, 2, 1, 128, 16, {{2, 0}, {1, 70}}, 2.0f);
	attention_case(rep, 2, 2, 256, 4, {{1, 9}, {2, 3}}, 1.0f);
	attention_case(rep, 8, 1, 40, 3, {{1, 0}, {4, 2}}, 6.0f);
	attention_case(rep, 1, 1, 96, 1, {{2, 20}}, 3.0f);
	// DCA: chunks of 5 and 7 positions; rows in chunk 0 (intra only), 1
	// (intra and succ) and further on (all three), a partial last chunk,
	// the temperature past 12 positions.
	attention_case(rep, 4, 2, 16, 4, {{6, 0}, {1, 33}, {4, 17}}, 2.0f, 5, 0);
	attention_case(rep, 4, 2, 40, 3, {{3, 9}, {1, 30}}, 2.0f, 7, 12);
	attention_case(rep, 2, 1, 64, 16, {{2, 40}, {2, 3}}, 1.0f, 16, 20);
}

// ---- rows ----

void test_gather() {
	Report rep("qf_gather");
	const int R = 9, H = 33, n = 14;
	std::vector<float> x = rand_vec((size_t)R * H);
	std::vector<int> rows(n);
	for (auto& r : rows)
		r = rng.intn(R);
	std::vector<float> y((size_t)n * H, NAN);
	std::vector<double> ref(y.size());
	for (int i = 0; i < n; i++)
		for (int c = 0; c < H; c++)
			ref[(size_t)i * H + c] = x[(size_t)rows[i] * H + c];
	emu_launch(qf_gather, flat((long long)n * H), dim3(256), x.data(), rows.data(), y.data(), n, H);
	rep.add(check("qf_gather", y.data(), ref, std::vector<double>(ref.size(), 0.0)));
}

void test_scatter_add() {
	Report rep("qf_scatter_add");
	for (bool withScale : {true, false}) {
		const int R = 7, H = 33, n = 50;
		std::vector<float> d = rand_vec((size_t)R * H), src = rand_vec((size_t)n * H), sc = rand_vec(n, 0, 1);
		std::vector<int> rows(n);
		for (auto& r : rows)
			r = rng.intn(R); // repeats
		rows[0] = rows[1] = rows[2] = 3;
		std::vector<double> ref(d.begin(), d.end()), mag(ref.size());
		for (size_t i = 0; i < ref.size(); i++)
			mag[i] = std::fabs(ref[i]);
		for (int i = 0; i < n; i++)
			for (int c = 0; c < H; c++) {
				const double v = (withScale ? (double)(sc[i] * src[(size_t)i * H + c]) : src[(size_t)i * H + c]);
				ref[(size_t)rows[i] * H + c] += v;
				mag[(size_t)rows[i] * H + c] += std::fabs(v);
			}
		emu_launch(qf_scatter_add, dim3(3), dim3(256), d.data(), src.data(), rows.data(),
		           withScale ? sc.data() : nullptr, n, H);
		rep.add(check("qf_scatter_add", d.data(), ref, rel_tol(mag, 1e-5)));
	}
}

void test_scale_rows() {
	Report rep("qf_scale_rows");
	const int T = 6, H = 301;
	std::vector<float> x = rand_vec((size_t)T * H), s = rand_vec(T, -2, 2);
	std::vector<double> ref(x.size()), mag(x.size());
	for (size_t i = 0; i < x.size(); i++) {
		ref[i] = (double)x[i] * s[i / H];
		mag[i] = std::fabs(ref[i]);
	}
	emu_launch(qf_scale_rows, flat((long long)T * H), dim3(256), x.data(), s.data(), T, H);
	rep.add(check("qf_scale_rows", x.data(), ref, rel_tol(mag, 1e-7)));
}

} // namespace

int main() {
	test_cvt();
	test_gemv("qf_gemv_bf16", qf_gemv_bf16);
	test_gemv("qf_gemv_f32", qf_gemv_f32);
	test_gemm("qf_gemm_bf16", qf_gemm_bf16);
	test_gemm("qf_gemm_f32", qf_gemm_f32);
	test_add_bias();
	test_embed();
	test_rmsnorm();
	test_add();
	test_rope();
	test_rope_multi();
	test_swiglu();
	test_write_kv();
	test_attention();
	test_gather();
	test_scatter_add();
	test_scale_rows();
	if (!g_ok) {
		std::printf("FAILED\n");
		return 1;
	}
	std::printf("ALL OK\n");
	return 0;
}
