// Attention over a KV cache in one operator: write the step's keys and values into the cache, then let each new query
// attend to every cached key up to its own position (the bottom-right causal mask), without building a mask.
//
// Why: at decode time attention is tiny arithmetic (a 3-token verification of a 6-layer, 384-wide model is about 0.1
// MFLOP per layer) wrapped in a dozen operators: split, views, two cache writes, a mask, SDPA, a transpose and a copy
// back. In a profile on 2 CPU cores SDPA alone took 27 us per layer for one new row and 39 us for three, and a
// speculative round pays for those extra rows where plain decoding does not. Here it is one call.
//
// Queries of one (sequence, head) go in groups that share each load of keys and values, but each query's arithmetic
// depends on its own position alone, so a row's result is the same bit for bit in a one-token step and in a
// verification of K + 1 tokens.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

float dot(const float* a, const float* b, int64_t n) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
    }
    for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    float s = hsum(_mm256_add_ps(acc0, acc1));
    for (; i < n; ++i) s = std::fma(a[i], b[i], s);
    return s;
}

// The 8 sums of a0 .. a7 (8 lanes each), as the 8 lanes of one vector: a transpose by pairwise adds, instead of 8
// horizontal sums.
__m256 sums8(__m256 a0, __m256 a1, __m256 a2, __m256 a3, __m256 a4, __m256 a5, __m256 a6, __m256 a7) {
    const __m256 t0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));  // a0..a3's quarter sums
    const __m256 t1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));  // a4..a7's
    return _mm256_add_ps(_mm256_permute2f128_ps(t0, t1, 0x20), _mm256_permute2f128_ps(t0, t1, 0x31));
}

// For n queries q[t], each over its first S[t] keys (keys: (max S, D)): scores[t * stride + j] = scale * q[t] . keys[j].
// Eight keys at a time, their dot products summed together (sums8), and each block of eight keys, loaded once, serves
// every query of the group from L1. Per query the arithmetic is fixed by its own S (which keys form full blocks of
// eight, the order of every sum), so a row comes out the same whatever other rows share the call.
void scores_of(const float* const* q, const int64_t* S, int64_t n, const float* keys, int64_t D, float scale,
               float* scores, int64_t stride) {
    const int64_t Dv = D / 8 * 8, S_max = S[n - 1];  // S grows with t: query t sits at position past + t
    for (int64_t j = 0; j + 8 <= S_max; j += 8) {
        const float* k = keys + j * D;
        for (int64_t t = 0; t < n; ++t) {
            if (j + 8 > S[t]) continue;  // past this query's last full block: its tail is done below
            __m256 a[8];
            for (int i = 0; i < 8; ++i) a[i] = _mm256_setzero_ps();
            for (int64_t d = 0; d < Dv; d += 8) {
                const __m256 qv = _mm256_loadu_ps(q[t] + d);
                for (int i = 0; i < 8; ++i) a[i] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + i * D + d), a[i]);
            }
            alignas(32) float s8[8];
            _mm256_store_ps(s8, sums8(a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]));
            for (int i = 0; i < 8; ++i) {
                for (int64_t d = Dv; d < D; ++d) s8[i] = std::fma(q[t][d], k[i * D + d], s8[i]);  // D % 8 != 0
                scores[t * stride + j + i] = s8[i] * scale;
            }
        }
    }
    for (int64_t t = 0; t < n; ++t)
        for (int64_t j = S[t] / 8 * 8; j < S[t]; ++j) scores[t * stride + j] = dot(q[t], keys + j * D, D) * scale;
}

