// The greedy token of each row of logits, on every thread: argmax over the last dimension of an (M, N) float32 tensor.
//
// Why: a greedy step reads every logit once (50257 per row for GPT-2), and a speculative verification has K + 1 rows.
// numpy's argmax (toyllm/sampling.py `greedy`) runs on one core: 0.25 ms for 9 rows on a 2-core Xeon, about a twentieth
// of the forward that made them, and 0.07 ms for one row. Here each row is cut into pieces of columns (one per
// thread, each at least 16K floats), the pieces are split over torch's threads, and each is scanned 16 floats at a
// time.
//
// Ties go to the lowest index and a NaN counts as the largest value (its first occurrence wins), as torch.argmax does.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

struct Best {
    float value;
    int64_t index;  // -1: an empty range
};

// The first NaN wins; otherwise the larger value, then the smaller index. `a` covers indices before `b`'s.
Best better(Best a, Best b) {
    if (a.index < 0) return b;
    if (b.index < 0) return a;
    if (std::isnan(a.value)) return a;
    if (std::isnan(b.value)) return b;
    return b.value > a.value ? b : a;
}

__attribute__((target("avx512f"))) Best scan_avx512(const float* x, int64_t begin, int64_t end) {
    if (begin >= end) return {0.0f, -1};
    // Pass 1: the maximum, 16 lanes at a time, and whether there is any NaN (a NaN compares unordered with itself).
    __m512 top = _mm512_set1_ps(-INFINITY);
    __mmask16 nan = 0;
    int64_t i = begin;
    for (; i + 16 <= end; i += 16) {
        const __m512 v = _mm512_loadu_ps(x + i);
        top = _mm512_max_ps(top, v);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    }
    float best = _mm512_reduce_max_ps(top);
    bool has_nan = nan != 0;
    for (int64_t j = i; j < end; ++j) {
        has_nan |= std::isnan(x[j]);
        best = x[j] > best ? x[j] : best;
    }
    // Pass 2: the first index holding it (the range is in L1/L2 by now), 16 lanes at a time.
    if (has_nan) {
        for (int64_t j = begin; j < end; ++j)
            if (std::isnan(x[j])) return {x[j], j};
    }
    const __m512 target = _mm512_set1_ps(best);
    int64_t j = begin;
    for (; j + 16 <= end; j += 16) {
        const __mmask16 hit = _mm512_cmp_ps_mask(_mm512_loadu_ps(x + j), target, _CMP_EQ_OQ);
        if (hit) return {best, j + __builtin_ctz(hit)};
    }
    for (; j < end; ++j)
        if (x[j] == best) return {best, j};
    return {best, begin};  // not reached: `best` is one of the values
}

Best scan_scalar(const float* x, int64_t begin, int64_t end) {
    Best b{0.0f, -1};
    for (int64_t j = begin; j < end; ++j) b = better(b, {x[j], j});
    return b;
}

Best scan(const float* x, int64_t begin, int64_t end) {
    static const bool wide = __builtin_cpu_supports("avx512f");
    return wide ? scan_avx512(x, begin, end) : scan_scalar(x, begin, end);
}

// x: (M, N) float32 contiguous, N >= 1. Returns (M,) int64.
torch::Tensor argmax_rows(torch::Tensor x) {
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2 && x.is_contiguous(),
                "argmax_rows: x must be a contiguous (M, N) float32 CPU tensor");
    const int64_t M = x.size(0), N = x.size(1);
    TORCH_CHECK(N > 0, "argmax_rows: rows must not be empty");
    auto out = torch::empty({M}, x.options().dtype(at::kLong));
    const float* xp = x.data_ptr<float>();
    int64_t* op = out.data_ptr<int64_t>();
    // Every row cut into `parts` pieces of columns, one task each, so one row still uses every thread. A piece of at
    // least 16K floats (64 KB) is worth a thread. Tasks go piece by piece (all rows' first pieces, then the second
    // ones...), so with one piece per thread a thread scans a band of columns: about the band the same thread wrote
    // when the kernel's product made these logits (amx.cpp and gemv.cpp split the output columns in contiguous
    // ranges too), still in that core's cache.
    const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), N / 16384));
    const int64_t piece = (N + parts - 1) / parts;
    std::vector<Best> found(M * parts);
    at::parallel_for(0, M * parts, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
            const int64_t row = t % M, lo = (t / M) * piece, hi = std::min(N, lo + piece);
            found[t] = scan(xp + row * N, lo, hi);
        }
    });
    for (int64_t row = 0; row < M; ++row) {
        Best b{0.0f, -1};
        for (int64_t p = 0; p < parts; ++p) b = better(b, found[p * M + row]);  // pieces in index order
        op[row] = b.index;
    }
    return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toyllm, m) { m.def("argmax_rows(Tensor x) -> Tensor"); }
TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("argmax_rows", &argmax_rows); }
