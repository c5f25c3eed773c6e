/* Products with the weights of pre-quantized checkpoints as their publishers store them
   (quant/published.py): y[t, n] = sum_k x[t, k] * w[n, k], read from the stored bytes, fp32 sums.

   - fp8 block (DeepSeek-V3, Qwen3-FP8, GLM FP8): w [N, K] float8 e4m3 bytes, one fp32 scale per
     bn x bk block, scale [ceil(N/bn), ceil(K/bk)]; each byte turned into fp32 exactly by bit moves.
   - int pack (compressed-tensors `pack-quantized`, llm-compressor's W4A16/W8A16): w [N, ceil(K*b/32)]
     int32 words, value k of a row at bits (k % (32/b))*b of word k / (32/b), stored + 2^(b-1);
     scale [N, ceil(K/group)] fp32/bf16/fp16; optional zero points packed the same way along N:
     zp [ceil(N/(32/b)), G] (then w = (q - zp) * s, else (q - 2^(b-1)) * s); with llm-compressor's
     actorder "group" a `weight_g_idx` [K] names each input's group (else k / group).
   - GPTQ (AutoGPTQ / GPTQModel / optimum): qweight [K/(32/b), N] int32 (K-major: value k of column n
     at bits (k % (32/b))*b of word [k / (32/b), n]), qzeros [G, N/(32/b)] packed along N, scales
     [G, N] fp16, g_idx [K] int32 (the group of input k: k / group, or any order with desc_act);
     w = (q - (z + zero_offset)) * s, zero_offset 1 for v1 checkpoints (zeros stored minus one).

   fp8 and int pack rows are decoded one output row at a time into a per-thread fp32 buffer, then
   dotted with every token (no whole-matrix dequantization); for one int token (decode) the products
   are summed as the words are unpacked instead, each group's sum scaled once and the zero point
   times the group's activation sum subtracted once (for fp8 that fused loop measured slower here). GPTQ, stored K-major, accumulates over k
   for a tile of 64 output columns and 8 tokens at a time. Each output is one thread's sum in a
   fixed order: results do not depend on the thread count.

   Entry points take (x, x dtype, y, y dtype, tokens, fixed arguments, threads) as the other kernels'
   `*_p` calls (native.call_rows): dtype 0 fp32, 1 bf16. Returns 0, -1 when scratch cannot be had,
   -2 for arguments it does not take. */
#include "kernel_args.h"
#include "kernel_common.h"

#include <omp.h>

int pq_path(void) { return 0; } /* portable C, vectorised by the compiler */

static __thread Arena arena;      /* the calling thread's: activations as fp32 */
static __thread Arena row_arena;  /* each worker's: one decoded row */

/* e4m3fn byte -> fp32, exact and branch-free (vectorised): the 7 magnitude bits placed at the top
   of an fp32 mantissa are that value times 2^-120 (subnormals included), the sign is bit 7, and
   0x7f / 0xff are NaN (e4m3fn has no infinities). The same values as a 256-entry table would give,
   without the table's scalar gathers. */
static inline float e4m3_to_float(uint32_t b) {
    uint32_t u = (b & 0x7fu) << 20, r;
    float f;
    memcpy(&f, &u, 4);
    f *= 0x1p120f;
    memcpy(&r, &f, 4);
    r |= (b & 0x80u) << 24;
    r = (b & 0x7fu) == 0x7fu ? 0x7fc00000u : r;
    memcpy(&f, &r, 4);
    return f;
}

static inline float load_scale(const void *s, int dtype, size_t i) {
    if (dtype == 0) return ((const float *)s)[i];
    if (dtype == 1) return bf16_to_float(((const uint16_t *)s)[i]);
    return half_to_float_portable(((const uint16_t *)s)[i]);
}

/* x (T, K) in dtype -> fp32 (T, K): a view when already fp32, else converted into the caller's arena */
static const float *activations(const void *x, int dtype, size_t T, size_t K) {
    if (dtype == 0) return (const float *)x;
    float *xf = (float *)arena_reserve(&arena, 4 * T * K);
    if (!xf) return NULL;
    for (size_t i = 0; i < T * K; i++) xf[i] = bf16_to_float(((const uint16_t *)x)[i]);
    return xf;
}

static inline void put(void *y, int dtype, size_t i, float v) {
    if (dtype == 0) ((float *)y)[i] = v;
    else ((uint16_t *)y)[i] = float_to_bf16(v);
}