// out[t][0:D] = sum over j < S[t] of w[t * stride + j] * values[j], for n queries, two at a time so that each value
// loaded serves both. Outputs stay in registers, 32 per query while the values stream past, then 8, then one by one;
// each query's sum runs over j in order, whatever its partner. Scalar tails use std::fma, never `a += w * v`: the
// compiler may fuse that multiply-add in one copy of a loop and not in another, and a row would then differ by a
// rounding between a call where it has a partner and one where it has none.
void weighted_sum(const float* w, int64_t stride, const int64_t* S, int64_t n, const float* values, int64_t D,
                  float* const* out) {
    for (int64_t t = 0; t < n; t += 2) {
        const bool pair = t + 1 < n;
        const float* w0 = w + t * stride;
        const float* w1 = pair ? w0 + stride : w0;
        const int64_t S0 = S[t], S1 = pair ? S[t + 1] : S[t];  // S0 <= S1
        int64_t d = 0;
        for (; d + 32 <= D; d += 32) {
            __m256 a[4], b[4];
            for (int i = 0; i < 4; ++i) a[i] = b[i] = _mm256_setzero_ps();
            for (int64_t j = 0; j < S1; ++j) {
                const float* v = values + j * D + d;
                const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                             v3 = _mm256_loadu_ps(v + 24);
                if (j < S0) {
                    const __m256 x = _mm256_set1_ps(w0[j]);
                    a[0] = _mm256_fmadd_ps(x, v0, a[0]);
                    a[1] = _mm256_fmadd_ps(x, v1, a[1]);
                    a[2] = _mm256_fmadd_ps(x, v2, a[2]);
                    a[3] = _mm256_fmadd_ps(x, v3, a[3]);
                }
                if (pair) {
                    const __m256 x = _mm256_set1_ps(w1[j]);
                    b[0] = _mm256_fmadd_ps(x, v0, b[0]);
                    b[1] = _mm256_fmadd_ps(x, v1, b[1]);
                    b[2] = _mm256_fmadd_ps(x, v2, b[2]);
                    b[3] = _mm256_fmadd_ps(x, v3, b[3]);
                }
            }
            for (int i = 0; i < 4; ++i) {
                _mm256_storeu_ps(out[t] + d + 8 * i, a[i]);
                if (pair) _mm256_storeu_ps(out[t + 1] + d + 8 * i, b[i]);
            }
        }
        for (; d + 8 <= D; d += 8) {
            __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
            for (int64_t j = 0; j < S1; ++j) {
                const __m256 v = _mm256_loadu_ps(values + j * D + d);
                if (j < S0) a = _mm256_fmadd_ps(_mm256_set1_ps(w0[j]), v, a);
                if (pair) b = _mm256_fmadd_ps(_mm256_set1_ps(w1[j]), v, b);
            }
            _mm256_storeu_ps(out[t] + d, a);
            if (pair) _mm256_storeu_ps(out[t + 1] + d, b);
        }
        for (; d < D; ++d) {
            float a = 0.0f, b = 0.0f;
            for (int64_t j = 0; j < S1; ++j) {
                if (j < S0) a = std::fma(w0[j], values[j * D + d], a);
                if (pair) b = std::fma(w1[j], values[j * D + d], b);
            }
            out[t][d] = a;
            if (pair) out[t + 1][d] = b;
        }
    }
}

// e^x for x <= 0 on 8 lanes: 2^n * e^r with n = round(x / ln 2), r = x - n ln 2 (|r| <= ln(2)/2), e^r by its Taylor
// series to degree 6 (relative error under 2e-7). Inputs below -87 give about 1e-38 instead of 0, nothing next to
// the row's largest weight, which is 1.
__m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.4426950408889634f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.6931471805599453f), x);
    __m256 e = _mm256_set1_ps(1.0f / 720);
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 120));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 24));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f / 6));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(0.5f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
    e = _mm256_fmadd_ps(e, r, _mm256_set1_ps(1.0f));
    const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(e, _mm256_castsi256_ps(bits));  // * 2^n
}

// scores[0:S] -> exp(scores - max) in place; returns their sum.
float softmax_numerators(float* scores, int64_t S) {
    float top = -INFINITY;
    for (int64_t j = 0; j < S; ++j) top = std::max(top, scores[j]);
    const __m256 m = _mm256_set1_ps(top);
    __m256 acc = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 8 <= S; j += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + j), m));
        _mm256_storeu_ps(scores + j, e);
        acc = _mm256_add_ps(acc, e);
    }
    float total = hsum(acc);
    if (j < S) {  // the tail through a padded buffer, with the same arithmetic as the lanes above
        alignas(32) float tail[8];
        for (int64_t i = 0; i < 8; ++i) tail[i] = j + i < S ? scores[j + i] - top : -INFINITY;
        _mm256_store_ps(tail, exp_nonpositive(_mm256_load_ps(tail)));
        for (int64_t i = 0; j + i < S; ++i) {
            scores[j + i] = tail[i];
            total += tail[i];
        }
    }
    return total;
}

}  // namespace

