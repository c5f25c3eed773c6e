/* Matrix products from ggml's block layouts as they lie in a GGUF file, with int8 activations.

   Why: a GGUF weight is rows of blocks (Q4_0 ... Q6_K, MXFP4). Computing from those bytes in place
   costs nothing at load and reads each weight byte once per call. As in llama.cpp's dot products,
   the activations are quantized to int8 and the weights' codes multiplied as bytes:
     legacy types (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, MXFP4; blocks of 32 weights): one activation
       block per 32 inputs, a[i] = round(x[i] / d), d = max|x| / 127, and s = d * sum(a) for the
       types whose weights carry an offset or a minimum;
     K types (Q2_K ... Q6_K; super-blocks of 256): one activation scale per 256 inputs and the sum
       of each 16 codes (`bsums`), which the weights' minimums and offsets multiply.
   Every weight is written as unsigned codes u (0..255) with integer sub-block scales:
     legacy: w = dw * u + cw            (Q4_0: dw = d, cw = -8 d; Q4_1: cw = m; Q8_0: signed codes)
     K:      w = d * sc[j] * u - dmin * mn[j],  j the sub-block of 16 inputs
   so a block's product is an integer dot product of bytes (AVX2 `vpmaddubsw`, AVX-512 VNNI
   `vpdpbusd`/`vpdpwssd`), scaled once, plus an integer correction from the activation sums.

   Error against float64 math on the dequantized weights: that of the int8 activations (relative
   ~0.5% per 32-input block, ~1% per 256-input block) plus fp32 sums.

   Prefill: rows are taken in groups of ROWS, and each group is computed against the tokens TT at
   a time (8 with AVX-512's 32 registers, else 4), so a weight row is read from memory once per
   call, each block unpacked once per tile, and a tile's activations reused across the group from
   cache.

   Threads: an OpenMP loop over row groups in torch's OpenMP runtime (as qmv.c); every output is
   one thread's sum in a fixed order, so the result does not depend on the thread count.

   Float weights (F32, F16, BF16) take the same entry points with fp32 activations.

   Shape letters: N tokens, I in features, O out features. */

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

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && defined(__F16C__)
#define GPATH 2
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define GPATH 1
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
#define GPATH 3
#else
#define GPATH 0
#endif
#define GX86 (GPATH == 1 || GPATH == 2) /* the AVX2/AVX-512 code below; NEON (3) shares the portable activations */

int ggml_path(void) { return GPATH; } /* 3: NEON dotprod, 2: AVX-512 VNNI, 1: AVX2, 0: portable C */

/* ggml type ids (gguf.GGMLQuantizationType) */
enum { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12,
       Q5_K = 13, Q6_K = 14, BF16 = 30, MXFP4 = 39 };

#ifndef ROWS
#define ROWS 8 /* rows per group in a prefill */
#endif
#ifndef PF_GROUPS
#define PF_GROUPS 1 /* eight-row kernels: prefetch the group this many ahead */
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T0
#endif
#ifndef TT
#define TT (GPATH == 2 ? 8 : 4) /* tokens per tile: as many accumulators as the registers hold */
#endif

/* family: 0 float, 1 legacy (blocks of 32), 2 K (super-blocks of 256); block weights and bytes */
static int family(int type) {
    switch (type) {
        case F32: case F16: case BF16: return 0;
        case Q4_0: case Q4_1: case Q5_0: case Q5_1: case Q8_0: case MXFP4: return 1;
        case Q2_K: case Q3_K: case Q4_K: case Q5_K: case Q6_K: return 2;
        default: return -1;
    }
}

static size_t block_bytes(int type) {
    switch (type) {
        case F32: return 4; case F16: case BF16: return 2;
        case Q4_0: return 18; case Q4_1: return 20; case Q5_0: return 22; case Q5_1: return 24; case Q8_0: return 34;
        case MXFP4: return 17; case Q2_K: return 84; case Q3_K: return 110; case Q4_K: return 144; case Q5_K: return 176;
        case Q6_K: return 210;
        default: return 0;
    }
}

static size_t block_size(int type) { int f = family(type); return f == 0 ? 1 : f == 1 ? 32 : 256; }

/* Whether a [*, in] matrix of `type` is computed here. */
int ggml_supported(int type, int64_t in_features) {
    return family(type) >= 0 && in_features > 0 && in_features % (int64_t)(family(type) == 0 ? 1 : block_size(type)) == 0;
}

/* ------------------------------------------------------------------ scalars */

static inline float half_to_float(uint16_t h) {
#if GX86
    return _cvtsh_ss(h);
#else
    return half_to_float_portable(h);
#endif
}

static inline float f16_at(const uint8_t *p) { uint16_t h; memcpy(&h, p, 2); return half_to_float(h); }

/* MXFP4's shared exponent as a float, halved (its codes below are twice the E2M1 values) */
static inline float e8m0_half(uint8_t e) {
    uint32_t bits = e < 2 ? 0x00200000u << e : (uint32_t)(e - 1) << 23;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* E2M1 values times 2, plus 12 so they are unsigned: w = d * (code - 12) */
static const uint8_t MXFP4_U[16] = {12, 13, 14, 15, 16, 18, 20, 24, 12, 11, 10, 9, 8, 6, 4, 0};

/* ------------------------------------------------------------------ activations */

typedef struct {
    int8_t *q;        /* [N, I] int8 codes */
    float *d;         /* [N, I / bs] block scales (bs 32 or 256) */
    float *s;         /* [N, I / 32] legacy: d * sum of the block's codes */
    int32_t *qsum;    /* [N, I / 32] legacy: sum of the block's codes (the eight-row kernels' offsets) */
    int16_t *bsums;   /* [N, I / 16] K: sums of each 16 codes */
    const float *x;   /* [N, I] fp32 activations (float weights) */
    size_t n, in, nb; /* nb: blocks per row */
    size_t tt;        /* tokens per stored tile: TT, or N when fewer */
    int fam;
} Act;

static inline size_t up64(size_t n) { return (n + 63) & ~(size_t)63; }

static size_t act_bytes(size_t n, size_t in, int fam, int x_dtype) {
    if (fam == 0) return x_dtype == 0 ? 0 : up64(4 * n * in);
    n = (n + TT - 1) / TT * TT;   /* whole tiles */
    return up64(n * in) + 3 * up64(4 * n * (in / 32)) + up64(2 * n * (in / 16));
}

#if !GX86
static void quantize_block(const float *x, size_t len, int8_t *q, float *d) {
    float amax = 0.0f;
    for (size_t i = 0; i < len; i++) amax = fmaxf(amax, fabsf(x[i]));
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *d = amax / 127.0f;
    for (size_t i = 0; i < len; i++) {
        float v = nearbyintf(x[i] * inv);
        q[i] = (int8_t)(v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v));
    }
}

#endif

#if GX86
/* 32 activations (fp32 or bf16) at x + i as fp32, in four vectors */
static inline __m256 load8(const void *x, int x_dtype, size_t i) {
    if (x_dtype == 0) return _mm256_loadu_ps((const float *)x + i);
    __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)x + i)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
}

/* int8 codes of `len` (a multiple of 32) activations, one scale for all of them */
static void quantize_run(const void *x, int x_dtype, size_t i0, size_t len, int8_t *q, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (size_t i = 0; i < len; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, load8(x, x_dtype, i0 + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    float amax = _mm_cvtss_f32(h);
    float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
    *d = amax / 127.0f;
    const __m256 vi = _mm256_set1_ps(inv);
    for (size_t i = 0; i < len; i += 32) {
        __m256i a = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, x_dtype, i0 + i), vi));
        __m256i b = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, x_dtype, i0 + i + 8), vi));
        __m256i c = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, x_dtype, i0 + i + 16), vi));
        __m256i e = _mm256_cvtps_epi32(_mm256_mul_ps(load8(x, x_dtype, i0 + i + 24), vi));
        __m256i ab = _mm256_packs_epi32(a, b), ce = _mm256_packs_epi32(c, e);
        __m256i all = _mm256_packs_epi16(ab, ce);   /* lanes interleaved by the packs: put them back */
        all = _mm256_permutevar8x32_epi32(all, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)(q + i), all);
    }
}
#endif

