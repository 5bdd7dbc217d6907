/* Weight-only quantized matmul for CPU decoding: y[M, N] = x[M, K] @ dequant(W)[N, K]^T + b.
 *
 * Decoding reads every weight once per token, so the weights stay packed in memory and are
 * expanded only in registers. Each row of x is quantized on the fly to int8 in blocks of 32
 * along K (one float scale per block, as llama.cpp's Q8_0 does for the vector side), so that
 * AVX2's maddubs/madd pair does 32 multiply-adds of int8 weights by int8 activations where a
 * float FMA would do 8. The result is float32.
 *
 * Weights come in tiles of 8 output rows (engine/quant.py `pack_tiles`; N padded to 8), so one
 * 256-bit register holds 4 bytes of each of the 8 rows: a broadcast of 4 activation bytes meets
 * all 8 rows at once, the dot products land in 8 lanes (one per row) with no horizontal sums, and
 * a block's scales are applied to 8 rows with one FMA. K is a multiple of 32.
 *   int8: data [N/8, K/32, 8 groups, 8 rows, 4 bytes], int8 in [-127, 127]: group g holds
 *         columns 4g..4g+3 of the block; scales float32 [N8], one per row (symmetric).
 *   int4: data [N/8, K/32, 4 groups, 8 rows, 4 bytes]: byte j of group g holds column 8g + j in
 *         its low nibble and column 8g + 4 + j in its high nibble; weight = nibble * d + m, with
 *         d and m float16 [N/8, K/32, 2, 8]: a block's 8 rows' d, then their m (Q4_1's block;
 *         Q4_0's is m = -8d).
 * int4 nibbles enter maddubs as they are (unsigned 0..15) and the minimum is added after, as
 * m * sum(x) per block: no sign trick, no subtraction per weight. The sum is of x as rounded to
 * int8, so each weight meets the same x as a whole: the rounding's error is weighted by w, not by
 * the nibble (x's float sum gave 2.8x the error in tests/test_quantized.py's 16-row matmul).
 *
 * The same library holds a bfloat16-weight kernel (`bf16_linear`, at the end) for CPUs without
 * native bf16 maths, where torch's bf16 GEMV reaches about half the memory bandwidth.
 *
 * Built by exoctl/engine/qkernel.py with the node's own compiler flags (-march=native); OpenMP is
 * the libgomp torch already loaded, and the thread count is torch's, passed in.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#define FAST 1
#include <immintrin.h>
#endif

#define QK 32     /* weights per block */
#define ROWS 8    /* output rows per tile */
#define M_TILE 4  /* rows of x sharing one load of a weight group */
#define Q_PREFETCH 4096 /* bytes: a software prefetch this far ahead of each block (1.8 -> 1.3 ms int8, 0.88 -> 0.76 int4, 11264 x 2048, one row) */

int qmm_has_avx2(void) {
#ifdef FAST
    return 1;
#else
    return 0;
#endif
}

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) {
                man <<= 1;
                exp--;
            }
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
}

/* x[M, K] float32 -> xq[M, K] int8, xs[M, K/32] scales and xsum[M, K/32] (the sum of each block's
 * int8 values, for int4's minimum), per block of 32. */
static void quantize_rows(const float *x, int64_t M, int64_t K, int8_t *xq, float *xs, int32_t *xsum) {
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
            int32_t sum = 0;
            for (int i = 0; i < QK; i++) {
                dst[i] = (int8_t)lrintf(src[i] * id);
                sum += dst[i];
            }
            xs[m * blocks + b] = d;
            xsum[m * blocks + b] = sum;
        }
    }
}

