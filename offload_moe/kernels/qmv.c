/* Groupwise-quantized matrix products on the CPU, from the packed codes, with int8 activations.

   Why: a decode step is a chain of matrix-vector products bound by the bytes they read. torch's
   int4 CPU kernel widens every weight to fp32 and multiplies in fp32, so it is bound by
   instructions per weight, not by bandwidth. Here, as in llama.cpp's Q4_0 x Q8_0 products, the
   activations are quantized to int8 (one scale per 64 inputs) and the weights' codes are
   multiplied as bytes (AVX-512 VNNI `vpdpbusd`: 64 products per instruction; AVX2 `vpmaddubsw`;
   NEON `sdot`: 16).

   Weight (one [O, I] matrix, groups of G inputs along a row: see qmv_supported):
     w[o, i] = (code[o, i] - zero[o, g]) * scale[o, g],   g = i / G,  scale/zero fp16 [O, I/G]
   codes, `bits` = 4: uint8 [O, I/2] as stored (pack.py): byte j of a row holds input 2j (low
     nibble) and input 2j + 1 (high nibble), so the kernel reads the checkpoint's bytes as they are.
     Codes of 2- and 3-bit weights are repacked to this layout (4 bits each) by the caller.
   codes, `bits` = 8: uint8 [O, I], one byte per input, as stored.
   Activation (one token row of I inputs): a[i] = round(x[i] / d[b]) in [-127, 127], b = i / 64,
     d[b] = max |x| of block b / 127; the product uses x^ = a * d, so
     y[o] = sum_g scale[o, g] * (sum_{b in g} d[b] * sum_{i in b} code[o, i] a[i]  -  zero[o, g] X[g])
     with X[g] = sum_{i in g} x^[i], the group's sum of x^ (exact: the zero point is applied to the
     same activations the codes see). For 4-bit codes the int8 activations are stored in the
     order the codes unpack from one load (`slot`): even inputs first, odd ones after, per run of
     128 inputs (AVX-512; a trailing run of 64 likewise) or of 32 (AVX2).
   Error against float64 math: that of x^ against x (relative ~0.5%), plus fp32 sums.

   Threads: an OpenMP loop over output rows in the OpenMP runtime torch already loaded (the
   library is linked without one and native.py makes torch's global first), `threads` from the caller.
   Scratch for the quantized activations is one buffer per calling thread, grown, never freed
   per call. `qmv_swiglu` computes a whole SwiGLU expert in one call and one parallel region. */

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

#define QB 64 /* activation block: one scale per 64 inputs (a trailing block may hold 32) */
#define NBLOCKS(in) (((in) + QB - 1) / QB)

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define QMV_PATH 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define QMV_PATH 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define QMV_PATH 3
#else
#define QMV_PATH 0
#endif

int qmv_path(void) { return QMV_PATH; } /* 3: NEON dotprod, 2: AVX-512 VNNI, 1: AVX2, 0: portable C */

/* ------------------------------------------------------------------ fp16 / bf16 conversions */

static inline float half_to_float(uint16_t h) { return half_to_float_portable(h); }


/* ------------------------------------------------------------------ activations */

typedef struct {            /* N tokens' activations, quantized for a weight with groups of G */
    int8_t *a;              /* [N, I] int8, in slot order */
    float *d;               /* [N, I/64] block scales */
    float *xsum;            /* [N, I/G] group sums of x^ */
    float *dexp;            /* [N, I/128, 16] per run of 128 inputs: its two block scales, 8 lanes each */
    float *row;             /* [I] one token's activations as fp32 (portable and AVX2 paths) */
    size_t n, in, group;
    int bits;
    /* the row loop's geometry, computed once per call (divisions per row cost as much as a short row) */
    size_t blocks, groups, span, steps, gps, per_load, row_bytes;
    unsigned shift;
} Act;

/* One buffer per calling thread, grown, never freed per call; carved into what a call needs. */
static __thread Arena arena; /* kernel_common.h */

static inline size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t act_bytes(size_t n, size_t in, size_t group) {
    return up64(n * in) + up64(4 * n * NBLOCKS(in)) + up64(4 * n * (in / group)) + up64(4 * n * (in / 8)) + up64(4 * in);
}

static char *reserve(size_t need) { return arena_reserve(&arena, need); }

