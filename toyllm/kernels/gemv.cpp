// Matrix-vector products for decoding on x86 CPUs with AVX2 and FMA: y = x @ W.T * scale + bias for a few rows of x.
//
// Why this file exists: decoding one token multiplies one activation row by every weight matrix once, so each weight
// is read from memory once and used for a single multiply-add. The speed limit is memory bandwidth, not arithmetic
// (docs/decoding_performance.md). On a 2-core AVX2 CPU, torch's default kernel for a 1-row product (MKL) runs on one
// core and reads about 10 GB/s, half of what the two cores can read together. This kernel does three things:
//
//   1. splits the output rows across all of torch's threads (at::parallel_for), so every core streams weights;
//   2. reads each weight from memory once for up to 32 rows of x (speculative verification and small batches
//      multiply K+1, B or B x (K+1) rows; MKL's small-M path costs about one full pass per row here), two output rows per
//      pass with a software prefetch, so that 5 rows cost little more than 1 (the extra rows are arithmetic on
//      weights already in registers);
//   3. reads weights stored as float32, bfloat16 or int8 and widens them to float32 in registers, so compact
//      weights really mean fewer bytes read. Accumulation is float32 in every case.
//
// W is (N, K) row-major like nn.Linear's weight; x is (M, K) float32 with M <= 32; y is (M, N) float32.
// int8 weights carry one float32 scale per output row: W[n, k] ~ q[n, k] * scale[n] (toyllm/quantize.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <type_traits>

namespace {

// The most rows of x one call takes (toyllm/kernels/__init__.py MAX_ROWS): verification's K+1, small batches, and a
// batch's B x (K+1) rows. Up to 32 rows the kernel beat torch's GEMM on both reference models, on the whole model
// and on the transformer layers alone (docs/cpu_kernel.md); the two weight rows of a pass stay in L1 while every
// group of x rows goes past them. Beyond that, torch's cache blocking starts to win on small matrices.
constexpr int64_t kMaxRows = 32;

// Widen 8 consecutive weights to 8 float32 lanes.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

inline __m256 load8(const at::BFloat16* p) {
    // bfloat16 is the top half of a float32: zero-extend each 16-bit value to 32 bits and shift it up.
    __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

inline __m256 load8(const int8_t* p) {
    // Sign-extend 8 int8 values to int32, then convert to float32 (exact: |q| <= 127).
    __m128i raw = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(raw));
}

inline float to_float(float v) { return v; }
inline float to_float(at::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(int8_t v) { return static_cast<float>(v); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));  // 8 lanes -> 4
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));                                          // 4 -> 2
    s = _mm_add_ss(s, _mm_movehdup_ps(s));                                           // 2 -> 1
    return _mm_cvtss_f32(s);
}

// How far ahead (in bytes of weights) to ask for the next weights. With several rows of x the loop does enough
// arithmetic per byte that the hardware prefetcher alone falls behind and the core waits on memory; a software
// prefetch 8 KB ahead (two float32 rows of a 1024-wide matrix) keeps the stream going. 4, 16 and 32 KB were no
// better (docs/cpu_kernel.md has the A/B).
constexpr int64_t kPrefetchBytes = 8192;

// One output row against R rows of x (R <= 6). U independent accumulators per x row hide the FMA latency:
// with one accumulator every FMA would wait for the previous one (4 cycles), capping a core at 2 weights per cycle.
// Used for one or two rows of x, where the loop is bound by memory and software prefetch only costs load slots,
// and for the last output row of an odd N.
template <typename W, int R, int U>
inline void dot_rows(const W* w, const float* x, int64_t K, float* out) {
    __m256 acc[R][U];
    for (int r = 0; r < R; ++r)
        for (int u = 0; u < U; ++u) acc[r][u] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
        for (int u = 0; u < U; ++u) {
            __m256 wv = load8(w + k + 8 * u);  // the weights are loaded and widened once for all R rows
            for (int r = 0; r < R; ++r) acc[r][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + r * K + k + 8 * u), acc[r][u]);
        }
    }
    for (int r = 0; r < R; ++r) {
        for (int u = 1; u < U; ++u) acc[r][0] = _mm256_add_ps(acc[r][0], acc[r][u]);
        float s = hsum(acc[r][0]);
        for (int64_t kk = k; kk < K; ++kk) s += to_float(w[kk]) * x[r * K + kk];  // K not a multiple of 8U
        out[r] = s;
    }
}