#ifdef FAST
static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* One tile (8 output rows) against rows m0 .. m0 + MR of x; writes y[m, n0 .. n0 + 8). MR is a
 * constant at each call site, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_avx2(
    const int MR, const int bits, const int8_t *xq, const float *xs, const int32_t *xsum, int64_t K, int64_t m0,
    const uint8_t *w, const void *ws, int64_t tile, float *y, int64_t N, const float *bias) {
    const int64_t blocks = K / QK;
    const __m256i ones = _mm256_set1_epi16(1);
    const __m256i low = _mm256_set1_epi8(0x0f);
    __m256 acc[M_TILE];
    for (int t = 0; t < MR; t++) acc[t] = _mm256_setzero_ps();
    const int64_t block_bytes = bits == 8 ? ROWS * QK : ROWS * QK / 2;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + (tile * blocks + b) * block_bytes;
        for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch((const char *)wb + Q_PREFETCH + off, _MM_HINT_T0);
        __m256i isum[M_TILE];
        for (int t = 0; t < MR; t++) isum[t] = _mm256_setzero_si256();
        if (bits == 8) {
            for (int g = 0; g < 8; g++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + 32 * g));
                const __m256i aw = _mm256_sign_epi8(wv, wv);
                for (int t = 0; t < MR; t++) {
                    const __m256i xv = _mm256_set1_epi32(load4(xq + (m0 + t) * K + b * QK + 4 * g));
                    const __m256i prod = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xv, wv));
                    isum[t] = _mm256_add_epi32(isum[t], _mm256_madd_epi16(prod, ones));
                }
            }
        } else {
            /* int16 sums are safe over the whole block: a lane adds 16 products of a nibble
             * (<= 15) and an int8 (|x| <= 127), at most 30480 < 32767; one madd per block. */
            __m256i part[M_TILE];
            for (int t = 0; t < MR; t++) part[t] = _mm256_setzero_si256();
            for (int g = 0; g < 4; g++) {
                const __m256i wv = _mm256_loadu_si256((const __m256i *)(wb + 32 * g));
                const __m256i lo = _mm256_and_si256(wv, low);
                const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wv, 4), low);
                for (int t = 0; t < MR; t++) {
                    const int8_t *xb = xq + (m0 + t) * K + b * QK + 8 * g;
                    const __m256i xl = _mm256_set1_epi32(load4(xb));
                    const __m256i xh = _mm256_set1_epi32(load4(xb + 4));
                    part[t] = _mm256_add_epi16(part[t], _mm256_maddubs_epi16(lo, xl));
                    part[t] = _mm256_add_epi16(part[t], _mm256_maddubs_epi16(hi, xh));
                }
            }
            for (int t = 0; t < MR; t++) isum[t] = _mm256_madd_epi16(part[t], ones);
        }
        if (bits == 8) {
            for (int t = 0; t < MR; t++) {
                const __m256 s = _mm256_set1_ps(xs[(m0 + t) * blocks + b]);
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), s, acc[t]);
            }
        } else {
            const uint16_t *dm = (const uint16_t *)ws + (tile * blocks + b) * 2 * ROWS;
            const __m256 d = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)dm));
            const __m256 mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(dm + ROWS)));
            for (int t = 0; t < MR; t++) {
                const int64_t i = (m0 + t) * blocks + b;
                const __m256 s = _mm256_mul_ps(d, _mm256_set1_ps(xs[i]));
                acc[t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum[t]), s, acc[t]);
                acc[t] = _mm256_fmadd_ps(mn, _mm256_set1_ps(xs[i] * (float)xsum[i]), acc[t]);
            }
        }
    }
    const int64_t n0 = tile * ROWS;
    const int valid = N - n0 < ROWS ? (int)(N - n0) : ROWS;
    __m256 scale = _mm256_set1_ps(1.0f);
    if (bits == 8) scale = _mm256_loadu_ps((const float *)ws + n0);
    for (int t = 0; t < MR; t++) {
        __m256 out = _mm256_mul_ps(acc[t], scale);
        float *dst = y + (m0 + t) * N + n0;
        if (valid == ROWS) {
            if (bias) out = _mm256_add_ps(out, _mm256_loadu_ps(bias + n0));
            _mm256_storeu_ps(dst, out);
        } else {
            float lanes[ROWS];
            _mm256_storeu_ps(lanes, out);
            for (int r = 0; r < valid; r++) dst[r] = lanes[r] + (bias ? bias[n0 + r] : 0.0f);
        }
    }
}

