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
#include "decode_ops.h"

#define LANES 16 /* independent partial sums per dot product: the compiler keeps them in one vector */


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
    for (; i < n; i++) s += a[i] * elem_get(b, b_dtype, i);
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
    for (size_t i = 0; i < n; i++) x[i] = x[i] * r * elem_get(w, w_dtype, i);
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

/* `rows` rows (row r at x + r * x_stride): out[r] = rms_norm(x[r]) * w, out [rows, n]. half_scale:
 * round the normalised row to x's dtype before the weight multiplies it (torch's
 * `weight * norm(x).to(dtype)`); otherwise scale in fp32. */
int rms_norm_rows(const void *x, int x_dtype, int64_t x_stride, const void *w, int w_dtype, int64_t n, int64_t nrows,
                  float eps, int half_scale, void *out, int out_dtype) {
    size_t esize = x_dtype ? 2 : 4;
    for (int64_t r = 0; r < nrows; r++) {
        const void *xr = (const char *)x + (size_t)(r * x_stride) * esize;
        size_t o = (size_t)(r * n);
        float ss = 0.f;
        float acc[LANES] = {0};
        int64_t i = 0;
        for (; i + LANES <= n; i += LANES)
            for (int l = 0; l < LANES; l++) {
                float v = elem_get(xr, x_dtype, i + l);
                acc[l] += v * v;
            }
        for (int l = 0; l < LANES; l++) ss += acc[l];
        for (; i < n; i++) ss += elem_get(xr, x_dtype, i) * elem_get(xr, x_dtype, i);
        float rs = 1.f / sqrtf(ss / (float)n + eps);
        for (i = 0; i < n; i++) {
            float h = elem_get(xr, x_dtype, i) * rs;
            if (half_scale) h = round_to(x_dtype, h);
            elem_put(out, out_dtype, o + (size_t)i, h * elem_get(w, w_dtype, i));
        }
    }
    return 0;
}

/* The attention of `nrows` new tokens, each of its own sequence: row r is at position pos[r] of
 * KV slot slots[r] (a batched decode step; one sequence: nrows 1).
 * q [nrows, nh*hd] (row r at q + r * q_stride), k, v [nrows, nkv*hd] (row stride kv_stride) in
 * in_dtype (the projections, biases added); cos, sin: the rotary tables [*, hd], row pos[r] -
 * rope_first for row r, rope_pairs 0 rotating the pairs (i, i + d/2), 1 the pairs (2i, 2i + 1) (llama.cpp's
 * row order); norm_mode 0 none, 1 per head (weights [hd]), 2 over the whole projection
 * (weights [nh*hd] and [nkv*hd]) -- applied where the torch path does: whole-projection norm, then
 * the clamp (clip > 0), then per-head norm, then the rotation. The rotated key and the value are
 * written to the caches kc, vc [slots, nkv, max_seq, hd] (slot s at kc + s * slot_stride) at pos[r];
 * head h attends with key/value head h / (nh / nkv) to positions max(0, pos - window + 1) .. pos
 * (window <= 0: all), softmax with one extra logit per head when sinks [nh] is given.
 * out [nrows, nh*hd] in out_dtype. Returns 0, or -1 without memory for the scores. */
