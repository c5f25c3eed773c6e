/* The fixed arguments of the `*_p` entry points, one struct per entry point.

   Why: a foreign-function call costs ~0.2 us an argument, as much as a short expert's rows, so a
   weight's fixed arguments (shapes, pointers, formats) travel as one pointer to a struct the caller
   fills once. Each struct here is mirrored field for field by a ctypes.Structure in
   quant/native.py (ARG_STRUCTS), which declares the entry point's argument as a pointer to it; a
   test compiles this header and compares every field's offset and the sizes with ctypes. Add a
   field here and there together. */
#ifndef OFFLOAD_MOE_KERNEL_ARGS_H
#define OFFLOAD_MOE_KERNEL_ARGS_H

#include <stdint.h>

typedef struct {               /* qmv_p: one groupwise-quantized [O, I] matrix */
    int64_t out_features, in_features;
    const uint8_t *codes;
    const uint16_t *scales, *zeros;
    int64_t group;
    int32_t bits;
} QmvArgs;

typedef struct {               /* qmv_many_p: `count` matrices of one input (arrays of count) */
    int64_t in_features;
    int32_t count;
    const int64_t *outs;
    const uint8_t *const *codes;
    const uint16_t *const *scales, *const *zeros;
    int64_t group;
    int32_t bits;
} QmvManyArgs;

typedef struct {               /* qmv_swiglu_p: w1, w3 [F, H] in one format, w2 [H, F] */
    int64_t hidden, inter;
    const uint8_t *c1;
    const uint16_t *s1, *z1;
    const uint8_t *c3;
    const uint16_t *s3, *z3;
    int64_t group13;
    int32_t bits13;
    const uint8_t *c2;
    const uint16_t *s2, *z2;
    int64_t group2;
    int32_t bits2;
} QmvSwigluArgs;

typedef struct {               /* bmv_swiglu_p: bf16 w1, w3 [F, H], w2 [H, F] */
    int64_t hidden, inter;
    const uint16_t *w1, *w3, *w2;
} BmvSwigluArgs;

typedef struct {               /* ggml_mv_p: one [O, I] matrix of ggml blocks */
    int64_t out_features, in_features;
    const uint8_t *data;
    int32_t type;
} GgmlArgs;

typedef struct {               /* ggml_mv_many_p: `count` matrices of one input and type */
    int64_t in_features;
    int32_t count;
    const int64_t *outs;
    const uint8_t *const *datas;
    int32_t type;
} GgmlManyArgs;

typedef struct {               /* ggml_swiglu_p: w1, w3 [F, H] of type t13, w2 [H, F] of type t2 */
    int64_t hidden, inter;
    const uint8_t *w1, *w3;
    int32_t t13;
    const uint8_t *w2;
    int32_t t2;
} GgmlSwigluArgs;

typedef struct {               /* pq_fp8_p: FP8 E4M3 [N, K] with fp32 scales per bn x bk block */
    int64_t n, k;
    const uint8_t *w;
    const float *scale;
    int64_t bn, bk;
} PqFp8Args;

typedef struct {               /* pq_int_p: compressed-tensors pack-quantized int4/int8 [N, K] */
    int64_t n, k;
    const uint32_t *q;
    const void *scale;
    int64_t s_dtype;
    const uint32_t *zp;        /* NULL: symmetric */
    int64_t group, bits;
    const int32_t *g_idx;      /* NULL: groups in order */
    int64_t groups;
} PqIntArgs;

typedef struct {               /* pq_gptq_p: GPTQ 4/8-bit [N, K] */
    int64_t n, k;
    const uint32_t *qw, *qz;
    const void *scales;
    int64_t s_dtype;
    const int32_t *g_idx;
    int64_t groups, bits, zero_offset;
    const int32_t *order;      /* NULL: inputs in order */
} PqGptqArgs;

typedef struct {               /* layer_front: a decoder layer's attention half and router (decode_layer.c) */
    int64_t hidden;
    const void *norm1, *norm2;          /* input and post-attention RMSNorm weights [hidden] */
    int32_t norm_dtype, half_scale;     /* their dtype; round the normalised row before the weight */
    float eps;
    void *qkv_call;                     /* q, k, v in one `*_p` call: [N, q_width + 2 kv_width] */
    const void *qkv_args;
    int64_t q_width, kv_width;
    void *o_call;                       /* o_proj's `*_p` call: [N, nh * hd] -> [N, hidden] */
    const void *o_args;
    const void *q_norm, *k_norm;        /* attn_decode_rows' fixed arguments */
    int32_t qk_norm_dtype, qk_norm_mode;
    float qk_norm_eps, clip;
    const void *sinks;
    int32_t sinks_dtype, rope_pairs;
    int64_t window, nh, nkv, hd;
    float scale;
    const void *gate, *gate_bias;       /* the router (route_rows' fixed arguments); gate NULL: no router */
    int32_t gate_dtype, gate_bias_dtype;
    int64_t experts;
    int32_t k, rule, norm_topk, round_logits;
    float scaling;
} LayerFrontArgs;

typedef struct {               /* layer_step: a layer's routed experts where they lie, one stacked tensor each */
    void *call;                         /* ggml_swiglu_p */
    const uint8_t *w1, *w3, *w2;        /* expert 0's gate, up, down */
    int64_t s1, s3, s2;                 /* bytes from one expert's matrix to the next's */
    int32_t t13, t2;                    /* their ggml types */
    int64_t hidden, inter, experts;
} ExpertTableArgs;

typedef struct {               /* layers_step: one layer of a decode step through every layer */
    const LayerFrontArgs *front;
    const ExpertTableArgs *table;
    void *kc, *vc;                      /* the layer's KV cache (slot 0's start; slots slot_stride apart) */
    int32_t cache_dtype;
    int64_t slot_stride, max_seq;
} LayerStackArgs;

#endif