/* Where token t's activations lie: tokens are stored in tiles of TT, and within a tile chunk by
   chunk (32 codes of each of its TT tokens in a row), so a row kernel finds chunk c of every token
   of its tile at fixed offsets from one pointer. Per-block values (d, s) and the K sums likewise.
   Fewer than TT tokens are one tile of N (a decode step's activations stay contiguous). */
static inline int8_t *act_chunk(const Act *act, size_t t, size_t c) {   /* 32 codes: inputs 32c .. 32c + 31 */
    return act->q + ((t / act->tt) * (act->in / 32) + c) * (act->tt * 32) + (t % act->tt) * 32;
}

static inline size_t act_at(const Act *act, size_t t, size_t b) {       /* block b's d, s; bsums / 16 */
    return ((t / act->tt) * act->nb + b) * act->tt + t % act->tt;
}

/* Quantize token t's row (fp32 or bf16 at x) for weights of family `fam`. */
static void act_row(Act *act, const void *x, int x_dtype, size_t t) {
    const size_t I = act->in, bs = act->fam == 1 ? 32 : 256;
    const void *xt = (const char *)x + t * I * (x_dtype == 0 ? 4 : 2);
    for (size_t b = 0; b < I / bs; b++) {
        _Alignas(32) int8_t q[256];
        float d;
#if GX86
        quantize_run(xt, x_dtype, b * bs, bs, q, &d);
#else
        float block[256];
        const float *xb = (const float *)xt + b * bs;
        if (x_dtype != 0) {
            for (size_t i = 0; i < bs; i++) block[i] = bf16_to_float(((const uint16_t *)xt)[b * bs + i]);
            xb = block;
        }
        quantize_block(xb, bs, q, &d);
#endif
        for (size_t c = 0; c < bs / 32; c++) memcpy(act_chunk(act, t, b * bs / 32 + c), q + 32 * c, 32);
        const size_t at = act_at(act, t, b);
        act->d[at] = d;
        if (act->fam == 1) {
            int sum = 0;
            for (size_t i = 0; i < 32; i++) sum += q[i];
            act->s[at] = d * (float)sum;
            act->qsum[at] = sum;
        } else {
            for (size_t j = 0; j < 16; j++) {
                int sum = 0;
                for (size_t i = 0; i < 16; i++) sum += q[j * 16 + i];
                act->bsums[at * 16 + j] = (int16_t)sum;
            }
        }
    }
}

/* Carve act's buffers from p and fill them from x [N, I] (fp32 or bf16), tokens split over `threads`
   (1 inside a parallel region). Returns the end of what it used. */
static char *act_fill(Act *act, char *p, const void *x, int x_dtype, size_t n, size_t in, int fam, int threads) {
    act->n = n, act->in = in, act->fam = fam;
    if (fam == 0) {
        act->nb = in;
        if (x_dtype == 0) {
            act->x = (const float *)x;
            return p;
        }
        float *f = (float *)p;
        const uint16_t *xb = (const uint16_t *)x;
        for (size_t i = 0; i < n * in; i++) f[i] = bf16_to_float(xb[i]);
        act->x = f;
        return p + up64(4 * n * in);
    }
    act->tt = n < TT ? n : TT;                 /* a single token needs no interleaving */
    const size_t np = (n + act->tt - 1) / act->tt * act->tt;   /* whole tiles */
    act->nb = in / (fam == 1 ? 32 : 256);
    act->q = (int8_t *)p;        p += up64(np * in);
    act->d = (float *)p;         p += up64(4 * np * (in / 32));
    act->s = (float *)p;         p += up64(4 * np * (in / 32));
    act->qsum = (int32_t *)p;    p += up64(4 * np * (in / 32));
    act->bsums = (int16_t *)p;   p += up64(2 * np * (in / 16));
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n > 1)
    for (int64_t t = 0; t < (int64_t)n; t++) act_row(act, x, x_dtype, (size_t)t);
    return p;
}

/* ------------------------------------------------------------------ K super-blocks: scales */

/* A K super-block as the dot product needs it: w[i] = d * sc[i/16] * u[i] - dmin * mn[i/16] */
typedef struct {
    int16_t sc[16], mn[16];
    float d, dmin;
} KScales;

