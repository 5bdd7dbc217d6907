"""Linear layers: y = x @ W.T + b with W in float (`Linear`: oneDNN-prepacked where the CPU allows,
else the node's bf16 kernel) or int8/int4 (`QuantLinear`: the node's quantized kernel).

The calls into C go through `kernel_calls`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exoctl.engine import kernel_calls
from exoctl.engine.quant import QuantizedWeight, pack_tiles, unpack_tiles


class Linear:
    """y = x @ W.T + b with W [out, in], prepacked for oneDNN where the CPU allows; bfloat16
    weights go through the node's own kernel (`bf16_kernel`) in decode steps."""

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
        self.kernel = kernel_calls.bf16_kernel() if weight.dtype is torch.bfloat16 else None
        # prompts: oneDNN's bf16 GEMM where the CPU multiplies bf16 natively (AMX or AVX512-BF16),
        # else float32 GEMM on widened weights (`_bf16`)
        self.native_gemm = kernel_calls.cpu_has_native_bf16()
        if partial and self.kernel is None and weight.dtype is torch.bfloat16:
            # torch's bf16 GEMM can only write bf16: a partial sum goes through the kernel, which
            # writes float32 (oneDNN's is faster where bf16 is native, but rounds each part)
            self.kernel = kernel_calls.optional_library()
        self.packed = self.kernel is None and kernel_calls.packed_linear_available(weight.dtype)
        self.bias32 = None
        if self.kernel is not None:
            weight = weight.contiguous()
            self.bias32 = None if bias is None else bias.float().contiguous()
        # float32: steps of at most KERNEL_ROWS rows go through the node's kernel, which reads the
        # plain row-major weight (oneDNN's prepacked copy stays for prompts: two copies would
        # double the bytes, so the kernel path keeps the plain one and prompts use F.linear)
        self.small = kernel_calls.f32_kernel() if weight.dtype is torch.float32 else None
        if self.small is not None:
            self.packed = False
            weight = weight.contiguous()
            self.bias32 = None if bias is None else bias.contiguous()
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
        if self.small is not None:
            rows = x.numel() // self.in_features
            if 0 < rows <= kernel_calls.KERNEL_ROWS:
                flat = x if x.is_contiguous() else x.contiguous()
                out = torch.empty((*x.shape[:-1], self.out_features))
                kernel_calls.f32_linear(self.small, flat, rows, self.weight, self.bias32, out)
                return out
        if self.packed:
            return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _bf16(self, x: torch.Tensor) -> torch.Tensor:
        assert self.kernel is not None
        rows = x.numel() // self.in_features
        if x.dtype not in kernel_calls.KERNEL_DTYPES or not x.is_contiguous():
            x = x.float().contiguous()
        if rows == 0:
            return torch.empty((*x.shape[:-1], self.out_features), dtype=x.dtype)
        if rows > self.GEMV_ROWS and self.native_gemm and not self.keep_float32:
            # A prompt where bf16 is native: oneDNN's GEMM (a partial sum stays on the float32
            # path below, which does not round it)
            bias = None if self.bias is None else self.bias.bfloat16()
            return F.linear(x.bfloat16(), self.weight, bias).to(x.dtype)
        if rows > self.GEMV_ROWS:
            # A prompt: float32 GEMM on the weight widened a block of rows at a time, so the
            # float32 copy never outgrows one block.
            flat = x.reshape(rows, self.in_features).float()
            out = torch.empty(rows, self.out_features)
            for start in range(0, self.out_features, self.WIDEN_ROWS):
                stop = min(start + self.WIDEN_ROWS, self.out_features)
                block = kernel_calls.widen_rows(self.kernel, self.weight, start, stop)
                bias = None if self.bias32 is None else self.bias32[start:stop]
                out[:, start:stop] = F.linear(flat, block, bias)
            out = out.view(*x.shape[:-1], self.out_features)
            return out if self.keep_float32 else out.to(x.dtype)
        out_dtype = torch.float32 if self.keep_float32 else x.dtype
        out = torch.empty((*x.shape[:-1], self.out_features), dtype=out_dtype)
        kernel_calls.bf16_linear(self.kernel, x, rows, self.weight, self.bias32, out)
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
        self._call = kernel_calls.QuantCall(self.data, self.scales, self.bias, self.bits)

    def weight(self) -> QuantizedWeight:
        return unpack_tiles(self.data, self.scales, self.bits, (self.out_features, self.in_features))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        flat = x if x.dtype is torch.float32 and x.is_contiguous() else x.float().contiguous()
        out = torch.empty((*x.shape[:-1], self.out_features))
        self._call(flat, flat.numel() // self.in_features, out)
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