static char *act_carve(Act *act, char *p, size_t n, size_t in, size_t group, int bits) {
    act->n = n, act->in = in, act->group = group, act->bits = bits;
    act->blocks = NBLOCKS(in), act->groups = in / group, act->row_bytes = bits == 8 ? in : in / 2;
    act->span = bits == 4 ? 128 : 64, act->steps = in / act->span;
    act->gps = group <= act->span && act->span % group == 0 ? act->span / group : 0;   /* groups per step */
    act->per_load = act->gps ? 16 / act->gps : 0;                                      /* steps per scale vector */
    act->shift = act->per_load ? (unsigned)__builtin_ctz((unsigned)act->per_load) : 0;
    act->a = (int8_t *)p;                 p += up64(n * in);
    act->d = (float *)p;                  p += up64(4 * n * NBLOCKS(in));
    act->xsum = (float *)p;               p += up64(4 * n * (in / group));
    act->dexp = (float *)p;               p += up64(4 * n * (in / 8));
    act->row = (float *)p;                p += up64(4 * in);
    return p;
}

/* Where input i's activation is stored (see the header): 4-bit codes unpack as the even inputs of
   a run (low nibbles), then its odd ones (high nibbles). */
static inline size_t slot(size_t i, size_t in, int bits) {
#if QMV_PATH == 2
    size_t run = (i & ~(size_t)127) + 128 <= in ? 128 : (i & ~(size_t)63) + 64 <= in ? 64 : 32;
#elif QMV_PATH == 1 || QMV_PATH == 3
    size_t run = 32;
#else
    size_t run = 0;
#endif
    if (bits == 8 || run == 0) return i;
    size_t j = i % run;
    return i - j + (j & 1) * (run / 2) + j / 2;
}

#if QMV_PATH != 2  /* AVX-512 has quantize_row_fast */
static void quantize_row(const float *x, size_t in, size_t group, int bits, int8_t *a, float *d, float *xsum) {
    size_t blocks = NBLOCKS(in);
    for (size_t g = 0; g < in / group; g++) xsum[g] = 0.0f;
    for (size_t b = 0; b < blocks; b++) {
        const float *xb = x + b * QB;
        const size_t len = in - b * QB < QB ? in - b * QB : QB;          /* 64, or 32 at the end */
        float amax = 0.0f;
        for (size_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int8_t q[QB];
        for (size_t i = 0; i < len; i++) {
            float v = nearbyintf(xb[i] * inv);
            q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
        }
        const size_t step = group < len ? group : len;
        for (size_t g0 = 0; g0 < len; g0 += step) {
            int sum = 0;
            for (size_t i = g0; i < g0 + step; i++) sum += q[i];
            xsum[(b * QB + g0) / group] += db * (float)sum;
        }
        for (size_t i = 0; i < len; i++) a[slot(b * QB + i, in, bits)] = q[i];
        d[b] = db;
    }
}
#endif

#if QMV_PATH == 2
static void expand_scales(const float *d, size_t in, float *dexp) {
    for (size_t r = 0; r < in / 128; r++)
        _mm512_store_ps(dexp + 16 * r, _mm512_mask_blend_ps(0xff00, _mm512_set1_ps(d[2 * r]), _mm512_set1_ps(d[2 * r + 1])));
}

/* quantize_row for AVX-512: 64 inputs per block in four vectors; 4-bit runs of 128 are split into
   their even and odd inputs with two-source permutes (the same slots as `slot`). */
static inline __m512 load16(const void *x, int x_dtype, size_t i) {
    if (x_dtype == 0) return _mm512_loadu_ps((const float *)x + i);
    __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)x + i)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
}

static void quantize_tail32(const void *x, int x_dtype, size_t in, size_t group, int bits, int8_t *a, float *d,
                            float *xsum, size_t b, __m512i even, __m512i odd) {
    const size_t i0 = b * QB;
    __m512 v0 = load16(x, x_dtype, i0), v1 = load16(x, x_dtype, i0 + 16);
    float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, _mm512_set1_ps(inv)));
    __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, _mm512_set1_ps(inv)));
    d[b] = db;
    xsum[i0 / group] += db * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));   /* group is 32 */
    if (bits == 8) {
        _mm_storeu_si128((__m128i *)(a + i0), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(a + i0 + 16), _mm512_cvtsepi32_epi8(q1));
    } else {                                           /* evens to slots 0-15, odds to 16-31 */
        _mm_storeu_si128((__m128i *)(a + i0), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q0, even, q1)));
        _mm_storeu_si128((__m128i *)(a + i0 + 16), _mm512_cvtsepi32_epi8(_mm512_permutex2var_epi32(q0, odd, q1)));
    }
    (void)in;
}