int attn_decode_rows(const void *q, const void *k, const void *v, int in_dtype, int64_t q_stride, int64_t kv_stride,
                     const void *cos, const void *sin, int rope_dtype, int64_t rope_first, int rope_pairs,
                     const void *q_norm,
                     const void *k_norm, int norm_dtype, int norm_mode, float norm_eps, float clip, const void *sinks,
                     int sinks_dtype, void *kc, void *vc, int cache_dtype, int64_t slot_stride, int64_t max_seq,
                     const int64_t *slots, const int64_t *pos, int64_t nrows, int64_t window, int64_t nh, int64_t nkv,
                     int64_t hd, float scale, void *out, int out_dtype, int threads) {
    int64_t group = nh / nkv;
    size_t qn = (size_t)(nh * hd), kn = (size_t)(nkv * hd);
    size_t esize = cache_dtype ? 2 : 4, in_size = in_dtype ? 2 : 4, rope_size = rope_dtype ? 2 : 4;
    float *buf = reserve(&rows, (size_t)nrows * qn + 2 * kn + 2 * (size_t)hd);
    if (!buf) return -1;
    float *qall = buf, *kf = qall + (size_t)nrows * qn, *vf = kf + kn, *c = vf + kn, *s = c + hd;
    int64_t work = 0;
    for (int64_t r = 0; r < nrows; r++) { /* each row: norms, clamp, rotation, its key and value cached */
        float *qf = qall + (size_t)r * qn;
        size_t rope_at = (size_t)(pos[r] - rope_first) * (size_t)hd * rope_size;
        load_row(qf, (const char *)q + (size_t)(r * q_stride) * in_size, in_dtype, qn);
        load_row(kf, (const char *)k + (size_t)(r * kv_stride) * in_size, in_dtype, kn);
        load_row(vf, (const char *)v + (size_t)(r * kv_stride) * in_size, in_dtype, kn);
        load_row(c, (const char *)cos + rope_at, rope_dtype, (size_t)hd);
        load_row(s, (const char *)sin + rope_at, rope_dtype, (size_t)hd);
        if (norm_mode == 2) {
            normalize(qf, qn, q_norm, norm_dtype, norm_eps);
            normalize(kf, kn, k_norm, norm_dtype, norm_eps);
        }
        if (clip > 0.f) {
            for (size_t i = 0; i < qn; i++) qf[i] = qf[i] > clip ? clip : (qf[i] < -clip ? -clip : qf[i]);
            for (size_t i = 0; i < 2 * kn; i++) kf[i] = kf[i] > clip ? clip : (kf[i] < -clip ? -clip : kf[i]);
        }
        for (int64_t h = 0; h < nh; h++) {
            if (norm_mode == 1) normalize(qf + h * hd, (size_t)hd, q_norm, norm_dtype, norm_eps);
            (rope_pairs ? rotate_adjacent : rotate)(qf + h * hd, c, s, (size_t)hd);
        }
        for (int64_t h = 0; h < nkv; h++) {
            if (norm_mode == 1) normalize(kf + h * hd, (size_t)hd, k_norm, norm_dtype, norm_eps);
            (rope_pairs ? rotate_adjacent : rotate)(kf + h * hd, c, s, (size_t)hd);
            size_t at = (size_t)(slots[r] * slot_stride) + (size_t)(h * max_seq + pos[r]) * (size_t)hd;
            for (int64_t i = 0; i < hd; i++) {
                elem_put(kc, cache_dtype, at + i, kf[h * hd + i]);
                elem_put(vc, cache_dtype, at + i, vf[h * hd + i]);
            }
        }
        work += pos[r] + 1;
    }
    int failed = 0;
#pragma omp parallel for num_threads(threads) schedule(static) if (work * nh * hd > 65536) reduction(| : failed)
    for (int64_t rh = 0; rh < nrows * nh; rh++) {
        int64_t r = rh / nh, h = rh % nh, kvh = h / group;
        int64_t lo = window > 0 && pos[r] - window + 1 > 0 ? pos[r] - window + 1 : 0, span = pos[r] + 1 - lo;
        float *p = reserve(&scores, (size_t)span + (size_t)hd);
        if (!p) {
            failed = 1;
            continue;
        }
        float *acc = p + span;
        const float *qh = qall + (size_t)r * qn + h * hd;
        size_t base = (size_t)(slots[r] * slot_stride) + (size_t)(kvh * max_seq + lo) * (size_t)hd;
        const char *kbase = (const char *)kc + base * esize;
        const char *vbase = (const char *)vc + base * esize;
        float top = sinks ? elem_get(sinks, sinks_dtype, (size_t)h) : -INFINITY;
        for (int64_t j = 0; j < span; j++) {
            p[j] = dot(qh, kbase + (size_t)j * (size_t)hd * esize, cache_dtype, (size_t)hd) * scale;
            if (p[j] > top) top = p[j];
        }
        float total = sinks ? expf(elem_get(sinks, sinks_dtype, (size_t)h) - top) : 0.f;
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
        for (int64_t i = 0; i < hd; i++) elem_put(out, out_dtype, (size_t)(rh * hd + i), acc[i] / total);
    }
    return failed ? -1 : 0;
}

/* A router on `nrows` tokens (row r at x + r * x_stride): logits = x @ w.T (+ bias), in fp32 from x
 * and w as stored (rounded to x's dtype when round_logits, as a half-precision router's output is).
 * rule 0: softmax over all experts, top k, then renormalised (norm_topk) or scaled by `scaling`;
 * rule 1: top k of the logits, softmax over those k. ids [nrows, k] (best first), weights [nrows, k]
 * rounded to weights_dtype. The logits of a wide router (E * H >= 65536) are spread over `threads`. */
int route_rows(const void *x, int x_dtype, int64_t x_stride, const void *w, int w_dtype, const void *bias,
               int bias_dtype, int64_t E, int64_t H, int k, int rule, int norm_topk, float scaling, int round_logits,
               int64_t nrows, int64_t *ids_out, void *weights, int weights_dtype, int threads) {
    float *buf = reserve(&rows, (size_t)H + (size_t)E);
    if (!buf || k > E || k > 64) return -1;
    float *xf = buf, *logits = buf + H;
    size_t wsize = w_dtype ? 2 : 4, xsize = x_dtype ? 2 : 4;
    for (int64_t r = 0; r < nrows; r++) {
        int64_t *ids = ids_out + r * k;
        load_row(xf, (const char *)x + (size_t)(r * x_stride) * xsize, x_dtype, (size_t)H);
        /* each logit is one thread's dot product: the same bits at any thread count */
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && E * H >= 65536)
        for (int64_t e = 0; e < E; e++) {
            float l = dot(xf, (const char *)w + (size_t)(e * H) * wsize, w_dtype, (size_t)H);
            if (bias) l += elem_get(bias, bias_dtype, (size_t)e);
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
        for (int j = 0; j < k; j++) elem_put(weights, weights_dtype, (size_t)(r * k + j), chosen[j]);
    }
    return 0;
}

