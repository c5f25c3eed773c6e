/* One decode step's small operations on the CPU, each in one call: the attention of one new token
 * (q/k norms, clamp, rotary embedding, the KV cache write, grouped-query attention over the cache
 * with an optional window and sinks), RMSNorm of one row, and a router's top-k.
 *
 * Why: in decode these are ~40 tiny torch ops per layer (views, casts, a concatenation per rotary
 * embedding, the cache slices, the softmax), each costing more in dispatch than in arithmetic; a
 * step of a 600 M-parameter MoE spent about a third of its time on them (BENCHMARKS.md, "CPU decode
 * step"). Here each is one loop over a few kilobytes. The math is the torch path's (decode_cpu.py
 * says where each call replaces which ops) computed in fp32 and rounded once where the result is
 * stored: the KV cache and the outputs in the model's dtype.
 *
 * dtypes: 0 fp32, 1 bf16 (as qmv.c). Built and loaded like qmv.c (quant/native.py).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_common.h"

#define LANES 16 /* independent partial sums per dot product: the compiler keeps them in one vector */


static inline float load(const void *p, int dtype, size_t i) {
    return dtype ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store(void *p, int dtype, size_t i, float v) {
    if (dtype)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

static inline float round_to(int dtype, float v) { return dtype ? bf16_to_float(float_to_bf16(v)) : v; }

static void load_row(float *dst, const void *src, int dtype, size_t n) {
    if (dtype) {
        const uint16_t *s = src;
        for (size_t i = 0; i < n; i++) dst[i] = bf16_to_float(s[i]);
    } else {
        memcpy(dst, src, n * sizeof(float));
    }
}

static float dot(const float *a, const void *b, int b_dtype, size_t n) {
    float acc[LANES] = {0};
    size_t i = 0;
    if (b_dtype) {
        const uint16_t *bb = b;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * bf16_to_float(bb[i + l]);
    } else {
        const float *bb = b;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) acc[l] += a[i + l] * bb[i + l];
    }
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < n; i++) s += a[i] * load(b, b_dtype, i);
    return s;
}

