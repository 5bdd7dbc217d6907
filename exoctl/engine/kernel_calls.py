"""The engine room: every call from the model's maths into exoctl's C kernels, as typed functions
on tensors, and the choices of which path runs (each forced by a `cpu_policy` switch).

The maths (`layers`, `linear`) never handles a raw pointer: it asks here whether the C path
takes a step (`step_kernel`, `bf16_kernel`), then calls a wrapper that checks nothing it does
not need to (these run a hundred times a token) and passes the pointers in the order the C
prototypes in kernels/exoctl_kernels.h give them (`qkernel.SIGNATURES`, checked by a test).
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

from exoctl import cpu_policy
from exoctl.engine import qkernel

optional_library = qkernel.optional_library

KERNEL_DTYPES = (torch.float32, torch.bfloat16)  # what the library's C code reads and writes
# Rows up to which the C per-layer steps beat torch's: they save per-call overhead, which is what a
# decode step of a batch pays; a prompt's rows are better served by torch's vectorised exp and loops.
KERNEL_ROWS = 16


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products in hardware (torch exposes the probes privately)."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def bf16_activations() -> bool:
    """Whether `auto`, int8 and int4 compute in bfloat16: EXOCTL_ACTIVATIONS, else the CPU."""
    return cpu_policy.bf16_activations(cpu_has_native_bf16())


def bf16_kernel() -> ctypes.CDLL | None:
    """The node's own bfloat16 kernel, unless EXOCTL_BF16_MATMUL=torch: None then.

    Without native bf16 maths (AVX2 CPUs) torch's bf16 GEMV reads weights at about half the
    memory bandwidth and costs 6-8x one row at 8 rows; the kernel widens bf16 to float32 in
    registers (1.1B shape's gate/up, 2 threads: 3.1 ms a row against torch's 5.2, 10 ms for 8
    rows against 33). With AVX512-BF16 it multiplies by vdpbf16ps, as llama.cpp does, where
    torch's path reached 0.57x llama.cpp. A node without a C compiler keeps torch's path:
    slower, still right.
    """
    return qkernel.optional_library() if cpu_policy.bf16_matmul_by_kernel() else None


def rounds_x_to_bf16(kernel: ctypes.CDLL) -> bool:
    """Whether this library's bf16 matmul rounds float32 x to bf16 first (the vdpbf16ps path)."""
    return bool(kernel.kernel_isa() & qkernel.ISA_BF16_BIT)


def f32_kernel() -> ctypes.CDLL | None:
    """The node's float32 kernel for steps of few rows (EXOCTL_F32_MATMUL), or None: torch's."""
    return qkernel.optional_library() if cpu_policy.f32_matmul_by_kernel() else None


