/* The small per-layer steps in one C call each (engine/layers.py: RMSNorm, rope, SwiGLU's
 * SiLU-and-multiply). Built with the rest of the library by exoctl/engine/qkernel.py. */
#include "exoctl_kernels.h"

/* A decode step of a small model is mostly per-call overhead: torch's RMSNorm is a dozen calls
 * (60-70 us for 576 numbers), rope five, SiLU-and-multiply three. Each is one call here. bf16:
 * the same roundings as transformers' bfloat16 modules, so results match torch's to the bit
 * where the sums do. */

/* Rounds as the tensor's dtype would: a no-op for float32. */
static inline float round_as(float v, int bf16) { return bf16 ? bf16_to_float(float_to_bf16(v)) : v; }

/* y[m] = x[m] / sqrt(mean(x[m]^2) + eps) * w, x y w [M, D] / [D], all float32 or all bf16; bf16
 * normalises in float32, rounds, then multiplies by w and rounds (LlamaRMSNorm). */
void rms_norm(const void *x, void *y, const void *w, int64_t M, int64_t D, float eps, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++) {
        double sum = 0.0;
        for (int64_t i = 0; i < D; i++) {
            const float v = load_any(x, m * D + i, bf16);
            sum += (double)v * v;
        }
        const float scale = 1.0f / sqrtf((float)(sum / (double)D) + eps);
        for (int64_t i = 0; i < D; i++) {
            const float normed = round_as(load_any(x, m * D + i, bf16) * scale, bf16);
            store_any(y, m * D + i, normed * load_any(w, i, bf16), bf16);
        }
    }
}

/* Rotates, in place, the first `heads` heads of each of M rows of x (row stride `stride`
 * elements, head size D): pairs (i, i + D/2) as transformers' rotate_half, with cos/sin [M, D]
 * (each row's position already looked up). */
void rope(void *x, int64_t M, int64_t stride, int64_t heads, int64_t D, const void *cos, const void *sin,
          int bf16) {
    const int64_t half = D / 2;
    for (int64_t m = 0; m < M; m++)
        for (int64_t h = 0; h < heads; h++) {
            const int64_t base = m * stride + h * D;
            for (int64_t i = 0; i < half; i++) {
                const float a = load_any(x, base + i, bf16), b = load_any(x, base + i + half, bf16);
                const float c0 = load_any(cos, m * D + i, bf16), s0 = load_any(sin, m * D + i, bf16);
                const float c1 = load_any(cos, m * D + i + half, bf16);
                const float s1 = load_any(sin, m * D + i + half, bf16);
                store_any(x, base + i, round_as(a * c0, bf16) + round_as(-b * s0, bf16), bf16);
                store_any(x, base + i + half, round_as(b * c1, bf16) + round_as(a * s1, bf16), bf16);
            }
        }
}

/* y[m, j] = silu(gu[m, j]) * gu[m, I + j]: gate and up side by side in one row of 2I. */
void silu_mul(const void *gu, void *y, int64_t M, int64_t I, int bf16, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static) if (M > 8)
    for (int64_t m = 0; m < M; m++)
        for (int64_t j = 0; j < I; j++) {
            const float g = load_any(gu, m * 2 * I + j, bf16), u = load_any(gu, m * 2 * I + I + j, bf16);
            store_any(y, m * I + j, round_as(g / (1.0f + expf(-g)), bf16) * u, bf16);
        }
}