// Two adjacent output rows (w and w + K) against R rows of x (R <= 6): each 8-wide load of x feeds two FMAs, so
// there are 2 + R loads per 2R FMAs instead of 1 + R per R. That is what lets K+1 = 5 or 9 verification rows cost
// little more than one row: with one output row per pass the loads, not memory, were the limit.
// 2R accumulators + 2 weights + 1 x = at most 15 of AVX2's 16 registers.
template <typename W, int R>
inline void dot_rows_pair(const W* w, const float* x, int64_t K, float* out0, float* out1) {
    constexpr int64_t kLine = 64 / sizeof(W);                // weights per cache line
    constexpr int64_t kAhead = kPrefetchBytes / sizeof(W);  // prefetch distance in weights
    __m256 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
        if (k % kLine == 0) {  // one prefetch per cache line of each of the two weight rows
            _mm_prefetch(reinterpret_cast<const char*>(w + k + kAhead), _MM_HINT_T0);
            _mm_prefetch(reinterpret_cast<const char*>(w + K + k + kAhead), _MM_HINT_T0);
        }
        const __m256 w0 = load8(w + k), w1 = load8(w + K + k);
        for (int r = 0; r < R; ++r) {
            const __m256 xv = _mm256_loadu_ps(x + r * K + k);
            acc0[r] = _mm256_fmadd_ps(w0, xv, acc0[r]);
            acc1[r] = _mm256_fmadd_ps(w1, xv, acc1[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        float s0 = hsum(acc0[r]), s1 = hsum(acc1[r]);
        for (int64_t kk = k; kk < K; ++kk) {  // K not a multiple of 8
            s0 += to_float(w[kk]) * x[r * K + kk];
            s1 += to_float(w[K + kk]) * x[r * K + kk];
        }
        out0[r] = s0;
        out1[r] = s1;
    }
}

// Rows of x are taken in balanced groups of at most `most` (9 -> 5 + 4, not 6 + 3), so no group is a nearly empty
// pass that reads the weights from L1 again for one row.
inline int64_t group_size(int64_t left, int64_t most) {
    const int64_t groups = (left + most - 1) / most;
    return (left + groups - 1) / groups;
}

template <typename W>
void dot_one_output(const W* wrow, const float* x, int64_t M, int64_t K, float* out) {
    for (int64_t m = 0; m < M;) {
        const int64_t r = group_size(M - m, 6);
        const float* xs = x + m * K;
        switch (r) {  // R x U accumulators: at most 8 of AVX2's 16 registers
            case 1: dot_rows<W, 1, 4>(wrow, xs, K, out + m); break;
            case 2: dot_rows<W, 2, 2>(wrow, xs, K, out + m); break;
            case 3: dot_rows<W, 3, 2>(wrow, xs, K, out + m); break;
            case 4: dot_rows<W, 4, 2>(wrow, xs, K, out + m); break;
            case 5: dot_rows<W, 5, 1>(wrow, xs, K, out + m); break;
            default: dot_rows<W, 6, 1>(wrow, xs, K, out + m); break;
        }
        m += r;
    }
}

template <typename W>
void dot_two_outputs(const W* wrow, const float* x, int64_t M, int64_t K, float* out0, float* out1) {
    for (int64_t m = 0; m < M;) {
        const int64_t r = group_size(M - m, 6);
        const float* xs = x + m * K;
        switch (r) {
            case 1: dot_rows_pair<W, 1>(wrow, xs, K, out0 + m, out1 + m); break;
            case 2: dot_rows_pair<W, 2>(wrow, xs, K, out0 + m, out1 + m); break;
            case 3: dot_rows_pair<W, 3>(wrow, xs, K, out0 + m, out1 + m); break;
            case 4: dot_rows_pair<W, 4>(wrow, xs, K, out0 + m, out1 + m); break;
            case 5: dot_rows_pair<W, 5>(wrow, xs, K, out0 + m, out1 + m); break;
            default: dot_rows_pair<W, 6>(wrow, xs, K, out0 + m, out1 + m); break;
        }
        m += r;
    }
}

// -- AVX-512, float32 weights only ----------------------------------------------------------------------------------
// On a CPU that has it (checked at run time; the rest of the file needs only AVX2), a 16-wide FMA does twice the
// work of an 8-wide one, and 32 registers hold 2 x 12 accumulators: a pair of weight rows meets up to 12 rows of x in
// one pass, where AVX2's 16 registers take at most 6 (9 verification rows were two passes, 5 + 4). One row goes the
// same way, two output rows per pass with the prefetch. On an Intel Xeon with AVX-512, interleaved against the AVX2
// code on the trained 6x384 target (docs/cpu_kernel.md): 1 / 3 / 9 rows took about 0.73 / 0.94 / 0.83 of its time.
#define TOYLLM_AVX512 __attribute__((target("avx512f")))
constexpr int kMaxRows512 = 12;

template <int R>
TOYLLM_AVX512 void dot_rows_pair16(const float* w, const float* x, int64_t K, float* out0, float* out1) {
    constexpr int64_t kAhead = kPrefetchBytes / sizeof(float);
    __m512 acc0[R], acc1[R];
    for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {  // 16 floats: one cache line of each weight row per step, one prefetch each
        _mm_prefetch(reinterpret_cast<const char*>(w + k + kAhead), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(w + K + k + kAhead), _MM_HINT_T0);
        const __m512 w0 = _mm512_loadu_ps(w + k), w1 = _mm512_loadu_ps(w + K + k);
        for (int r = 0; r < R; ++r) {
            const __m512 xv = _mm512_loadu_ps(x + r * K + k);
            acc0[r] = _mm512_fmadd_ps(w0, xv, acc0[r]);
            acc1[r] = _mm512_fmadd_ps(w1, xv, acc1[r]);
        }
    }
    for (int r = 0; r < R; ++r) {
        float s0 = _mm512_reduce_add_ps(acc0[r]), s1 = _mm512_reduce_add_ps(acc1[r]);
        for (int64_t kk = k; kk < K; ++kk) {  // K not a multiple of 16
            s0 += w[kk] * x[r * K + kk];
            s1 += w[K + kk] * x[r * K + kk];
        }
        out0[r] = s0;
        out1[r] = s1;
    }
}

TOYLLM_AVX512 void dot_two_outputs16(const float* wrow, const float* x, int64_t M, int64_t K, float* out0,
                                     float* out1) {
    for (int64_t m = 0; m < M;) {
        const int64_t r = group_size(M - m, kMaxRows512);
        const float* xs = x + m * K;
        switch (r) {
            case 1: dot_rows_pair16<1>(wrow, xs, K, out0 + m, out1 + m); break;
            case 2: dot_rows_pair16<2>(wrow, xs, K, out0 + m, out1 + m); break;
            case 3: dot_rows_pair16<3>(wrow, xs, K, out0 + m, out1 + m); break;
            case 4: dot_rows_pair16<4>(wrow, xs, K, out0 + m, out1 + m); break;
            case 5: dot_rows_pair16<5>(wrow, xs, K, out0 + m, out1 + m); break;
            case 6: dot_rows_pair16<6>(wrow, xs, K, out0 + m, out1 + m); break;
            case 7: dot_rows_pair16<7>(wrow, xs, K, out0 + m, out1 + m); break;
            case 8: dot_rows_pair16<8>(wrow, xs, K, out0 + m, out1 + m); break;
            case 9: dot_rows_pair16<9>(wrow, xs, K, out0 + m, out1 + m); break;
            case 10: dot_rows_pair16<10>(wrow, xs, K, out0 + m, out1 + m); break;
            case 11: dot_rows_pair16<11>(wrow, xs, K, out0 + m, out1 + m); break;
            default: dot_rows_pair16<12>(wrow, xs, K, out0 + m, out1 + m); break;
        }
        m += r;
    }
}

// Whether this CPU runs AVX-512F, asked once. TOYLLM_KERNEL_AVX512=0 turns the path off (for an A/B).
bool use_avx512() {
    static const bool ok = [] {
        const char* env = std::getenv("TOYLLM_KERNEL_AVX512");
        return __builtin_cpu_supports("avx512f") && !(env && env[0] == '0');
    }();
    return ok;
}

template <typename W>
void gemv_kernel(const W* w, const float* x, const float* scale, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
    // Each thread takes a contiguous block of output rows: it streams its part of W exactly once.
    // Grain: at least 16 output rows per task, so a thread's work outweighs waking it.
    // float32 weights on an AVX-512 CPU take the 16-wide pair pass for one row (plain decoding) and for 3 or more.
    const bool wide = std::is_same_v<W, float> && M != 2 && use_avx512();
    if (M == 1 && !wide) {  // plain decoding: the hot path, one output row at a time, nothing else in the loop
        at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
            for (int64_t n = begin; n < end; ++n) {
                float out;
                dot_rows<W, 1, 4>(w + n * K, x, K, &out);
                y[n] = out * (scale ? scale[n] : 1.0f) + (bias ? bias[n] : 0.0f);
            }
        });
        return;
    }
    // Two rows of x (the draft's catch-up) go one output row at a time: memory is their only limit, and in the A/B
    // the pair path cost them about 10% more. Three or more (verification, small batches) go two at a time.
    const int64_t step = M == 2 ? 1 : 2;
    at::parallel_for(0, (N + step - 1) / step, 16 / step, [&](int64_t begin, int64_t end) {
        float out[2][kMaxRows];
        for (int64_t i = begin; i < end; ++i) {
            const int64_t n = i * step;
            const int64_t outputs = std::min<int64_t>(step, N - n);  // an odd N leaves one row at the end
            if (outputs == 2) {
                if constexpr (std::is_same_v<W, float>) {
                    if (wide)
                        dot_two_outputs16(w + n * K, x, M, K, out[0], out[1]);
                    else
                        dot_two_outputs(w + n * K, x, M, K, out[0], out[1]);
                } else {
                    dot_two_outputs(w + n * K, x, M, K, out[0], out[1]);
                }
            } else
                dot_one_output(w + n * K, x, M, K, out[0]);
            for (int64_t j = 0; j < outputs; ++j) {
                const float sc = scale ? scale[n + j] : 1.0f;
                const float b = bias ? bias[n + j] : 0.0f;
                for (int64_t m = 0; m < M; ++m) y[m * N + n + j] = out[j][m] * sc + b;
            }
        }
    });
}

