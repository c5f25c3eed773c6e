/* What our C kernels (qmv.c, bf16mv.c, decode.c) share: bf16 <-> fp32 conversions and per-thread
   scratch buffers. Each kernel file is its own library (quant/native.py builds them with this
   folder on the include path and hashes this header into every cache key). */
#ifndef OFFLOAD_MOE_KERNEL_COMMON_H
#define OFFLOAD_MOE_KERNEL_COMMON_H

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

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
