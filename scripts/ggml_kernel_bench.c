/* Our ggml kernel (quant/ggml_mv.c) against llama.cpp's own CPU mul_mat on the same weight bytes,
   in one process, interleaved, with a memcpy of the same bytes as the bandwidth bound.

   Why: whole-model runs (scripts/llamacpp_side_by_side.py) mix attention, routing and Python; this
   isolates the matrix product. llama.cpp's side is a ggml graph of `copies` mul_mats (its weights in
   a plain context buffer: no repack, as `--repack 0`); ours calls `ggml_mv` on the same tensors'
   bytes. `copies` distinct matrices (over the L3 cache in total) are cycled so every call reads its
   weights from memory. Weights are valid random blocks with small fp16 scales.

   Build (llama.cpp's build tree L, our library built by `native.build(native.GGML_SOURCE)`):
     cc -O2 -fopenmp scripts/ggml_kernel_bench.c -I L/ggml/include -L L/build/bin -lggml -lggml-base \
        -lggml-cpu -ldl -Wl,-rpath,L/build/bin -o /tmp/ggml_kernel_bench
   Run: ggml_kernel_bench OURS.so TYPE ROWS COLS TOKENS THREADS COPIES ROUNDS
   Prints per call medians (and min-max) of wall time for llama.cpp, ours and memcpy, and the
   relative difference of the two results (ours vs llama.cpp's, Frobenius). */

#include <dlfcn.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "ggml-cpu.h"
#include "ggml.h"

typedef int (*MvFn)(const void *, int, void *, int, int64_t, int64_t, int64_t, const uint8_t *, int, int);