static void quantize_row_fast(const void *x, int x_dtype, size_t in, size_t group, int bits, int8_t *a, float *d,
                              float *xsum) {
    const size_t blocks = NBLOCKS(in);
    const __m512i even = _mm512_set_epi32(30, 28, 26, 24, 22, 20, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0);
    const __m512i odd = _mm512_set_epi32(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
    for (size_t g = 0; g < in / group; g++) xsum[g] = 0.0f;
    for (size_t b = 0; b < blocks; b++) {
        __m512 v[4];
        if ((b + 1) * QB > in) {                       /* a trailing block of 32 inputs */
            quantize_tail32(x, x_dtype, in, group, bits, a, d, xsum, b, even, odd);
            continue;
        }
        for (int j = 0; j < 4; j++) v[j] = load16(x, x_dtype, b * QB + 16 * j);
        __m512 m = _mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(v[0]), _mm512_abs_ps(v[1])),
                                 _mm512_max_ps(_mm512_abs_ps(v[2]), _mm512_abs_ps(v[3])));
        float amax = _mm512_reduce_max_ps(m);
        float db = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m512i q[4];
        for (int j = 0; j < 4; j++) q[j] = _mm512_cvtps_epi32(_mm512_mul_ps(v[j], _mm512_set1_ps(inv)));
        d[b] = db;
        if (group == 32) {
            xsum[2 * b] = db * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q[0], q[1]));
            xsum[2 * b + 1] = db * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q[2], q[3]));
        } else {
            xsum[b * QB / group] += db * (float)_mm512_reduce_add_epi32(
                _mm512_add_epi32(_mm512_add_epi32(q[0], q[1]), _mm512_add_epi32(q[2], q[3])));
        }
        size_t i0 = b * QB, run0 = i0 & ~(size_t)127;
        if (bits == 8 || run0 + 128 > in) {
            if (bits == 8) {
                for (int j = 0; j < 4; j++) _mm_storeu_si128((__m128i *)(a + i0 + 16 * j), _mm512_cvtsepi32_epi8(q[j]));
            } else {  /* a trailing run of 64: evens to slots 0-31, odds to 32-63 */
                for (int j = 0; j < 2; j++) {
                    __m512i e = _mm512_permutex2var_epi32(q[2 * j], even, q[2 * j + 1]);
                    __m512i o = _mm512_permutex2var_epi32(q[2 * j], odd, q[2 * j + 1]);
                    _mm_storeu_si128((__m128i *)(a + i0 + 16 * j), _mm512_cvtsepi32_epi8(e));
                    _mm_storeu_si128((__m128i *)(a + i0 + 32 + 16 * j), _mm512_cvtsepi32_epi8(o));
                }
            }
            continue;
        }
        /* block `half` (0 or 1) of a run of 128: its inputs 32p..32p+31 (p = 0, 1) have evens at
           slots 32 half + 16 p, odds at 64 + 32 half + 16 p */
        size_t half = (i0 - run0) / 64;
        for (int pair = 0; pair < 2; pair++) {
            __m512i e = _mm512_permutex2var_epi32(q[2 * pair], even, q[2 * pair + 1]);
            __m512i o = _mm512_permutex2var_epi32(q[2 * pair], odd, q[2 * pair + 1]);
            _mm_storeu_si128((__m128i *)(a + run0 + 32 * half + 16 * pair), _mm512_cvtsepi32_epi8(e));
            _mm_storeu_si128((__m128i *)(a + run0 + 64 + 32 * half + 16 * pair), _mm512_cvtsepi32_epi8(o));
        }
    }
}
#endif

/* ------------------------------------------------------------------ one row, NT tokens */

#if QMV_PATH == 2

static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

static inline __mmask16 first(size_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* 16 fp16 values from p (fewer at the end of a row: the rest are zero) as fp32 */
static inline __m512 load_halfs(const uint16_t *p, size_t n) {
    return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first(n), (const void *)p));
}

/* One step of a row (64 bytes of codes: 128 inputs at 4 bits, 64 at 8) against NT tokens, with
   `s` the weight scale of each of its 16 int32 lanes. */
