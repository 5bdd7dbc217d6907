"""The node's own C kernels beside the quantized matmul (engine/kernels/qmatmul.c): the bfloat16
weight matmul that CPUs without native bf16 maths decode with (the same numbers as torch's float32
matmul of the same weights, rounded once), and the per-layer steps (RMSNorm, rope, SiLU-and-multiply)
that equal transformers' modules in float32 and bfloat16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from exoctl.engine import kernel_calls, qkernel
from exoctl.engine.kernel_calls import cpu_has_native_bf16, step_kernel
from exoctl.engine.layers import GatedMLP, RMSNorm, Rotary, apply_rope
from exoctl.engine.linear import Linear


@pytest.fixture
def kernel_linear(monkeypatch: pytest.MonkeyPatch) -> type[Linear]:
    """Linear with the kernel, whatever EXOCTL_BF16_MATMUL says."""
    monkeypatch.setattr(kernel_calls, "bf16_kernel", qkernel.library)
    return Linear


def test_the_kernel_is_what_bfloat16_decodes_with_on_every_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """vdpbf16ps where bf16 is native, widened in registers elsewhere; prompts go to oneDNN's
    bf16 GEMM only where bf16 is native."""
    monkeypatch.delenv("EXOCTL_BF16_MATMUL", raising=False)
    linear = Linear(torch.zeros(8, 8, dtype=torch.bfloat16))
    assert linear.kernel is not None
    assert linear.native_gemm == cpu_has_native_bf16()


@pytest.mark.parametrize(("forced", "by_kernel"), [("kernel", True), ("torch", False)])
def test_the_bf16_matmul_switch_picks_the_path_on_any_cpu(
    monkeypatch: pytest.MonkeyPatch, forced: str, by_kernel: bool
) -> None:
    monkeypatch.setenv("EXOCTL_BF16_MATMUL", forced)
    weight = torch.randn(64, 96).bfloat16()
    x = torch.randn(3, 96).bfloat16()
    linear = Linear(weight)
    assert (linear.kernel is not None) == by_kernel
    # either path: the float32 matmul of the bf16 weights, rounded once to bf16
    expected = F.linear(x.float(), weight.float()).bfloat16()
    torch.testing.assert_close(linear(x), expected, rtol=2**-7, atol=1e-2)


# K = 203 ends in a part of 16 the kernel adds one by one, 208 in a lone 16 after the steps of 32.
# 49 rows and more take the widened float32 GEMM, below that the kernel's own loop (odd counts:
# the last row of x alone).
@pytest.mark.parametrize("rows", [1, 2, 3, 16, 49, 130])
@pytest.mark.parametrize("size", [203, 208])
@pytest.mark.parametrize("x_dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bf16_linear_equals_the_float32_matmul_of_its_weights(
    kernel_linear: type[Linear], rows: int, size: int, x_dtype: torch.dtype, with_bias: bool
) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1030, size, generator=generator).bfloat16()
    bias = torch.randn(1030, generator=generator).bfloat16() if with_bias else None
    x = torch.randn(2, rows, size, generator=generator).to(x_dtype)
    linear = kernel_linear(weight, bias)
    linear.WIDEN_ROWS = 256  # several widened blocks, the last one short
    out = linear(x)
    assert out.shape == (2, rows, 1030) and out.dtype == x_dtype
    # where bf16 is native, x is rounded to bf16 first: by vdpbf16ps in decode steps, by oneDNN's
    # bf16 GEMM in prompts, which rounds its output too
    prompt = rows > Linear.GEMV_ROWS
    rounded = linear.native_gemm if prompt else kernel_calls.rounds_x_to_bf16(qkernel.library())
    seen = x.bfloat16().float() if rounded else x.float()
    truth = F.linear(seen, weight.float(), None if bias is None else bias.float())
    # float32 sums in another order (1e-5), then one rounding to bfloat16 (2^-9 relative).
    coarse = x_dtype is torch.bfloat16 or (prompt and linear.native_gemm)
    bound = truth.abs() * (2**-8 if coarse else 1e-5) + 1e-4
    assert bool(((out.float() - truth).abs() <= bound).all())


@pytest.mark.parametrize(("forced", "by_kernel"), [("kernel", True), ("torch", False), ("auto", True)])
def test_the_f32_matmul_switch_picks_the_path(
    monkeypatch: pytest.MonkeyPatch, forced: str, by_kernel: bool
) -> None:
    monkeypatch.setenv("EXOCTL_F32_MATMUL", forced)
    weight, x = torch.randn(64, 96), torch.randn(3, 96)
    linear = Linear(weight)
    assert (linear.small is not None) == by_kernel
    torch.testing.assert_close(linear(x), F.linear(x, weight), rtol=1e-5, atol=1e-5)


# K = 203 ends in a tail the kernel adds one by one; 17 rows and more go to oneDNN's GEMM.
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 16, 17])
@pytest.mark.parametrize("size", [203, 576])
@pytest.mark.parametrize("with_bias", [True, False])
def test_f32_linear_equals_torch_and_each_row_is_the_same_bits_alone(
    monkeypatch: pytest.MonkeyPatch, rows: int, size: int, with_bias: bool
) -> None:
    """The kernel's sums per row do not depend on the other rows: a verification step of k + 1
    positions gives each position the bits a step of one gives it (speculative decoding)."""
    monkeypatch.setenv("EXOCTL_F32_MATMUL", "kernel")
    generator = torch.Generator().manual_seed(rows)
    weight = torch.randn(1030, size, generator=generator)
    bias = torch.randn(1030, generator=generator) if with_bias else None
    x = torch.randn(rows, size, generator=generator)
    linear = Linear(weight, bias)
    out = linear(x)
    torch.testing.assert_close(out, F.linear(x, weight, bias), rtol=1e-5, atol=1e-4)
    if rows <= kernel_calls.KERNEL_ROWS:
        alone = torch.cat([linear(x[i : i + 1]) for i in range(rows)])
        assert torch.equal(out, alone)


@pytest.mark.parametrize("partial", [False, True])
def test_a_prompt_where_bf16_is_native_takes_the_bf16_gemm(
    kernel_linear: type[Linear], partial: bool
) -> None:
    """Where the CPU multiplies bf16 natively (forced here on any CPU), a prompt's rows go to
    torch's bf16 GEMM, x and the output rounded to bf16; a tensor rank's partial sum stays on the
    float32 path, unrounded."""
    generator = torch.Generator().manual_seed(5)
    weight = torch.randn(300, 208, generator=generator).bfloat16()
    bias = torch.randn(300, generator=generator).bfloat16()
    x = torch.randn(1, Linear.GEMV_ROWS + 3, 208, generator=generator)
    linear = kernel_linear(weight, bias, partial)
    linear.native_gemm = True
    out = linear(x)
    assert out.dtype == torch.float32
    if partial:
        truth = F.linear(x, weight.float(), bias.float())
        torch.testing.assert_close(out, truth, rtol=1e-5, atol=1e-4)
    else:
        truth = F.linear(x.bfloat16().float(), weight.float(), bias.float())
        assert bool(((out - truth).abs() <= truth.abs() * 2**-7 + 2e-2).all())
        assert torch.equal(out, out.bfloat16().float())  # rounded once, to bf16


def test_an_empty_batch_gives_an_empty_answer(kernel_linear: type[Linear]) -> None:
    linear = kernel_linear(torch.ones(16, 16, dtype=torch.bfloat16))
    assert linear(torch.empty(0, 16, dtype=torch.bfloat16)).shape == (0, 16)


DTYPES = [torch.float32, torch.bfloat16]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> int:
    """The largest distance between a and b in units of their dtype's last place."""
    step = torch.finfo(a.dtype).eps * torch.maximum(a.float().abs(), b.float().abs()).clamp_min(1e-30)
    return int(((a.float() - b.float()).abs() / step).ceil().max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 3, 8])  # x 2 sequences: up to KERNEL_ROWS
