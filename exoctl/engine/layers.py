"""The building blocks every architecture shares: linear, RMSNorm, rotary embedding, attention.

Plain classes holding tensors rather than `nn.Module`s: a decode step of a small model is
dominated by per-call Python overhead, and module hooks cost a few microseconds per call.
"""

from __future__ import annotations

import ctypes
import functools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from exoctl import cpu_policy
from exoctl.engine import qkernel
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.quant import QuantizedWeight, pack_tiles, unpack_tiles

if TYPE_CHECKING:
    from exoctl.engine.mixtral import SparseMoE


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products in hardware (torch exposes the probes privately)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def bf16_activations() -> bool:
    """Whether `auto`, int8 and int4 compute in bfloat16: EXOCTL_ACTIVATIONS, else the CPU."""
    return cpu_policy.bf16_activations(cpu_has_native_bf16())


def bf16_kernel() -> ctypes.CDLL | None:
    """The node's own bfloat16 kernel where torch's bf16 matmul is slow, else None.

    Without native bf16 maths (AVX2 CPUs) torch's bf16 GEMV reads weights at about half the
    memory bandwidth and costs 6-8x one row at 8 rows; the kernel widens bf16 to float32 in
    registers (1.1B shape's gate/up, 2 threads: 3.1 ms a row against torch's 5.2, 10 ms for 8
    rows against 33). A node without a C compiler keeps torch's path: slower, still right.
    """
    by_kernel = cpu_policy.bf16_matmul_by_kernel(cpu_has_native_bf16())  # EXOCTL_BF16_MATMUL forces it
    return qkernel.optional_library() if by_kernel else None


KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the library's C code reads and writes
# Rows up to which the C per-layer steps beat torch's: they save per-call overhead, which is what a
# decode step of a batch pays; a prompt's rows are better served by torch's vectorised exp and loops.
KERNEL_ROWS = 16


def step_kernel(rows: int, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library for a C per-layer step over `rows` rows of `tensors` (one dtype, contiguous),
    or None where torch's step runs."""
    dtype = tensors[0].dtype
    if rows > KERNEL_ROWS or dtype not in KERNEL_DTYPES:
        return None
    if any(t.dtype is not dtype or not t.is_contiguous() for t in tensors):
        return None
    return qkernel.optional_library()


_widened = torch.empty(0)  # scratch for bf16 weights widened to float32, reused by every Linear


def _widen_rows(weight: torch.Tensor, start: int, stop: int, kernel: ctypes.CDLL) -> torch.Tensor:
    """weight[start:stop] as float32 [stop - start, K], in a buffer the next call overwrites."""
    global _widened
    count = (stop - start) * weight.shape[1]
    if _widened.numel() < count:
        _widened = torch.empty(count)
    out = _widened[:count].view(stop - start, weight.shape[1])
    kernel.bf16_widen(weight[start].data_ptr(), out.data_ptr(), count, torch.get_num_threads())
    return out


@functools.cache
def packed_linear_available(dtype: torch.dtype) -> bool:
    """Whether oneDNN can prepack weights of `dtype` on this CPU.

    Prepacked weights decode 2-4x faster than `F.linear` on the 1B-sized matrices measured on
    an AVX2 machine (MKL's GEMV is far from the memory-bandwidth limit there), and they make a
    batch of 8 rows cost about 1.8x one row rather than 3-4x.
    """
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(8, 8, dtype=dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        out = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 8, dtype=dtype), packed, None, "none", [], "")
        return bool(torch.allclose(out.float(), torch.full((1, 8), 8.0)))
    except (RuntimeError, AttributeError):
        return False