// x: (M, K) float32 contiguous; weight: (N, K) float32 / bfloat16 / int8 contiguous;
// scale: (N,) float32 or empty; bias: (N,) float32 or empty. Returns (M, N) float32.
torch::Tensor gemv(torch::Tensor x, torch::Tensor weight, torch::Tensor scale, torch::Tensor bias) {
    TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "gemv: CPU tensors only");
    TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "gemv: shapes (M, K) and (N, K)");
    TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "gemv: x must be contiguous float32");
    TORCH_CHECK(weight.is_contiguous(), "gemv: weight must be contiguous");
    TORCH_CHECK(x.size(0) <= kMaxRows, "gemv: at most 32 rows of x");
    const int64_t M = x.size(0), K = x.size(1), N = weight.size(0);
    const float* sp = nullptr;
    const float* bp = nullptr;
    if (scale.numel()) {
        TORCH_CHECK(scale.scalar_type() == at::kFloat && scale.is_contiguous() && scale.numel() == N, "gemv: scale (N,)");
        sp = scale.data_ptr<float>();
    }
    if (bias.numel()) {
        TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.is_contiguous() && bias.numel() == N, "gemv: bias (N,)");
        bp = bias.data_ptr<float>();
    }
    auto y = torch::empty({M, N}, x.options());
    const float* xp = x.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    switch (weight.scalar_type()) {
        case at::kFloat: gemv_kernel(weight.data_ptr<float>(), xp, sp, bp, yp, M, N, K); break;
        case at::kBFloat16: gemv_kernel(weight.data_ptr<at::BFloat16>(), xp, sp, bp, yp, M, N, K); break;
        case at::kChar: gemv_kernel(weight.data_ptr<int8_t>(), xp, sp, bp, yp, M, N, K); break;
        default: TORCH_CHECK(false, "gemv: weight dtype must be float32, bfloat16 or int8");
    }
    return y;
}

}  // namespace

// Registered as the operator torch.ops.toyllm.gemv: it shows up by name in torch.profiler, and torch.compile treats
// it as one opaque call (with the shape rule registered in toyllm/kernels/__init__.py) instead of breaking the graph.
TORCH_LIBRARY(toyllm, m) { m.def("gemv(Tensor x, Tensor weight, Tensor scale, Tensor bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("gemv", &gemv); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {}  // loading the library is what registers the operator