// qkv: (B, T, 3C) float32, c_attn's output (queries, keys, values side by side); k_cache, v_cache: (B, H, L, D)
// float32 with H * D = C; past: the rows already cached. Writes rows [past, past + T) of both caches and returns the
// attention output (B, T, C), heads side by side, as SDPA followed by the transpose and reshape would.
torch::Tensor cached_attention(torch::Tensor qkv, torch::Tensor k_cache, torch::Tensor v_cache, int64_t past) {
    TORCH_CHECK(qkv.device().is_cpu() && qkv.scalar_type() == at::kFloat && qkv.dim() == 3 && qkv.is_contiguous(),
                "cached_attention: qkv must be a contiguous (B, T, 3C) float32 CPU tensor");
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.dim() == 4 && k_cache.is_contiguous() &&
                    v_cache.sizes() == k_cache.sizes() && v_cache.scalar_type() == at::kFloat &&
                    v_cache.is_contiguous(),
                "cached_attention: the caches must be two contiguous (B, H, L, D) float32 tensors");
    const int64_t B = qkv.size(0), T = qkv.size(1), C3 = qkv.size(2);
    const int64_t H = k_cache.size(1), L = k_cache.size(2), D = k_cache.size(3), C = H * D;
    TORCH_CHECK(k_cache.size(0) == B && C3 == 3 * C, "cached_attention: qkv and the caches do not fit together");
    TORCH_CHECK(k_cache.device().is_cpu() && v_cache.device().is_cpu(), "cached_attention: the caches must be on the CPU");
    TORCH_CHECK(past >= 0 && past + T <= L, "cached_attention: the cache holds ", L, " rows, not ", past + T);
    auto y = torch::empty({B, T, C}, qkv.options());
    if (B == 0 || T == 0 || H == 0) return y;
    const float* src = qkv.data_ptr<float>();
    float* kc = k_cache.data_ptr<float>();
    float* vc = v_cache.data_ptr<float>();
    float* out = y.data_ptr<float>();
    for (int64_t b = 0; b < B; ++b)
        for (int64_t t = 0; t < T; ++t)
            for (int64_t h = 0; h < H; ++h) {
                const float* row = src + (b * T + t) * C3 + h * D;
                const int64_t at = ((b * H + h) * L + past + t) * D;
                std::memcpy(kc + at, row + C, D * sizeof(float));
                std::memcpy(vc + at, row + 2 * C, D * sizeof(float));
            }
    const float scale = 1.0f / std::sqrt(static_cast<float>(D));
    // One task per (sequence, head, group of up to 16 queries): a group shares every key and value it loads. A thread
    // takes tasks worth at least 64K multiply-adds (each query costs about (past + T) * D twice over: scores, then
    // the sum), so a one-token step of a 6-head model over 60 keys stays on one thread, where splitting it did not
    // pay (4.3 us a call on one thread, 4.7 us on two, on a 2-core Xeon).
    constexpr int64_t kGroup = 16;
    const int64_t groups = (T + kGroup - 1) / kGroup, tasks = B * H * groups;
    const int64_t work = std::min(T, kGroup) * (past + T) * D;
    at::parallel_for(0, tasks, std::max<int64_t>(1, 65536 / work), [&](int64_t begin, int64_t end) {
        std::vector<float> scores(kGroup * (past + T));
        const float* q[kGroup];
        float* o[kGroup];
        int64_t S[kGroup];
        for (int64_t task = begin; task < end; ++task) {
            const int64_t b = task / (H * groups), h = task / groups % H, t0 = task % groups * kGroup;
            const int64_t n = std::min(kGroup, T - t0), stride = past + T;
            for (int64_t i = 0; i < n; ++i) {
                q[i] = src + (b * T + t0 + i) * C3 + h * D;
                o[i] = out + (b * T + t0 + i) * C + h * D;
                S[i] = past + t0 + i + 1;  // the bottom-right causal mask: keys up to the query's own position
            }
            const float* keys = kc + (b * H + h) * L * D;
            const float* values = vc + (b * H + h) * L * D;
            scores_of(q, S, n, keys, D, scale, scores.data(), stride);
            float inv[kGroup];
            for (int64_t i = 0; i < n; ++i) inv[i] = 1.0f / softmax_numerators(scores.data() + i * stride, S[i]);
            weighted_sum(scores.data(), stride, S, n, values, D, o);
            for (int64_t i = 0; i < n; ++i)
                for (int64_t d = 0; d < D; ++d) o[i][d] *= inv[i];
        }
    });
    return y;
}

TORCH_LIBRARY_FRAGMENT(toyllm, m) {
    m.def("cached_attention(Tensor qkv, Tensor(a!) k_cache, Tensor(b!) v_cache, int past) -> Tensor");
}
TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("cached_attention", &cached_attention); }
