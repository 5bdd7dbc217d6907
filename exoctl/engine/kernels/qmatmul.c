/* Weight-only quantized matmul for CPU decoding: y[M, N] = x[M, K] @ dequant(W)[N, K]^T + b.
 *
 * Decoding reads every weight once per token, so the weights stay packed in memory and are
 * expanded only in registers. Each row of x is quantized on the fly to int8 in blocks of 32
 * along K (one float scale per block, as llama.cpp's Q8_0 does for the vector side), so that
 * one AVX2 instruction pair (maddubs + madd) does 32 multiply-adds of int8 weights by int8
 * activations; a float FMA path would do 8. The result is float32.
 *
 * Weight formats (K a multiple of 32):
 *   int8: w[N, K] int8 in [-127, 127], one float32 scale per output row (symmetric).
 *   int4: w[N, K/2] bytes, blocks of 32 weights in 16 bytes, llama.cpp's Q4_0 layout: byte j
 *         of a block holds weight j in its low nibble and weight j + 16 in its high nibble;
 *         weight = (nibble - 8) * scale, one float16 scale per block of 32 (symmetric).
 *
 * Built by exoctl/engine/qkernel.py with the node's own compiler flags (-march=native); OpenMP
 * is the libgomp torch already loaded, so the threads are torch's own pool size.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define QK 32       /* weights per block */
#define M_TILE 4    /* rows of x sharing one load of a weight block */
#define N_TILE 8    /* output rows a thread takes at a time */
#define M_CHUNK 64  /* rows of x kept hot in cache while a tile of weights passes */

int qmm_has_avx2(void) {
#ifdef __AVX2__
    return 1;
#else
    return 0;
#endif
}

static float half_to_float(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
#endif
}

/* x[M, K] float32 -> xq[M, K] int8 and xs[M, K/32] scales, per block of 32. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs) {
    const int64_t blocks = K / QK;
    for (int64_t m = 0; m < M; m++) {
        for (int64_t b = 0; b < blocks; b++) {
            const float *src = x + m * K + b * QK;
            float amax = 0.0f;
            for (int i = 0; i < QK; i++) {
                float a = fabsf(src[i]);
                amax = a > amax ? a : amax;
            }
            const float d = amax / 127.0f;
            const float id = d > 0.0f ? 1.0f / d : 0.0f;
            int8_t *dst = xq + m * K + b * QK;
            for (int i = 0; i < QK; i++) dst[i] = (int8_t)lrintf(src[i] * id);
            xs[m * blocks + b] = d;
        }
    }
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 32 int8 weights times 32 int8 activations, as 8 float partial sums. */
static inline __m256 dot32(__m256i w, __m256i x) {
    const __m256i ax = _mm256_sign_epi8(w, w);
    const __m256i sx = _mm256_sign_epi8(x, w);
    const __m256i pairs = _mm256_maddubs_epi16(ax, sx);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

static inline __m256i unpack_q4(const uint8_t *p) {
    const __m128i bytes = _mm_loadu_si128((const __m128i *)p);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes);
    return _mm256_sub_epi8(_mm256_and_si256(both, _mm256_set1_epi8(0x0f)), _mm256_set1_epi8(8));
}
#endif

#ifdef __AVX2__
/* The micro-kernel: output rows n, n + 1 (NR = 2) times rows m0 .. m0 + MR of x, over all of K.
 * Each weight block is loaded once for MR rows and each x block once for both weight rows;
 * 2 * MR independent accumulators keep the FMA latency hidden. MR is a constant at each call
 * site, so the loops unroll and the accumulators live in registers. */
static inline __attribute__((always_inline)) void tile_avx2(
    const int MR, const int bits, const int8_t *xq, const float *xs, int64_t K, int64_t m0, const void *w,
    const void *ws, int64_t n, int nr, float *y, int64_t N, const float *bias) {
    const int64_t blocks = K / QK;
    __m256 acc[2][M_TILE];
    for (int r = 0; r < 2; r++)
        for (int t = 0; t < MR; t++) acc[r][t] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; b++) {
        __m256i wv[2];
        float d[2];
        for (int r = 0; r < 2; r++) {
            const int64_t row = n + (r < nr ? r : 0);
            if (bits == 8) {
                wv[r] = _mm256_loadu_si256((const __m256i *)((const int8_t *)w + row * K + b * QK));
                d[r] = 1.0f;
            } else {
                wv[r] = unpack_q4((const uint8_t *)w + row * (K / 2) + b * (QK / 2));
                d[r] = half_to_float(((const uint16_t *)ws)[row * blocks + b]);
            }
        }
        for (int t = 0; t < MR; t++) {
            const int64_t m = m0 + t;
            const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + m * K + b * QK));
            const float s = xs[m * blocks + b];
            for (int r = 0; r < 2; r++)
                acc[r][t] = _mm256_fmadd_ps(dot32(wv[r], xv), _mm256_set1_ps(d[r] * s), acc[r][t]);
        }
    }
    for (int r = 0; r < nr; r++) {
        const float scale = bits == 8 ? ((const float *)ws)[n + r] : 1.0f;
        const float add = bias ? bias[n + r] : 0.0f;
        for (int t = 0; t < MR; t++) y[(m0 + t) * N + n + r] = hsum(acc[r][t]) * scale + add;
    }
}