def test_rms_norm_equals_transformers(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    weight = (1 + torch.randn(576, generator=generator) / 4).to(dtype)
    x = (torch.randn(2, rows, 576, generator=generator) * 3).to(dtype)
    theirs = LlamaRMSNorm(576, eps=1e-5)
    theirs.weight.data = weight.clone()
    ours = RMSNorm(weight, 1e-5)
    assert step_kernel(x.numel() // 576, x, weight) is not None  # the C step is what runs
    # float32: the sum of squares in double and 1/sqrt for torch's rsqrt move the last bits (a few
    # ulps); bfloat16: those differences are far below its rounding, which may fall the other way once.
    assert ulps_apart(ours(x), theirs(x)) <= (4 if dtype is torch.float32 else 1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_equals_transformers(dtype: torch.dtype) -> None:
    heads, kv_heads, head_dim = 6, 2, 16
    generator = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 5, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 8, 9, 10, 11]])
    cos, sin = Rotary(head_dim, 10000.0, None, dtype)(positions)  # [B, T, 1, D]
    q, k = qkv[:, :, :heads].transpose(1, 2), qkv[:, :, heads : heads + kv_heads].transpose(1, 2)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos[:, :, 0], sin[:, :, 0])  # [B, H, T, D]
    rotated = qkv.clone()
    qkernel.library().rope(
        rotated.data_ptr(), 10, rotated.shape[2] * head_dim, heads + kv_heads, head_dim,
        cos.data_ptr(), sin.data_ptr(), int(dtype is torch.bfloat16),
    )  # fmt: skip
    # bfloat16: products of two bf16 numbers are exact in float32, so the same roundings give the
    # same bits. float32: a*cos - b*sin may be one fused multiply-add here, two roundings there;
    # the difference is a rounding of the terms, not of their (possibly cancelling) sum.
    for ours, theirs in ((rotated[:, :, :heads], want_q), (rotated[:, :, heads : heads + kv_heads], want_k)):
        if dtype is torch.bfloat16:
            assert torch.equal(ours.transpose(1, 2), theirs)
        else:
            bound = 4 * 2**-23 * float(qkv.abs().max())
            assert torch.allclose(ours.transpose(1, 2), theirs, rtol=0, atol=bound)
    assert torch.equal(rotated[:, :, heads + kv_heads :], qkv[:, :, heads + kv_heads :])  # v untouched


