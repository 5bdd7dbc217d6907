/* A decode step's attention for one sequence in one call (engine/layers.py `Attention`): rope on
 * the new position's q and k, k and v stored in the layer's cache, and each query head's softmax
 * over the cached positions times v. For a small model torch's way is five calls a layer (rope,
 * two cache copies, SDPA at 37 us, views), most of it overhead at a short context. Built with the
 * rest of the library by exoctl/engine/qkernel.py. */
#include "exoctl_kernels.h"

/* q . k over D, k float32 or bf16, q float32: eight partial sums, which the compiler keeps in one
 * vector register (a single running sum is a chain of dependent adds, 4x slower at D = 64) */
static inline float dot_row(const float *q, const void *k, int64_t D, int bf16) {
    float part[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f}, sum = 0.0f;
    int64_t i = 0;
    if (bf16) {
        const uint16_t *kb = (const uint16_t *)k;
        for (; i + 8 <= D; i += 8)
            for (int j = 0; j < 8; j++) part[j] += q[i + j] * bf16_to_float(kb[i + j]);
        for (; i < D; i++) sum += q[i] * bf16_to_float(kb[i]);
    } else {
        const float *kf = (const float *)k;
        for (; i + 8 <= D; i += 8)
            for (int j = 0; j < 8; j++) part[j] += q[i + j] * kf[i + j];
        for (; i < D; i++) sum += q[i] * kf[i];
    }
    return sum + ((part[0] + part[4]) + (part[1] + part[5])) + ((part[2] + part[6]) + (part[3] + part[7]));
}

/*   qkv  [(H + 2 KVH) * D]: the new position's q heads, then k, then v (q and k rotated in place)
 *   cos, sin [D]: the position's
 *   keys, values [KVH, capacity, D]: this layer's cache; position `past` is written
 *   out [H * D]
 * qkv, cos, sin, the cache and out all float32 or all bf16; sums and the softmax in float32, out
 * rounded once. Query head h reads KV head h / (H / KVH). Returns 0, or -1 if out of memory. */
int attend_decode(void *qkv, const void *cos, const void *sin, void *keys, void *values, int64_t capacity,
                  int64_t past, int64_t heads, int64_t kv_heads, int64_t D, float scale, void *out, int bf16,
                  int threads) {
    rope(qkv, 1, 0, heads + kv_heads, D, cos, sin, bf16);
    const size_t item = bf16 ? 2 : 4;
    for (int64_t g = 0; g < kv_heads; g++) {
        memcpy((char *)keys + ((g * capacity + past) * D) * item, (char *)qkv + ((heads + g) * D) * item, D * item);
        memcpy((char *)values + ((g * capacity + past) * D) * item,
               (char *)qkv + ((heads + kv_heads + g) * D) * item, D * item);
    }
    const int64_t n = past + 1, group = heads / kv_heads;
    /* per head: the scores [n] and q and the sum [D] in float32 */
    float *scratch = (float *)malloc((size_t)(heads * (n + 2 * D)) * sizeof(float));
    if (!scratch) return -1;
#pragma omp parallel for num_threads(threads) schedule(static) if (n * heads * D > 32768)
    for (int64_t h = 0; h < heads; h++) {
        float *score = scratch + h * (n + 2 * D), *q = score + n, *acc = q + D;
        const int64_t g = h / group;
        for (int64_t i = 0; i < D; i++) q[i] = load_any(qkv, h * D + i, bf16) * scale;
        float top = -INFINITY;
        for (int64_t j = 0; j < n; j++) {
            score[j] = dot_row(q, (const char *)keys + ((g * capacity + j) * D) * item, D, bf16);
            top = score[j] > top ? score[j] : top;
        }
        float total = 0.0f;
        for (int64_t j = 0; j < n; j++) total += score[j] = expf(score[j] - top);
        for (int64_t i = 0; i < D; i++) acc[i] = 0.0f;
        for (int64_t j = 0; j < n; j++) {
            const float p = score[j];
            if (bf16) {
                const uint16_t *v = (const uint16_t *)values + (g * capacity + j) * D;
                for (int64_t i = 0; i < D; i++) acc[i] += p * bf16_to_float(v[i]);
            } else {
                const float *v = (const float *)values + (g * capacity + j) * D;
                for (int64_t i = 0; i < D; i++) acc[i] += p * v[i];
            }
        }
        const float inv = 1.0f / total;
        for (int64_t i = 0; i < D; i++) store_any(out, h * D + i, acc[i] * inv, bf16);
    }
    free(scratch);
    return 0;
}
