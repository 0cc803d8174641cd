// Matrix products through AMX tiles (Intel Xeon, Sapphire Rapids and later): y = x @ W.T + bias, bfloat16 inputs,
// float32 accumulation, any number of rows of x.
//
// Why: gemv.cpp's extra rows are arithmetic. A speculative verification of K + 1 rows costs 1.2x to 1.7x a one-row
// step on 2 CPU cores (docs/speculative_bench.md), and that ratio v caps the speedup. An AMX unit multiplies a
// 16 x 32 bfloat16 tile by a 32 x 16 one in a single instruction, so 1 or 16 rows of x cost the same instruction
// stream: the time is the time to stream the weights, which are half the bytes of float32. The price is precision:
// x and W are rounded to bfloat16 (8 bits of mantissa) before the product, as under torch's bfloat16 autocast, but
// the result stays float32.
//
// Each output depends only on its own row of x and the fixed order of the k-loop, never on how many rows share the
// call, so a verification of K + 1 rows gives each row exactly the logits a one-row step would (tested).
//
// The weight arrives pre-packed by toyllm/kernels/amx.py in the layout the B operand of TDPBF16PS wants:
// (N/16, K/32, 16, 16, 2), i.e. per block of 16 output columns and 32 inputs, 16 rows of [16 columns x 2 adjacent k].

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

// AMX intrinsics (and "amx-bf16" in __builtin_cpu_supports) need GCC 11 or a recent clang. Older compilers still build
// the rest of the kernel; amx_ready() then says no.
#if defined(__x86_64__) && ((defined(__clang__) && __clang_major__ >= 18) || (!defined(__clang__) && __GNUC__ >= 11))
#define TOYLLM_HAVE_AMX 1
#define TOYLLM_AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bf16")))
#else
#define TOYLLM_HAVE_AMX 0
#endif

namespace {

#if TOYLLM_HAVE_AMX
// The 64-byte operand of LDTILECFG: for each of the 8 tile registers, its rows and its bytes per row.
struct TileConfig {
    uint8_t palette_id;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};
static_assert(sizeof(TileConfig) == 64, "LDTILECFG reads 64 bytes");

// Tile registers (the intrinsics paste their number into the instruction, so they are written as literals below):
// 0..3 accumulate 4 blocks of 16 output columns (C), 4 holds 32 inputs of each row of x (A), and 5 and 6 take turns
// holding weights (B), so one block's load can overlap the previous block's multiply.
constexpr int64_t kBlocks = 4;         // column blocks per pass over x (one C register each)
constexpr int64_t kBlockBytes = 1024;  // one B tile: 16 k-pairs x 16 columns x 2 bfloat16

TOYLLM_AMX void configure(int64_t rows) {
    TileConfig cfg{};
    cfg.palette_id = 1;
    for (int t = 0; t < 5; ++t) {  // C: rows x 16 float32; A: rows x 32 bfloat16
        cfg.rows[t] = static_cast<uint8_t>(rows);
        cfg.colsb[t] = 64;
    }
    for (int t = 5; t < 7; ++t) {  // B: 16 k-pairs x (16 columns x 2) bfloat16
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
}

// GPT-2's GELU, tanh form, on 16 lanes: 0.5 x (1 + tanh(u)) with u = sqrt(2/pi) (x + 0.044715 x^3), computed as the
// equal x * sigmoid(2u) = x / (1 + exp(-2u)). exp(-2u) = 2^t = 2^n * e^r with n = round(t) and r = (t - n) ln 2,
// |r| <= ln(2)/2, e^r by its Taylor series to degree 6 (relative error under 2e-7, about float32's rounding). Fused into c_fc's output (amx.py), it replaces torch's GELU,
// which ran on one thread and cost 25 us for the 9 x 1536 outputs of a verification, 5x one row's.
TOYLLM_AMX __m512 gelu_tanh16(__m512 x) {
    const __m512 x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f), _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), x3, x));
    // -2u in log2 units, clamped so that 2^n stays finite (sigmoid is 0 or 1 there anyway)
    __m512 t = _mm512_mul_ps(u, _mm512_set1_ps(-2.0f * 1.4426950408889634f));
    t = _mm512_min_ps(_mm512_max_ps(t, _mm512_set1_ps(-126.0f)), _mm512_set1_ps(126.0f));
    const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_mul_ps(_mm512_sub_ps(t, n), _mm512_set1_ps(0.6931471805599453f));  // 2^(t-n) = e^r
    __m512 e = _mm512_set1_ps(1.0f / 720);
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 120));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 24));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f / 6));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(0.5f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));
    e = _mm512_fmadd_ps(e, r, _mm512_set1_ps(1.0f));  // e^r
    e = _mm512_scalef_ps(e, n);                        // * 2^n
    return _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0f), e));
}

