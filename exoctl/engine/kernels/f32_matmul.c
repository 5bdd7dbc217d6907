/* float32-weight matmul for a few rows of x (decode steps, speculative decoding's verification
 * steps), where oneDNN's and MKL's sgemm read the weights at about half the memory bandwidth as
 * soon as x has two rows (measured, AVX2 EPYC, 2 threads, an 8192 x 2048 matrix: 3.3 ms for one
 * row, 7.6 ms for two, 14.7 ms for five): a verification step of k + 1 positions must cost about
 * what a step of one does, since both read every weight once.
 * Built with the rest of the library by exoctl/engine/qkernel.py. */
#include "exoctl_kernels.h"

#define F_MR 2
#ifndef F_PREFETCH
#define F_PREFETCH 256 /* elements: 1 KB ahead */
#endif

/* Row n of W against rows m0 .. m0 + mr of x (mr <= F_MR, a constant at the call sites). Each
 * row of x has its own four accumulators (32 of K a step), summed in the same order whatever the
 * number of rows: y[m, n] is the same bits in a step of one row as in a step of sixteen, so a
 * verification step's logits are the plain step's. */
static inline __attribute__((always_inline)) void f32_row(
    const int mr, const float *x, int64_t K, int64_t m0, const float *wrow, float *y, int64_t N, int64_t n) {
    float sums[F_MR];
    int64_t k = 0;
#ifdef FAST
    __m256 acc[F_MR][4];
    for (int t = 0; t < mr; t++)
        for (int j = 0; j < 4; j++) acc[t][j] = _mm256_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        _mm_prefetch((const char *)(wrow + k + F_PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(wrow + k + F_PREFETCH + 16), _MM_HINT_T0);
        const __m256 w0 = _mm256_loadu_ps(wrow + k);
        const __m256 w1 = _mm256_loadu_ps(wrow + k + 8);
        const __m256 w2 = _mm256_loadu_ps(wrow + k + 16);
        const __m256 w3 = _mm256_loadu_ps(wrow + k + 24);
        for (int t = 0; t < mr; t++) {
            const float *xr = x + (m0 + t) * K + k;
            acc[t][0] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), acc[t][0]);
            acc[t][1] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), acc[t][1]);
            acc[t][2] = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xr + 16), acc[t][2]);
            acc[t][3] = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xr + 24), acc[t][3]);
        }
    }
    for (int t = 0; t < mr; t++) {
        const __m256 v = _mm256_add_ps(_mm256_add_ps(acc[t][0], acc[t][1]), _mm256_add_ps(acc[t][2], acc[t][3]));
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        sums[t] = _mm_cvtss_f32(s);
    }
#else
    for (int t = 0; t < mr; t++) sums[t] = 0.0f;
#endif
    for (; k < K; k++)
        for (int t = 0; t < mr; t++) sums[t] += wrow[k] * x[(m0 + t) * K + k];
    for (int t = 0; t < mr; t++) y[(m0 + t) * N + n] = sums[t];
}

/* y[M, N] = x[M, K] @ W[N, K]^T + b, all float32, W row-major as the checkpoint holds it; b may
 * be NULL. Each weight row is read from memory once, front to back; rows of x go two at a time
 * against it, the next pair reading it again from cache. */
void f32_linear(const float *x, int64_t M, int64_t K, const float *w, const float *bias, float *y, int64_t N,
                int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t n = 0; n < N; n++) {
        const float *wrow = w + n * K;
        int64_t m0 = 0;
        for (; m0 + F_MR <= M; m0 += F_MR) f32_row(F_MR, x, K, m0, wrow, y, N, n);
        if (m0 < M) f32_row(1, x, K, m0, wrow, y, N, n);
    }
    if (bias)
        for (int64_t m = 0; m < M; m++)
            for (int64_t n = 0; n < N; n++) y[m * N + n] += bias[n];
}