__attribute__((always_inline)) static inline void one_step(const uint8_t *w, int bits, size_t st, __m512 s,
                                                           const int8_t *a, size_t in, const float *d, size_t blocks,
                                                           const float *dexp, int NT, __m512 *acc) {
    const size_t dexp_stride = (in / 128) * 16;
    __m512i b = _mm512_loadu_si512((const void *)(w + st * 64));
    if (bits == 4) {
        const __m512i m = _mm512_set1_epi8(0x0f);
        __m512i lo = _mm512_and_si512(b, m), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
        for (int t = 0; t < NT; t++) {
            const int8_t *at = a + t * in + st * 128;
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, _mm512_load_si512((const void *)at));
            dot = _mm512_dpbusd_epi32(dot, hi, _mm512_load_si512((const void *)(at + 64)));
            __m512 dv = _mm512_load_ps(dexp + t * dexp_stride + st * 16);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, s), acc[t]);
        }
    } else {
        for (int t = 0; t < NT; t++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), b, _mm512_load_si512((const void *)(a + t * in + st * 64)));
            __m512 dv = _mm512_set1_ps(d[t * blocks + st]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, s), acc[t]);
        }
    }
}

/* One row against NT tokens. A step reads `span` inputs (128 for 4-bit codes: 64 bytes; 64 for
   8-bit: 64 bytes) into 16 int32 lanes; lane k covers inputs span/16 * k onwards. The weight scale
   of each lane comes from a vector of 16 group scales loaded once per 16 groups and permuted per
   step (`gps` groups per step, so lane k takes group k / (16 / gps), plus gps per step); where a
   group spans several steps the step broadcasts its one scale. The zero points' term is
   subtracted per 16 groups in the same accumulator. */
__attribute__((always_inline)) static inline void row_tokens(
    const Act *geo, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, size_t in, size_t group, int bits,
    const int8_t *a, const float *d, const float *dexp, const float *xsum, size_t blocks, size_t groups,
    int NT, float *out) {
    __m512 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm512_setzero_ps();
    const size_t span = geo->span, steps = geo->steps, gps = geo->gps;
    if (gps) {
        const size_t per_load = geo->per_load;
        const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i idx0 = _mm512_srli_epi32(lane, geo->shift);
        const __m512i step = _mm512_set1_epi32((int)gps);
        for (size_t s0 = 0; s0 < steps; s0 += per_load) {
            __m512 sv = load_halfs(scale + s0 * gps, groups - s0 * gps);
            __m512i idx = idx0;
            size_t s1 = s0 + per_load < steps ? s0 + per_load : steps;
            for (size_t st = s0; st < s1; st++, idx = _mm512_add_epi32(idx, step))
                one_step(w, bits, st, _mm512_permutexvar_ps(idx, sv), a, in, d, blocks, dexp, NT, acc);
        }
    } else {                                                                      /* a group spans steps */
        for (size_t st = 0; st < steps; st++)
            one_step(w, bits, st, _mm512_set1_ps(_cvtsh_ss(scale[st * span / group])), a, in, d, blocks, dexp, NT, acc);
    }
    if (bits == 4 && steps * 128 + 64 <= in) {                                    /* a trailing run of 64 inputs */
        size_t i = steps * 128;
        const __m256i m8 = _mm256_set1_epi8(0x0f);
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + i / 2));
        __m256i lo = _mm256_and_si256(b, m8), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m8);
        __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
        /* lanes 0-3 and 8-11 hold inputs 0-31 of the run, lanes 4-7 and 12-15 inputs 32-63 */
        __m512 s = group == 32 ? _mm512_mask_blend_ps(0xf0f0, _mm512_set1_ps(_cvtsh_ss(scale[i / 32])),
                                                      _mm512_set1_ps(_cvtsh_ss(scale[i / 32 + 1])))
                               : _mm512_set1_ps(_cvtsh_ss(scale[i / group]));
        for (int t = 0; t < NT; t++) {
            __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q, _mm512_load_si512((const void *)(a + t * in + i)));
            __m512 dv = _mm512_set1_ps(d[t * blocks + i / 64]);
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), _mm512_mul_ps(dv, s), acc[t]);
        }
    }
    if (in % 64) {                                                                /* a trailing 32 inputs (group 32) */
        const size_t i = in - 32;
        __m256i q;
        if (bits == 4) {
            const __m128i m4 = _mm_set1_epi8(0x0f);
            __m128i b = _mm_loadu_si128((const __m128i *)(w + i / 2));
            q = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m4), _mm_and_si128(b, m4));  /* evens, odds */
        } else {
            q = _mm256_loadu_si256((const __m256i *)(w + i));
        }
        __m512 s = _mm512_set1_ps(_cvtsh_ss(scale[i / 32]));
        for (int t = 0; t < NT; t++) {
            __m256i dot = _mm256_dpbusd_epi32(_mm256_setzero_si256(), q, _mm256_loadu_si256((const __m256i *)(a + t * in + i)));
            __m512 dv = _mm512_set1_ps(d[t * blocks + i / 64]);
            acc[t] = _mm512_fmadd_ps(_mm512_zextps256_ps512(_mm256_cvtepi32_ps(dot)), _mm512_mul_ps(dv, s), acc[t]);
        }
    }
    for (size_t g = 0; g < groups; g += 16) {                                     /* - sum_g scale zero X[g] */
        __m512 sz = _mm512_mul_ps(load_halfs(scale + g, groups - g), load_halfs(zero + g, groups - g));
        for (int t = 0; t < NT; t++)
            acc[t] = _mm512_fnmadd_ps(sz, _mm512_maskz_loadu_ps(first(groups - g), xsum + t * groups + g), acc[t]);
    }
    for (int t = 0; t < NT; t++) out[t] = hsum(acc[t]);
}

