/* bfloat16-weight matmul for decoding (engine/linear.py `Linear`): with native bf16 dot products
 * (AVX512-BF16) where the CPU has them, else bf16 widened to float32 in registers (AVX2), where
 * torch's bf16 GEMV reaches about half the memory bandwidth. Built with the rest of the library by
 * exoctl/engine/qkernel.py. */
#include "exoctl_kernels.h"

/* y[M, N] = x[M, K] @ W[N, K]^T + b, W bfloat16 in the checkpoint's own row-major layout (no
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
#ifndef BF_PREFETCH
#define BF_PREFETCH 512 /* elements: 1 KB ahead */
#endif

#ifndef EXO_BF16
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
#endif

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

#ifdef EXO_BF16
/* Native bf16 maths (AVX512-BF16): vdpbf16ps multiplies 32 bf16 pairs and adds each pair's two
 * products into one float32 lane, so the weight row is used as it lies and x is rounded to bf16
 * once per call (as llama.cpp's BF16 dot product does): 64 bytes of weights per instruction, where
 * widening takes a shift or a mask and an FMA per 16. Sums stay float32. */
static inline __m512bh as_bh(__m512i v) {
    __m512bh r;
    memcpy(&r, &v, sizeof r);
    return r;
}

static inline float hsum16(__m512 v) {
    float lanes[16], s = 0.0f;
    _mm512_storeu_ps(lanes, v);
    for (int i = 0; i < 16; i++) s += lanes[i];
    return s;
}

/* Row n of W against rows m0 .. m0 + mr of xb (bf16); two accumulators per row of x (64 of K a
 * step) hide vdpbf16ps's latency. */
static inline __attribute__((always_inline)) void bf16_row_native(
    const int mr, const uint16_t *xb, int64_t K, int64_t m0, const uint16_t *wrow, float *y, int64_t N, int64_t n) {
    __m512 acc[BF_MR][2];
    for (int t = 0; t < mr; t++) acc[t][0] = acc[t][1] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        _mm_prefetch((const char *)(wrow + k + BF_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(wrow + k + BF_PREFETCH + 32), _MM_HINT_T0);
        const __m512bh w0 = as_bh(_mm512_loadu_si512((const void *)(wrow + k)));
        const __m512bh w1 = as_bh(_mm512_loadu_si512((const void *)(wrow + k + 32)));
        for (int t = 0; t < mr; t++) {
            const uint16_t *xr = xb + (m0 + t) * K + k;
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, as_bh(_mm512_loadu_si512((const void *)xr)));
            acc[t][1] = _mm512_dpbf16_ps(acc[t][1], w1, as_bh(_mm512_loadu_si512((const void *)(xr + 32))));
        }
    }
    for (; k + 32 <= K; k += 32) {
        const __m512bh w0 = as_bh(_mm512_loadu_si512((const void *)(wrow + k)));
        for (int t = 0; t < mr; t++)
            acc[t][0] = _mm512_dpbf16_ps(acc[t][0], w0, as_bh(_mm512_loadu_si512((const void *)(xb + (m0 + t) * K + k))));
    }
    for (int t = 0; t < mr; t++) {
        float sum = hsum16(_mm512_add_ps(acc[t][0], acc[t][1]));
        for (int64_t j = k; j < K; j++) sum += bf16_to_float(wrow[j]) * bf16_to_float(xb[(m0 + t) * K + j]);
        y[(m0 + t) * N + n] = sum;
    }
}
#endif

#ifdef EXO_BF16
typedef uint16_t x_elem; /* vdpbf16ps reads x as bf16, in order */
#define ROW bf16_row_native
#else
typedef float x_elem; /* widening reads x as float32, each 16 reordered (deinterleave) */
#define ROW bf16_row
#endif

/* x_bf16, y_bf16: whether x and y are bfloat16 (else float32). Returns 0, or -1 if out of memory. */
int bf16_linear(const void *x, int x_bf16, int64_t M, int64_t K, const uint16_t *w, const float *bias, void *y,
                int y_bf16, int64_t N, int threads) {
#ifdef EXO_BF16
    const size_t x_room = x_bf16 ? 0 : (size_t)(M * K); /* float32 x rounded to bf16 once */
#else
    const size_t x_room = 2 * (size_t)(M * K); /* x widened, then reordered */
#endif
    x_elem *room = x_room ? (x_elem *)malloc(x_room * sizeof(x_elem)) : NULL;
    float *yf = y_bf16 ? (float *)malloc((size_t)(M * N) * sizeof(float)) : (float *)y; /* the sums */
    if ((x_room && !room) || !yf) {
        free(room);
        if (y_bf16) free(yf);
        return -1;
    }
#ifdef EXO_BF16
    for (int64_t i = 0; room && i < M * K; i++) room[i] = float_to_bf16(((const float *)x)[i]);
    const x_elem *xs = room ? room : (const x_elem *)x;
#else
    for (int64_t i = 0; i < M * K; i++) room[i] = x_bf16 ? bf16_to_float(((const uint16_t *)x)[i]) : ((const float *)x)[i];
    x_elem *xs = room + M * K;
    deinterleave(room, xs, M, K);
#endif
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const uint16_t *wrow = w + n * K;
        int64_t m0 = 0;
        for (; m0 + BF_MR <= M; m0 += BF_MR) ROW(BF_MR, xs, K, m0, wrow, yf, N, n);
        if (m0 < M) ROW(1, xs, K, m0, wrow, yf, N, n);
    }
    for (int64_t m = 0; m < M; m++)
        for (int64_t n = 0; n < N; n++) {
            const float v = yf[m * N + n] + (bias ? bias[n] : 0.0f);
            if (y_bf16) ((uint16_t *)y)[m * N + n] = float_to_bf16(v);
            else yf[m * N + n] = v;
        }
    free(room);
    if (y_bf16) free(yf);
    return 0;
}

/* dst[n] = float(src[n]): a bf16 weight widened for one prefill chunk's float32 GEMM. */
void bf16_widen(const uint16_t *src, float *dst, int64_t n, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; i++) dst[i] = bf16_to_float(src[i]);
}