static inline void k4_scale_min(int j, const uint8_t *q, uint8_t *d, uint8_t *m) { /* Q4_K / Q5_K: 6-bit pairs */
    if (j < 4) {
        *d = q[j] & 63, *m = q[j + 4] & 63;
    } else {
        *d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        *m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

static inline void k_scales(int type, const uint8_t *blk, KScales *k) {
    switch (type) {
        case Q2_K: {  /* scales[16] (low: scale, high: min), qs[64], d, dmin */
            for (int j = 0; j < 16; j++) k->sc[j] = blk[j] & 15, k->mn[j] = blk[j] >> 4;
            k->d = f16_at(blk + 80), k->dmin = f16_at(blk + 82);
            break;
        }
        case Q3_K: {  /* hmask[32], qs[64], scales[12] (16 x 6 bits), d */
            const uint8_t *s = blk + 96;
            for (int j = 0; j < 16; j++) {
                int lo = j < 8 ? s[j] & 15 : s[j - 8] >> 4;
                int hi = (s[8 + (j & 3)] >> (2 * (j >> 2))) & 3;
                int v = (lo | (hi << 4)) - 32;
                k->sc[j] = (int16_t)v, k->mn[j] = (int16_t)(4 * v);
            }
            k->d = k->dmin = f16_at(blk + 108);
            break;
        }
        case Q4_K: case Q5_K: {  /* d, dmin, scales[12] (8 pairs of 6 bits), ... */
            for (int j = 0; j < 8; j++) {
                uint8_t sc, m;
                k4_scale_min(j, blk + 4, &sc, &m);
                k->sc[2 * j] = k->sc[2 * j + 1] = sc;
                k->mn[2 * j] = k->mn[2 * j + 1] = m;
            }
            k->d = f16_at(blk), k->dmin = f16_at(blk + 2);
            break;
        }
        default: {  /* Q6_K: ql[128], qh[64], int8 scales[16], d */
            for (int j = 0; j < 16; j++) {
                int v = (int8_t)blk[192 + j];
                k->sc[j] = (int16_t)v, k->mn[j] = (int16_t)(32 * v);
            }
            k->d = k->dmin = f16_at(blk + 208);
            break;
        }
    }
}

/* The 256 unsigned codes of a K super-block, in input order (portable; the SIMD path has its own). */
static void k_codes_scalar(int type, const uint8_t *blk, uint8_t *u) {
    for (int e = 0; e < 256; e++) {
        int h = e / 128, j = (e % 128) / 32, l = e % 32, c = e / 64, hi = (e % 64) >= 32;
        switch (type) {
            case Q2_K: u[e] = (blk[16 + 32 * h + l] >> (2 * j)) & 3; break;
            case Q3_K: u[e] = ((blk[32 + 32 * h + l] >> (2 * j)) & 3) | (((blk[l] >> (4 * h + j)) & 1) << 2); break;
            case Q4_K: u[e] = (blk[16 + 32 * c + l] >> (4 * hi)) & 15; break;
            case Q5_K: u[e] = ((blk[48 + 32 * c + l] >> (4 * hi)) & 15) | (((blk[16 + l] >> (2 * c + hi)) & 1) << 4); break;
            default: {  /* Q6_K */
                int lo = (blk[64 * h + 32 * (j & 1) + l] >> (4 * (j >> 1))) & 15;
                u[e] = lo | (((blk[128 + 32 * h + l] >> (2 * j)) & 3) << 4);
            }
        }
    }
}

/* ------------------------------------------------------------------ legacy blocks: codes */

/* The 32 unsigned codes of a legacy block (portable), its dw and cw (w = dw * u + cw; Q8_0's
   codes are signed, stored as int8 in u, cw = 0). */
static void legacy_scalar(int type, const uint8_t *blk, uint8_t *u, float *dw, float *cw) {
    switch (type) {
        case Q4_0: case Q4_1: {
            const uint8_t *qs = blk + (type == Q4_0 ? 2 : 4);
            for (int j = 0; j < 16; j++) u[j] = qs[j] & 15, u[j + 16] = qs[j] >> 4;
            *dw = f16_at(blk), *cw = type == Q4_0 ? -8.0f * *dw : f16_at(blk + 2);
            break;
        }
        case Q5_0: case Q5_1: {
            const uint8_t *qh = blk + (type == Q5_0 ? 2 : 4), *qs = qh + 4;
            uint32_t h;
            memcpy(&h, qh, 4);
            for (int j = 0; j < 16; j++) {
                u[j] = (qs[j] & 15) | (((h >> j) & 1) << 4);
                u[j + 16] = (qs[j] >> 4) | (((h >> (j + 16)) & 1) << 4);
            }
            *dw = f16_at(blk), *cw = type == Q5_0 ? -16.0f * *dw : f16_at(blk + 2);
            break;
        }
        case Q8_0:
            memcpy(u, blk + 2, 32);
            *dw = f16_at(blk), *cw = 0.0f;
            break;
        default: {  /* MXFP4: e, qs[16] */
            for (int j = 0; j < 16; j++) u[j] = MXFP4_U[blk[1 + j] & 15], u[j + 16] = MXFP4_U[blk[1 + j] >> 4];
            *dw = e8m0_half(blk[0]), *cw = -12.0f * *dw;
        }
    }
}

/* ------------------------------------------------------------------ one row against NT tokens */

#if GX86

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* sum of 4 unsigned x signed byte products per int32 lane */
static inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if GPATH == 2
    return _mm256_dpbusd_epi32(_mm256_setzero_si256(), u, s);
#else
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

/* acc + sums of 4 unsigned x signed byte products per int32 lane */
static inline __m256i dot_acc(__m256i acc, __m256i u, __m256i s) {
#if GPATH == 2
    return _mm256_dpbusd_epi32(acc, u, s);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

/* acc + the int16 pairs p times the int16 scales sc, per int32 lane */
static inline __m256i madd_acc(__m256i acc, __m256i p, __m256i sc) {
#if GPATH == 2
    return _mm256_dpwssd_epi32(acc, p, sc);
#else
    return _mm256_add_epi32(acc, _mm256_madd_epi16(p, sc));
#endif
}

/* bytes 0xff where bit i of the 32 bits at p is set */
static inline __m256i bits32(const uint8_t *p) {
    uint32_t x;
    memcpy(&x, p, 4);
#if GPATH == 2
    return _mm256_movm_epi8(x);
#else
    const __m256i spread = _mm256_setr_epi64x(0, 0x0101010101010101LL, 0x0202020202020202LL, 0x0303030303030303LL);
    __m256i b = _mm256_shuffle_epi8(_mm256_set1_epi32((int)x), spread);
    const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
    return _mm256_cmpeq_epi8(_mm256_and_si256(b, bit), bit);
#endif
}

static inline __m256i nibbles(const uint8_t *qs) { /* 16 bytes -> 32 codes: low nibbles, then high */
    __m128i b = _mm_loadu_si128((const __m128i *)qs), m = _mm_set1_epi8(15);
    return _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

__attribute__((always_inline)) static inline void row_legacy(int type, const uint8_t *w, const Act *act, size_t t0,
                                                             int NT, float *out) {
    const size_t nb = act->nb, tile = act_at(act, t0, 0), tt = act->tt;   /* t0: a multiple of TT */
    const int8_t *qt = act_chunk(act, t0, 0);
    const float *dt = act->d + tile, *st = act->s + tile;
    __m256 acc[TT];
    float corr[TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps(), corr[t] = 0.0f;
    const size_t bb = block_bytes(type);
    const __m128i mx_table = _mm_loadu_si128((const __m128i *)MXFP4_U);
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bb;
        __m256i u;
        float dw, cw = 0.0f;
        switch (type) {
            case Q4_0: u = nibbles(blk + 2), dw = f16_at(blk), cw = -8.0f * dw; break;
            case Q4_1: u = nibbles(blk + 4), dw = f16_at(blk), cw = f16_at(blk + 2); break;
            case Q5_0:
                u = _mm256_or_si256(nibbles(blk + 6), _mm256_and_si256(bits32(blk + 2), _mm256_set1_epi8(16)));
                dw = f16_at(blk), cw = -16.0f * dw;
                break;
            case Q5_1:
                u = _mm256_or_si256(nibbles(blk + 8), _mm256_and_si256(bits32(blk + 4), _mm256_set1_epi8(16)));
                dw = f16_at(blk), cw = f16_at(blk + 2);
                break;
            case Q8_0: u = _mm256_loadu_si256((const __m256i *)(blk + 2)), dw = f16_at(blk); break;
            default: {  /* MXFP4 */
                __m256i n = nibbles(blk + 1);
                u = _mm256_shuffle_epi8(_mm256_set_m128i(mx_table, mx_table), n);
                dw = e8m0_half(blk[0]), cw = -12.0f * dw;
            }
        }
        __m256i uu = type == Q8_0 ? _mm256_sign_epi8(u, u) : u;
        for (int t = 0; t < NT; t++) {
            __m256i a = _mm256_load_si256((const __m256i *)(qt + (b * tt + t) * 32));
            if (type == Q8_0) a = _mm256_sign_epi8(a, u);
            __m256 dot = _mm256_cvtepi32_ps(dot_u8s8(uu, a));
            acc[t] = _mm256_fmadd_ps(dot, _mm256_set1_ps(dw * dt[b * tt + t]), acc[t]);
            if (type != Q8_0) corr[t] += cw * st[b * tt + t];
        }
    }
    for (int t = 0; t < NT; t++) out[t] = hsum8(acc[t]) + corr[t];
}

/* Eight rows of 4-bit codes at once (Q4_0, Q4_1, MXFP4): each row's block is loaded as it lies and
   the eight rows' 16 code bytes transposed in registers (4-byte groups), so one 32-bit lane holds
   one row's four codes; a product with the activations' four bytes broadcast then fills eight
   rows' lanes at once, as llama.cpp's repacked 8x8 layout does, without its repack. Per block and
   token a lane ends with the row's exact integer dot product (the code offset taken out as an
   integer: Q4_0 -8, MXFP4 -12 times the activations' code sum), which one fused multiply-add
   scales by dw * da into the row's fp32 sum (Q4_1 adds m * da * sum(a) with a second). One formula for any number of tokens: a row computes the same bits in a decode step and in
   a prefill. pr: the eight rows' first bytes (repeated rows where fewer than eight remain), and
   pr[8] the next group's (its 8 rows' bytes, contiguous), prefetched as these are read: eight rows
   read side by side are eight streams, which the hardware prefetcher does not keep ahead of. */
static inline __m256i load2x16(const uint8_t *lo, const uint8_t *hi) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                   _mm_loadu_si128((const __m128i *)hi), 1);
}

static inline uint16_t u16_at(const uint8_t *p) { uint16_t v; memcpy(&v, p, 2); return v; }
static inline int32_t i32_at(const int8_t *p) { int32_t v; memcpy(&v, p, 4); return v; }

/* the fp16 at byte o of each of the eight rows, as fp32 [8] */
static inline __m256 f16x8(const uint8_t *const *pr, size_t o) {
    __m128i h = _mm_cvtsi32_si128(u16_at(pr[0] + o));
    h = _mm_insert_epi16(h, u16_at(pr[1] + o), 1);
    h = _mm_insert_epi16(h, u16_at(pr[2] + o), 2);
    h = _mm_insert_epi16(h, u16_at(pr[3] + o), 3);
    h = _mm_insert_epi16(h, u16_at(pr[4] + o), 4);
    h = _mm_insert_epi16(h, u16_at(pr[5] + o), 5);
    h = _mm_insert_epi16(h, u16_at(pr[6] + o), 6);
    h = _mm_insert_epi16(h, u16_at(pr[7] + o), 7);
    return _mm256_cvtph_ps(h);
}

__attribute__((always_inline)) static inline void rows8_q4(int type, const uint8_t *const *pr, const Act *act,
                                                           size_t t0, int NT, float *out) {
    const size_t nb = act->nb, tile = act_at(act, t0, 0), tt = act->tt;   /* t0: a multiple of TT */
    const int8_t *qt = act_chunk(act, t0, 0);
    const float *dt = act->d + tile;
    const int32_t *zt = act->qsum + tile;
    const float *st = act->s + tile;
    /* Q4_0: d, qs[16]; Q4_1: d, m, qs[16]; MXFP4: e, qs[16] (codes through MXFP4_U) */
    const size_t bb = block_bytes(type), qo = type == Q4_0 ? 2 : type == Q4_1 ? 4 : 1;
    const int32_t offset = type == Q4_0 ? 8 : type == MXFP4 ? 12 : 0;   /* w = dw * (u - offset) [+ m] */
    const __m256i m4 = _mm256_set1_epi8(15);
    const __m128i mx = _mm_loadu_si128((const __m128i *)MXFP4_U);
    const __m256i mx_table = _mm256_set_m128i(mx, mx);
    __m256 acc[TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    const uint8_t *next = pr[8];
    for (size_t b = 0; b < nb; b++) {
        const size_t o = b * bb;
        if (next != NULL) {   /* the next group: 8 * bb bytes per block here, in three lines */
            _mm_prefetch((const char *)next + 8 * o, PF_HINT);
            _mm_prefetch((const char *)next + 8 * o + 64, PF_HINT);
            _mm_prefetch((const char *)next + 8 * o + 128, PF_HINT);
        }
        /* rows (0, 4), (1, 5), (2, 6), (3, 7) in the two halves; then a 4x4 transpose of 4-byte groups
           in each half: c[j] lane r (r = 0..7) = row r's code bytes 4j .. 4j + 3 */
        const __m256i p0 = load2x16(pr[0] + o + qo, pr[4] + o + qo), p1 = load2x16(pr[1] + o + qo, pr[5] + o + qo);
        const __m256i p2 = load2x16(pr[2] + o + qo, pr[6] + o + qo), p3 = load2x16(pr[3] + o + qo, pr[7] + o + qo);
        const __m256i a01 = _mm256_unpacklo_epi32(p0, p1), b01 = _mm256_unpackhi_epi32(p0, p1);
        const __m256i a23 = _mm256_unpacklo_epi32(p2, p3), b23 = _mm256_unpackhi_epi32(p2, p3);
        const __m256i c[4] = {_mm256_unpacklo_epi64(a01, a23), _mm256_unpackhi_epi64(a01, a23),
                              _mm256_unpacklo_epi64(b01, b23), _mm256_unpackhi_epi64(b01, b23)};
        __m256i lo[4], hi[4];   /* codes of inputs 4j .. 4j + 3 and 16 + 4j .. 16 + 4j + 3 */
        for (int j = 0; j < 4; j++) {
            lo[j] = _mm256_and_si256(c[j], m4);
            hi[j] = _mm256_and_si256(_mm256_srli_epi16(c[j], 4), m4);
            if (type == MXFP4) lo[j] = _mm256_shuffle_epi8(mx_table, lo[j]), hi[j] = _mm256_shuffle_epi8(mx_table, hi[j]);
        }
        const __m256 dw = type == MXFP4 ? _mm256_setr_ps(e8m0_half(pr[0][o]), e8m0_half(pr[1][o]), e8m0_half(pr[2][o]),
                                                         e8m0_half(pr[3][o]), e8m0_half(pr[4][o]), e8m0_half(pr[5][o]),
                                                         e8m0_half(pr[6][o]), e8m0_half(pr[7][o]))
                                        : f16x8(pr, o);
        const __m256 mins = type == Q4_1 ? f16x8(pr, o + 2) : _mm256_setzero_ps();
        for (int t = 0; t < NT; t++) {
            const int8_t *a = qt + (b * tt + t) * 32;
            __m256i s;
            if (NT <= 2) {   /* few tokens: four independent chains (integer sums: any order, the same bits) */
                __m256i s0 = dot_acc(_mm256_setzero_si256(), lo[0], _mm256_set1_epi32(i32_at(a)));
                __m256i s1 = dot_acc(_mm256_setzero_si256(), lo[1], _mm256_set1_epi32(i32_at(a + 4)));
                __m256i s2 = dot_acc(_mm256_setzero_si256(), hi[0], _mm256_set1_epi32(i32_at(a + 16)));
                __m256i s3 = dot_acc(_mm256_setzero_si256(), hi[1], _mm256_set1_epi32(i32_at(a + 20)));
                s0 = dot_acc(s0, lo[2], _mm256_set1_epi32(i32_at(a + 8)));
                s1 = dot_acc(s1, lo[3], _mm256_set1_epi32(i32_at(a + 12)));
                s2 = dot_acc(s2, hi[2], _mm256_set1_epi32(i32_at(a + 24)));
                s3 = dot_acc(s3, hi[3], _mm256_set1_epi32(i32_at(a + 28)));
                s = _mm256_add_epi32(_mm256_add_epi32(s0, s1), _mm256_add_epi32(s2, s3));
            } else {         /* the tokens' sums are the independent chains */
                s = _mm256_setzero_si256();
                for (int j = 0; j < 4; j++) {
                    s = dot_acc(s, lo[j], _mm256_set1_epi32(i32_at(a + 4 * j)));
                    s = dot_acc(s, hi[j], _mm256_set1_epi32(i32_at(a + 16 + 4 * j)));
                }
            }
            if (offset) s = _mm256_sub_epi32(s, _mm256_set1_epi32(offset * zt[b * tt + t]));
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_mul_ps(dw, _mm256_set1_ps(dt[b * tt + t])), acc[t]);
            if (type == Q4_1) acc[t] = _mm256_fmadd_ps(mins, _mm256_set1_ps(st[b * tt + t]), acc[t]);   /* m * da * sum(a) */
        }
    }
    for (int t = 0; t < NT; t++) _mm256_storeu_ps(out + 8 * t, acc[t]);
}

/* A K super-block in registers: its 256 codes as 8 vectors of 32 bytes (input order), the 16
   sub-block scales S and minimums M as int16 (w = d * S[j] * u - dmin * M[j]), d and dmin. */
typedef struct {
    __m256i u[8], S, M;
    float d, dmin;
} KBlock;

__attribute__((always_inline)) static inline void k_unpack(int type, const uint8_t *blk, KBlock *k) {
    const __m256i m4 = _mm256_set1_epi8(15), m2 = _mm256_set1_epi8(3);
    switch (type) {
        case Q2_K: {  /* scales[16] (low: scale, high: min), qs[64], d, dmin */
            __m128i sm = _mm_loadu_si128((const __m128i *)blk);
            k->S = _mm256_cvtepu8_epi16(_mm_and_si128(sm, _mm_set1_epi8(15)));
            k->M = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(sm, 4), _mm_set1_epi8(15)));
            k->d = f16_at(blk + 80), k->dmin = f16_at(blk + 82);
            for (int h = 0; h < 2; h++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * h));
                for (int j = 0; j < 4; j++) k->u[4 * h + j] = _mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m2);
            }
            break;
        }
        case Q3_K: {  /* hmask[32], qs[64], scales[12] (16 x 6 bits), d */
            uint32_t aux[4];
            memcpy(aux, blk + 96, 12);
            const uint32_t tmp = aux[2], k2 = 0x0f0f0f0f, k1 = 0x03030303;
            aux[2] = ((aux[0] >> 4) & k2) | (((tmp >> 4) & k1) << 4);
            aux[3] = ((aux[1] >> 4) & k2) | (((tmp >> 6) & k1) << 4);
            aux[0] = (aux[0] & k2) | (((tmp >> 0) & k1) << 4);
            aux[1] = (aux[1] & k2) | (((tmp >> 2) & k1) << 4);
            k->S = _mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)aux)), _mm256_set1_epi16(32));
            k->M = _mm256_slli_epi16(k->S, 2);
            k->d = k->dmin = f16_at(blk + 108);
            __m256i hm = _mm256_loadu_si256((const __m256i *)blk);
            for (int h = 0; h < 2; h++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(blk + 32 + 32 * h));
                for (int j = 0; j < 4; j++) {
                    __m256i bit = _mm256_set1_epi8((char)(1 << (4 * h + j)));
                    __m256i hb = _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(hm, bit), bit), _mm256_set1_epi8(4));
                    k->u[4 * h + j] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q, 2 * j), m2), hb);
                }
            }
            break;
        }
        case Q4_K: case Q5_K: {  /* d, dmin, scales[12] (8 pairs of 6 bits), [qh[32]], qs[128] */
            uint32_t t[4];
            memcpy(t, blk + 4, 12);
            const uint32_t k1 = 0x3f3f3f3f, k2 = 0x0f0f0f0f, k3 = 0x03030303;
            t[3] = ((t[2] >> 4) & k2) | (((t[1] >> 6) & k3) << 4);     /* mins 4..7 */
            const uint32_t m03 = t[1] & k1;                             /* mins 0..3 */
            t[1] = (t[2] & k2) | (((t[0] >> 6) & k3) << 4);             /* scales 4..7 */
            t[2] = m03;
            t[0] &= k1;                                                 /* scales 0..3 */
            __m128i v = _mm_loadu_si128((const __m128i *)t);            /* 8 scales, 8 mins */
            k->S = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(v, v));       /* each twice: per 16 inputs */
            k->M = _mm256_cvtepu8_epi16(_mm_unpackhi_epi8(v, v));
            k->d = f16_at(blk), k->dmin = f16_at(blk + 2);
            const uint8_t *qs = blk + (type == Q4_K ? 16 : 48);
            const __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 16)), sixteen = _mm256_set1_epi8(16);
            for (int c = 0; c < 4; c++) {
                __m256i q = _mm256_loadu_si256((const __m256i *)(qs + 32 * c));
                k->u[2 * c] = _mm256_and_si256(q, m4);
                k->u[2 * c + 1] = _mm256_and_si256(_mm256_srli_epi16(q, 4), m4);
                if (type == Q5_K) {
                    __m256i b0 = _mm256_set1_epi8((char)(1 << (2 * c))), b1 = _mm256_set1_epi8((char)(2 << (2 * c)));
                    k->u[2 * c] = _mm256_or_si256(k->u[2 * c], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b0), b0), sixteen));
                    k->u[2 * c + 1] = _mm256_or_si256(k->u[2 * c + 1],
                                                      _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(qh, b1), b1), sixteen));
                }
            }
            break;
        }
        default: {  /* Q6_K: ql[128], qh[64], int8 scales[16], d */
            k->S = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(blk + 192)));
            k->M = _mm256_slli_epi16(k->S, 5);
            k->d = k->dmin = f16_at(blk + 208);
            for (int h = 0; h < 2; h++) {
                __m256i l0 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h));
                __m256i l1 = _mm256_loadu_si256((const __m256i *)(blk + 64 * h + 32));
                __m256i qh = _mm256_loadu_si256((const __m256i *)(blk + 128 + 32 * h));
                __m256i lo[4] = {_mm256_and_si256(l0, m4), _mm256_and_si256(l1, m4),
                                 _mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                                 _mm256_and_si256(_mm256_srli_epi16(l1, 4), m4)};
                for (int j = 0; j < 4; j++) {
                    __m256i hb = _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(qh, 2 * j), m2), 4);
                    k->u[4 * h + j] = _mm256_or_si256(lo[j], hb);
                }
            }
        }
    }
}