static void tile(int mt, int bits, const int8_t *xq, const float *xs, int64_t K, int64_t m0, const void *w,
                 const void *ws, int64_t n, int nr, float *y, int64_t N, const float *bias) {
    /* constant MR and bits per branch: eight unrolled copies of the micro-kernel */
    if (bits == 8) {
        switch (mt) {
        case 4: tile_avx2(4, 8, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        case 3: tile_avx2(3, 8, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        case 2: tile_avx2(2, 8, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        default: tile_avx2(1, 8, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        }
    } else {
        switch (mt) {
        case 4: tile_avx2(4, 4, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        case 3: tile_avx2(3, 4, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        case 2: tile_avx2(2, 4, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        default: tile_avx2(1, 4, xq, xs, K, m0, w, ws, n, nr, y, N, bias); break;
        }
    }
}
#else
/* Portable loop, for CPUs without AVX2: correct, and as slow as it looks. */
static void tile(int mt, int bits, const int8_t *xq, const float *xs, int64_t K, int64_t m0, const void *w,
                 const void *ws, int64_t n, int nr, float *y, int64_t N, const float *bias) {
    const int64_t blocks = K / QK;
    for (int r = 0; r < nr; r++) {
        for (int t = 0; t < mt; t++) {
            const int64_t m = m0 + t, row = n + r;
            float sum = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                const int8_t *xb = xq + m * K + b * QK;
                int32_t isum = 0;
                float d = 1.0f;
                if (bits == 8) {
                    const int8_t *wb = (const int8_t *)w + row * K + b * QK;
                    for (int i = 0; i < QK; i++) isum += (int32_t)wb[i] * xb[i];
                } else {
                    const uint8_t *p = (const uint8_t *)w + row * (K / 2) + b * (QK / 2);
                    for (int j = 0; j < QK / 2; j++) {
                        isum += ((int32_t)(p[j] & 0x0f) - 8) * xb[j];
                        isum += ((int32_t)(p[j] >> 4) - 8) * xb[j + QK / 2];
                    }
                    d = half_to_float(((const uint16_t *)ws)[row * blocks + b]);
                }
                sum += (float)isum * d * xs[m * blocks + b];
            }
            const float scale = bits == 8 ? ((const float *)ws)[row] : 1.0f;
            y[m * N + row] = sum * scale + (bias ? bias[row] : 0.0f);
        }
    }
}
#endif

/* bits: 8 or 4. w, ws as in the header; bias may be NULL. Returns 0, or -1 if out of memory. */
int qmm_linear(const float *x, int64_t M, int64_t K, const void *w, const void *ws, const float *bias,
               float *y, int64_t N, int bits, int threads) {
    const int64_t blocks = K / QK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xs = (float *)malloc((size_t)(M * blocks) * sizeof(float));
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    quantize_rows(x, M, K, xq, xs);
    const int64_t tiles = (N + N_TILE - 1) / N_TILE;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < tiles; t++) {
        const int64_t n_end = (t + 1) * N_TILE < N ? (t + 1) * N_TILE : N;
        for (int64_t mc = 0; mc < M; mc += M_CHUNK) {
            const int64_t mc_end = mc + M_CHUNK < M ? mc + M_CHUNK : M;
            for (int64_t n = t * N_TILE; n < n_end; n += 2) {
                const int nr = n + 1 < n_end ? 2 : 1;
                for (int64_t m0 = mc; m0 < mc_end; m0 += M_TILE) {
                    const int mt = (int)(mc_end - m0 < M_TILE ? mc_end - m0 : M_TILE);
                    tile(mt, bits, xq, xs, K, m0, w, ws, n, nr, y, N, bias);
                }
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}
