/* bf16 matrix products on the CPU for a few tokens, from the weights as stored ([O, I] row-major).

   Why: at batch 1 a bf16 product reads each weight once and does one multiply-add with it, so it
   is bound by memory bandwidth; torch's path (oneDNN) either reorders the weight on every call or
   needs a second, prepacked copy of it, and still reads well below the bandwidth llama.cpp's F16
   products reach on the same machine (BENCHMARKS.md, "bf16 decode"). Here each output row is one
   pass over the weight row: AVX-512 BF16 `vdpbf16ps` (32 products per instruction, fp32 sums) on
   the bf16 activations as they are; AVX2 and portable C widen the weights to fp32 (exact) against
   fp32 copies of the activations. The sum order depends only on the shape, never on addresses or
   the thread count, so a matrix in a cache slot and the same matrix resident give the same bits.

   Error against float64 math: fp32 sums of exact products (the bf16 x bf16 products fit fp32),
   then one rounding to the output dtype (0 fp32, 1 bf16).

   Threads: an OpenMP loop over output rows (torch's OpenMP runtime, as qmv.c). `bmv_swiglu`
   computes a whole SwiGLU expert in one call: gate and up rows, silu(gate) * up rounded to bf16
   (where the torch path rounds its hidden activations), then the down rows. */

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h> /* only x86 has it; the SIMD paths below are chosen by the compiler's -m flags */
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_args.h"
#include "kernel_common.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__) && defined(__AVX512F__)
#define BMV_PATH 2
#elif defined(__AVX2__) && defined(__FMA__)
#define BMV_PATH 1
#else
#define BMV_PATH 0
#endif

int bmv_path(void) { return BMV_PATH; } /* 2: AVX-512 BF16, 1: AVX2, 0: portable C */


static __thread Arena arena; /* one per calling thread (kernel_common.h) */

static char *reserve(size_t need) { return arena_reserve(&arena, need); }

/* Activations as a row kernel reads them: bf16 as given (AVX-512 BF16), else fp32 widened once. */
typedef struct {
    const uint16_t *b; /* [N, I] bf16 */
    const float *f;    /* [N, I] fp32 (paths 0 and 1) */
} Rows;

static size_t rows_bytes(size_t n, size_t in) { return BMV_PATH == 2 ? 0 : (4 * n * in + 63) & ~(size_t)63; }

static Rows rows_of(const uint16_t *x, size_t n, size_t in, char *scratch) {
    Rows r = {x, NULL};
#if BMV_PATH != 2
    float *f = (float *)scratch;
    for (size_t i = 0; i < n * in; i++) f[i] = bf16_to_float(x[i]);
    r.f = f;
#else
    (void)n, (void)in, (void)scratch;
#endif
    return r;
}

