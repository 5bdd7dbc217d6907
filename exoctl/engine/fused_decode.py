"""A decoder layer's decode step as one C call (kernels/layer_decode.c), for the layers whose
every piece the library computes: dense MLP, int8/int4 weights, or bf16/float32 weights on the
kernel's path, no tensor split (whose all-reduces sit inside the layer).

Why: a decode step of a small model is mostly the interpreter and torch around small arithmetic.
SmolLM2-135M's layer is 2 MB of int4 weights, read in about 90 us, and a dozen Python-level calls
around it cost as much again. The C layer runs the same library functions with the roundings the
Python layer makes, in its order, so either path gives the same bits (tests/test_fused_decode.py).
"""

from __future__ import annotations

import ctypes
from typing import TYPE_CHECKING

import torch

from exoctl.engine import kernel_calls
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.linear import AnyLinear, QuantLinear

if TYPE_CHECKING:
    from exoctl.engine.layers import DecoderLayer

# kinds of kernels/exoctl_kernels.h's exo_linear
QUANT, BF16, F32 = 1, 2, 3
MAX_ROWS = kernel_calls.KERNEL_ROWS  # sequences per step: the f32 kernel's and the steps' limit


class ExoLinear(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int32),
        ("bits", ctypes.c_int32),
        ("n", ctypes.c_int64),
        ("k", ctypes.c_int64),
        ("w", ctypes.c_void_p),
        ("ws", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
    ]


class ExoLayer(ctypes.Structure):
    _fields_ = [
        ("input_norm", ctypes.c_void_p),
        ("post_norm", ctypes.c_void_p),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
        ("bf16", ctypes.c_int32),
        ("hidden", ctypes.c_int64),
        ("heads", ctypes.c_int64),
        ("kv_heads", ctypes.c_int64),
        ("head_dim", ctypes.c_int64),
        ("intermediate", ctypes.c_int64),
        ("qkv", ExoLinear),
        ("o", ExoLinear),
        ("gate_up", ExoLinear),
        ("down", ExoLinear),
    ]


def _describe(linear: AnyLinear) -> tuple[ExoLinear, tuple[torch.Tensor | None, ...]] | None:
    """The C description of `linear` and the tensors it points into, or None where the C layer
    does not compute it as the Python one does (oneDNN's prepacked weights, torch's bf16 GEMM)."""
    if isinstance(linear, QuantLinear):
        bias = linear.bias
        described = ExoLinear(QUANT, linear.bits, linear.out_features, linear.in_features)
        described.w, described.ws = linear.data.data_ptr(), linear.scales.data_ptr()
        keep: tuple[torch.Tensor | None, ...] = (linear.data, linear.scales, bias)
    elif (linear.dtype is torch.bfloat16 and linear.kernel is not None) or (
        linear.dtype is torch.float32 and linear.small is not None
    ):
        # row-major weights on the library's own path, the bias as it takes it (float32)
        kind = BF16 if linear.dtype is torch.bfloat16 else F32
        described = ExoLinear(kind, 0, linear.out_features, linear.in_features)
        described.w, bias = linear.weight.data_ptr(), linear.bias32
        keep = (linear.weight, bias)
    else:
        return None
    described.bias = None if bias is None else bias.data_ptr()
    return described, keep


class FusedDecode:
    """One decoder layer's decode step in one C call; `build` says whether the layer has one."""

    def __init__(
        self,
        lib: ctypes.CDLL,
        layer: ExoLayer,
        index: int,
        dtype: torch.dtype,
        keep: list[torch.Tensor | None],
    ) -> None:
        self.function = lib.layer_decode
        self.layer = layer
        self.pointer = ctypes.byref(layer)
        self.index = index  # the layer's index in the caches
        self.dtype = dtype
        self.keep = keep  # every pointer above stays valid while this object lives

    @classmethod
    def build(cls, block: DecoderLayer) -> FusedDecode | None:
        from exoctl.engine.layers import GatedMLP

        lib = kernel_calls.optional_library()
        attention, mlp = block.attention, block.mlp
        norm_in, norm_post = block.input_norm.weight, block.post_norm.weight
        dtype = norm_in.dtype
        if lib is None or not isinstance(mlp, GatedMLP) or dtype not in kernel_calls.KERNEL_DTYPES:
            return None
        if norm_post.dtype is not dtype or block.input_norm.eps != block.post_norm.eps:
            return None
        parts = [_describe(x) for x in (attention.qkv, attention.o_proj, mlp.gate_up, mlp.down)]
        if any(part is None for part in parts):
            return None
        described = [part for part in parts if part is not None]
        layer = ExoLayer(
            norm_in.data_ptr(),
            norm_post.data_ptr(),
            block.input_norm.eps,
            attention.head_dim**-0.5,
            int(dtype is torch.bfloat16),
            norm_in.shape[0],
            attention.num_heads,
            attention.num_kv_heads,
            attention.head_dim,
            mlp.intermediate,
            *(d for d, _ in described),
        )
        keep: list[torch.Tensor | None] = [norm_in, norm_post]  # RMSNorm keeps them contiguous
        for _, tensors in described:
            keep += tensors
        return cls(lib, layer, attention.layer, dtype, keep)

    def takes(self, h: torch.Tensor, cos: torch.Tensor, caches: list[KVCache]) -> bool:
        """Whether this step is one the C layer runs: each sequence one new position, at most
        MAX_ROWS of them, all in the layer's dtype."""
        batch, steps, _ = h.shape
        return (
            steps == 1
            and batch <= MAX_ROWS
            and h.dtype is self.dtype
            and cos.dtype is self.dtype
            and caches[0].dtype is self.dtype
            and h.is_contiguous()
            and cos.is_contiguous()
        )

    def __call__(
        self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, caches: list[KVCache]
    ) -> torch.Tensor:
        """h [B, 1, D] -> the layer's output [B, 1, D]; each cache gets the step's keys and values."""
        batch = h.shape[0]
        slots = [cache.slot(self.index, 1) for cache in caches]
        pointers = ctypes.c_void_p * batch
        counts = ctypes.c_int64 * batch
        out = torch.empty_like(h)
        status = self.function(
            self.pointer,
            h.data_ptr(),
            out.data_ptr(),
            batch,
            cos.data_ptr(),
            sin.data_ptr(),
            pointers(*(k.data_ptr() for k, _, _ in slots)),
            pointers(*(v.data_ptr() for _, v, _ in slots)),
            counts(*(k.shape[1] for k, _, _ in slots)),
            counts(*(past for _, _, past in slots)),
            torch.get_num_threads(),
        )
        if status != 0:
            raise MemoryError(f"no room for a decode step of {batch} sequences")
        return out