TOYLLM_AMX void gelu_row(float* row, int64_t cols) {
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) _mm512_storeu_ps(row + j, gelu_tanh16(_mm512_loadu_ps(row + j)));
    if (j < cols) {
        const __mmask16 tail = static_cast<__mmask16>((1u << (cols - j)) - 1);
        _mm512_mask_storeu_ps(row + j, tail, gelu_tanh16(_mm512_maskz_loadu_ps(tail, row + j)));
    }
}

// Column blocks [nb0, nb1) of y for all M rows. xb: (M, Kp) bfloat16 bits; packed: (NB, Kp/32, 16, 16, 2).
// Rows go 16 at a time; a group of 4 column blocks (4 x Kp/32 KB) stays in L2 while the row chunks pass over it, so
// the weights are read from memory once however many rows there are (a long prefill included).
TOYLLM_AMX void column_blocks(const uint16_t* xb, const uint16_t* packed, const float* bias, bool gelu, float* y,
                              int64_t M, int64_t N, int64_t Kp, int64_t nb0, int64_t nb1) {
    const int64_t kb_count = Kp / 32, block = kb_count * kBlockBytes / 2;  // bfloat16 values per column block
    alignas(64) float out[16][16 * kBlocks];
    int64_t configured = 0;
    for (int64_t nb = nb0; nb < nb1; nb += kBlocks) {
        const int64_t g = std::min(kBlocks, nb1 - nb);
        const uint16_t* b = packed + nb * block;
        for (int64_t m0 = 0; m0 < M; m0 += 16) {
            const int64_t rows = std::min<int64_t>(16, M - m0);
            if (rows != configured) {
                configure(rows);
                configured = rows;
            }
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            const uint16_t* a = xb + m0 * Kp;
            for (int64_t kb = 0; kb < kb_count; ++kb) {  // tile numbers are immediates: the 4 blocks are spelled out
                const int64_t at = kb * kBlockBytes / 2;
                _tile_loadd(4, a + kb * 32, Kp * 2);  // A: this chunk's rows of x, inputs kb*32 .. kb*32+31
                _tile_loadd(5, b + at, 64);
                _tile_dpbf16ps(0, 4, 5);  // C0 += A x B
                if (g > 1) {
                    _tile_loadd(6, b + block + at, 64);
                    _tile_dpbf16ps(1, 4, 6);
                }
                if (g > 2) {
                    _tile_loadd(5, b + 2 * block + at, 64);
                    _tile_dpbf16ps(2, 4, 5);
                }
                if (g > 3) {
                    _tile_loadd(6, b + 3 * block + at, 64);
                    _tile_dpbf16ps(3, 4, 6);
                }
            }
            const int64_t n0 = nb * 16, cols = std::min(g * 16, N - n0);  // the last block may be padding
            float* dst = y + m0 * N + n0;
            if (cols == 16 * kBlocks) {  // a whole group: the tiles go straight into y's rows
                _tile_stored(0, dst, N * 4);
                _tile_stored(1, dst + 16, N * 4);
                _tile_stored(2, dst + 32, N * 4);
                _tile_stored(3, dst + 48, N * 4);
            } else {  // the last group: through a buffer, keeping only the real columns
                _tile_stored(0, &out[0][0], sizeof(out[0]));
                _tile_stored(1, &out[0][16], sizeof(out[0]));
                _tile_stored(2, &out[0][32], sizeof(out[0]));
                _tile_stored(3, &out[0][48], sizeof(out[0]));
                for (int64_t m = 0; m < rows; ++m)
                    for (int64_t j = 0; j < cols; ++j) dst[m * N + j] = out[m][j];
            }
            if (bias)
                for (int64_t m = 0; m < rows; ++m)
                    for (int64_t j = 0; j < cols; ++j) dst[m * N + j] += bias[n0 + j];
            if (gelu)
                for (int64_t m = 0; m < rows; ++m) gelu_row(dst + m * N, cols);
        }
    }
    _tile_release();
}