static void tile_rows(int mt, int bits, const int8_t *xq, const float *xs, const int32_t *xsum, int64_t K,
                      int64_t m0, const uint8_t *w, const void *ws, int64_t tile, float *y, int64_t N,
                      const float *bias) {
    /* constant MR and bits per branch: eight unrolled copies of the micro-kernel */
    if (bits == 8) {
        switch (mt) {
        case 4: tile_avx2(4, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 3: tile_avx2(3, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 2: tile_avx2(2, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        default: tile_avx2(1, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        }
    } else {
        switch (mt) {
        case 4: tile_avx2(4, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 3: tile_avx2(3, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 2: tile_avx2(2, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        default: tile_avx2(1, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        }
    }
}
#else
/* Portable loop over the same layout, for CPUs without AVX2: correct, and as slow as it looks. */
static void tile_rows(int mt, int bits, const int8_t *xq, const float *xs, const int32_t *xsum, int64_t K,
                      int64_t m0, const uint8_t *w, const void *ws, int64_t tile, float *y, int64_t N,
                      const float *bias) {
    const int64_t blocks = K / QK;
    const int64_t block_bytes = bits == 8 ? ROWS * QK : ROWS * QK / 2;
    for (int r = 0; r < ROWS; r++) {
        const int64_t n = tile * ROWS + r;
        if (n >= N) break;
        for (int t = 0; t < mt; t++) {
            const int64_t m = m0 + t;
            float sum = 0.0f;
            for (int64_t b = 0; b < blocks; b++) {
                const uint8_t *wb = w + (tile * blocks + b) * block_bytes;
                const int8_t *xb = xq + m * K + b * QK;
                int32_t isum = 0;
                float d = 1.0f, mn = 0.0f;
                if (bits == 8) {
                    for (int g = 0; g < 8; g++)
                        for (int j = 0; j < 4; j++) isum += (int32_t)(int8_t)wb[32 * g + 4 * r + j] * xb[4 * g + j];
                } else {
                    for (int g = 0; g < 4; g++)
                        for (int j = 0; j < 4; j++) {
                            const uint8_t byte = wb[32 * g + 4 * r + j];
                            isum += (int32_t)(byte & 0x0f) * xb[8 * g + j];
                            isum += (int32_t)(byte >> 4) * xb[8 * g + 4 + j];
                        }
                    const uint16_t *dm = (const uint16_t *)ws + (tile * blocks + b) * 2 * ROWS;
                    d = half_to_float(dm[r]);
                    mn = half_to_float(dm[ROWS + r]);
                }
                sum += (float)isum * d * xs[m * blocks + b] + mn * xs[m * blocks + b] * (float)xsum[m * blocks + b];
            }
            const float scale = bits == 8 ? ((const float *)ws)[n] : 1.0f;
            y[m * N + n] = sum * scale + (bias ? bias[n] : 0.0f);
        }
    }
}
#endif

/* bits: 8 or 4; w, ws as in the header (N rows, padded to tiles of 8); bias may be NULL.
 * Returns 0, or -1 if out of memory. */
int qmm_linear(const float *x, int64_t M, int64_t K, const void *w, const void *ws, const float *bias,
               float *y, int64_t N, int bits, int threads) {
    const int64_t blocks = K / QK;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K));
    float *xs = (float *)malloc((size_t)(M * blocks) * sizeof(float));
    int32_t *xsum = (int32_t *)malloc((size_t)(M * blocks) * sizeof(int32_t));
    if (!xq || !xs || !xsum) {
        free(xq);
        free(xs);
        free(xsum);
        return -1;
    }
    quantize_rows(x, M, K, xq, xs, xsum);
    const int64_t tiles = (N + ROWS - 1) / ROWS;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t tile = 0; tile < tiles; tile++) {
        for (int64_t m0 = 0; m0 < M; m0 += M_TILE) {
            const int mt = (int)(M - m0 < M_TILE ? M - m0 : M_TILE);
            tile_rows(mt, bits, xq, xs, xsum, K, m0, (const uint8_t *)w, ws, tile, y, N, bias);
        }
    }
    free(xq);
    free(xs);
    free(xsum);
    return 0;
}


/* ---- bfloat16 weights ------------------------------------------------------------------------
 * y[M, N] = x[M, K] @ W[N, K]^T + b, W bfloat16 in the checkpoint's own row-major layout (no
 * repacking, so slices for tensor sharding stay plain tensors), x and y float32 or bfloat16,
 * b float32 or NULL; sums in float32, y rounded to bfloat16 once, to nearest even, as torch does.
 * A bf16 value is the top half of a float32, so widening is a shift, and a 256-bit load of 16
 * weights gives two float32 vectors at once: the even elements (shifted up) and the odd ones
 * (masked). x is reordered once per call to match (each 16 of K: evens, then odds).
 * Each weight row is read once, front to back, with a software prefetch a kilobyte ahead
 * (measured, 2 threads, AVX2 EPYC: 10-15 GB/s with 4 rows interleaved and no prefetch, 22-23
 * GB/s this way, where a plain sum of memory reaches 24): decoding is that read. Rows of x go
 * two at a time against a weight row, which the next pair re-reads from cache. */
#define BF_MR 2
#define BF_PREFETCH 512 /* elements: 1 KB ahead */

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

/* x[M, K] -> xp[M, K]: within each whole 16 of K, the 8 even elements then the 8 odd ones; the
 * tail past the last 16 stays in order. */
static void deinterleave(const float *x, float *xp, int64_t M, int64_t K) {
    const int64_t body = K / 16 * 16;
    for (int64_t m = 0; m < M; m++) {
        const float *src = x + m * K;
        float *dst = xp + m * K;
        for (int64_t k = 0; k < body; k += 16)
            for (int j = 0; j < 8; j++) {
                dst[k + j] = src[k + 2 * j];
                dst[k + 8 + j] = src[k + 2 * j + 1];
            }
        for (int64_t k = body; k < K; k++) dst[k] = src[k];
    }
}

#ifdef FAST
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* Row n of W against rows m0 .. m0 + mr of xp (mr <= BF_MR, a constant at the call sites); four
 * accumulators per row of x (32 of K a step) hide the FMA latency. */
static inline __attribute__((always_inline)) void bf16_row(
    const int mr, const float *xp, int64_t K, int64_t m0, const uint16_t *wrow, float *y, int64_t N, int64_t n) {
    float sums[BF_MR];
    int64_t k = 0;
#ifdef FAST
    const __m256i odd = _mm256_set1_epi32((int)0xffff0000);
    __m256 acc[BF_MR][4];
    for (int t = 0; t < mr; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)(wrow + k + BF_PREFETCH), _MM_HINT_T0);
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wrow + k));
        const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wrow + k + 16));
        const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd));
        const __m256 w2 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
        const __m256 w3 = _mm256_castsi256_ps(_mm256_and_si256(v1, odd));
        for (int t = 0; t < mr; t++) {
            const float *xr = xp + (m0 + t) * K + k;
            acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[t][1]);
            acc[t][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[t][2]);
            acc[t][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[t][3]);
        }
    }
    for (; k + 16 <= K; k += 16) {
        const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wrow + k));
        const __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
        const __m256 w1 = _mm256_castsi256_ps(_mm256_and_si256(v0, odd));
        for (int t = 0; t < mr; t++) {
            const float *xr = xp + (m0 + t) * K + k;
            acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[t][1]);
        }
    }
    for (int t = 0; t < mr; t++)
        sums[t] = hsum8(_mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3])));