/* The int16 scale vector of chunk c (inputs 32c .. 32c + 31): S[2c] for its first 16 inputs (the
   low 8 lanes of vpmaddubsw's result), S[2c + 1] for the rest. */
static inline __m256i chunk_scales(__m256i S, int c) {
#if GPATH == 2
    const __m256i idx = _mm256_setr_epi16(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
    return _mm256_permutexvar_epi16(_mm256_add_epi16(idx, _mm256_set1_epi16((short)(2 * c))), S);
#else
    __m128i half = c < 4 ? _mm256_castsi256_si128(S) : _mm256_extracti128_si256(S, 1);
    const int e = 2 * (c & 3);   /* element of `half` for the low lanes; e + 1 for the high ones */
    __m256i both = _mm256_broadcastsi128_si256(half);
    const __m256i pick = _mm256_setr_epi8(0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1, 0, 1,
                                          2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3, 2, 3);
    return _mm256_shuffle_epi8(both, _mm256_add_epi8(pick, _mm256_set1_epi8((char)(2 * e))));
#endif
}

__attribute__((always_inline)) static inline void row_k(int type, const uint8_t *w, const Act *act, size_t t0, int NT,
                                                        float *out) {
    const size_t nb = act->nb, tile = act_at(act, t0, 0), tt = act->tt;   /* t0: a multiple of TT */
    const int8_t *qt = act_chunk(act, t0, 0);
    const float *dt = act->d + tile;
    const int16_t *bt = act->bsums + 16 * tile;
    KBlock k;
    __m256 acc[TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    const size_t bb = block_bytes(type);
    for (size_t b = 0; b < nb; b++) {
        k_unpack(type, w + b * bb, &k);
        __m256i isum[TT];
        for (int t = 0; t < NT; t++) isum[t] = _mm256_setzero_si256();
#pragma GCC unroll 1
        for (int c = 0; c < 8; c++) {            /* chunk outer: the tokens' sums are independent chains;
                                                    not unrolled: unrolled, the compiler spills the sums */
            const __m256i sc = chunk_scales(k.S, c);
            const int8_t *a = qt + ((8 * b + c) * tt) * 32;
            for (int t = 0; t < NT; t++)
                isum[t] = madd_acc(isum[t], _mm256_maddubs_epi16(k.u[c], _mm256_load_si256((const __m256i *)(a + 32 * t))), sc);
        }
        for (int t = 0; t < NT; t++) {
            __m256i mins = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(bt + (b * tt + t) * 16)), k.M);
            const float da = dt[b * tt + t];
            acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), _mm256_set1_ps(k.d * da), acc[t]);
            acc[t] = _mm256_fnmadd_ps(_mm256_cvtepi32_ps(mins), _mm256_set1_ps(k.dmin * da), acc[t]);
        }
    }
    for (int t = 0; t < NT; t++) out[t] = hsum8(acc[t]);
}

