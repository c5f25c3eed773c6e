/* A decoder layer's attention half and its router for a decode step, in one call: the input RMSNorm,
 * q/k/v in one projection call, the new tokens' attention (decode.c's attn_decode_rows), o_proj,
 * the residual sum, the post-attention RMSNorm and the router's top-k.
 *
 * Why: each of these was already one C call (decode_step.py, the weights' `*_p` entry points), but
 * between them ran ~0.5 ms of Python per layer (module calls, views, checks, tensor allocations):
 * about a fifth of a step of a 30 B-parameter MoE on two cores (BENCHMARKS.md, "one call per layer
 * half"). The calls made here are the same functions with the same arguments, in the same order, so
 * the results are the same bits as the call-by-call path (tests/test_layer_front.py).
 *
 * The rows are the tokens of a batched step (row r: position pos[r] of KV slot slots[r]; one
 * sequence: one row). Intermediate rows live in a per-thread scratch buffer; the outputs are the
 * residual stream after attention (h), its normalised copy (xn, the MoE block's input) and the
 * router's choices (ids, weights), all in the model's dtype (ids int64).
 *
 * dtypes: 0 fp32, 1 bf16 (as decode.c).
 */
#include <stdint.h>
#include <string.h>

#include "decode_ops.h"
#include "kernel_args.h"
#include "kernel_common.h"

typedef int (*RowsCall)(const void *x, int x_dtype, void *y, int y_dtype, int64_t n, const void *args, int threads);

static __thread Arena front;

/* Returns 0; -1 without scratch memory; -2 when a projection's kernel refused the rows; -3 a router
 * that cannot take k. */
int layer_front(const LayerFrontArgs *a, const void *x, int dtype, int64_t nrows, const void *cos, const void *sin,
                int rope_dtype, int64_t rope_first, void *kc, void *vc, int cache_dtype, int64_t slot_stride,
                int64_t max_seq, const int64_t *slots, const int64_t *pos, void *h, void *xn, int64_t *ids,
                void *weights, int threads) {
    const int64_t H = a->hidden, qkv_w = a->q_width + 2 * a->kv_width, att_w = a->nh * a->hd;
    const size_t es = dtype ? 2 : 4;
    char *buf = arena_reserve(&front, (size_t)nrows * (size_t)(H + qkv_w + att_w + H) * es + 256);
    if (!buf) return -1;
    char *normed = buf, *qkv = normed + (size_t)(nrows * H) * es, *att = qkv + (size_t)(nrows * qkv_w) * es,
         *o = att + (size_t)(nrows * att_w) * es;

    rms_norm_rows(x, dtype, H, a->norm1, a->norm_dtype, H, nrows, a->eps, a->half_scale, normed, dtype);
    if (((RowsCall)a->qkv_call)(normed, dtype, qkv, dtype, nrows, a->qkv_args, threads) != 0) return -2;
    const char *q = qkv, *k = qkv + (size_t)a->q_width * es, *v = k + (size_t)a->kv_width * es;
    int rc = attn_decode_rows(q, k, v, dtype, qkv_w, qkv_w, cos, sin, rope_dtype, rope_first, a->rope_pairs, a->q_norm,
                              a->k_norm, a->qk_norm_dtype, a->qk_norm_mode, a->qk_norm_eps, a->clip, a->sinks,
                              a->sinks_dtype, kc, vc, cache_dtype, slot_stride, max_seq, slots, pos, nrows, a->window,
                              a->nh, a->nkv, a->hd, a->scale, att, dtype, threads);
    if (rc != 0) return rc;
    if (((RowsCall)a->o_call)(att, dtype, o, dtype, nrows, a->o_args, threads) != 0) return -2;
    /* the residual sum, rounded once to the model's dtype (torch's x + attention(x)) */
    for (size_t i = 0; i < (size_t)(nrows * H); i++) elem_put(h, dtype, i, elem_get(x, dtype, i) + elem_get(o, dtype, i));
    rms_norm_rows(h, dtype, H, a->norm2, a->norm_dtype, H, nrows, a->eps, a->half_scale, xn, dtype);
    if (a->gate == NULL || ids == NULL) return 0;
    rc = route_rows(xn, dtype, H, a->gate, a->gate_dtype, a->gate_bias, a->gate_bias_dtype, a->experts, H, a->k,
                    a->rule, a->norm_topk, a->scaling, a->round_logits, nrows, ids, weights, dtype, threads);
    return rc != 0 ? -3 : 0;
}

/* ---------------------------------------------------------------- the whole layer */

typedef int (*SwigluCall)(const void *x, int x_dtype, void *y, int y_dtype, int64_t n, const GgmlSwigluArgs *args,
                          int threads);

static __thread Arena moe_scratch;

/* A decode step of a whole MoE layer: `layer_front`, then the experts the router chose, from the
 * layer's stacked expert tensors (`t`: expert e's matrices lie e strides after expert 0's), each
 * computed by its `ggml_swiglu_p` call on the rows that chose it (decode.c's moe_experts_rows, one
 * thread per expert when there are enough experts to share, else each with every thread: the
 * policy and the calls of `decode_step.ExpertRows`), the choices weighted and summed in order
 * (moe_combine), and the sum added to the residual stream: out [nrows, H] in dtype. ids_out
 * [nrows, k] receives the router's choices. The same calls as the Python path of the layer, so the
 * same bits. Returns as layer_front, or the first expert call's error. */