static inline float dot(const float *a, const float *b, size_t n) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* args: N, K, w (uint8 [N, K]), scale (fp32 [ceil(N/bn), ceil(K/bk)]), bn, bk */
int pq_fp8_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const PqFp8Args *a, int threads) {
    const size_t N = a->n, K = a->k, bn = a->bn, bk = a->bk, T = n_tokens;
    const uint8_t *w = a->w;
    const float *scale = a->scale;
    if (bn <= 0 || bk <= 0 || x_dtype < 0 || x_dtype > 1) return -2;
    const float *xf = activations(x, x_dtype, T, K);
    if (!xf) return -1;
    const size_t KB = (K + bk - 1) / bk;
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K > 65536)
    for (size_t n = 0; n < N; n++) {
        float *row = (float *)arena_reserve(&row_arena, 4 * K);
        if (!row) { failed = 1; continue; }
        const uint8_t *wr = w + n * K;
        const float *sr = scale + (n / bn) * KB;
        for (size_t k0 = 0; k0 < K; k0 += bk) {
            const float s = sr[k0 / bk];
            const size_t k1 = k0 + bk < K ? k0 + bk : K;
            for (size_t k = k0; k < k1; k++) row[k] = e4m3_to_float(wr[k]) * s;
        }
        for (size_t t = 0; t < T; t++) put(y, y_dtype, t * N + n, dot(row, xf + t * K, K));
    }
    return failed ? -1 : 0;
}

/* words [n_words] of PER values of BITS each -> (value - z) * s into row [n_words * PER] */
static inline __attribute__((always_inline)) void unpack_words(const uint32_t *words, float *row, size_t n_words,
                                                               const int per, const int bits, float z, float s) {
    const uint32_t mask = (1u << bits) - 1;
    for (size_t w = 0; w < n_words; w++) {
        const uint32_t v = words[w];
        for (int j = 0; j < per; j++) row[w * per + j] = ((float)((v >> (j * bits)) & mask) - z) * s;
    }
}

/* sum of value * x over words [n_words] of PER values of BITS each, x [n_words * PER] */
static inline __attribute__((always_inline)) float dot_words(const uint32_t *words, const float *x, size_t n_words,
                                                             const int per, const int bits) {
    const uint32_t mask = (1u << bits) - 1;
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (size_t w = 0; w < n_words; w++) {
        const uint32_t v = words[w];
        for (int j = 0; j < per; j++) s += (float)((v >> (j * bits)) & mask) * x[w * per + j];
    }
    return s;
}

static __thread Arena sum_arena;  /* the calling thread's: the activations' sums per group */

/* decode (one token, groups of whole words in order): y[n] = sum_g s[n,g] (sum_k q x - z[n,g] sum_k x) */
static int int_decode(const float *xf, void *y, int y_dtype, size_t N, size_t K, const uint32_t *q, const void *scale,
                      int s_dtype, const uint32_t *zp, size_t group, int bits, size_t G, int threads) {
    const size_t per = 32 / bits, words = K / per;
    const uint32_t mask = (1u << bits) - 1, mid = 1u << (bits - 1);
    float *xsum = (float *)arena_reserve(&sum_arena, 4 * G);
    if (!xsum) return -1;
    for (size_t g = 0; g < G; g++) {
        const size_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
        xsum[g] = 0.0f;
        for (size_t k = g * group; k < k1; k++) xsum[g] += xf[k];
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K > 65536)
    for (size_t n = 0; n < N; n++) {
        const uint32_t *qr = q + n * words;
        float acc = 0.0f;
        for (size_t g = 0; g < G; g++) {
            const size_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
            const float z = zp ? (float)((zp[(n / per) * G + g] >> ((n % per) * bits)) & mask) : (float)mid;
            const float part = bits == 4 ? dot_words(qr + k0 / 8, xf + k0, (k1 - k0) / 8, 8, 4)
                                         : dot_words(qr + k0 / 4, xf + k0, (k1 - k0) / 4, 4, 8);
            acc += load_scale(scale, s_dtype, n * G + g) * (part - z * xsum[g]);
        }
        put(y, y_dtype, n, acc);
    }
    return 0;
}

/* args: N, K, packed (int32 [N, ceil(K*bits/32)]), scale ([N, G]), scale dtype, zero points (int32
   [ceil(N/(32/bits)), G] or 0: symmetric), group, bits, g_idx (int32 [K], the group of each input
   under llm-compressor's actorder "group", or 0: k / group), G */
