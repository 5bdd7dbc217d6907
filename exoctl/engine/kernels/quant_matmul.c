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
 * With AVX512 (EXO_AVX512, kernels/exoctl_kernels.h) a 512-bit register holds two groups of a
 * block and the dot products are vpdpbusd (VNNI) where the CPU has it, maddubs/madd 512 bits wide
 * where it has AVX512BW alone; the scales are applied as on AVX2, 8 rows at a time. Without AVX2,
 * a plain C loop over the same layout.
 *
 * Built by exoctl/engine/qkernel.py with the node's own compiler flags (-march=native); OpenMP is
 * the libgomp torch already loaded, and the thread count is torch's, passed in.
 */
#include "exoctl_kernels.h"

#define QK 32     /* weights per block */
#define ROWS 8    /* output rows per tile */
#define M_TILE 4  /* rows of x sharing one load of a weight group */
#ifndef Q_PREFETCH
#define Q_PREFETCH 4096 /* bytes: a software prefetch this far ahead of each block (1.8 -> 1.3 ms int8, 0.88 -> 0.76 int4, 11264 x 2048, one row) */
#endif

int kernel_isa(void) {
    int isa = 0;
#ifdef FAST
    isa |= ISA_AVX2;
#endif
#ifdef EXO_AVX512
    isa |= ISA_AVX512;
#endif
#ifdef EXO_VNNI
    isa |= ISA_VNNI;
#endif
#ifdef EXO_BF16
    isa |= ISA_BF16;
#endif
#ifdef EXOCTL_EMULATE_AVX512
    isa |= ISA_EMULATED;
#endif
    return isa;
}

#ifndef FAST /* the portable loop's: the vector paths convert with F16C */
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
#endif

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

/* The integer dot products of one block (32 columns of a tile's 8 rows) with rows m0 .. m0 + MR
 * of x: isum[t] lane r = sum over the block of weight (row r) * xq (row m0 + t), int32. */
#ifdef EXO_AVX512
/* 512 bits hold two groups of the block: lanes 0-7 group g's 8 rows, lanes 8-15 group g + 1's; x's
 * 4 bytes for each half are broadcast into it, and the two halves are added once per block. */
static inline __m512i pair_x(const int8_t *lo, const int8_t *hi) {
    return _mm512_mask_set1_epi32(_mm512_set1_epi32(load4(lo)), (__mmask16)0xff00, load4(hi));
}

/* acc + the sums of 4 adjacent u8 * s8 products per 32-bit lane */
static inline __m512i dot_u8s8(__m512i acc, __m512i u, __m512i s) {
#ifdef EXO_VNNI
    return _mm512_dpbusd_epi32(acc, u, s);
#else
    /* maddubs's int16 pairs cannot saturate here: |u| <= 127 (int8's absolute value) or <= 15
     * (a nibble), |s| <= 127, so a pair is at most 32258 */
    return _mm512_add_epi32(acc, _mm512_madd_epi16(_mm512_maddubs_epi16(u, s), _mm512_set1_epi16(1)));
#endif
}

