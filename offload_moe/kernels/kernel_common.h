/* What our C kernels (qmv.c, bf16mv.c, ggml_mv.c, decode.c) share: fp16/bf16 -> fp32 conversions and per-thread
   scratch buffers. Each kernel file is its own library (quant/native.py builds them with this
   folder on the include path and hashes this header into every cache key). */
#ifndef OFFLOAD_MOE_KERNEL_COMMON_H
#define OFFLOAD_MOE_KERNEL_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float half_to_float_portable(uint16_t h) { /* exact, subnormals included */
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            float f = ldexpf((float)man, -24);
            memcpy(&bits, &f, 4);
            bits |= sign;
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline uint16_t float_to_bf16(float f) { /* round to nearest even, NaN kept NaN */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);
    bits += 0x7fffu + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

/* Element i of an activation array of dtype 0 (fp32) or 1 (bf16), as fp32; and stored, rounded once. */
static inline float elem_get(const void *p, int dtype, size_t i) {
    return dtype ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void elem_put(void *p, int dtype, size_t i, float v) {
    if (dtype)
        ((uint16_t *)p)[i] = float_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* A scratch buffer (declare it `static __thread`: one per calling thread), 64-byte aligned, grown
   when a call needs more and never freed per call. Returns NULL when it cannot grow. */
typedef struct { char *base; size_t cap; } Arena;

static inline char *arena_reserve(Arena *arena, size_t need) {
    if (need > arena->cap) {
        void *p = NULL;
        if (posix_memalign(&p, 64, need)) return NULL;
        free(arena->base);
        arena->base = (char *)p;
        arena->cap = need;
    }
    return arena->base;
}

#endif