int pq_int_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const PqIntArgs *a, int threads) {
    const size_t N = a->n, K = a->k, group = a->group, T = n_tokens, G = a->groups;
    const uint32_t *q = a->q;
    const void *scale = a->scale;
    const int s_dtype = (int)a->s_dtype, bits = (int)a->bits;
    const uint32_t *zp = a->zp;
    const int32_t *g_idx = a->g_idx;
    if ((bits != 4 && bits != 8) || group <= 0 || x_dtype < 0 || x_dtype > 1) return -2;
    if (!g_idx && G != (K + group - 1) / group) return -2;
    if (g_idx)
        for (size_t k = 0; k < K; k++)
            if (g_idx[k] < 0 || (size_t)g_idx[k] >= G) return -2;
    const size_t per = 32 / bits, words = (K * bits + 31) / 32;
    const uint32_t mask = (1u << bits) - 1, mid = 1u << (bits - 1);
    const float *xf = activations(x, x_dtype, T, K);
    if (!xf) return -1;
    if (T == 1 && !g_idx && group % per == 0 && K % per == 0)
        return int_decode(xf, y, y_dtype, N, K, q, scale, s_dtype, zp, group, bits, G, threads);
    int failed = 0;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K > 65536)
    for (size_t n = 0; n < N; n++) {
        float *row = (float *)arena_reserve(&row_arena, 4 * K);
        if (!row) { failed = 1; continue; }
        const uint32_t *qr = q + n * words;
        if (g_idx) { /* groups in activation order: each input's own scale and zero */
            for (size_t k = 0; k < K; k++) {
                const size_t g = (size_t)g_idx[k];
                const float z = zp ? (float)((zp[(n / per) * G + g] >> ((n % per) * bits)) & mask) : (float)mid;
                row[k] = ((float)((qr[k / per] >> ((k % per) * bits)) & mask) - z) * load_scale(scale, s_dtype, n * G + g);
            }
        } else for (size_t g = 0; g < G; g++) {
            const float s = load_scale(scale, s_dtype, n * G + g);
            const float z = zp ? (float)((zp[(n / per) * G + g] >> ((n % per) * bits)) & mask) : (float)mid;
            const size_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
            if (group % per == 0 && k1 - k0 == group) { /* whole words: the width a constant, vectorised */
                if (bits == 4) unpack_words(qr + k0 / 8, row + k0, group / 8, 8, 4, z, s);
                else unpack_words(qr + k0 / 4, row + k0, group / 4, 4, 8, z, s);
            } else {
                for (size_t k = k0; k < k1; k++)
                    row[k] = ((float)((qr[k / per] >> ((k % per) * bits)) & mask) - z) * s;
            }
        }
        for (size_t t = 0; t < T; t++) put(y, y_dtype, t * N + n, dot(row, xf + t * K, K));
    }
    return failed ? -1 : 0;
}

#define COLS 64
#define TOKS 8

/* args: N, K, qweight (int32 [K/(32/bits), N]), qzeros (int32 [G, N/(32/bits)]), scales ([G, N]),
   scale dtype, g_idx (int32 [K]), G, bits, zero offset, order (int32 [K]: the inputs sorted by group,
   made once at load for desc_act, so a tile's scales and zeros change G times, not K; or 0: 0..K-1) */
int pq_gptq_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const PqGptqArgs *a, int threads) {
    const size_t N = a->n, K = a->k, G = a->groups, T = n_tokens;
    const uint32_t *qw = a->qw, *qz = a->qz;
    const void *scales = a->scales;
    const int s_dtype = (int)a->s_dtype, bits = (int)a->bits, zero_offset = (int)a->zero_offset;
    const int32_t *g_idx = a->g_idx, *order = a->order;
    if ((bits != 4 && bits != 8) || K % (32 / bits) || N % (32 / bits) || x_dtype < 0 || x_dtype > 1) return -2;
    for (size_t k = 0; k < K; k++)
        if (g_idx[k] < 0 || (size_t)g_idx[k] >= G || (order && (order[k] < 0 || (size_t)order[k] >= K))) return -2;
    const size_t per = 32 / bits, NZ = N / per;
    const uint32_t mask = (1u << bits) - 1;
    const float *xf = activations(x, x_dtype, T, K);
    if (!xf) return -1;
    const size_t tiles = (N + COLS - 1) / COLS;
#pragma omp parallel for schedule(static) num_threads(threads) if (N * K > 65536)
    for (size_t c = 0; c < tiles; c++) {
        const size_t n0 = c * COLS, nc = n0 + COLS < N ? COLS : N - n0;
        for (size_t t0 = 0; t0 < T; t0 += TOKS) {
            const size_t tc = t0 + TOKS < T ? TOKS : T - t0;
            float acc[TOKS][COLS] = {{0}};
            float wk[COLS], zs[COLS], ss[COLS];
            size_t last = (size_t)-1;
            for (size_t i = 0; i < K; i++) {
                const size_t k = order ? (size_t)order[i] : i, g = (size_t)g_idx[k];
                if (g != last) { /* the tile's zeros and scales of group g (every k under desc_act) */
                    for (size_t j = 0; j < nc; j++) {
                        const size_t n = n0 + j;
                        zs[j] = (float)(((qz[g * NZ + n / per] >> ((n % per) * bits)) & mask) + zero_offset);
                        ss[j] = load_scale(scales, s_dtype, g * N + n);
                    }
                    last = g;
                }
                const uint32_t *qrow = qw + (k / per) * N + n0;
                const int shift = (int)((k % per) * bits);
                for (size_t j = 0; j < nc; j++) wk[j] = ((float)((qrow[j] >> shift) & mask) - zs[j]) * ss[j];
                for (size_t t = 0; t < tc; t++) {
                    const float xv = xf[(t0 + t) * K + k];
#pragma omp simd
                    for (size_t j = 0; j < nc; j++) acc[t][j] += xv * wk[j];
                }
            }
            for (size_t t = 0; t < tc; t++)
                for (size_t j = 0; j < nc; j++) put(y, y_dtype, (t0 + t) * N + n0 + j, acc[t][j]);
        }
    }
    return 0;
}