static inline __attribute__((always_inline)) void block_sums(
    const int MR, const int bits, const int8_t *xq, int64_t K, int64_t m0, int64_t b, const uint8_t *wb,
    __m256i *isum) {
    __m512i acc[M_TILE];
    for (int t = 0; t < MR; t++) acc[t] = _mm512_setzero_si512();
    if (bits == 8) {
#ifdef EXO_VNNI
        /* x enters as the unsigned operand, offset by 128 (x ^ 0x80 = x + 128 in [1, 255]), and
         * 128 * sum(w) comes off after: two vpdpbusd per 64 weights for one row of x, where the
         * sign trick takes an abs, a mask and a subtraction per row of x. */
        const __m512i ones = _mm512_set1_epi8(1), flip = _mm512_set1_epi8((char)0x80);
        __m512i wsum = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) { /* groups 2q, 2q + 1: columns 8q .. 8q + 7 */
            const __m512i wv = _mm512_loadu_si512((const void *)(wb + 64 * q));
            wsum = _mm512_dpbusd_epi32(wsum, ones, wv);
            for (int t = 0; t < MR; t++) {
                const int8_t *xb = xq + (m0 + t) * K + b * QK + 8 * q;
                acc[t] = _mm512_dpbusd_epi32(acc[t], _mm512_xor_si512(pair_x(xb, xb + 4), flip), wv);
            }
        }
        for (int t = 0; t < MR; t++) acc[t] = _mm512_sub_epi32(acc[t], _mm512_slli_epi32(wsum, 7));
#else
        const __m512i zero = _mm512_setzero_si512();
        for (int q = 0; q < 4; q++) {
            const __m512i wv = _mm512_loadu_si512((const void *)(wb + 64 * q));
            const __m512i aw = _mm512_abs_epi8(wv);
            const __mmask64 negative = _mm512_movepi8_mask(wv);
            for (int t = 0; t < MR; t++) {
                const int8_t *xb = xq + (m0 + t) * K + b * QK + 8 * q;
                const __m512i xv = pair_x(xb, xb + 4);
                acc[t] = dot_u8s8(acc[t], aw, _mm512_mask_sub_epi8(xv, negative, zero, xv));
            }
        }
#endif
    } else {
        /* group g's byte j: column 8g + j in its low nibble, 8g + 4 + j in its high one */
        const __m512i low = _mm512_set1_epi8(0x0f);
        for (int q = 0; q < 2; q++) { /* groups 2q, 2q + 1: columns 16q .. 16q + 15 */
            const __m512i wv = _mm512_loadu_si512((const void *)(wb + 64 * q));
            const __m512i lo = _mm512_and_si512(wv, low);
            const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wv, 4), low);
            for (int t = 0; t < MR; t++) {
                const int8_t *xb = xq + (m0 + t) * K + b * QK + 16 * q;
                acc[t] = dot_u8s8(acc[t], lo, pair_x(xb, xb + 8));
                acc[t] = dot_u8s8(acc[t], hi, pair_x(xb + 4, xb + 12));
            }
        }
    }
    for (int t = 0; t < MR; t++)
        isum[t] = _mm256_add_epi32(_mm512_castsi512_si256(acc[t]), _mm512_extracti64x4_epi64(acc[t], 1));
}
#else
static inline __attribute__((always_inline)) void block_sums(
    const int MR, const int bits, const int8_t *xq, int64_t K, int64_t m0, int64_t b, const uint8_t *wb,
    __m256i *isum) {
    const __m256i ones = _mm256_set1_epi16(1);
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
        const __m256i low = _mm256_set1_epi8(0x0f);
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
}
#endif

/* One tile (8 output rows) against rows m0 .. m0 + MR of x; writes y[m, n0 .. n0 + 8). MR is a
 * constant at each call site, so the loops unroll and the accumulators stay in registers. */
static inline __attribute__((always_inline)) void tile_vector(
    const int MR, const int bits, const int8_t *xq, const float *xs, const int32_t *xsum, int64_t K, int64_t m0,
    const uint8_t *w, const void *ws, int64_t tile, float *y, int64_t N, const float *bias) {
    const int64_t blocks = K / QK;
    __m256 acc[M_TILE];
    for (int t = 0; t < MR; t++) acc[t] = _mm256_setzero_ps();
    const int64_t block_bytes = bits == 8 ? ROWS * QK : ROWS * QK / 2;
    for (int64_t b = 0; b < blocks; b++) {
        const uint8_t *wb = w + (tile * blocks + b) * block_bytes;
        for (int64_t off = 0; off < block_bytes; off += 64) _mm_prefetch((const char *)wb + Q_PREFETCH + off, _MM_HINT_T0);
        __m256i isum[M_TILE];
        block_sums(MR, bits, xq, K, m0, b, wb, isum);
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
        case 4: tile_vector(4, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 3: tile_vector(3, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 2: tile_vector(2, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        default: tile_vector(1, 8, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        }
    } else {
        switch (mt) {
        case 4: tile_vector(4, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 3: tile_vector(3, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        case 2: tile_vector(2, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
        default: tile_vector(1, 4, xq, xs, xsum, K, m0, w, ws, tile, y, N, bias); break;
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