/* sum_i w[i] * x[i] over one weight row and one token's activations */
static inline float row_dot(const uint16_t *w, const Rows *x, size_t t, size_t I) {
#if BMV_PATH == 2
    const uint16_t *xb = x->b + t * I;
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    size_t i = 0;
    for (; i + 128 <= I; i += 128) {
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(xb + i));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w + i + 32), (__m512bh)_mm512_loadu_si512(xb + i + 32));
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w + i + 64), (__m512bh)_mm512_loadu_si512(xb + i + 64));
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w + i + 96), (__m512bh)_mm512_loadu_si512(xb + i + 96));
    }
    for (; i + 32 <= I; i += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w + i), (__m512bh)_mm512_loadu_si512(xb + i));
    if (i < I) {
        __mmask32 m = (__mmask32)((1ull << (I - i)) - 1);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(m, w + i),
                              (__m512bh)_mm512_maskz_loadu_epi16(m, xb + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif BMV_PATH == 1
    const float *xf = x->f + t * I;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    size_t i = 0;
#define WIDEN(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
    for (; i + 32 <= I; i += 32) {
        a0 = _mm256_fmadd_ps(WIDEN(w + i), _mm256_loadu_ps(xf + i), a0);
        a1 = _mm256_fmadd_ps(WIDEN(w + i + 8), _mm256_loadu_ps(xf + i + 8), a1);
        a2 = _mm256_fmadd_ps(WIDEN(w + i + 16), _mm256_loadu_ps(xf + i + 16), a2);
        a3 = _mm256_fmadd_ps(WIDEN(w + i + 24), _mm256_loadu_ps(xf + i + 24), a3);
    }
#undef WIDEN
    __m256 s8 = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
    s4 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    float s = _mm_cvtss_f32(_mm_add_ss(s4, _mm_movehdup_ps(s4)));
    for (; i < I; i++) s += bf16_to_float(w[i]) * xf[i];
    return s;
#else
    const float *xf = x->f + t * I;
    float acc[8] = {0};
    size_t i = 0;
    for (; i + 8 <= I; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += bf16_to_float(w[i + l]) * xf[i + l];
    float s = 0.f;
    for (int l = 0; l < 8; l++) s += acc[l];
    for (; i < I; i++) s += bf16_to_float(w[i]) * xf[i];
    return s;
#endif
}

static inline void put(void *y, int y_dtype, size_t k, float v) {
    if (y_dtype == 0)
        ((float *)y)[k] = v;
    else
        ((uint16_t *)y)[k] = float_to_bf16(v);
}

/* y[N, O] = x[N, I] @ w.T with x bf16, w bf16 [O, I]; y in y_dtype. Returns 0, or -1 without scratch. */
int bmv(const uint16_t *x, void *y, int y_dtype, int64_t n_tokens, int64_t out_features, int64_t in_features,
        const uint16_t *w, int threads) {
    const size_t N = (size_t)n_tokens, O = (size_t)out_features, I = (size_t)in_features;
    char *p = reserve(rows_bytes(N, I) + 64);
    if (p == NULL) return -1;
    Rows rows = rows_of(x, N, I, p);
    const int parallel = threads > 1 && O * I * N >= (1u << 16);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t o = 0; o < (int64_t)O; o++)
        for (size_t t = 0; t < N; t++) put(y, y_dtype, t * O + (size_t)o, row_dot(w + (size_t)o * I, &rows, t, I));
    return 0;
}

/* A SwiGLU expert: y[N, H] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, w1 and w3 [F, H], w2 [H, F], all
   bf16; gate and up rounded to bf16 as products, the hidden activations rounded to bf16 once. */
int bmv_swiglu(const uint16_t *x, void *y, int y_dtype, int64_t n_tokens, int64_t hidden, int64_t inter,
               const uint16_t *w1, const uint16_t *w3, const uint16_t *w2, int threads) {
    const size_t N = (size_t)n_tokens, H = (size_t)hidden, F = (size_t)inter;
    const size_t hb_bytes = (2 * N * F + 63) & ~(size_t)63;
    char *p = reserve(rows_bytes(N, H) + hb_bytes + rows_bytes(N, F) + 64);
    if (p == NULL) return -1;
    Rows in = rows_of(x, N, H, p);
    uint16_t *hb = (uint16_t *)(p + rows_bytes(N, H));
    char *hf_scratch = p + rows_bytes(N, H) + hb_bytes;
    Rows mid = {hb, NULL};
    const int parallel = threads > 1 && F * H * N >= (1u << 16);
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < (int64_t)F; o++)
            for (size_t t = 0; t < N; t++) {
                float g = bf16_to_float(float_to_bf16(row_dot(w1 + (size_t)o * H, &in, t, H)));
                float u = bf16_to_float(float_to_bf16(row_dot(w3 + (size_t)o * H, &in, t, H)));
                hb[t * F + (size_t)o] = float_to_bf16(g / (1.0f + expf(-g)) * u);
            }
#pragma omp single
        mid = rows_of(hb, N, F, hf_scratch);
#pragma omp for schedule(static)
        for (int64_t o = 0; o < (int64_t)H; o++)
            for (size_t t = 0; t < N; t++) put(y, y_dtype, t * H + (size_t)o, row_dot(w2 + (size_t)o * F, &mid, t, F));
    }
    return 0;
}

/* `bmv_swiglu` with the expert's fixed arguments in one struct filled once (kernel_args.h): a
   foreign-function call costs ~0.2 us an argument. */
int bmv_swiglu_p(const uint16_t *x, void *y, int y_dtype, int64_t n_tokens, const BmvSwigluArgs *w, int threads) {
    return bmv_swiglu(x, y, y_dtype, n_tokens, w->hidden, w->inter, w->w1, w->w3, w->w2, threads);
}
