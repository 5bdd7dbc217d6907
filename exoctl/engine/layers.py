"""The building blocks every architecture shares: RMSNorm, rotary embedding, attention, SwiGLU, the
decoder layer (the linear layers are in `linear`).

Plain classes holding tensors rather than `nn.Module`s: a decode step of a small model is
dominated by per-call Python overhead, and module hooks cost a few microseconds per call. Every
call into C goes through `kernel_calls`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from exoctl import cpu_policy
from exoctl.engine import kernel_calls
from exoctl.engine.fused_decode import FusedDecode
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.linear import AnyLinear

if TYPE_CHECKING:
    from exoctl.engine.mixtral import SparseMoE


class RMSNorm:
    def __init__(self, weight: torch.Tensor, eps: float) -> None:
        self.weight = weight.contiguous()
        self.eps = eps
        self.shape = (weight.shape[0],)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        kernel = kernel_calls.step_kernel(x.numel() // self.shape[0], x, self.weight)
        if kernel is not None:
            return kernel_calls.rms_norm(kernel, x, self.weight, self.eps)
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


def stacked_causal_mask(past: int, steps: int, groups: int, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of `steps` new positions after `past` cached ones: position past + t sees
    keys [0, past + t]. One row per query row of a KV head's `groups` query heads stacked (the
    layout `Attention` reads a cache in): [G*T, past + T]. The same for every layer of a step."""
    total = past + steps
    allowed = torch.arange(total)[None, :] <= (past + torch.arange(steps))[:, None]  # [T, past+T]
    return torch.zeros(steps, total, dtype=dtype).masked_fill_(~allowed, float("-inf")).repeat(groups, 1)


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
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: list[KVCache],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`mask`: `stacked_causal_mask` of one sequence's new positions after cached ones."""
        batch, steps, _ = x.shape
        heads, kv_heads = self.num_heads, self.num_kv_heads
        qkv = self.qkv(x).view(batch, steps, heads + 2 * kv_heads, self.head_dim)
        # q and k rotated in one go: a decode step of a small model is mostly per-call overhead
        kernel = kernel_calls.step_kernel(batch * steps, qkv, cos, sin)
        if kernel is not None and steps == 1 and mask is None and caches[0].dtype is qkv.dtype:
            # a decode step: rope, the cache's append and attention in one C call per sequence
            outs = [
                kernel_calls.attend_decode(kernel, qkv[b], cos[b], sin[b], *cache.slot(self.layer, 1), heads)
                for b, cache in enumerate(caches)
            ]
            return self.o_proj(outs[0] if batch == 1 else torch.cat(outs))
        if kernel is not None:
            kernel_calls.rope(kernel, qkv, heads + kv_heads, cos, sin)  # in place
            qk = qkv
        else:
            qk = apply_rope(qkv[:, :, : heads + kv_heads], cos, sin)
        q, k, v = qk[:, :, :heads], qk[:, :, heads : heads + kv_heads], qkv[:, :, heads + kv_heads :]
        if batch == 1:
            out = self._attend(q[0], k[0], v[0], caches[0], mask)[None]
        else:
            out = torch.empty(batch, steps, heads, self.head_dim, dtype=x.dtype)
            for b, cache in enumerate(caches):
                out[b] = self._attend(q[b], k[b], v[b], cache)
        return self.o_proj(out.reshape(batch, steps, self.q_size))

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        cache: KVCache,
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
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
            # New positions after cached ones (a prompt's later chunk, a turn after a cached
            # prefix): the query heads sharing a KV head are stacked as that head's rows,
            # [1, KVH, G*T, D], so the cache is read as it is rather than repeated per head (23%
            # less time at 138 positions after 1,457 on 2 cores, the same result).
            groups = self.num_heads // self.num_kv_heads
            if mask is None:
                mask = stacked_causal_mask(past, steps, groups, q.dtype)
            stacked = query.reshape(1, self.num_kv_heads, groups * steps, self.head_dim)
            out = F.scaled_dot_product_attention(stacked, keys[None], values[None], attn_mask=mask)
            out = out.view(1, self.num_heads, steps, self.head_dim)
        return out[0].permute(1, 0, 2)  # [T, H, D]


class GatedMLP:
    """SwiGLU: down(silu(gate(x)) * up(x)), with gate and up fused into one matmul."""

    def __init__(self, gate_up: AnyLinear, down: AnyLinear) -> None:
        self.gate_up = gate_up
        self.down = down
        self.intermediate = gate_up.out_features // 2

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        both = self.gate_up(x)
        kernel = kernel_calls.step_kernel(both.numel() // (2 * self.intermediate), both)
        if kernel is not None:
            return self.down(kernel_calls.silu_mul(kernel, both, self.intermediate))
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
        self._fused: FusedDecode | bool | None = False  # False: not built yet (`_decode_layer`)

    def _decode_layer(self) -> FusedDecode | None:
        """The layer's one-call decode step (EXOCTL_DECODE_LAYER), built at the first decode step."""
        if self._fused is False:
            self._fused = FusedDecode.build(self) if cpu_policy.fused_decode() else None
        return self._fused if isinstance(self._fused, FusedDecode) else None

    def __call__(
        self,
        h: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        caches: list[KVCache],
        mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        reduce = self.reduce
        if reduce is None and mask is None and h.shape[1] == 1:
            fused = self._decode_layer()
            if fused is not None and fused.takes(h, cos, caches):
                return fused(h, cos, sin, caches)
        attended = self.attention(self.input_norm(h), cos, sin, caches, mask)
        h = h + (attended if reduce is None else reduce(attended).to(h.dtype))
        mixed = self.mlp(self.post_norm(h))
        return h + (mixed if reduce is None else reduce(mixed).to(h.dtype))