int layer_step(const LayerFrontArgs *a, const ExpertTableArgs *t, const void *x, int dtype, int64_t nrows,
               const void *cos, const void *sin, int rope_dtype, int64_t rope_first, void *kc, void *vc,
               int cache_dtype, int64_t slot_stride, int64_t max_seq, const int64_t *slots, const int64_t *pos,
               void *out, int64_t *ids_out, int threads) {
    const int64_t H = a->hidden, k = a->k, rows_k = nrows * k;
    const size_t es = dtype ? 2 : 4, row = (size_t)H * es;
    if (a->gate == NULL || t->hidden != H || k < 1 || rows_k > 4096) return -3;
    const size_t need = (size_t)nrows * row * 3 + (size_t)rows_k * row + (size_t)rows_k * (es + 2 * sizeof(int64_t)) +
                        (size_t)rows_k * (sizeof(GgmlSwigluArgs) + 2 * sizeof(void *)) + 512;
    char *buf = arena_reserve(&moe_scratch, need);
    if (!buf) return -1;
    char *h = buf, *xn = h + (size_t)nrows * row, *y = xn + (size_t)nrows * row;
    char *per_choice = y + (size_t)nrows * row;
    char *weights = per_choice + (size_t)rows_k * row;
    int64_t *used = (int64_t *)(((uintptr_t)(weights + (size_t)rows_k * es) + 63) & ~(uintptr_t)63);
    GgmlSwigluArgs *args = (GgmlSwigluArgs *)(used + rows_k);
    void **calls = (void **)(args + rows_k);
    const int64_t **argp = (const int64_t **)(calls + rows_k);

    int rc = layer_front(a, x, dtype, nrows, cos, sin, rope_dtype, rope_first, kc, vc, cache_dtype, slot_stride,
                         max_seq, slots, pos, h, xn, ids_out, weights, threads);
    if (rc != 0) return rc;
    /* the distinct experts, in increasing order (as the Python path asks its provider for them) */
    int64_t count = 0;
    for (int64_t i = 0; i < rows_k; i++) {
        int64_t e = ids_out[i], at = count;
        if (e < 0 || e >= t->experts) return -3;
        for (int64_t j = 0; j < count; j++)
            if (used[j] >= e) { at = j; break; }
        if (at < count && used[at] == e) continue;
        memmove(used + at + 1, used + at, (size_t)(count - at) * sizeof(int64_t));
        used[at] = e, count++;
    }
    for (int64_t j = 0; j < count; j++) {
        const int64_t e = used[j];
        args[j] = (GgmlSwigluArgs){t->hidden, t->inter, t->w1 + e * t->s1, t->w3 + e * t->s3, t->t13,
                                   t->w2 + e * t->s2, t->t2};
        calls[j] = t->call, argp[j] = (const int64_t *)&args[j];
    }
    if (count >= 2 * threads) {
        rc = moe_experts_rows(xn, dtype, H, nrows, H, (int)k, ids_out, count, used, calls, argp, per_choice, threads);
    } else {
        for (int64_t j = 0; j < count && rc == 0; j++)
            rc = moe_expert_rows(xn, dtype, H, nrows, H, (int)k, ids_out, used[j], calls[j], argp[j], per_choice,
                                 threads);
    }
    if (rc != 0) return rc == -1 ? -1 : -4;
    moe_combine(per_choice, dtype, weights, dtype, nrows, (int)k, H, y);
    for (size_t i = 0; i < (size_t)(nrows * H); i++) elem_put(out, dtype, i, elem_get(h, dtype, i) + elem_get(y, dtype, i));
    return 0;
}

/* ---------------------------------------------------------------- every layer */

static __thread Arena stack_scratch;

/* A decode step through `n` layers in one call: layer i runs `layer_step` with its own arguments and
 * KV cache (layers[i]), from x to out [nrows, H] (the stream after the last layer), the stream between
 * layers in a per-thread scratch buffer. The same calls, in the same order, as one `layer_step` call
 * per layer from Python: the same bits. Returns as layer_step. */
int layers_step(const LayerStackArgs *layers, int n, const void *x, int dtype, int64_t nrows, const void *cos,
                const void *sin, int rope_dtype, int64_t rope_first, const int64_t *slots, const int64_t *pos,
                void *out, int threads) {
    if (n < 1) return -3;
    const int64_t H = layers[0].front->hidden;
    const size_t row = (size_t)(nrows * H) * (dtype ? 2 : 4), k = (size_t)layers[0].front->k;
    char *buf = arena_reserve(&stack_scratch, 2 * row + (size_t)nrows * (k ? k : 1) * sizeof(int64_t) + 128);
    if (!buf) return -1;
    char *ping = buf, *pong = buf + row;
    int64_t *ids = (int64_t *)(pong + row);
    const void *in = x;
    for (int i = 0; i < n; i++) {
        const LayerStackArgs *l = &layers[i];
        if (l->front->hidden != H || (size_t)l->front->k != k) return -3;
        void *dst = i == n - 1 ? out : (i % 2 ? pong : ping);
        int rc = layer_step(l->front, l->table, in, dtype, nrows, cos, sin, rope_dtype, rope_first, l->kc, l->vc,
                            l->cache_dtype, l->slot_stride, l->max_seq, slots, pos, dst, ids, threads);
        if (rc != 0) return rc;
        in = dst;
    }
    return 0;
}
