// Matrix-vector products for decoding on x86 CPUs with AVX2 and FMA: y = x @ W.T * scale + bias for a few rows of x.
//
// Why this file exists: decoding one token multiplies one activation row by every weight matrix once, so each weight
// is read from memory once and used for a single multiply-add. The speed limit is memory bandwidth, not arithmetic
// (docs/decoding_performance.md). On a 2-core AVX2 CPU, torch's default kernel for a 1-row product (MKL) runs on one
// core and reads about 10 GB/s, half of what the two cores can read together. This kernel does three things:
//
//   1. splits the output rows across all of torch's threads (at::parallel_for), so every core streams weights;
//   2. reads each weight row once for up to 8 rows of x (speculative verification and small batches multiply
//      K+1 or B rows; MKL's small-M path costs about one full pass per row here);
//   3. reads weights stored as float32, bfloat16 or int8 and widens them to float32 in registers, so compact
//      weights really mean fewer bytes read. Accumulation is float32 in every case.
//
// W is (N, K) row-major like nn.Linear's weight; x is (M, K) float32; y is (M, N) float32.
// int8 weights carry one float32 scale per output row: W[n, k] ~ q[n, k] * scale[n] (toyllm/quantize.py).

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>

namespace {

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

// One output row n against R rows of x (R <= 8). U independent accumulators per x row hide the FMA latency:
// with one accumulator every FMA would wait for the previous one (4 cycles), capping a core at 2 weights per cycle.
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

template <typename W>
void gemv_kernel(const W* w, const float* x, const float* scale, const float* bias, float* y, int64_t M, int64_t N,
                 int64_t K) {
    // Each thread takes a contiguous block of output rows: it streams its part of W exactly once.
    // Grain: at least 16 rows per task, so a thread's work outweighs waking it.
    at::parallel_for(0, N, 16, [&](int64_t begin, int64_t end) {
        float out[8];
        for (int64_t n = begin; n < end; ++n) {
            const W* wrow = w + n * K;
            for (int64_t m = 0; m < M; m += 8) {  // x rows in groups of 8; the weight row stays in L1 between groups
                const int64_t r = std::min<int64_t>(8, M - m);
                const float* xs = x + m * K;
                switch (r) {  // R x U accumulators: at most 8 of AVX2's 16 registers
                    case 1: dot_rows<W, 1, 4>(wrow, xs, K, out); break;
                    case 2: dot_rows<W, 2, 2>(wrow, xs, K, out); break;
                    case 3: dot_rows<W, 3, 2>(wrow, xs, K, out); break;
                    case 4: dot_rows<W, 4, 2>(wrow, xs, K, out); break;
                    case 5: dot_rows<W, 5, 1>(wrow, xs, K, out); break;
                    case 6: dot_rows<W, 6, 1>(wrow, xs, K, out); break;
                    case 7: dot_rows<W, 7, 1>(wrow, xs, K, out); break;
                    default: dot_rows<W, 8, 1>(wrow, xs, K, out); break;
                }
                const float sc = scale ? scale[n] : 1.0f;
                const float b = bias ? bias[n] : 0.0f;
                for (int64_t i = 0; i < r; ++i) y[(m + i) * N + n] = out[i] * sc + b;
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
