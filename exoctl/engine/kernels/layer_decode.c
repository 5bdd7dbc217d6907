/* A whole decoder layer's decode step in one C call (engine/fused_decode.py): RMSNorm, the q/k/v
 * projection, rope, the cache's append and attention per sequence, the output projection and
 * residual add, RMSNorm, gate/up, SiLU-and-multiply, down and residual add. The Python layer makes
 * a dozen calls of this (each a few microseconds of interpreter and torch around its arithmetic),
 * which for a 135M model (576 wide, 2 MB of int4 weights a layer) cost as much as the arithmetic.
 * Each step is the library's own function with the roundings the Python path makes, in its order:
 * the result is the Python path's, to the bit. Built with the rest by exoctl/engine/qkernel.py. */
#include "exoctl_kernels.h"

static inline size_t act_size(int bf16) { return bf16 ? 2 : 4; }

/* y [M, N] (activation dtype) = x [M, K] (activation dtype) @ W^T + b, as engine/linear.py does:
 * int8/int4 and float32 weights take x in float32 and their output is rounded to the activation
 * dtype; bf16 weights take x and write y in it. xf, yf: float32 room for M * K and M * N. */
static int linear_apply(const exo_linear *l, const void *x, int64_t M, void *y, int bf16, float *xf, float *yf,
                        int threads) {
    if (l->kind == EXO_LINEAR_BF16)
        return bf16_linear(x, bf16, M, l->k, (const uint16_t *)l->w, l->bias, y, bf16, l->n, threads);
    const float *xin = (const float *)x;
    if (bf16) {
        for (int64_t i = 0; i < M * l->k; i++) xf[i] = load_any(x, i, 1);
        xin = xf;
    }
    float *yout = bf16 ? yf : (float *)y;
    if (l->kind == EXO_LINEAR_QUANT) {
        if (qmm_linear(xin, M, l->k, l->w, l->ws, l->bias, yout, l->n, l->bits, threads) != 0) return -1;
    } else {
        f32_linear(xin, M, l->k, (const float *)l->w, l->bias, yout, l->n, threads);
    }
    if (bf16)
        for (int64_t i = 0; i < M * l->n; i++) store_any(y, i, yout[i], 1);
    return 0;
}

/* out = h + part, rounded to the activation dtype as torch's add rounds */
static void residual(const void *h, const void *part, void *out, int64_t n, int bf16) {
    for (int64_t i = 0; i < n; i++) store_any(out, i, load_any(h, i, bf16) + load_any(part, i, bf16), bf16);
}

static int64_t max64(int64_t a, int64_t b) { return a > b ? a : b; }

/* h [B, D] -> out [B, D] (activation dtype: L->bf16); cos, sin [B, head_dim] (each sequence's new
 * position); keys[b], values[b] [KVH, capacity[b], head_dim]: sequence b's cache of this layer,
 * its new position written at past[b]. Returns 0, or -1 if out of memory. */
int layer_decode(const exo_layer *L, const void *h, void *out, int64_t B, const void *cos, const void *sin,
                 void *const *keys, void *const *values, const int64_t *capacity, const int64_t *past,
                 int threads) {
    const int bf16 = L->bf16;
    const size_t item = act_size(bf16);
    const int64_t D = L->hidden, hd = L->head_dim, qkv_n = L->qkv.n, attn_n = L->heads * hd;
    const int64_t widest_in = max64(max64(L->qkv.k, L->o.k), max64(L->gate_up.k, L->down.k));
    const int64_t widest_out = max64(max64(L->qkv.n, L->o.n), max64(L->gate_up.n, L->down.n));
    /* activation-dtype buffers: normed [B, D], qkv [B, qkv_n], attention [B, attn_n], a projection
     * [B, D] (o and down), gate/up [B, 2I], SiLU * up [B, I]; float32: x and y of a projection */
    const int64_t act_elems = B * (D + qkv_n + attn_n + D + L->gate_up.n + L->intermediate);
    char *room = (char *)malloc((size_t)act_elems * item + (size_t)(B * (widest_in + widest_out)) * sizeof(float));
    if (!room) return -1;
    char *normed = room, *qkv = normed + B * D * item, *attn = qkv + B * qkv_n * item;
    char *proj = attn + B * attn_n * item, *gu = proj + B * D * item, *act = gu + B * L->gate_up.n * item;
    float *xf = (float *)(act + B * L->intermediate * item), *yf = xf + B * widest_in;
    int status = 0;

    rms_norm(h, normed, L->input_norm, B, D, L->eps, bf16, threads);
    status |= linear_apply(&L->qkv, normed, B, qkv, bf16, xf, yf, threads);
    for (int64_t b = 0; b < B && status == 0; b++)
        status |= attend_decode(qkv + b * qkv_n * item, (const char *)cos + b * hd * item,
                                (const char *)sin + b * hd * item, keys[b], values[b], capacity[b], past[b],
                                L->heads, L->kv_heads, hd, L->scale, attn + b * attn_n * item, bf16, threads);
    status |= linear_apply(&L->o, attn, B, proj, bf16, xf, yf, threads);
    residual(h, proj, out, B * D, bf16);
    rms_norm(out, normed, L->post_norm, B, D, L->eps, bf16, threads);
    status |= linear_apply(&L->gate_up, normed, B, gu, bf16, xf, yf, threads);
    silu_mul(gu, act, B, L->intermediate, bf16, threads);
    status |= linear_apply(&L->down, act, B, proj, bf16, xf, yf, threads);
    residual(out, proj, out, B * D, bf16);
    free(room);
    return status == 0 ? 0 : -1;
}