class Linear:
    """y = x @ W.T + b with W [out, in], prepacked for oneDNN where the CPU allows; bfloat16
    weights on a CPU without native bf16 go through the node's own kernel (`bf16_kernel`)."""

    # Rows of x up to which the bf16 kernel beats widening the weight for float32 GEMM (measured
    # on the 1.1B shape's matrices, AVX2, 2 threads); WIDEN_ROWS weight rows are widened at a time.
    GEMV_ROWS = 48
    WIDEN_ROWS = 1024

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, partial: bool = False) -> None:
        self.out_features, self.in_features = weight.shape
        self.nbytes = weight.numel() * weight.element_size() + (
            0 if bias is None else bias.numel() * bias.element_size()
        )
        self.bias = bias
        self.dtype = weight.dtype
        self.kernel = bf16_kernel() if weight.dtype is torch.bfloat16 else None
        if partial and self.kernel is None and weight.dtype is torch.bfloat16:
            # torch's bf16 GEMM can only write bf16: a partial sum goes through the kernel, which
            # writes float32 (oneDNN's is faster where bf16 is native, but rounds each part)
            self.kernel = qkernel.optional_library()
        self.packed = self.kernel is None and packed_linear_available(weight.dtype)
        self.bias32 = None
        if self.kernel is not None:
            weight = weight.contiguous()
            self.bias32 = None if bias is None else bias.float().contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 1) if self.packed else weight
        # A tensor rank's o_proj/down_proj output is a partial sum: kept in float32 where the path
        # computes in float32 (the kernel, a float32 matrix), so ranks round once, after the sum.
        self.keep_float32 = partial

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel is not None:
            return self._bf16(x)
        if x.dtype is not self.dtype:
            # a float32 matrix in a bfloat16 model (a quantized model's matrix held in float):
            # computed in float32, handed on in float32 as a tensor rank's partial, else rounded
            out = self._torch(x.to(self.dtype))
            return out if self.keep_float32 else out.to(x.dtype)
        return self._torch(x)

    def _torch(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _bf16(self, x: torch.Tensor) -> torch.Tensor:
        assert self.kernel is not None
        rows = x.numel() // self.in_features
        if x.dtype not in KERNEL_DTYPES or not x.is_contiguous():
            x = x.float().contiguous()
        if rows == 0:
            return torch.empty((*x.shape[:-1], self.out_features), dtype=x.dtype)
        if rows > self.GEMV_ROWS:
            # A prompt: float32 GEMM on the weight widened a block of rows at a time, so the
            # float32 copy never outgrows one block.
            flat = x.reshape(rows, self.in_features).float()
            out = torch.empty(rows, self.out_features)
            for start in range(0, self.out_features, self.WIDEN_ROWS):
                stop = min(start + self.WIDEN_ROWS, self.out_features)
                block = _widen_rows(self.weight, start, stop, self.kernel)
                bias = None if self.bias32 is None else self.bias32[start:stop]
                out[:, start:stop] = F.linear(flat, block, bias)
            out = out.view(*x.shape[:-1], self.out_features)
            return out if self.keep_float32 else out.to(x.dtype)
        out_dtype = torch.float32 if self.keep_float32 else x.dtype
        out = torch.empty((*x.shape[:-1], self.out_features), dtype=out_dtype)
        status = self.kernel.bf16_linear(
            x.data_ptr(),
            int(x.dtype is torch.bfloat16),
            rows,
            self.in_features,
            self.weight.data_ptr(),
            0 if self.bias32 is None else self.bias32.data_ptr(),
            out.data_ptr(),
            int(out_dtype is torch.bfloat16),
            self.out_features,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"the bfloat16 kernel could not allocate room for {x.shape} activations")
        return out


class QuantLinear:
    """y = x @ dequant(W).T + b with W int8 or int4 (engine.quant), by the node's own kernel.

    The weight is kept only in the kernel's tiled layout (`pack_tiles`); `weight()` unpacks it.
    The kernel reads x as float32 and writes float32; bfloat16 activations are converted on the
    way in and out (a few kB per token, against megabytes of weights). Every torch call here
    costs microseconds, and a small model makes a hundred of these calls a token: the wrapper
    does no more than allocate the output.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None = None) -> None:
        self.out_features, self.in_features = weight.shape
        self.bits = weight.bits
        self.data, self.scales = pack_tiles(weight)
        self.bias = None if bias is None else bias.float().contiguous()
        self.nbytes = self.data.numel() + self.scales.numel() * self.scales.element_size()
        if bias is not None:
            self.nbytes += bias.numel() * bias.element_size()
        self.keep_float32 = False  # a tensor rank's partial sum, rounded after the all-reduce (Linear)
        self._kernel = qkernel.library().qmm_linear
        self._args = (
            self.data.data_ptr(),
            self.scales.data_ptr(),
            0 if self.bias is None else self.bias.data_ptr(),
        )

    def weight(self) -> QuantizedWeight:
        return unpack_tiles(self.data, self.scales, self.bits, (self.out_features, self.in_features))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()
        out = torch.empty((*x.shape[:-1], self.out_features))
        w, s, b = self._args
        status = self._kernel(
            flat.data_ptr(),
            flat.numel() // self.in_features,
            self.in_features,
            w,
            s,
            b,
            out.data_ptr(),
            self.out_features,
            self.bits,
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"the quantized kernel could not allocate room for {x.shape} activations")
        return out if x.dtype is torch.float32 or self.keep_float32 else out.to(x.dtype)


AnyLinear = Linear | QuantLinear


def make_linear(
    weight: torch.Tensor | QuantizedWeight, bias: torch.Tensor | None = None, partial: bool = False
) -> AnyLinear:
    """`partial`: a tensor rank's row-split projection (o_proj, down_proj), whose output is a
    partial sum: handed on in float32 and rounded once, after the all-reduce (DecoderLayer).
    Partials rounded to bfloat16 before the sum lose about 2^-9 of each part: a 4-rank int4
    split's greedy tokens differed from the whole model's, and a 2-rank bfloat16 split's logits
    by 2.2% (benchmarks/tensor_partials.py)."""
    if isinstance(weight, QuantizedWeight):
        linear: AnyLinear = QuantLinear(weight, bias)
        linear.keep_float32 = partial  # the kernel computes in float32 anyway
        return linear
    return Linear(weight, bias, partial)


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight.contiguous()
        self.eps = eps
        self.shape = (weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        size = self.shape[0]
        kernel = step_kernel(x.numel() // size, x, self.weight)
        if kernel is not None:
            out = torch.empty_like(x)
            kernel.rms_norm(
                x.data_ptr(),
                out.data_ptr(),
                self.weight.data_ptr(),
                x.numel() // size,
                size,
                self.eps,
                int(x.dtype is torch.bfloat16),
                torch.get_num_threads(),
            )
            return out
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.shape, self.weight, self.eps)
        # As transformers does: normalise in float32, round to the runtime dtype, then scale.
        return F.rms_norm(x.float(), self.shape, None, self.eps).to(x.dtype) * self.weight


def rope_inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2], with Llama 3.1's frequency-dependent scaling if asked."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq
    if scaling.get("rope_type") == "freq_factors":
        # a GGUF's rope_freqs tensor: llama.cpp divides each frequency by its factor
        return inv_freq / torch.tensor(scaling["factors"], dtype=torch.float32)
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling.get("low_freq_factor", 1.0))
    high_freq_factor = float(scaling.get("high_freq_factor", 4.0))
    old_context = float(scaling.get("original_max_position_embeddings", 8192))
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class Rotary:
    """cos/sin tables by absolute position, grown on demand."""

    def __init__(
        self, head_dim: int, theta: float, scaling: dict[str, Any] | None, dtype: torch.dtype
    ) -> None:
        self.inv_freq = rope_inv_freq(head_dim, theta, scaling)
        self.dtype = dtype
        self.cos = torch.empty(0, head_dim, dtype=dtype)
        self.sin = torch.empty(0, head_dim, dtype=dtype)

    def _grow(self, length: int) -> None:
        length = max(length, 2 * self.cos.shape[0], 256)
        freqs = torch.arange(length, dtype=torch.float32)[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [L, head_dim]
        self.cos, self.sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)

    def __call__(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] -> cos, sin [B, T, 1, head_dim] (broadcast over heads)."""
        needed = int(positions.max()) + 1
        if needed > self.cos.shape[0]:
            self._grow(needed)
        return self.cos[positions].unsqueeze(2), self.sin[positions].unsqueeze(2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; rotate pairs (i, i + D/2) as transformers' rotate_half does."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention:
    """Grouped-query self-attention with fused q/k/v and a per-sequence KV cache."""

    def __init__(
        self,
        layer: int,
        qkv: AnyLinear,
        o_proj: AnyLinear,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
    ) -> None:
        self.layer = layer
        self.qkv = qkv
        self.o_proj = o_proj
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim

    def __call__(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        batch, steps, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(batch, steps, heads + 2 * kv_heads, self.head_dim)
        # q and k rotated in one go: a decode step of a small model is mostly per-call overhead
        kernel = step_kernel(batch * steps, qkv, cos, sin)
        if kernel is not None:
            kernel.rope(
                qkv.data_ptr(),
                batch * steps,
                qkv.shape[2] * self.head_dim,
                heads + kv_heads,
                self.head_dim,
                cos.data_ptr(),
                sin.data_ptr(),
                int(qkv.dtype is torch.bfloat16),
            )
            qk = qkv
        else:
            qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)
        q, k, v = qk[:, :, :heads], qk[:, :, heads : heads + kv_heads], qkv[:, :, heads + kv_heads :]
        if batch == 1:
            out = self._attend(q[0], k[0], v[0], caches[0])[None]
        else:
            out = torch.empty(batch, steps, heads, self.head_dim, dtype=x.dtype)
            for b, cache in enumerate(caches):
                out[b] = self._attend(q[b], k[b], v[b], cache)
        return self.o_proj(out.reshape(batch, steps, self.q_size))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] of one sequence -> [T, H, D].

        4-D inputs throughout: torch's CPU SDPA takes its fused kernel only for them (a 3-D decode
        step ran the 15-op math path, 3x slower).
        """
        steps = q.shape[0]
        keys, values, past = cache.append(self.layer, k, v)  # [KVH, past + T, D]
        if steps == 1:
            # Query heads sharing a KV head become that head's rows: [1, H, D] -> [1, KVH, G, D],
            # so the cache is read as it is, never repeated, and a single position needs no mask.
            groups = self.num_heads // self.num_kv_heads
            query = q.view(1, self.num_kv_heads, groups, self.head_dim)
            out = F.scaled_dot_product_attention(query, keys[None], values[None])
            return out.view(1, self.num_heads, self.head_dim)
        query = q.permute(1, 0, 2)[None]  # [1, H, T, D]
        if past == 0:
            # A prompt from the start: the fused causal kernel, O(T) memory, no [T, T] mask.
            out = F.scaled_dot_product_attention(
                query, keys[None], values[None], is_causal=True, enable_gqa=True
            )
        else:
            # New positions after cached ones: position past + t sees keys [0, past + t].
            total = past + steps
            allowed = torch.arange(total)[None, :] <= (past + torch.arange(steps))[:, None]  # [T, past+T]
            out = F.scaled_dot_product_attention(
                query, keys[None], values[None], attn_mask=allowed, enable_gqa=True
            )
        return out[0].permute(1, 0, 2)  # [T, H, D]


class GatedMLP:
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, gate_up: AnyLinear, down: AnyLinear) -> None:
        self.gate_up = gate_up
        self.down = down
        self.intermediate = gate_up.out_features // 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        both = self.gate_up(x)
        size = self.intermediate
        kernel = step_kernel(both.numel() // (2 * size), both)
        if kernel is not None:
            act = torch.empty((*both.shape[:-1], size), dtype=both.dtype)
            kernel.silu_mul(
                both.data_ptr(),
                act.data_ptr(),
                both.numel() // (2 * size),
                size,
                int(both.dtype is torch.bfloat16),
                torch.get_num_threads(),
            )
            return self.down(act)
        gate, up = both.split(self.intermediate, dim=-1)
        return self.down(F.silu(gate) * up)


Reduce = Callable[[torch.Tensor], torch.Tensor]


class DecoderLayer:
    """Pre-norm residual block: attention, then the MLP (dense or mixture of experts).

    `reduce` (tensor sharding) sums a rank's partial attention and MLP outputs over the ranks
    before each residual add; the layer itself does not know how the sum travels.
    """

    def __init__(
        self, input_norm: RMSNorm, attention: Attention, post_norm: RMSNorm, mlp: GatedMLP | SparseMoE
    ) -> None:
        self.input_norm = input_norm
        self.attention = attention
        self.post_norm = post_norm
        self.mlp = mlp
        self.reduce: Reduce | None = None

    def __call__(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        reduce = self.reduce
        attended = self.attention(self.input_norm(h), cos, sin, caches)
        h = h + (attended if reduce is None else reduce(attended).to(h.dtype))
        mixed = self.mlp(self.post_norm(h))
        return h + (mixed if reduce is None else reduce(mixed).to(h.dtype))