/* float weights: 8 at a time, a scalar tail */
static inline __m256 wload8(int type, const uint8_t *w, size_t i) {
    if (type == F32) return _mm256_loadu_ps((const float *)w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    if (type == F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

#endif /* GX86 */

static inline float wscalar(int type, const uint8_t *w, size_t i) {
    if (type == F32) { float f; memcpy(&f, w + 4 * i, 4); return f; }
    uint16_t h;
    memcpy(&h, w + 2 * i, 2);
    return type == F16 ? half_to_float(h) : bf16_to_float(h);
}

__attribute__((always_inline)) static inline void row_float(int type, const uint8_t *w, const Act *act, size_t t0,
                                                            int NT, float *out) {
    const size_t I = act->in;
    size_t i = 0;
    float tail[TT] = {0};
#if GX86
    __m256 acc[TT];
    for (int t = 0; t < NT; t++) acc[t] = _mm256_setzero_ps();
    for (; i + 8 <= I; i += 8) {
        __m256 wv = wload8(type, w, i);
        for (int t = 0; t < NT; t++) acc[t] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(act->x + (t0 + t) * I + i), acc[t]);
    }
    for (int t = 0; t < NT; t++) tail[t] = hsum8(acc[t]);
#endif
    for (; i < I; i++) {
        float wi = wscalar(type, w, i);
        for (int t = 0; t < NT; t++) tail[t] += wi * act->x[(t0 + t) * I + i];
    }
    for (int t = 0; t < NT; t++) out[t] = tail[t];
}

#if GPATH == 0
static void row_portable(int type, const uint8_t *w, const Act *act, size_t t0, int NT, float *out) {
    const size_t nb = act->nb, bb = block_bytes(type);
    uint8_t u[256];
    for (int t = 0; t < NT; t++) {
        const size_t tt = t0 + t;
        float total = 0.0f;
        for (size_t b = 0; b < nb; b++) {
            const uint8_t *blk = w + b * bb;
            if (act->fam == 1) {
                float dw, cw;
                legacy_scalar(type, blk, u, &dw, &cw);
                const int8_t *a = act_chunk(act, tt, b);
                int sum = 0;
                for (int i = 0; i < 32; i++) sum += (type == Q8_0 ? (int)(int8_t)u[i] : (int)u[i]) * a[i];
                total += dw * act->d[act_at(act, tt, b)] * (float)sum + cw * act->s[act_at(act, tt, b)];
            } else {
                KScales ks;
                k_scales(type, blk, &ks);
                k_codes_scalar(type, blk, u);
                const int16_t *bs = act->bsums + 16 * act_at(act, tt, b);
                int isum = 0, msum = 0;
                for (int j = 0; j < 16; j++) {
                    const int8_t *a = act_chunk(act, tt, 8 * b + j / 2) + 16 * (j & 1);
                    int s = 0;
                    for (int i = 0; i < 16; i++) s += u[16 * j + i] * a[i];
                    isum += ks.sc[j] * s;
                    msum += ks.mn[j] * bs[j];
                }
                const float da = act->d[act_at(act, tt, b)];
                total += ks.d * da * (float)isum - ks.dmin * da * (float)msum;
            }
        }
        out[t] = total;
    }
}
#endif

#if GPATH == 3
/* NEON with the dot-product extension: each block's codes unpacked once (Q4_0, Q8_0 and Q4_K with
   NEON, the rest by the portable unpackers) and multiplied with every token of the tile by `sdot`
   (16 int8 products an instruction); every code fits int8 (legacy 0..31 or Q8_0's signed bytes, K
   0..63). The same integer sums as row_portable, so the same result up to fp32 sum order. */
static inline int dot16(const uint8_t *u, const int8_t *a) {
    return vaddvq_s32(vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vld1q_u8(u)), vld1q_s8(a)));
}