#elif QMV_PATH == 1

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* The dot product of 32 codes with their 32 activations, as 8 int32 lanes. `k`: index of the
   first of the 32 inputs (a multiple of 32). */
static inline __m256i dot32(const uint8_t *w, size_t k, int bits, const int8_t *a) {
    const __m256i ones = _mm256_set1_epi16(1), m = _mm256_set1_epi8(0x0f);
    __m256i x = _mm256_loadu_si256((const __m256i *)a);
    if (bits == 8) { /* u8 x s8 pairs would overflow int16: 16 * dot(high nibbles) + dot(low) */
        __m256i b = _mm256_loadu_si256((const __m256i *)(w + k));
        __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(b, m), x), ones);
        __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), m), x), ones);
        return _mm256_add_epi32(_mm256_slli_epi32(hi, 4), lo);
    }
    __m128i b = _mm_loadu_si128((const __m128i *)(w + k / 2)), m4 = _mm_set1_epi8(0x0f);
    __m128i lo = _mm_and_si128(b, m4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), m4);  /* even, odd inputs */
    return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set_m128i(hi, lo), x), ones);
}

__attribute__((always_inline)) static inline void row_tokens(
    const Act *geo, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, size_t in, size_t group, int bits,
    const int8_t *a, const float *d, const float *dexp, const float *xsum, size_t blocks, size_t groups,
    int NT, float *out) {
    (void)geo;
    __m256 acc[4];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (size_t k = 0; k < in; k += 32) {
        float s = _cvtsh_ss(scale[k / group]);
        for (int t = 0; t < NT; t++) {
            __m256i dot = dot32(w, k, bits, a + t * in + k);  /* the run's activations, in slot order */
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(d[t * blocks + k / QB] * s), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) {
        const float *xs = xsum + t * groups;
        float zs = 0.0f;
        for (size_t g = 0; g < groups; g++) zs += _cvtsh_ss(scale[g]) * _cvtsh_ss(zero[g]) * xs[g];
        out[t] = hsum8(acc[t]) - zs;
    }
}

#elif QMV_PATH == 3

/* The dot product of 32 codes with their 32 activations (in slot order: for 4-bit codes the 16
   even inputs, then the 16 odd ones, as AVX2), as 4 int32 lanes: NEON `sdot`, 16 products an
   instruction. Codes are 0..15 (4 bits) or split into nibbles (8 bits: 16 * dot(high) + dot(low),
   as unsigned bytes do not fit the signed product). `k`: the first input (a multiple of 32). */
static inline int32x4_t dot32(const uint8_t *w, size_t k, int bits, const int8_t *a) {
    const uint8x16_t m = vdupq_n_u8(0x0f);
    const int8x16_t a0 = vld1q_s8(a), a1 = vld1q_s8(a + 16);
    if (bits == 8) {
        const uint8x16_t b0 = vld1q_u8(w + k), b1 = vld1q_u8(w + k + 16);
        int32x4_t lo = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(b0, m)), a0);
        lo = vdotq_s32(lo, vreinterpretq_s8_u8(vandq_u8(b1, m)), a1);
        int32x4_t hi = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vshrq_n_u8(b0, 4)), a0);
        hi = vdotq_s32(hi, vreinterpretq_s8_u8(vshrq_n_u8(b1, 4)), a1);
        return vaddq_s32(vshlq_n_s32(hi, 4), lo);
    }
    const uint8x16_t b = vld1q_u8(w + k / 2);                                   /* even, odd inputs */
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vandq_u8(b, m)), a0);
    return vdotq_s32(acc, vreinterpretq_s8_u8(vshrq_n_u8(b, 4)), a1);
}

