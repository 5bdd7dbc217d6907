/* What exoctl's kernel library exports, one prototype per function: the C files include it, and
 * engine/kernel_calls.py's ctypes table is checked against it (tests/test_cpu_kernels.py). Also the
 * helpers the files share: the vector paths' switches and bfloat16 conversions.
 *
 * The vector paths, each compiled in where the build's target has it (engine/qkernel.py builds with
 * -march=native, or the target EXOCTL_KERNEL_ISA forces):
 *   FAST       AVX2 with F16C and FMA: the 256-bit paths, and every other path's frame
 *   EXO_AVX512 AVX512F+BW: the quantized kernel's dot products 512 bits wide
 *   EXO_VNNI   AVX512-VNNI: those dot products one vpdpbusd each (u8 x s8, 4 per 32-bit lane)
 *   EXO_BF16   AVX512-BF16: bfloat16 weights by vdpbf16ps (bf16 pairs into float32 lanes)
 * EXOCTL_EMULATE_AVX512 (tests only: qkernel.build_emulated) compiles the AVX512 paths on any
 * AVX2 CPU with their 512-bit intrinsics done in portable C by SIMDe (libsimde-dev): 1 = AVX512BW
 * alone, 2 = with VNNI and BF16. The same source lines then run on a machine that lacks them. */
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
#if defined(EXOCTL_EMULATE_AVX512) && defined(FAST)
#define SIMDE_ENABLE_NATIVE_ALIASES
#include <simde/x86/avx512.h>
/* SIMDe 0.7.4's native alias of _mm512_madd_epi16 takes the masked form's 4 arguments */
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)
#define EXO_AVX512 1
#if EXOCTL_EMULATE_AVX512 >= 2
#define EXO_VNNI 1
#define EXO_BF16 1
#endif
#elif defined(FAST) && defined(__AVX512F__) && defined(__AVX512BW__)
#define EXO_AVX512 1
#if defined(__AVX512VNNI__)
#define EXO_VNNI 1
#endif
#if defined(__AVX512BF16__)
#define EXO_BF16 1
#endif
#endif

/* kernel_isa()'s bits: which paths this build holds */
#define ISA_AVX2 1
#define ISA_AVX512 2
#define ISA_VNNI 4
#define ISA_BF16 8
#define ISA_EMULATED 16

/* quant_matmul.c */
int kernel_isa(void);
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
/* attention.c */
int attend_decode(void *qkv, const void *cos, const void *sin, void *keys, void *values, int64_t capacity,
                  int64_t past, int64_t heads, int64_t kv_heads, int64_t D, float scale, void *out, int bf16,
                  int threads);
/* layer_decode.c: one decoder layer's weights as engine/fused_decode.py describes them */
#define EXO_LINEAR_QUANT 1 /* int8/int4 in quant_matmul.c's tiles: w, ws (scales), bits */
#define EXO_LINEAR_BF16 2  /* bfloat16 [n, k], row-major */
#define EXO_LINEAR_F32 3   /* float32 [n, k], row-major */
typedef struct {
    int32_t kind, bits;
    int64_t n, k;
    const void *w, *ws;
    const float *bias; /* [n] or NULL */
} exo_linear;
typedef struct {
    const void *input_norm, *post_norm; /* [hidden], activation dtype */
    float eps, scale;                   /* RMSNorm's epsilon; attention's 1 / sqrt(head_dim) */
    int32_t bf16;                       /* activations bfloat16 (else float32) */
    int64_t hidden, heads, kv_heads, head_dim, intermediate;
    exo_linear qkv, o, gate_up, down;
} exo_layer;
int layer_decode(const exo_layer *L, const void *h, void *out, int64_t B, const void *cos, const void *sin,
                 void *const *keys, void *const *values, const int64_t *capacity, const int64_t *past,
                 int threads);
/* shm_signal.c */
void shm_publish(uint32_t *word, uint32_t value);
int shm_wait(const uint32_t *word, uint32_t value, int64_t spin_ns, int64_t timeout_ns);
/* partials_q8.c */
void q8_encode(const float *x, int64_t n, uint8_t *out);
void q8_decode(const uint8_t *raw, int64_t n, float *y);

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

/* element i of a float32 or bf16 array (bf16 != 0), as float32; and stored back, rounded to
 * nearest even where bf16 */
static inline float load_any(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_any(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

#endif