def f32_linear(
    kernel: ctypes.CDLL,
    x: torch.Tensor,
    rows: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """out [rows, N] = x [rows, K] @ weight [N, K]^T + bias, all float32 and contiguous."""
    n, k = weight.shape
    kernel.f32_linear(
        x.data_ptr(),
        rows,
        k,
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        n,
        torch.get_num_threads(),
    )


def step_kernel(rows: int, *tensors: torch.Tensor) -> ctypes.CDLL | None:
    """The library for a C per-layer step over `rows` rows of `tensors` (one dtype, contiguous),
    or None where torch's step runs."""
    dtype = tensors[0].dtype
    if rows > KERNEL_ROWS or dtype not in KERNEL_DTYPES:
        return None
    if any(t.dtype is not dtype or not t.is_contiguous() for t in tensors):
        return None
    return qkernel.optional_library()


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


def _is_bf16(t: torch.Tensor) -> int:
    return int(t.dtype is torch.bfloat16)


# --- matmuls ---------------------------------------------------------------------------------


class QuantCall:
    """y[M, N] = x[M, K] @ dequant(W)^T + b for one int8/int4 weight in the kernel's tiled layout;
    x and y float32. The weight's pointers are looked up once, not on every call."""

    def __init__(
        self, data: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None, bits: int
    ) -> None:
        self.function = qkernel.library().qmm_linear
        self.pointers = (data.data_ptr(), scales.data_ptr(), 0 if bias is None else bias.data_ptr())
        self.bits = bits
        self.keep = (data, scales, bias)  # the pointers stay valid while this call exists

    def __call__(self, x: torch.Tensor, rows: int, out: torch.Tensor) -> None:
        """x [rows, K] float32 contiguous -> out [rows, N] float32."""
        w, s, b = self.pointers
        k, n = x.shape[-1], out.shape[-1]
        status = self.function(
            x.data_ptr(), rows, k, w, s, b, out.data_ptr(), n, self.bits, torch.get_num_threads()
        )
        if status != 0:
            raise MemoryError(f"the quantized kernel could not allocate room for {list(x.shape)} activations")


def bf16_linear(
    kernel: ctypes.CDLL,
    x: torch.Tensor,
    rows: int,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
) -> None:
    """out [rows, N] = x [rows, K] @ weight [N, K] (bfloat16, row-major)^T + bias (float32); x and
    out float32 or bfloat16, contiguous; sums in float32, out rounded once."""
    n, k = weight.shape
    status = kernel.bf16_linear(
        x.data_ptr(),
        _is_bf16(x),
        rows,
        k,
        weight.data_ptr(),
        0 if bias is None else bias.data_ptr(),
        out.data_ptr(),
        _is_bf16(out),
        n,
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"the bfloat16 kernel could not allocate room for {list(x.shape)} activations")


# Each thread its own widening buffer: the compute lanes of two instances on one worker prefill
# at once, and one buffer shared by both would be overwritten under the other's GEMM.
_scratch = threading.local()


def widen_rows(kernel: ctypes.CDLL, weight: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """weight[start:stop] (bfloat16) as float32 [stop - start, K], in this thread's buffer, which
    its next call overwrites."""
    count = (stop - start) * weight.shape[1]
    buffer: torch.Tensor | None = getattr(_scratch, "widened", None)
    if buffer is None or buffer.numel() < count:
        buffer = _scratch.widened = torch.empty(count)
    out = buffer[:count].view(stop - start, weight.shape[1])
    kernel.bf16_widen(weight[start].data_ptr(), out.data_ptr(), count, torch.get_num_threads())
    return out


# --- per-layer steps (rows <= KERNEL_ROWS, one dtype, contiguous: `step_kernel`) ---------------


def rms_norm(kernel: ctypes.CDLL, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] normalised and scaled by weight [D], as LlamaRMSNorm rounds."""
    size = weight.shape[0]
    out = torch.empty_like(x)
    kernel.rms_norm(
        x.data_ptr(),
        out.data_ptr(),
        weight.data_ptr(),
        x.numel() // size,
        size,
        eps,
        _is_bf16(x),
        torch.get_num_threads(),
    )
    return out


def rope(kernel: ctypes.CDLL, qkv: torch.Tensor, heads: int, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotates, in place, the first `heads` heads of qkv [B, T, all heads, D] by cos/sin [B, T, 1, D]."""
    batch, steps, all_heads, head_dim = qkv.shape
    rows = batch * steps
    kernel.rope(
        qkv.data_ptr(),
        rows,
        all_heads * head_dim,
        heads,
        head_dim,
        cos.data_ptr(),
        sin.data_ptr(),
        _is_bf16(qkv),
    )


def attend_decode(
    kernel: ctypes.CDLL,
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    past: int,
    heads: int,
) -> torch.Tensor:
    """One sequence's decode step through attention: qkv [1, 1, H + 2 KVH, D] (q and k rotated in
    place by cos/sin [1, 1, 1, D]), its k and v stored at position `past` of keys/values [KVH,
    capacity, D], and softmax(q k^T / sqrt(D)) v of each query head over positions 0 .. past
    -> [1, 1, H * D]."""
    kv_heads, capacity, head_dim = keys.shape
    out = torch.empty((1, 1, heads * head_dim), dtype=qkv.dtype)
    status = kernel.attend_decode(
        qkv.data_ptr(),
        cos.data_ptr(),
        sin.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        capacity,
        past,
        heads,
        kv_heads,
        head_dim,
        head_dim**-0.5,
        out.data_ptr(),
        _is_bf16(qkv),
        torch.get_num_threads(),
    )
    if status != 0:
        raise MemoryError(f"no room for the attention scores of {past + 1} positions")
    return out


def silu_mul(kernel: ctypes.CDLL, both: torch.Tensor, size: int) -> torch.Tensor:
    """both [..., 2I] (gate, then up) -> silu(gate) * up [..., I]."""
    rows = both.numel() // (2 * size)
    act = torch.empty((*both.shape[:-1], size), dtype=both.dtype)
    kernel.silu_mul(both.data_ptr(), act.data_ptr(), rows, size, _is_bf16(both), torch.get_num_threads())
    return act