__attribute__((always_inline)) static inline void row_tokens(
    const Act *geo, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, size_t in, size_t group, int bits,
    const int8_t *a, const float *d, const float *dexp, const float *xsum, size_t blocks, size_t groups,
    int NT, float *out) {
    (void)geo, (void)dexp;
    float32x4_t acc[4];
    for (int t = 0; t < NT; t++) acc[t] = vdupq_n_f32(0.0f);
    for (size_t k = 0; k < in; k += 32) {
        float s = half_to_float(scale[k / group]);
        for (int t = 0; t < NT; t++) {
            int32x4_t dot = dot32(w, k, bits, a + t * in + k);
            acc[t] = vmlaq_n_f32(acc[t], vcvtq_f32_s32(dot), d[t * blocks + k / QB] * s);
        }
    }
    for (int t = 0; t < NT; t++) {
        const float *xs = xsum + t * groups;
        float zs = 0.0f;
        for (size_t g = 0; g < groups; g++) zs += half_to_float(scale[g]) * half_to_float(zero[g]) * xs[g];
        out[t] = vaddvq_f32(acc[t]) - zs;
    }
}

#else

__attribute__((always_inline)) static inline void row_tokens(
    const Act *geo, const uint8_t *w, const uint16_t *scale, const uint16_t *zero, size_t in, size_t group, int bits,
    const int8_t *a, const float *d, const float *dexp, const float *xsum, size_t blocks, size_t groups,
    int NT, float *out) {
    (void)geo;
    for (int t = 0; t < NT; t++) {
        const int8_t *at = a + t * in;
        float total = 0.0f;
        for (size_t k0 = 0; k0 < in; k0 += 32) {       /* 32 inputs share a weight scale and a block */
            int sum = 0;
            for (size_t k = k0; k < k0 + 32; k++) {
                int code = bits == 8 ? w[k] : (w[k / 2] >> (4 * (k & 1))) & 15;
                sum += code * at[k];
            }
            total += half_to_float(scale[k0 / group]) * d[t * blocks + k0 / QB] * (float)sum;
        }
        const float *xs = xsum + t * groups;
        for (size_t g = 0; g < groups; g++) total -= half_to_float(scale[g]) * half_to_float(zero[g]) * xs[g];
        out[t] = total;
    }
}

#endif

/* ------------------------------------------------------------------ entry point */

/* The shapes the layout takes: I a multiple of 32; G = 32, 64 or a multiple of 128 dividing I. */
int qmv_supported(int64_t in_features, int64_t group, int bits) {
    return in_features > 0 && in_features % 32 == 0 && (group == 32 || group == 64 || (group > 0 && group % 128 == 0))
           && in_features % group == 0 && (bits == 4 || bits == 8);
}

static void act_fill(Act *act, const void *x, int x_dtype) {
    const size_t N = act->n, I = act->in, G = act->group, blocks = NBLOCKS(I), groups = I / G;
    for (size_t t = 0; t < N; t++) {
#if QMV_PATH == 2
        quantize_row_fast((const char *)x + t * I * (x_dtype == 0 ? 4 : 2), x_dtype, I, G, act->bits, act->a + t * I,
                          act->d + t * blocks, act->xsum + t * groups);
        expand_scales(act->d + t * blocks, I, act->dexp + t * (I / 128) * 16);
#else
        const float *xt = (const float *)x + t * I;
        if (x_dtype != 0) {
            const uint16_t *xb = (const uint16_t *)x + t * I;
            for (size_t i = 0; i < I; i++) act->row[i] = bf16_to_float(xb[i]);
            xt = act->row;
        }
        quantize_row(xt, I, G, act->bits, act->a + t * I, act->d + t * blocks, act->xsum + t * groups);
#endif
    }
}