static double clock_s(clockid_t id) {
    struct timespec t;
    clock_gettime(id, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

static double now(void) { return clock_s(CLOCK_MONOTONIC); }
static double cpu(void) { return clock_s(CLOCK_PROCESS_CPUTIME_ID); }

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static uint16_t f16_bits(float f) { /* small positive normal values only */
    uint32_t b;
    memcpy(&b, &f, 4);
    int e = (int)((b >> 23) & 0xff) - 127 + 15;
    return (uint16_t)((e << 10) | ((b >> 13) & 0x3ff));
}

/* valid random blocks: random codes, small fp16 scales where the type keeps them */
static void fill(uint8_t *p, size_t bytes, int type, size_t block_bytes) {
    for (size_t i = 0; i < bytes; i++) p[i] = (uint8_t)rand();
    for (size_t b = 0; b < bytes / block_bytes; b++) {
        uint8_t *blk = p + b * block_bytes;
        float s = 1e-3f * (1.0f + (float)(rand() % 1000) / 1000.0f);
        uint16_t h = f16_bits(s), h2 = f16_bits(s * 0.5f);
        switch (type) {
            case GGML_TYPE_Q4_0: case GGML_TYPE_Q5_0: case GGML_TYPE_Q8_0: memcpy(blk, &h, 2); break;
            case GGML_TYPE_Q4_1: case GGML_TYPE_Q5_1: memcpy(blk, &h, 2), memcpy(blk + 2, &h2, 2); break;
            case GGML_TYPE_MXFP4: blk[0] = 118; break;
            case GGML_TYPE_Q2_K: memcpy(blk + 80, &h, 2), memcpy(blk + 82, &h2, 2); break;
            case GGML_TYPE_Q3_K: memcpy(blk + 108, &h, 2); break;
            case GGML_TYPE_Q4_K: case GGML_TYPE_Q5_K: memcpy(blk, &h, 2), memcpy(blk + 2, &h2, 2); break;
            case GGML_TYPE_Q6_K: h = f16_bits(s * 0.1f), memcpy(blk + 208, &h, 2); break;
            default: break;
        }
    }
}

int main(int argc, char **argv) {
    if (argc != 9) {
        fprintf(stderr, "usage: %s OURS.so TYPE ROWS COLS TOKENS THREADS COPIES ROUNDS\n", argv[0]);
        return 2;
    }
    void *so = dlopen(argv[1], RTLD_NOW);
    MvFn ours = so ? (MvFn)dlsym(so, "ggml_mv") : NULL;
    if (!ours) {
        fprintf(stderr, "cannot load ggml_mv from %s\n", argv[1]);
        return 2;
    }
    int type = -1;
    for (int t = 0; t < GGML_TYPE_COUNT; t++)
        if (ggml_type_name((enum ggml_type)t) && strcasecmp(ggml_type_name((enum ggml_type)t), argv[2]) == 0) type = t;
    if (type < 0) {
        fprintf(stderr, "unknown type %s\n", argv[2]);
        return 2;
    }
    const int64_t M = atoll(argv[3]), K = atoll(argv[4]), N = atoll(argv[5]);
    const int threads = atoi(argv[6]), copies = atoi(argv[7]), rounds = atoi(argv[8]);
    const size_t wbytes = ggml_row_size((enum ggml_type)type, K) * M;
    struct ggml_init_params params = {(size_t)copies * (wbytes + 4 * M * N + 4096) + 4 * K * N + (64u << 20), NULL, false};
    struct ggml_context *ctx = ggml_init(params);
    struct ggml_tensor *x = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, K, N);
    float *xf = (float *)x->data;
    for (int64_t i = 0; i < K * N; i++) xf[i] = (float)rand() / RAND_MAX * 2.0f - 1.0f;
    struct ggml_cgraph *gf = ggml_new_graph_custom(ctx, copies + 16, false);
    struct ggml_tensor **w = malloc(sizeof(*w) * copies), **y = malloc(sizeof(*y) * copies);
    srand(1);
    for (int c = 0; c < copies; c++) {
        w[c] = ggml_new_tensor_2d(ctx, (enum ggml_type)type, K, M);
        fill((uint8_t *)w[c]->data, wbytes, type, ggml_type_size((enum ggml_type)type));
        y[c] = ggml_mul_mat(ctx, w[c], x);
        ggml_build_forward_expand(gf, y[c]);
    }
    float *mine = malloc(4 * M * N);
    uint8_t *dst = malloc(wbytes);
    double *tl = malloc(sizeof(double) * rounds), *to = malloc(sizeof(double) * rounds), *tm = malloc(sizeof(double) * rounds);
    double *cl = malloc(sizeof(double) * rounds), *co = malloc(sizeof(double) * rounds), *cm = malloc(sizeof(double) * rounds);
    ggml_graph_compute_with_ctx(ctx, gf, threads);                        /* warm both once */
    for (int c = 0; c < copies; c++) ours(xf, 0, mine, 0, N, M, K, (const uint8_t *)w[c]->data, type, threads);
    for (int r = 0; r < rounds; r++) {
        double t0 = now(), c0 = cpu();
        ggml_graph_compute_with_ctx(ctx, gf, threads);
        double t1 = now(), c1 = cpu();
        for (int c = 0; c < copies; c++) ours(xf, 0, mine, 0, N, M, K, (const uint8_t *)w[c]->data, type, threads);
        double t2 = now(), c2 = cpu();
        for (int c = 0; c < copies; c++) memcpy(dst, w[c]->data, wbytes);
        double t3 = now(), c3 = cpu();
        tl[r] = (t1 - t0) / copies, to[r] = (t2 - t1) / copies, tm[r] = (t3 - t2) / copies;
        cl[r] = (c1 - c0) / copies, co[r] = (c2 - c1) / copies, cm[r] = (c3 - c2) / copies;
    }
    double num = 0, den = 0;
    const float *ref = (const float *)y[copies - 1]->data;
    for (int64_t i = 0; i < M * N; i++) num += (double)(mine[i] - ref[i]) * (mine[i] - ref[i]), den += (double)ref[i] * ref[i];
    double *all[6] = {tl, to, tm, cl, co, cm};
    for (int i = 0; i < 6; i++) qsort(all[i], rounds, sizeof(double), cmp);
    const double gb = wbytes / 1e9;
    const int h = rounds / 2;
    printf("%s %lldx%lld N=%lld threads=%d | wall: llama.cpp %.1f us (%.1f-%.1f) %.2f GB/s, ours %.1f us (%.1f-%.1f) %.2f GB/s,"
           " memcpy %.2f GB/s, ours/llama.cpp %.2fx | cpu: llama.cpp %.1f us, ours %.1f us, memcpy %.1f us, ours/llama.cpp"
           " %.2fx | rel diff %.4f\n",
           argv[2], (long long)M, (long long)K, (long long)N, threads, 1e6 * tl[h], 1e6 * tl[0], 1e6 * tl[rounds - 1],
           gb / tl[h], 1e6 * to[h], 1e6 * to[0], 1e6 * to[rounds - 1], gb / to[h], gb / tm[h], tl[h] / to[h],
           1e6 * cl[h], 1e6 * co[h], 1e6 * cm[h], cl[h] / co[h], sqrt(num / den));
    return 0;
}