// float32 -> bfloat16 with round-to-nearest-even, zero-padding each row from K to Kp. As torch's .bfloat16() except
// for float32 denormals (below 1.2e-38), which the vector instruction flushes to zero; TDPBF16PS ignores bfloat16
// denormals in any case.
TOYLLM_AMX void to_bfloat16(const float* x, uint16_t* xb, int64_t M, int64_t K, int64_t Kp) {
    for (int64_t m = 0; m < M; ++m) {
        int64_t k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m256bh v = _mm512_cvtneps_pbh(_mm512_loadu_ps(x + m * K + k));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(xb + m * Kp + k), (__m256i)v);
        }
        for (; k < K; ++k) xb[m * Kp + k] = c10::BFloat16(x[m * K + k]).x;
        for (; k < Kp; ++k) xb[m * Kp + k] = 0;
    }
}
#endif

// Whether this CPU has AMX-BF16 and Linux lets this process use it (asked once; the tile registers are 8 KB of state
// the kernel only saves for a process that asked, via arch_prctl, Linux 5.16+). TOYLLM_KERNEL_AMX=0 says no.
bool amx_ready() {
#if TOYLLM_HAVE_AMX
    static const bool ok = [] {
        constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA
        const char* env = std::getenv("TOYLLM_KERNEL_AMX");
        if (env && env[0] == '0') return false;
        const bool cpu = __builtin_cpu_supports("amx-bf16") && __builtin_cpu_supports("avx512f") &&
                         __builtin_cpu_supports("avx512bf16");
        return cpu && syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
    }();
    return ok;
#else
    return false;
#endif
}

// x: (M, K) float32; packed: (ceil(N/16), ceil(K/32), 16, 16, 2) bfloat16, or its bits as int16 (amx.py keeps it
// so); bias: (N,) float32 or empty.
// gelu: apply GPT-2's tanh GELU to the result. Returns (M, N) float32.
torch::Tensor amx_linear(torch::Tensor x, torch::Tensor packed, torch::Tensor bias, int64_t N, bool gelu) {
    TORCH_CHECK(amx_ready(), "amx_linear: this CPU or kernel does not allow AMX");
    TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 2,
                "amx_linear: x must be an (M, K) float32 CPU tensor");
    x = x.contiguous();  // (a no-op when it already is)
    TORCH_CHECK((packed.scalar_type() == at::kBFloat16 || packed.scalar_type() == at::kShort) && packed.dim() == 5 &&
                    packed.is_contiguous() &&
                    packed.size(2) == 16 && packed.size(3) == 16 && packed.size(4) == 2,
                "amx_linear: packed must be a contiguous (N/16, K/32, 16, 16, 2) bfloat16 (or int16) tensor");
    const int64_t M = x.size(0), K = x.size(1), NB = packed.size(0), Kp = packed.size(1) * 32;
    TORCH_CHECK(K > 0 && Kp >= K && Kp < K + 32 && NB * 16 >= N && NB * 16 < N + 16,
                "amx_linear: packed shape does not fit");
    TORCH_CHECK(!bias.numel() || (bias.scalar_type() == at::kFloat && bias.numel() == N),
                "amx_linear: bias must be (N,) float32");
    bias = bias.contiguous();
    auto y = torch::empty({M, N}, x.options());
#if TOYLLM_HAVE_AMX
    if (M == 0) return y;
    auto xb = torch::empty({M, Kp}, x.options().dtype(at::kBFloat16));
    auto* xbp = reinterpret_cast<uint16_t*>(xb.data_ptr<at::BFloat16>());
    to_bfloat16(x.data_ptr<float>(), xbp, M, K, Kp);
    const auto* pp = static_cast<const uint16_t*>(packed.data_ptr());
    const float* bp = bias.numel() ? bias.data_ptr<float>() : nullptr;
    float* yp = y.data_ptr<float>();
    // Tasks of whole 4-block groups, at least 32 KB of weights each, so a small matrix is not split across threads
    // for less work than waking one costs.
    const int64_t groups = (NB + kBlocks - 1) / kBlocks, group_bytes = kBlocks * (Kp / 32) * kBlockBytes;
    at::parallel_for(0, groups, std::max<int64_t>(1, 32768 / group_bytes), [&](int64_t begin, int64_t end) {
        column_blocks(xbp, pp, bp, gelu, yp, M, N, Kp, begin * kBlocks, std::min(NB, end * kBlocks));
    });
#endif
    return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(toyllm, m) {
    m.def("amx_linear(Tensor x, Tensor packed, Tensor bias, int N, bool gelu=False) -> Tensor");
    m.def("amx_ready() -> bool", &amx_ready);
}
TORCH_LIBRARY_IMPL(toyllm, CPU, m) { m.impl("amx_linear", &amx_linear); }