static float sum_squares(const float *x, size_t n) {
    float acc[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += x[i + l] * x[i + l];
    float s = 0.f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    for (; i < n; i++) s += x[i] * x[i];
    return s;
}

/* x[0:n] *= rsqrt(mean(x^2) + eps) * w */
static void normalize(float *x, size_t n, const void *w, int w_dtype, float eps) {
    float r = 1.f / sqrtf(sum_squares(x, n) / (float)n + eps);
    for (size_t i = 0; i < n; i++) x[i] = x[i] * r * load(w, w_dtype, i);
}

/* rotate-half rotary embedding of one head: pairs (i, i + d/2) */
static void rotate(float *x, const float *c, const float *s, size_t d) {
    size_t half = d / 2;
    for (size_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * c[i] - b * s[i];
        x[i + half] = b * c[i + half] + a * s[i + half];
    }
}

/* the same rotation on rows in llama.cpp's order: pairs (2i, 2i + 1), angle i */
static void rotate_adjacent(float *x, const float *c, const float *s, size_t d) {
    for (size_t i = 0; i < d / 2; i++) {
        float a = x[2 * i], b = x[2 * i + 1];
        x[2 * i] = a * c[i] - b * s[i];
        x[2 * i + 1] = b * c[i] + a * s[i];
    }
}

/* Buffers per thread (kernel_common.h): a call's rows, and one head's scores (a separate one: the
 * calling thread is one of the heads' threads too). */
static __thread Arena rows, scores;

static float *reserve(Arena *b, size_t floats) { return (float *)arena_reserve(b, floats * sizeof(float)); }

/* One row: out = rms_norm(x) * w. half_scale: round the normalised row to x's dtype before the
 * weight multiplies it (torch's `weight * norm(x).to(dtype)`); otherwise scale in fp32. */
int rms_norm_row(const void *x, int x_dtype, const void *w, int w_dtype, int64_t n, float eps, int half_scale,
                 void *out, int out_dtype) {
    float ss = 0.f;
    float acc[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            float v = load(x, x_dtype, i + l);
            acc[l] += v * v;
        }
    for (int l = 0; l < LANES; l++) ss += acc[l];
    for (; i < n; i++) ss += load(x, x_dtype, i) * load(x, x_dtype, i);
    float r = 1.f / sqrtf(ss / (float)n + eps);
    for (i = 0; i < n; i++) {
        float h = load(x, x_dtype, i) * r;
        if (half_scale) h = round_to(x_dtype, h);
        store(out, out_dtype, i, h * load(w, w_dtype, i));
    }
    return 0;
}

/* The attention of one new token at position `pos` (batch row 0).
 * q [nh*hd], k, v [nkv*hd] in in_dtype (the projections, biases added); cos, sin [hd] the rotary
 * tables' row for pos, rope_pairs 0 rotating the pairs (i, i + d/2), 1 the pairs (2i, 2i + 1); norm_mode 0 none, 1 per head (weights [hd]), 2 over the whole projection
 * (weights [nh*hd] and [nkv*hd]) -- applied where the torch path does: whole-projection norm, then
 * the clamp (clip > 0), then per-head norm, then the rotation. The rotated key and the value are
 * written to the caches kc, vc [nkv, max_seq, hd] at pos; head h attends with key/value head
 * h / (nh / nkv) to positions max(0, pos - window + 1) .. pos (window <= 0: all), softmax with one
 * extra logit per head when sinks [nh] is given. out [nh*hd] in out_dtype.
 * Returns 0, or -1 without memory for the scores. */
int attn_decode(const void *q, const void *k, const void *v, int in_dtype, const void *cos, const void *sin,
                int rope_dtype, int rope_pairs, const void *q_norm, const void *k_norm, int norm_dtype, int norm_mode, float norm_eps,
                float clip, const void *sinks, int sinks_dtype, void *kc, void *vc, int cache_dtype, int64_t max_seq,
                int64_t pos, int64_t window, int64_t nh, int64_t nkv, int64_t hd, float scale, void *out,
                int out_dtype, int threads) {
    int64_t lo = window > 0 && pos - window + 1 > 0 ? pos - window + 1 : 0, span = pos + 1 - lo;
    int64_t group = nh / nkv;
    size_t qn = (size_t)(nh * hd), kn = (size_t)(nkv * hd);
    float *buf = reserve(&rows, qn + 2 * kn + 2 * (size_t)hd);
    if (!buf) return -1;
    float *qf = buf, *kf = qf + qn, *vf = kf + kn, *c = vf + kn, *s = c + hd;
    load_row(qf, q, in_dtype, qn);
    load_row(kf, k, in_dtype, kn);
    load_row(vf, v, in_dtype, kn);
    load_row(c, cos, rope_dtype, (size_t)hd);
    load_row(s, sin, rope_dtype, (size_t)hd);
    if (norm_mode == 2) {
        normalize(qf, qn, q_norm, norm_dtype, norm_eps);
        normalize(kf, kn, k_norm, norm_dtype, norm_eps);
    }
    if (clip > 0.f)
        for (size_t i = 0; i < qn + 2 * kn; i++) qf[i] = qf[i] > clip ? clip : (qf[i] < -clip ? -clip : qf[i]);
    for (int64_t h = 0; h < nh; h++) {
        if (norm_mode == 1) normalize(qf + h * hd, (size_t)hd, q_norm, norm_dtype, norm_eps);
        (rope_pairs ? rotate_adjacent : rotate)(qf + h * hd, c, s, (size_t)hd);
    }
    for (int64_t h = 0; h < nkv; h++) {
        if (norm_mode == 1) normalize(kf + h * hd, (size_t)hd, k_norm, norm_dtype, norm_eps);
        (rope_pairs ? rotate_adjacent : rotate)(kf + h * hd, c, s, (size_t)hd);
        size_t at = (size_t)(h * max_seq + pos) * (size_t)hd;
        for (int64_t i = 0; i < hd; i++) {
            store(kc, cache_dtype, at + i, kf[h * hd + i]);
            store(vc, cache_dtype, at + i, vf[h * hd + i]);
        }
    }
    int failed = 0;
    size_t esize = cache_dtype ? 2 : 4;
#pragma omp parallel for num_threads(threads) schedule(static) if (span * nh * hd > 65536) reduction(| : failed)
    for (int64_t h = 0; h < nh; h++) {
        int64_t kvh = h / group;
        float *p = reserve(&scores, (size_t)span + (size_t)hd);
        if (!p) {
            failed = 1;
            continue;
        }
        float *acc = p + span;
        const float *qh = qf + h * hd;
        const char *kbase = (const char *)kc + (size_t)(kvh * max_seq + lo) * (size_t)hd * esize;
        const char *vbase = (const char *)vc + (size_t)(kvh * max_seq + lo) * (size_t)hd * esize;
        float top = sinks ? load(sinks, sinks_dtype, (size_t)h) : -INFINITY;
        for (int64_t j = 0; j < span; j++) {
            p[j] = dot(qh, kbase + (size_t)j * (size_t)hd * esize, cache_dtype, (size_t)hd) * scale;
            if (p[j] > top) top = p[j];
        }
        float total = sinks ? expf(load(sinks, sinks_dtype, (size_t)h) - top) : 0.f;
        for (int64_t j = 0; j < span; j++) {
            p[j] = expf(p[j] - top);
            total += p[j];
        }
        for (int64_t i = 0; i < hd; i++) acc[i] = 0.f;
        for (int64_t j = 0; j < span; j++) {
            const void *vr = vbase + (size_t)j * (size_t)hd * esize;
            float w = p[j];
            if (cache_dtype) {
                const uint16_t *vv = vr;
                for (int64_t i = 0; i < hd; i++) acc[i] += w * bf16_to_float(vv[i]);
            } else {
                const float *vv = vr;
                for (int64_t i = 0; i < hd; i++) acc[i] += w * vv[i];
            }
        }
        for (int64_t i = 0; i < hd; i++) store(out, out_dtype, (size_t)(h * hd + i), acc[i] / total);
    }
    return failed ? -1 : 0;
}

/* A router on one token: logits = x @ w.T (+ bias), in fp32 from x and w as stored (rounded to
 * x's dtype when round_logits, as a half-precision router's output is). rule 0: softmax over all
 * experts, top k, then renormalised (norm_topk) or scaled by `scaling`; rule 1: top k of the
 * logits, softmax over those k. ids [k] (best first), weights [k] rounded to weights_dtype. */
int route_one(const void *x, int x_dtype, const void *w, int w_dtype, const void *bias, int bias_dtype, int64_t E,
              int64_t H, int k, int rule, int norm_topk, float scaling, int round_logits, int64_t *ids, void *weights,
              int weights_dtype) {
    float *buf = reserve(&rows, (size_t)H + (size_t)E);
    if (!buf || k > E || k > 64) return -1;
    float *xf = buf, *logits = buf + H;
    load_row(xf, x, x_dtype, (size_t)H);
    size_t wsize = w_dtype ? 2 : 4;
    for (int64_t e = 0; e < E; e++) {
        float l = dot(xf, (const char *)w + (size_t)(e * H) * wsize, w_dtype, (size_t)H);
        if (bias) l += load(bias, bias_dtype, (size_t)e);
        logits[e] = round_logits ? round_to(x_dtype, l) : l;
    }
    if (rule == 0) { /* softmax over all experts */
        float top = -INFINITY, total = 0.f;
        for (int64_t e = 0; e < E; e++) top = logits[e] > top ? logits[e] : top;
        for (int64_t e = 0; e < E; e++) total += (logits[e] = expf(logits[e] - top));
        for (int64_t e = 0; e < E; e++) logits[e] /= total;
    }
    float chosen[64];
    for (int j = 0; j < k; j++) { /* selection: the best remaining, lowest index on ties */
        int64_t best = -1;
        for (int64_t e = 0; e < E; e++) {
            int taken = 0;
            for (int i = 0; i < j; i++) taken |= ids[i] == e;
            if (!taken && (best < 0 || logits[e] > logits[best])) best = e;
        }
        ids[j] = best;
        chosen[j] = logits[best];
    }
    float total = 0.f;
    if (rule == 1) {
        float top = chosen[0];
        for (int j = 0; j < k; j++) total += (chosen[j] = expf(chosen[j] - top));
        for (int j = 0; j < k; j++) chosen[j] /= total;
    } else if (norm_topk) {
        for (int j = 0; j < k; j++) total += chosen[j];
        for (int j = 0; j < k; j++) chosen[j] /= total;
    } else {
        for (int j = 0; j < k; j++) chosen[j] *= scaling;
    }
    for (int j = 0; j < k; j++) store(weights, weights_dtype, (size_t)j, chosen[j]);
    return 0;
}