/* Row o of a weight against every token of `act`: out[t * stride + o] in out_dtype (0 fp32, 1 bf16). */
static inline void product_row(const Act *act, const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
                               size_t o, void *out, int out_dtype, size_t stride) {
    const size_t N = act->n, I = act->in, G = act->group, blocks = act->blocks, groups = act->groups;
    const int bits = act->bits;
    const uint8_t *w = codes + o * act->row_bytes;
    const uint16_t *s = scales + o * groups, *z = zeros + o * groups;
    for (size_t t0 = 0; t0 < N; t0 += 4) {
        float r[4];
        size_t nt = N - t0 < 4 ? N - t0 : 4;
        const int8_t *at = act->a + t0 * I;
        const float *dt = act->d + t0 * blocks, *xt = act->xsum + t0 * groups, *et = act->dexp + t0 * (I / 128) * 16;
        switch (nt) {
            case 1: row_tokens(act, w, s, z, I, G, bits, at, dt, et, xt, blocks, groups, 1, r); break;
            case 2: row_tokens(act, w, s, z, I, G, bits, at, dt, et, xt, blocks, groups, 2, r); break;
            case 3: row_tokens(act, w, s, z, I, G, bits, at, dt, et, xt, blocks, groups, 3, r); break;
            default: row_tokens(act, w, s, z, I, G, bits, at, dt, et, xt, blocks, groups, 4, r); break;
        }
        for (size_t t = 0; t < nt; t++) {
            size_t k = (t0 + t) * stride + o;
            if (out_dtype == 0) ((float *)out)[k] = r[t];
            else ((uint16_t *)out)[k] = float_to_bf16(r[t]);
        }
    }
}

/* Row o of a weight against the one token of `act` (decode): out[o]. Inlined into the row loops
   (a call per row, as `product_row` is, costs as much as a short row: 160-input rows took 15 ns
   that way and take 8 ns inlined). */
__attribute__((always_inline)) static inline void product_row1(const Act *act, const uint8_t *codes,
                                                               const uint16_t *scales, const uint16_t *zeros, size_t o,
                                                               void *out, int out_dtype) {
    const size_t groups = act->groups;
    float r;
    row_tokens(act, codes + o * act->row_bytes, scales + o * groups, zeros + o * groups, act->in, act->group, act->bits,
               act->a, act->d, act->dexp, act->xsum, act->blocks, groups, 1, &r);
    if (out_dtype == 0) ((float *)out)[o] = r;
    else ((uint16_t *)out)[o] = float_to_bf16(r);
}

/* y[N, O] = x[N, I] @ w.T.  x_dtype / y_dtype: 0 float32, 1 bfloat16.  Returns 0, or -1 when the
   scratch cannot be allocated, -2 for a shape the layout does not take. */
int qmv(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t out_features,
        int64_t in_features, const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros,
        int64_t group, int bits, int threads) {
    const size_t N = (size_t)n_tokens, O = (size_t)out_features, I = (size_t)in_features, G = (size_t)group;
    if (!qmv_supported(in_features, group, bits)) return -2;
    char *p = reserve(act_bytes(N, I, G));
    if (p == NULL) return -1;
    Act act;
    act_carve(&act, p, N, I, G, bits);
    act_fill(&act, x, x_dtype);
    const int parallel = threads > 1 && O * I * N >= (1u << 18);
    if (N == 1) {
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
        for (int64_t o = 0; o < (int64_t)O; o++) product_row1(&act, codes, scales, zeros, (size_t)o, y, y_dtype);
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t o = 0; o < (int64_t)O; o++) product_row(&act, codes, scales, zeros, (size_t)o, y, y_dtype, O);
    return 0;
}

/* Several matrices of one input in one call (attention's q, k and v): x quantized once, one
   parallel loop over all their rows, y[N, sum(outs)] with matrix m's outputs in its columns. */
