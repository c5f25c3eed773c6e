/* A program that calls our kernels on inputs written by a Python test and writes the outputs back:
   how the aarch64 build is checked under qemu-user (tests/test_aarch64.py) without an aarch64 Python.

   usage: kernel_driver CALL IN OUT
   IN:  int64 count, then `count` buffers, each int64 size in bytes and the bytes. Buffer 0 holds the
        call's int64 scalars; the others are its arrays, in the order listed per call below.
   OUT: the output array's bytes. Prints the call's return code (and for "info" what was built). */

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "kernel_args.h"

int qmv_path(void);
int ggml_path(void);
int bmv_path(void);
const char *kernels_variant(void);
int qmv(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t out_features, int64_t in_features,
        const uint8_t *codes, const uint16_t *scales, const uint16_t *zeros, int64_t group, int bits, int threads);
int qmv_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const QmvArgs *w, int threads);
int qmv_swiglu_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const QmvSwigluArgs *w,
                 int threads);
int ggml_mv(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, int64_t out_features,
            int64_t in_features, const uint8_t *w, int type, int threads);
int ggml_mv_p(const void *x, int x_dtype, void *y, int y_dtype, int64_t n_tokens, const GgmlArgs *w, int threads);
int bmv(const uint16_t *x, void *y, int y_dtype, int64_t n_tokens, int64_t out_features, int64_t in_features,
        const uint16_t *w, int threads);

static void *buf[16];
static int64_t size[16];

static int read_input(const char *path) {
    FILE *f = fopen(path, "rb");
    int64_t count = 0;
    if (!f || fread(&count, 8, 1, f) != 1 || count < 1 || count > 16) return -1;
    for (int64_t i = 0; i < count; i++) {
        if (fread(&size[i], 8, 1, f) != 1) return -1;
        buf[i] = malloc(size[i] ? (size_t)size[i] : 1);
        if (size[i] && fread(buf[i], 1, (size_t)size[i], f) != (size_t)size[i]) return -1;
    }
    fclose(f);
    return (int)count;
}

int main(int argc, char **argv) {
    if (argc == 2 && strcmp(argv[1], "info") == 0) {
        printf("%s %d %d %d\n", kernels_variant(), qmv_path(), ggml_path(), bmv_path());
        return 0;
    }
    if (argc != 4 || read_input(argv[2]) < 1) {
        fprintf(stderr, "usage: kernel_driver CALL IN OUT (a readable IN)\n");
        return 2;
    }
    const int64_t *s = (const int64_t *)buf[0];
    const char *call = argv[1];
    int rc = -100;
    size_t out_bytes = 0;
    void *y = NULL;
    if (strcmp(call, "qmv") == 0 || strcmp(call, "qmv_p") == 0) {
        /* scalars: n, O, I, group, bits, dtype, threads; arrays: x, codes, scales, zeros */
        out_bytes = (size_t)(s[0] * s[1] * (s[5] == 0 ? 4 : 2));
        y = malloc(out_bytes);
        if (call[3] == '_') {
            QmvArgs a = {s[1], s[2], buf[2], buf[3], buf[4], s[3], (int32_t)s[4]};
            rc = qmv_p(buf[1], (int)s[5], y, (int)s[5], s[0], &a, (int)s[6]);
        } else {
            rc = qmv(buf[1], (int)s[5], y, (int)s[5], s[0], s[1], s[2], buf[2], buf[3], buf[4], s[3], (int)s[4],
                     (int)s[6]);
        }
    } else if (strcmp(call, "qmv_swiglu_p") == 0) {
        /* scalars: n, H, F, group13, bits13, group2, bits2, dtype, threads; arrays: x, c1 s1 z1, c3 s3 z3, c2 s2 z2 */
        out_bytes = (size_t)(s[0] * s[1] * (s[7] == 0 ? 4 : 2));
        y = malloc(out_bytes);
        QmvSwigluArgs a = {s[1], s[2], buf[2], buf[3], buf[4], buf[5], buf[6], buf[7], s[3], (int32_t)s[4],
                           buf[8], buf[9], buf[10], s[5], (int32_t)s[6]};
        rc = qmv_swiglu_p(buf[1], (int)s[7], y, (int)s[7], s[0], &a, (int)s[8]);
    } else if (strcmp(call, "ggml_mv") == 0 || strcmp(call, "ggml_mv_p") == 0) {
        /* scalars: n, O, I, type, dtype, threads; arrays: x, w */
        out_bytes = (size_t)(s[0] * s[1] * (s[4] == 0 ? 4 : 2));
        y = malloc(out_bytes);
        if (call[7] == '_') {
            GgmlArgs a = {s[1], s[2], buf[2], (int32_t)s[3]};
            rc = ggml_mv_p(buf[1], (int)s[4], y, (int)s[4], s[0], &a, (int)s[5]);
        } else {
            rc = ggml_mv(buf[1], (int)s[4], y, (int)s[4], s[0], s[1], s[2], buf[2], (int)s[3], (int)s[5]);
        }
    } else if (strcmp(call, "bmv") == 0) {
        /* scalars: n, O, I, y dtype, threads; arrays: x (bf16), w (bf16) */
        out_bytes = (size_t)(s[0] * s[1] * (s[3] == 0 ? 4 : 2));
        y = malloc(out_bytes);
        rc = bmv(buf[1], y, (int)s[3], s[0], s[1], s[2], buf[2], (int)s[4]);
    }
    printf("%d\n", rc);
    FILE *f = fopen(argv[3], "wb");
    if (!f || (out_bytes && fwrite(y, 1, out_bytes, f) != out_bytes)) return 3;
    fclose(f);
    return rc == -100 ? 2 : 0;
}