/* ---------------------------------------------------------------- a batched MoE step's experts */

/* An expert kernel's entry point with its fixed arguments in one block (the `*_p` calls of
 * ggml_mv.c and qmv.c): y[n, H] = expert(x[n, H]), x and y contiguous in one dtype. */
typedef int (*ExpertCall)(const void *x, int x_dtype, void *y, int y_dtype, int64_t n, const int64_t *args,
                          int threads);

static __thread Arena gathered;

/* One expert's share of a MoE step over `nrows` tokens with k choices each (ids [nrows, k]): the
 * rows whose choices picked `expert` are gathered (x [nrows, H], row stride x_stride, fp32 or
 * bf16), computed in one call of `call`, and each result written to its (row, choice) place of
 * per_choice [nrows * k, H] (x's dtype), where `moe_combine` weights and sums them.
 * Returns the kernel's code (0, or negative: refused), or -1 without scratch memory. */
int moe_expert_rows(const void *x, int x_dtype, int64_t x_stride, int64_t nrows, int64_t H, int k, const int64_t *ids,
                    int64_t expert, void *call, const int64_t *args, void *per_choice, int threads) {
    size_t esize = x_dtype ? 2 : 4, row = (size_t)H * esize;
    int64_t n = 0;
    for (int64_t i = 0; i < nrows * k; i++) n += ids[i] == expert;
    if (n == 0) return 0;
    if (n == 1 || nrows == 1) { /* one row: computed where it lies, straight into its place */
        for (int64_t i = 0; i < nrows * k; i++)
            if (ids[i] == expert)
                return ((ExpertCall)call)((const char *)x + (size_t)((i / k) * x_stride) * esize, x_dtype,
                                          (char *)per_choice + (size_t)i * row, x_dtype, 1, args, threads);
    }
    char *buf = arena_reserve(&gathered, 2 * (size_t)n * row + 64);
    if (!buf) return -1;
    char *xg = buf, *yg = buf + (size_t)n * row;
    int64_t j = 0;
    for (int64_t i = 0; i < nrows * k; i++)
        if (ids[i] == expert) memcpy(xg + (size_t)(j++) * row, (const char *)x + (size_t)((i / k) * x_stride) * esize, row);
    int rc = ((ExpertCall)call)(xg, x_dtype, yg, x_dtype, n, args, threads);
    if (rc != 0) return rc;
    j = 0;
    for (int64_t i = 0; i < nrows * k; i++)
        if (ids[i] == expert) memcpy((char *)per_choice + (size_t)i * row, yg + (size_t)(j++) * row, row);
    return 0;
}

/* Several experts' shares at once (`moe_expert_rows` for experts[j] with calls[j], args[j]), the
 * experts spread over the threads, each computed by one thread: one parallel region for the layer
 * instead of one (with its barriers) per expert, which is what a few rows per expert need. Every
 * output is still one thread's sum in a fixed order: the same bits as one call per expert.
 * Returns 0, or the first failing expert's code. */
int moe_experts_rows(const void *x, int x_dtype, int64_t x_stride, int64_t nrows, int64_t H, int k, const int64_t *ids,
                     int64_t count, const int64_t *experts, void *const *calls, const int64_t *const *args,
                     void *per_choice, int threads) {
    int failed = 0;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1 && count > 1) reduction(min : failed)
    for (int64_t j = 0; j < count; j++) {
        int rc = moe_expert_rows(x, x_dtype, x_stride, nrows, H, k, ids, experts[j], calls[j], args[j], per_choice, 1);
        if (rc < failed) failed = rc;
    }
    return failed;
}

/* out[r] = sum over c of per_choice[r * k + c] * weights[r, c], the choices summed in order (as the
 * one-token path's (k, H) product summed over k): per_choice [nrows * k, H] and out [nrows, H] in
 * dtype, weights [nrows, k] in w_dtype; each product rounded to dtype, the sum kept in fp32. */
int moe_combine(const void *per_choice, int dtype, const void *weights, int w_dtype, int64_t nrows, int k, int64_t H,
                void *out) {
    for (int64_t r = 0; r < nrows; r++)
        for (int64_t i = 0; i < H; i++) {
            float acc = 0.f;
            for (int c = 0; c < k; c++)
                acc += round_to(dtype, elem_get(per_choice, dtype, (size_t)((r * k + c) * H + i)) *
                                           elem_get(weights, w_dtype, (size_t)(r * k + c)));
            elem_put(out, dtype, (size_t)(r * H + i), acc);
        }
    return 0;
}
