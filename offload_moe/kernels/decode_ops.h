/* decode.c's calls that other kernel files chain (decode_layer.c): one declaration each, the
   definitions and their full comments in decode.c. */
#ifndef OFFLOAD_MOE_DECODE_OPS_H
#define OFFLOAD_MOE_DECODE_OPS_H

#include <stdint.h>

int rms_norm_rows(const void *x, int x_dtype, int64_t x_stride, const void *w, int w_dtype, int64_t n, int64_t nrows,
                  float eps, int half_scale, void *out, int out_dtype);

int attn_decode_rows(const void *q, const void *k, const void *v, int in_dtype, int64_t q_stride, int64_t kv_stride,
                     const void *cos, const void *sin, int rope_dtype, int64_t rope_first, int rope_pairs,
                     const void *q_norm,
                     const void *k_norm, int norm_dtype, int norm_mode, float norm_eps, float clip, const void *sinks,
                     int sinks_dtype, void *kc, void *vc, int cache_dtype, int64_t slot_stride, int64_t max_seq,
                     const int64_t *slots, const int64_t *pos, int64_t nrows, int64_t window, int64_t nh, int64_t nkv,
                     int64_t hd, float scale, void *out, int out_dtype, int threads);

int route_rows(const void *x, int x_dtype, int64_t x_stride, const void *w, int w_dtype, const void *bias,
               int bias_dtype, int64_t E, int64_t H, int k, int rule, int norm_topk, float scaling, int round_logits,
               int64_t nrows, int64_t *ids_out, void *weights, int weights_dtype, int threads);

int moe_expert_rows(const void *x, int x_dtype, int64_t x_stride, int64_t nrows, int64_t H, int k, const int64_t *ids,
                    int64_t expert, void *call, const int64_t *args, void *per_choice, int threads);

int moe_experts_rows(const void *x, int x_dtype, int64_t x_stride, int64_t nrows, int64_t H, int k, const int64_t *ids,
                     int64_t count, const int64_t *experts, void *const *calls, const int64_t *const *args,
                     void *per_choice, int threads);

int moe_combine(const void *per_choice, int dtype, const void *weights, int w_dtype, int64_t nrows, int k, int64_t H,
                void *out);

#endif