static inline int dot32(const uint8_t *u, const int8_t *a) {
    int32x4_t acc = vdotq_s32(vdupq_n_s32(0), vreinterpretq_s8_u8(vld1q_u8(u)), vld1q_s8(a));
    return vaddvq_s32(vdotq_s32(acc, vreinterpretq_s8_u8(vld1q_u8(u + 16)), vld1q_s8(a + 16)));
}

static inline void legacy_codes(int type, const uint8_t *blk, uint8_t *u, float *dw, float *cw) {
    if (type == Q4_0) {                               /* low nibbles: inputs 0..15, high: 16..31 */
        const uint8x16_t q = vld1q_u8(blk + 2), m = vdupq_n_u8(15);
        vst1q_u8(u, vandq_u8(q, m));
        vst1q_u8(u + 16, vshrq_n_u8(q, 4));
        *dw = f16_at(blk), *cw = -8.0f * *dw;
    } else if (type == Q8_0) {
        memcpy(u, blk + 2, 32);
        *dw = f16_at(blk), *cw = 0.0f;
    } else {
        legacy_scalar(type, blk, u, dw, cw);
    }
}

static inline void k_codes(int type, const uint8_t *blk, uint8_t *u) {
    if (type == Q4_K) {                               /* 4 chunks of 32 bytes: 32 low nibbles, then 32 high */
        const uint8x16_t m = vdupq_n_u8(15);
        for (int c = 0; c < 4; c++) {
            const uint8x16_t q0 = vld1q_u8(blk + 16 + 32 * c), q1 = vld1q_u8(blk + 32 + 32 * c);
            vst1q_u8(u + 64 * c, vandq_u8(q0, m));
            vst1q_u8(u + 64 * c + 16, vandq_u8(q1, m));
            vst1q_u8(u + 64 * c + 32, vshrq_n_u8(q0, 4));
            vst1q_u8(u + 64 * c + 48, vshrq_n_u8(q1, 4));
        }
    } else {
        k_codes_scalar(type, blk, u);
    }
}

static void row_neon(int type, const uint8_t *w, const Act *act, size_t t0, int NT, float *out) {
    const size_t nb = act->nb, bb = block_bytes(type);
    _Alignas(16) uint8_t u[256];
    float total[TT] = {0};
    for (size_t b = 0; b < nb; b++) {
        const uint8_t *blk = w + b * bb;
        if (act->fam == 1) {
            float dw, cw;
            legacy_codes(type, blk, u, &dw, &cw);
            for (int t = 0; t < NT; t++) {
                const size_t at = act_at(act, t0 + t, b);
                const int sum = dot32(u, act_chunk(act, t0 + t, b));   /* Q8_0: u holds the signed bytes */
                total[t] += dw * act->d[at] * (float)sum + cw * act->s[at];
            }
        } else {
            KScales ks;
            k_scales(type, blk, &ks);
            k_codes(type, blk, u);
            for (int t = 0; t < NT; t++) {
                const size_t at = act_at(act, t0 + t, b);
                const int16_t *bs = act->bsums + 16 * at;
                int isum = 0, msum = 0;
                for (int j = 0; j < 16; j++) {
                    isum += ks.sc[j] * dot16(u + 16 * j, act_chunk(act, t0 + t, 8 * b + j / 2) + 16 * (j & 1));
                    msum += ks.mn[j] * bs[j];
                }
                const float da = act->d[at];
                total[t] += ks.d * da * (float)isum - ks.dmin * da * (float)msum;
            }
        }
    }
    for (int t = 0; t < NT; t++) out[t] = total[t];
}
#endif

/* Row o of a `type` weight (its bytes at w) against tokens t0 .. t0 + NT - 1: out[t]. */
__attribute__((always_inline)) static inline void row_dot(int type, const uint8_t *w, const Act *act, size_t t0,
                                                          int NT, float *out) {
    if (act->fam == 0) { row_float(type, w, act, t0, NT, out); return; }
#if GX86
    if (act->fam == 1) row_legacy(type, w, act, t0, NT, out);
    else row_k(type, w, act, t0, NT, out);
#elif GPATH == 3
    row_neon(type, w, act, t0, NT, out);
#else
    row_portable(type, w, act, t0, NT, out);
#endif
}

/* `F(args..., nt, out)` with nt as a constant for 1..7 tokens and TT beyond (the switches in the kernels
   fold away): the specializations of the row and eight-row kernels below. */
#define NT_SWITCH(F, ...)                                                                          \
    switch (nt) {                                                                                  \
        case 1: F(__VA_ARGS__, 1, out); break;                                                     \
        case 2: F(__VA_ARGS__, 2, out); break;                                                     \
        case 3: F(__VA_ARGS__, 3, out); break;                                                     \
        case 4: F(__VA_ARGS__, 4, out); break;                                                     \
        case 5: F(__VA_ARGS__, 5 < TT ? 5 : TT, out); break;                                       \
        case 6: F(__VA_ARGS__, 6 < TT ? 6 : TT, out); break;                                       \
        case 7: F(__VA_ARGS__, 7 < TT ? 7 : TT, out); break;                                       \
        default: F(__VA_ARGS__, TT, out); break;                                                   \
    }

/* One type's row kernel for 1..TT tokens, specialized. */
#define ROW_FN(T)                                                                                  \
    static void row_##T(const uint8_t *w, const Act *act, size_t t0, int nt, float *out) {        \
        NT_SWITCH(row_dot, T, w, act, t0)                                                          \
    }
ROW_FN(F32) ROW_FN(F16) ROW_FN(BF16) ROW_FN(Q4_0) ROW_FN(Q4_1) ROW_FN(Q5_0) ROW_FN(Q5_1) ROW_FN(Q8_0)
ROW_FN(MXFP4) ROW_FN(Q2_K) ROW_FN(Q3_K) ROW_FN(Q4_K) ROW_FN(Q5_K) ROW_FN(Q6_K)

typedef void (*RowFn)(const uint8_t *, const Act *, size_t, int, float *);

static RowFn row_fn(int type) {
    switch (type) {
        case F32: return row_F32; case F16: return row_F16; case BF16: return row_BF16;
        case Q4_0: return row_Q4_0; case Q4_1: return row_Q4_1; case Q5_0: return row_Q5_0; case Q5_1: return row_Q5_1;
        case Q8_0: return row_Q8_0; case MXFP4: return row_MXFP4; case Q2_K: return row_Q2_K; case Q3_K: return row_Q3_K;
        case Q4_K: return row_Q4_K; case Q5_K: return row_Q5_K; case Q6_K: return row_Q6_K;
        default: return NULL;
    }
}

/* One type's eight-row kernel for 1..TT tokens (out [nt][8]), or NULL where it has none. */
typedef void (*Rows8Fn)(const uint8_t *const *, const Act *, size_t, int, float *);

#if GX86 /* the eight-row kernel is x86's (NEON keeps the row kernels) */
#define ROWS8_FN(T, KERNEL)                                                                        \
    static void rows8_##T(const uint8_t *const *pr, const Act *act, size_t t0, int nt, float *out) { \
        NT_SWITCH(KERNEL, T, pr, act, t0)                                                          \
    }