#else
    /* the same even/odd order, so the portable build reads the same reordered x */
    for (int t = 0; t < mr; t++) sums[t] = 0.0f;
    for (; k + 16 <= K; k += 16)
        for (int j = 0; j < 8; j++)
            for (int t = 0; t < mr; t++) {
                const float *xr = xp + (m0 + t) * K + k;
                sums[t] += bf16_to_float(wrow[k + 2 * j]) * xr[j] + bf16_to_float(wrow[k + 2 * j + 1]) * xr[8 + j];
            }
#endif
    for (; k < K; k++)
        for (int t = 0; t < mr; t++) sums[t] += bf16_to_float(wrow[k]) * xp[(m0 + t) * K + k];
    for (int t = 0; t < mr; t++) y[(m0 + t) * N + n] = sums[t];
}

/* x_bf16, y_bf16: whether x and y are bfloat16 (else float32). Returns 0, or -1 if out of memory. */
int bf16_linear(const void *x, int x_bf16, int64_t M, int64_t K, const uint16_t *w, const float *bias, void *y,
                int y_bf16, int64_t N, int threads) {
    float *xf = (float *)malloc((size_t)(M * K) * sizeof(float)), *xp = (float *)malloc((size_t)(M * K) * sizeof(float));
    float *yf = y_bf16 ? (float *)malloc((size_t)(M * N) * sizeof(float)) : (float *)y;
    if (!xf || !xp || !yf) {
        free(xf);
        free(xp);
        if (y_bf16) free(yf);
        return -1;
    }
    for (int64_t i = 0; i < M * K; i++) xf[i] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    deinterleave(xf, xp, M, K);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *wrow = w + n * K;
        int64_t m0 = 0;
        for (; m0 + BF_MR <= M; m0 += BF_MR) bf16_row(BF_MR, xp, K, m0, wrow, yf, N, n);
        if (m0 < M) bf16_row(1, xp, K, m0, wrow, yf, N, n);
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            const float v = yf[m * N + n] + (bias ? bias[n] : 0.0f);
            if (y_bf16) ((uint16_t *)y)[m * N + n] = float_to_bf16(v);
            else yf[m * N + n] = v;
        }
    free(xf);
    free(xp);
    if (y_bf16) free(yf);
    return 0;
}

/* dst[n] = float(src[n]): a bf16 weight widened for one prefill chunk's float32 GEMM. */
void bf16_widen(const uint16_t *src, float *dst, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}

/* ---- the small per-layer steps ---------------------------------------------------------------
 * A decode step of a small model is mostly per-call overhead: torch's RMSNorm is a dozen calls
 * (60-70 us for 576 numbers), rope five, SiLU-and-multiply three. Each is one call here. bf16:
 * the same roundings as transformers' bfloat16 modules, so results match torch's to the bit
 * where the sums do. */

static inline float load_any(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_float(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

static inline void store_any(void *p, int64_t i, float v, int bf16) {
    if (bf16) ((uint16_t *)p)[i] = float_to_bf16(v);
    else ((float *)p)[i] = v;
}

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