int qmv_many(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t in_features, int count,
             const int64_t *outs, const uint8_t *const *codes, const uint16_t *const *scales,
             const uint16_t *const *zeros, int64_t group, int bits, int threads) {
    const size_t N = (size_t)n_tokens, I = (size_t)in_features, G = (size_t)group;
    if (!qmv_supported(in_features, group, bits) || count < 1 || count > 16) return -2;
    size_t first[17], total = 0;
    for (int m = 0; m < count; m++) first[m] = total, total += (size_t)outs[m];
    first[count] = total;
    char *p = reserve(act_bytes(N, I, G));
    if (p == NULL) return -1;
    Act act;
    act_carve(&act, p, N, I, G, bits);
    act_fill(&act, x, x_dtype);
    const size_t esize = y_dtype == 0 ? 4 : 2;
    const int parallel = threads > 1 && total * I * N >= (1u << 18);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t r = 0; r < (int64_t)total; r++) {
        int m = 0;
        while ((size_t)r >= first[m + 1]) m++;
        if (N == 1)
            product_row1(&act, codes[m], scales[m], zeros[m], (size_t)r - first[m], (char *)y + first[m] * esize,
                         y_dtype);
        else
            product_row(&act, codes[m], scales[m], zeros[m], (size_t)r - first[m], (char *)y + first[m] * esize,
                        y_dtype, total);
    }
    return 0;
}

/* A SwiGLU expert in one call: y[N, H] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, w1 and w3 [F, H]
   (one format), w2 [H, F]. x is quantized once for w1 and w3; the hidden activations stay fp32
   until they are quantized for w2. One parallel region: w1 and w3 rows, then w2 rows. */
int qmv_swiglu(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t hidden, int64_t inter,
               const uint8_t *c1, const uint16_t *s1, const uint16_t *z1, const uint8_t *c3, const uint16_t *s3,
               const uint16_t *z3, int64_t group13, int bits13, const uint8_t *c2, const uint16_t *s2,
               const uint16_t *z2, int64_t group2, int bits2, int threads) {
    const size_t N = (size_t)n_tokens, H = (size_t)hidden, F = (size_t)inter;
    if (!qmv_supported(hidden, group13, bits13) || !qmv_supported(inter, group2, bits2)) return -2;
    char *p = reserve(act_bytes(N, H, (size_t)group13) + act_bytes(N, F, (size_t)group2) + 2 * up64(4 * N * F));
    if (p == NULL) return -1;
    Act in1, in2;
    p = act_carve(&in1, p, N, H, (size_t)group13, bits13);
    p = act_carve(&in2, p, N, F, (size_t)group2, bits2);
    float *gate = (float *)p, *up = (float *)(p + up64(4 * N * F));
    act_fill(&in1, x, x_dtype);
    const int parallel = threads > 1 && F * H * N >= (1u << 17);
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t o = 0; o < (int64_t)F; o++) {
            if (N == 1) {
                product_row1(&in1, c1, s1, z1, (size_t)o, gate, 0);
                product_row1(&in1, c3, s3, z3, (size_t)o, up, 0);
            } else {
                product_row(&in1, c1, s1, z1, (size_t)o, gate, 0, F);
                product_row(&in1, c3, s3, z3, (size_t)o, up, 0, F);
            }
            for (size_t t = 0; t < N; t++) {                  /* silu(gate) * up, by the row's thread */
                float g = gate[t * F + (size_t)o];
                gate[t * F + (size_t)o] = g / (1.0f + expf(-g)) * up[t * F + (size_t)o];
            }
        }
#pragma omp single
        act_fill(&in2, gate, 0);
#pragma omp for schedule(static)
        for (int64_t o = 0; o < (int64_t)H; o++) {
            if (N == 1)
                product_row1(&in2, c2, s2, z2, (size_t)o, y, y_dtype);
            else
                product_row(&in2, c2, s2, z2, (size_t)o, y, y_dtype, H);
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ fixed arguments in one struct */

/* The entry points above with a weight's fixed arguments in one struct the caller fills once
   (kernel_args.h; ctypes mirrors it in native.py): a foreign-function call costs ~0.2 us an
   argument, as much as a short expert's rows. */
int qmv_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const QmvArgs *w, int threads) {
    return qmv(x, x_dtype, y, y_dtype, n_tokens, w->out_features, w->in_features, w->codes, w->scales, w->zeros,
               w->group, w->bits, threads);
}

int qmv_many_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const QmvManyArgs *w, int threads) {
    return qmv_many(x, x_dtype, y, y_dtype, n_tokens, w->in_features, w->count, w->outs, w->codes, w->scales,
                    w->zeros, w->group, w->bits, threads);
}

int qmv_swiglu_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const QmvSwigluArgs *w,
                 int threads) {
    return qmv_swiglu(x, x_dtype, y, y_dtype, n_tokens, w->hidden, w->inter, w->c1, w->s1, w->z1, w->c3, w->s3, w->z3,
                      w->group13, w->bits13, w->c2, w->s2, w->z2, w->group2, w->bits2, threads);
}
