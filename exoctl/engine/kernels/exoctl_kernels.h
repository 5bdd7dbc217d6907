/* What exoctl's kernel library exports, one prototype per function: the C files include it, and
 * engine/kernel_calls.py's ctypes table is checked against it (tests/test_cpu_kernels.py). Also the
 * helpers the files share: the vector path's switch (FAST: AVX2 with F16C and FMA) and bfloat16
 * conversions. */
#ifndef EXOCTL_KERNELS_H
#define EXOCTL_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FAST 1
#include <immintrin.h>
#endif

/* quant_matmul.c */
int qmm_has_avx2(void);
int qmm_linear(const float *x, int64_t M, int64_t K, const void *w, const void *ws, const float *bias, float *y,
               int64_t N, int bits, int threads);
/* bf16_matmul.c */
int bf16_linear(const void *x, int x_bf16, int64_t M, int64_t K, const uint16_t *w, const float *bias, void *y,
                int y_bf16, int64_t N, int threads);
void bf16_widen(const uint16_t *src, float *dst, int64_t n, int threads);
/* f32_matmul.c */
void f32_linear(const float *x, int64_t M, int64_t K, const float *w, const float *bias, float *y, int64_t N,
                int threads);
/* layer_steps.c */
void rms_norm(const void *x, void *y, const void *w, int64_t M, int64_t D, float eps, int bf16, int threads);
void rope(void *x, int64_t M, int64_t stride, int64_t heads, int64_t D, const void *cos, const void *sin,
          int bf16);
void silu_mul(const void *gu, void *y, int64_t M, int64_t I, int bf16, int threads);
/* shm_signal.c */
void shm_publish(uint32_t *word, uint32_t value);
int shm_wait(const uint32_t *word, uint32_t value, int64_t spin_ns, int64_t timeout_ns);

static inline float bf16_to_float(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t bits;
    memcpy(&bits, &f, sizeof bits);
    if ((bits & 0x7fffffff) > 0x7f800000) return (uint16_t)((bits >> 16) | 0x40); /* quiet NaN */
    bits += 0x7fff + ((bits >> 16) & 1);
    return (uint16_t)(bits >> 16);
}

#endif