ROWS8_FN(Q4_0, rows8_q4) ROWS8_FN(Q4_1, rows8_q4) ROWS8_FN(MXFP4, rows8_q4)
#endif

static Rows8Fn rows8_fn(int type) {
#if GX86
    if (type == Q4_0) return rows8_Q4_0;
    if (type == Q4_1) return rows8_Q4_1;
    if (type == MXFP4) return rows8_MXFP4;
#endif
    (void)type;
    return NULL;
}

/* Rows per parallel work item: eight-row groups where the type has that kernel or tokens share a
   row's reads, single rows for one token otherwise (finer balance). */
static size_t rows_per(int type, size_t N) { return rows8_fn(type) != NULL || N > 1 ? ROWS : 1; }

static size_t groups_of(size_t O, size_t per) { return (O + per - 1) / per; }

/* ------------------------------------------------------------------ row groups */

static inline void put(void *y, int y_dtype, size_t k, float v) {
    if (y_dtype == 0) ((float *)y)[k] = v;
    else ((uint16_t *)y)[k] = float_to_bf16(v);
}

/* Rows r0 .. r1 - 1 of a matrix of `rows` rows (row o's bytes at w + o * rb) against every token of act:
   y[t * stride + o]. Tokens TT at a time, each tile against every row of the group; eight rows
   at once where the type has an eight-row kernel (f8; r0 a multiple of 8, r1 - r0 <= 8). */
static inline void rows_group(RowFn fn, Rows8Fn f8, const uint8_t *w, size_t rb, size_t rows, const Act *act,
                              size_t r0, size_t r1, void *y, int y_dtype, size_t stride) {
    const size_t N = act->n;
    float r[TT * 8];
    if (f8 != NULL) {
        const uint8_t *pr[9];
        for (size_t k = 0; k < 8; k++) pr[k] = w + (r0 + k < r1 ? r0 + k : r1 - 1) * rb;   /* a short group repeats its last row */
        pr[8] = r1 - r0 == 8 && r1 + 8 * PF_GROUPS <= rows ? w + (r1 + 8 * (PF_GROUPS - 1)) * rb : NULL;
        for (size_t t0 = 0; t0 < N; t0 += TT) {
            const int nt = N - t0 < TT ? (int)(N - t0) : TT;
            f8(pr, act, t0, nt, r);
            for (int t = 0; t < nt; t++)
                for (size_t o = r0; o < r1; o++) put(y, y_dtype, (t0 + t) * stride + o, r[8 * t + (o - r0)]);
        }
        return;
    }
    for (size_t t0 = 0; t0 < N; t0 += TT) {
        const int nt = N - t0 < TT ? (int)(N - t0) : TT;
        for (size_t o = r0; o < r1; o++) {
            fn(w + o * rb, act, t0, nt, r);
            for (int t = 0; t < nt; t++) put(y, y_dtype, (t0 + t) * stride + o, r[t]);
        }
    }
}

/* ------------------------------------------------------------------ entry points */

static __thread Arena arena; /* kernel_common.h */


/* x [N, I] quantized for `type`'s dot products into this thread's scratch (act_fill): 0, or -1 without
   memory. The input of one call, shared by every matrix the call computes. */
static int input_act(Act *act, const void *x, int x_dtype, size_t N, size_t I, int type, int threads) {
    const int fam = family(type);
    char *p = arena_reserve(&arena, act_bytes(N, I, fam, x_dtype) + 64);
    if (p == NULL) return -1;
    act_fill(act, p, x, x_dtype, N, I, fam, threads);
    return 0;
}

/* y[N, O] = x[N, I] @ W.T, W [O, I] of ggml `type` (rows of `row_bytes` at w). x_dtype / y_dtype:
   0 float32, 1 bfloat16. Returns 0, -1 when the scratch cannot be allocated, -2 for a type or
   shape not taken. */
int ggml_mv(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t out_features,
            int64_t in_features, const uint8_t *w, int type, int threads) {
    const size_t N = (size_t)n_tokens, O = (size_t)out_features, I = (size_t)in_features;
    if (!ggml_supported(type, in_features) || N == 0) return N == 0 ? 0 : -2;
    const size_t rb = I / block_size(type) * block_bytes(type);
    Act act;
    if (input_act(&act, x, x_dtype, N, I, type, threads) != 0) return -1;
    RowFn fn = row_fn(type);
    Rows8Fn f8 = rows8_fn(type);
    const size_t per = rows_per(type, N), G = groups_of(O, per);
    const int parallel = threads > 1 && O * I * N >= (1u << 17);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t g = 0; g < (int64_t)G; g++) {
        size_t r0 = (size_t)g * per, r1 = r0 + per < O ? r0 + per : O;
        rows_group(fn, f8, w, rb, O, &act, r0, r1, y, y_dtype, O);
    }
    return 0;
}

/* Several matrices of one input and one type (attention's q, k, v): x quantized once, one
   parallel loop; y[N, sum(outs)] with matrix m's outputs in its columns. */
int ggml_mv_many(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t in_features, int count,
                 const int64_t *outs, const uint8_t *const *ws, int type, int threads) {
    const size_t N = (size_t)n_tokens, I = (size_t)in_features;
    if (!ggml_supported(type, in_features) || count < 1 || count > 16) return -2;
    if (N == 0) return 0;
    const size_t rb = I / block_size(type) * block_bytes(type), per = rows_per(type, N);
    size_t gfirst[17], first[17], total = 0, G = 0;
    for (int m = 0; m < count; m++) {
        first[m] = total, gfirst[m] = G;
        total += (size_t)outs[m], G += groups_of((size_t)outs[m], per);
    }
    gfirst[count] = G, first[count] = total;
    Act act;
    if (input_act(&act, x, x_dtype, N, I, type, threads) != 0) return -1;
    RowFn fn = row_fn(type);
    Rows8Fn f8 = rows8_fn(type);
    const size_t esize = y_dtype == 0 ? 4 : 2;
    const int parallel = threads > 1 && total * I * N >= (1u << 17);
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
    for (int64_t g = 0; g < (int64_t)G; g++) {
        int m = 0;
        while ((size_t)g >= gfirst[m + 1]) m++;
        size_t O = (size_t)outs[m], r0 = ((size_t)g - gfirst[m]) * per, r1 = r0 + per < O ? r0 + per : O;
        rows_group(fn, f8, ws[m], rb, O, &act, r0, r1, (char *)y + first[m] * esize, y_dtype, total);
    }
    return 0;
}

/* A SwiGLU expert in one call: y[N, H] = (silu(x @ w1.T) * (x @ w3.T)) @ w2.T, w1 and w3 [F, H] of
   type t13, w2 [H, F] of type t2. x is quantized once for w1 and w3; the hidden activations stay
   fp32 until they are quantized for w2. One parallel region. w1 is read whole before w3: reading
   the two a group of rows each in turn measured 12.4 GB/s on one thread, one after the other 17.6
   (the same bits; BENCHMARKS.md, "gate then up"). */