class Passthrough:
    """Stands in for gate_up and down: the MLP's own step between them is what is tested."""

    out_features = 2 * 96

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_times_up_equals_torch(dtype: torch.dtype) -> None:
    both = (torch.randn(3, 4, 2 * 96, generator=torch.Generator().manual_seed(4)) * 4).to(dtype)
    mlp = GatedMLP(Passthrough(), Passthrough())  # type: ignore[arg-type]
    assert step_kernel(both.numel() // (2 * 96), both) is not None  # the C step is what runs
    gate, up = both.split(96, dim=-1)
    # float32: libm's expf and torch's vectorised exp differ in the last bit or two
    assert ulps_apart(mlp(both), F.silu(gate) * up) <= (4 if dtype is torch.float32 else 1)


def test_the_ctypes_table_matches_the_c_prototypes() -> None:
    """Every function the C files export is declared in kernels/exoctl_kernels.h, and
    qkernel.SIGNATURES gives each the argument and return types the header does: a changed
    prototype fails here, not as a wrong pointer at run time."""
    import ctypes
    import re

    header = (qkernel.KERNELS / "exoctl_kernels.h").read_text()
    c_types = {
        "int": ctypes.c_int,
        "int64_t": ctypes.c_int64,
        "uint32_t": ctypes.c_uint32,
        "float": ctypes.c_float,
        "void": None,
    }

    def ctype(declaration: str) -> object:
        declaration = declaration.replace("const ", "").strip()
        if "*" in declaration:
            return ctypes.c_void_p
        return c_types[declaration.rsplit(" ", 1)[0] if " " in declaration else declaration]

    declared = {}
    for restype, name, params in re.findall(r"^(\w+) (\w+)\(([^)]*)\);", header, flags=re.M | re.S):
        args = [] if params.strip() == "void" else [ctype(p) for p in params.split(",")]
        declared[name] = (c_types[restype], args)
    assert declared == qkernel.SIGNATURES
    exported = set()
    for source in qkernel.SOURCES:
        text = source.read_text()
        exported |= set(re.findall(r"^(?:int|void) (\w+)\(", text, flags=re.M))
        assert '#include "exoctl_kernels.h"' in text, source.name  # so the compiler checks each against it
    assert exported == set(declared)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("past", [0, 1, 37, 300])
def test_decode_attention_in_one_call_equals_rope_append_and_sdpa(dtype: torch.dtype, past: int) -> None:
    """A decode step's attention in one C call: the rotated k and the v land in the cache at
    `past`, and each query head's output is torch's SDPA over the cache (GQA: 6 query heads on 2
    KV heads), within float32's sums (bf16: one rounding of the output)."""
    heads, kv_heads, head_dim = 6, 2, 64
    generator = torch.Generator().manual_seed(past)
    qkv = torch.randn(1, 1, heads + 2 * kv_heads, head_dim, generator=generator).to(dtype)
    cos, sin = Rotary(head_dim, 10000.0, None, dtype)(torch.tensor([[past]]))  # [1, 1, 1, D]
    keys = torch.randn(kv_heads, past + 16, head_dim, generator=generator).to(dtype)
    values = torch.randn(kv_heads, past + 16, head_dim, generator=generator).to(dtype)
    expected_keys, expected_values = keys.clone(), values.clone()
    rotated = apply_rope(qkv.float(), cos.float(), sin.float()).to(dtype)
    kernel = qkernel.library()
    out = kernel_calls.attend_decode(kernel, qkv, cos, sin, keys, values, past, heads)
    q, k = rotated[0, 0, :heads], rotated[0, 0, heads : heads + kv_heads]
    expected_keys[:, past] = k
    expected_values[:, past] = qkv[0, 0, heads + kv_heads :]
    # rope's own roundings are the rope kernel's (tested against transformers above)
    torch.testing.assert_close(keys.float(), expected_keys.float(), rtol=2**-7, atol=2e-2)
    assert torch.equal(values, expected_values)
    key = keys.float()[:, : past + 1].repeat_interleave(heads // kv_heads, dim=0)
    value = values.float()[:, : past + 1].repeat_interleave(heads // kv_heads, dim=0)
    truth = F.scaled_dot_product_attention(q.float()[:, None], key, value).reshape(1, 1, -1)
    assert out.shape == (1, 1, heads * head_dim) and out.dtype == dtype
    tolerance = 1e-5 if dtype is torch.float32 else 2**-7
    torch.testing.assert_close(out.float(), truth, rtol=tolerance, atol=tolerance)