int ggml_swiglu(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t hidden, int64_t inter,
                const uint8_t *w1, const uint8_t *w3, int t13, const uint8_t *w2, int t2, int threads) {
    const size_t N = (size_t)n_tokens, H = (size_t)hidden, F = (size_t)inter;
    if (!ggml_supported(t13, hidden) || !ggml_supported(t2, inter)) return -2;
    if (N == 0) return 0;
    const int f13 = family(t13), f2 = family(t2);
    const size_t rb13 = H / block_size(t13) * block_bytes(t13), rb2 = F / block_size(t2) * block_bytes(t2);
    const size_t hb = up64(4 * N * F);
    char *p = arena_reserve(&arena, act_bytes(N, H, f13, x_dtype) + act_bytes(N, F, f2, 0) + 2 * hb + 128);
    if (p == NULL) return -1;
    float *gate = (float *)p, *up = (float *)(p + hb);
    char *q = p + 2 * hb;
    Act in1, in2;
    q = act_fill(&in1, q, x, x_dtype, N, H, f13, threads);
    RowFn fn13 = row_fn(t13), fn2 = row_fn(t2);
    Rows8Fn k13 = rows8_fn(t13), k2 = rows8_fn(t2);
    const size_t per13 = rows_per(t13, N), per2 = rows_per(t2, N), G1 = groups_of(F, per13), G2 = groups_of(H, per2);
    const int parallel = threads > 1 && F * H * N >= (1u << 16);
#pragma omp parallel num_threads(threads) if (parallel)
    {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < (int64_t)G1; g++) {   /* w1 whole, then w3: one stream at a time (below) */
            size_t r0 = (size_t)g * per13, r1 = r0 + per13 < F ? r0 + per13 : F;
            rows_group(fn13, k13, w1, rb13, F, &in1, r0, r1, gate, 0, F);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < (int64_t)G1; g++) {   /* the same groups on the same threads as above */
            size_t r0 = (size_t)g * per13, r1 = r0 + per13 < F ? r0 + per13 : F;
            rows_group(fn13, k13, w3, rb13, F, &in1, r0, r1, up, 0, F);
            for (size_t t = 0; t < N; t++)
                for (size_t o = r0; o < r1; o++) {    /* silu(gate) * up, by the rows' thread */
                    float gv = gate[t * F + o];
                    gate[t * F + o] = gv / (1.0f + expf(-gv)) * up[t * F + o];
                }
        }
#pragma omp single
        act_fill(&in2, q, gate, 0, N, F, f2, 1);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < (int64_t)G2; g++) {
            size_t r0 = (size_t)g * per2, r1 = r0 + per2 < H ? r0 + per2 : H;
            rows_group(fn2, k2, w2, rb2, H, &in2, r0, r1, y, y_dtype, H);
        }
    }
    return 0;
}

/* A decode step's chosen experts in one call: y[j, H] = expert j's SwiGLU of the one token x [1, H],
   expert j's matrices given by its `ggml_swiglu_p` arguments experts[j] (`GgmlSwigluArgs`; one shape
   and type pair for all). Each expert computes exactly as `ggml_swiglu` does
   (the same kernels, rows and order), so its row equals that call's result bit for bit; what the
   one call saves is a parallel region, two barriers and an activation quantization per expert,
   and the Python around each. Returns as ggml_swiglu. */
int ggml_experts(const void *x, int x_dtype, void *y, int y_dtype, int count, const GgmlSwigluArgs *const *experts,
                 int threads) {
    if (count < 1 || count > 64) return -2;
    const GgmlSwigluArgs *e0 = experts[0];
    const size_t H = (size_t)e0->hidden, F = (size_t)e0->inter;
    const int t13 = (int)e0->t13, t2 = (int)e0->t2;
    for (int j = 1; j < count; j++)
        if (experts[j]->hidden != e0->hidden || experts[j]->inter != e0->inter || experts[j]->t13 != t13
            || experts[j]->t2 != t2) return -2;
    if (!ggml_supported(t13, (int64_t)H) || !ggml_supported(t2, (int64_t)F)) return -2;
    const int f13 = family(t13), f2 = family(t2);
    const size_t rb13 = H / block_size(t13) * block_bytes(t13), rb2 = F / block_size(t2) * block_bytes(t2);
    const size_t hb = up64(4 * F), ab2 = act_bytes(1, F, f2, 0) + 64;
    char *p = arena_reserve(&arena, act_bytes(1, H, f13, x_dtype) + 64 + (size_t)count * (2 * hb + ab2 + sizeof(Act)));
    if (p == NULL) return -1;
    float *gate = (float *)p, *up = (float *)(p + (size_t)count * hb);      /* [count, F] each */
    char *q = p + (size_t)count * 2 * hb;
    Act *in2 = (Act *)q;
    q += up64((size_t)count * sizeof(Act));
    char *q2 = q;                                                          /* experts' hidden activations */
    q += (size_t)count * ab2;
    Act in1;
    act_fill(&in1, q, x, x_dtype, 1, H, f13, 1);
    RowFn fn13 = row_fn(t13), fn2 = row_fn(t2);
    Rows8Fn k13 = rows8_fn(t13), k2 = rows8_fn(t2);
    const size_t per13 = rows_per(t13, 1), per2 = rows_per(t2, 1), G1 = groups_of(F, per13), G2 = groups_of(H, per2);
    const size_t esize = y_dtype == 0 ? 4 : 2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (int64_t g = 0; g < (int64_t)(G1 * count); g++) {   /* gates, then ups (as ggml_swiglu) */
            const int j = (int)((size_t)g / G1);
            size_t r0 = ((size_t)g % G1) * per13, r1 = r0 + per13 < F ? r0 + per13 : F;
            rows_group(fn13, k13, experts[j]->w1, rb13, F, &in1, r0, r1, gate + j * (hb / 4), 0, F);
        }
#pragma omp for schedule(static)
        for (int64_t g = 0; g < (int64_t)(G1 * count); g++) {
            const int j = (int)((size_t)g / G1);
            size_t r0 = ((size_t)g % G1) * per13, r1 = r0 + per13 < F ? r0 + per13 : F;
            float *gj = gate + j * (hb / 4), *uj = up + j * (hb / 4);
            rows_group(fn13, k13, experts[j]->w3, rb13, F, &in1, r0, r1, uj, 0, F);
            for (size_t o = r0; o < r1; o++) gj[o] = gj[o] / (1.0f + expf(-gj[o])) * uj[o];
        }
#pragma omp for schedule(static)
        for (int j = 0; j < count; j++) act_fill(&in2[j], q2 + (size_t)j * ab2, gate + j * (hb / 4), 0, 1, F, f2, 1);
#pragma omp for schedule(static)
        for (int64_t g = 0; g < (int64_t)(G2 * count); g++) {
            const int j = (int)((size_t)g / G2);
            size_t r0 = ((size_t)g % G2) * per2, r1 = r0 + per2 < H ? r0 + per2 : H;
            rows_group(fn2, k2, experts[j]->w2, rb2, H, &in2[j], r0, r1,
                       (char *)y + (size_t)j * H * esize, y_dtype, H);
        }
    }
    return 0;
}

/* Rows ids[0 .. n) of a [*, I] `type` matrix dequantized into y [n, I] (fp32 or bf16): a token table. */
int ggml_rows(const uint8_t *w, int type, int64_t in_features, const int64_t *ids, int64_t n, void *y, int y_dtype) {
    const size_t I = (size_t)in_features;
    if (!ggml_supported(type, in_features)) return -2;
    const int fam = family(type);
    const size_t rb = I / block_size(type) * block_bytes(type);
    uint8_t u[256];
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + (size_t)ids[r] * rb;
        const size_t base = (size_t)r * I;
        if (fam == 0) {
            for (size_t i = 0; i < I; i++) put(y, y_dtype, base + i, wscalar(type, row, i));
        } else if (fam == 1) {
            for (size_t b = 0; b < I / 32; b++) {
                float dw, cw;
                legacy_scalar(type, row + b * block_bytes(type), u, &dw, &cw);
                for (int i = 0; i < 32; i++)
                    put(y, y_dtype, base + 32 * b + i, dw * (float)(type == Q8_0 ? (int)(int8_t)u[i] : (int)u[i]) + cw);
            }
        } else {
            for (size_t b = 0; b < I / 256; b++) {
                KScales ks;
                const uint8_t *blk = row + b * block_bytes(type);
                k_scales(type, blk, &ks);
                k_codes_scalar(type, blk, u);
                for (int i = 0; i < 256; i++)
                    put(y, y_dtype, base + 256 * b + i, ks.d * (float)ks.sc[i / 16] * (float)u[i] - ks.dmin * (float)ks.mn[i / 16]);
            }
        }
    }
    return 0;
}

/* ------------------------------------------------------------------ fixed arguments in one struct */

/* (kernel_args.h; ctypes mirrors the structs in native.py) */
int ggml_mv_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const GgmlArgs *w, int threads) {
    return ggml_mv(x, x_dtype, y, y_dtype, n_tokens, w->out_features, w->in_features, w->data, w->type, threads);
}

int ggml_mv_many_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const GgmlManyArgs *w,
                   int threads) {
    return ggml_mv_many(x, x_dtype, y, y_dtype, n_tokens, w->in_features, w->count, w->outs, w->datas, w->type,
                        threads);
}

int ggml_swiglu_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const GgmlSwigluArgs *w,
                  int threads) {
    return ggml_swiglu(x, x_dtype, y, y_dtype, n_tokens, w->hidden, w->inter, w->w1, w->w3, w->t13, w->w2, w->t2,
                       threads);
}
