"""Every vector path of the kernel library, on any CPU: the library built for each target
(EXOCTL_KERNEL_ISA's `portable`, `avx2`, `avx512`, and the node's `native`), and the AVX512 paths
emulated by SIMDe where the CPU lacks them, each against the dequantized matmul within the kernel's
bound, against the portable loop, and (bfloat16) against the float32 matmul of its weights.

A path the CPU cannot run is skipped with the flags it lacks: on an AVX2-only machine the real
AVX512 build is compiled and its instructions checked, and its run is left to an AVX512 machine,
where the emulated builds' results must equal it."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from exoctl import cpu_policy
from exoctl.engine import kernel_calls, qkernel
from exoctl.engine.linear import QuantLinear
from exoctl.engine.quant import dequantize, quantize
from exoctl.errors import UnsupportedModelError
from tests.test_quantized import kernel_error_bound

REAL = ("portable", "avx2", "avx512", "native")
EMULATED = ("emulated-bw", "emulated-vnni")


def runnable(name: str) -> str | None:
    """Why this CPU cannot run target `name`'s build, or None where it can."""
    if name.startswith("emulated-"):
        if not qkernel.SIMDE_HEADER.is_file():
            return "SIMDe's headers are missing (apt install libsimde-dev; scripts/system-deps does)"
        name = "avx2"
    missing = [f for f in qkernel.TARGET_NEEDS.get(name, ()) if f not in cpu_policy.cpu_flags()]
    if missing:
        return f"this CPU lacks {', '.join(missing)}: the {name} path runs on a CPU that has them"
    return None


@pytest.fixture(scope="module")
def build_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kernel-paths")


def variant(build_dir: Path, name: str) -> ctypes.CDLL:
    reason = runnable(name)
    if reason is not None:
        pytest.skip(reason)
    return qkernel.build_variant(build_dir, name)


def quant_call(lib: ctypes.CDLL, q: QuantLinear, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty(x.shape[0], q.out_features)
    bias = 0 if q.bias is None else q.bias.data_ptr()
    status = lib.qmm_linear(
        x.data_ptr(), x.shape[0], x.shape[1], q.data.data_ptr(), q.scales.data_ptr(), bias,
        out.data_ptr(), q.out_features, q.bits, 2,
    )  # fmt: skip
    assert status == 0
    return out


@pytest.mark.parametrize("name", [*REAL, *EMULATED])
def test_each_build_reports_the_path_the_policy_names(build_dir: Path, name: str) -> None:
    """The library's own report (kernel_isa) is what the worker profile says without building it
    (cpu_policy.kernel_path), for every target this CPU can run."""
    lib = variant(build_dir, name)
    bits = lib.kernel_isa()
    if name.startswith("emulated-"):
        assert bits & qkernel.ISA_EMULATED
        expected = {"emulated-bw": "avx512 (emulated)", "emulated-vnni": "avx512+vnni+bf16 (emulated)"}[name]
        assert qkernel.isa_name(bits) == expected
    else:
        assert qkernel.isa_name(bits) == cpu_policy.kernel_path(name)


# 203 output rows: a last tile of 3; K = 320: 10 blocks; 1-5 rows: every micro-kernel width and
# a tile of 4 then 1; 67: a prompt's many tiles of rows
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("name", [*REAL, *EMULATED])
def test_every_path_equals_the_dequantized_matmul_and_the_portable_loop(
    build_dir: Path, name: str, bits: int
) -> None:
    lib = variant(build_dir, name)
    portable = variant(build_dir, "portable")
    torch.manual_seed(bits)
    w, bias = torch.randn(203, 320) * 0.05, torch.randn(203)
    q = QuantLinear(quantize(w, bits), bias)
    dense = dequantize(q.weight())
    for rows in (1, 2, 3, 4, 5, 67):
        x = torch.randn(rows, 320)
        x[:, 5] *= 30  # an outlier feature: its block gets a coarse step
        out = quant_call(lib, q, x)
        reference = F.linear(x, dense, bias)
        assert ((out - reference).abs() <= kernel_error_bound(x, dense)).all(), (name, rows)
        # the integer sums are exact on every path; only the float scaling's order may differ
        torch.testing.assert_close(out, quant_call(portable, q, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [8, 4])
def test_the_emulated_avx512_paths_give_the_native_builds_bits(build_dir: Path, bits: int) -> None:
    """The emulated builds run the AVX512 source lines; where the CPU has them too, the real
    instructions must give the same bits, so the emulation stands for them on other machines."""
    real = variant(build_dir, "native")
    torch.manual_seed(bits + 10)
    q = QuantLinear(quantize(torch.randn(96, 4096) * 0.05, bits), None)
    x = torch.randn(3, 4096)
    expected = quant_call(real, q, x)
    for name in EMULATED:
        assert torch.equal(quant_call(variant(build_dir, name), q, x), expected), name


@pytest.mark.parametrize("name", [*REAL, *EMULATED])
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_every_bf16_path_equals_the_float32_matmul_of_its_weights(
    build_dir: Path, name: str, x_dtype: torch.dtype
) -> None:
    """bfloat16 weights: sums in float32 on every path. The native bf16 path (vdpbf16ps) rounds
    float32 x to bf16 first, as llama.cpp does: its reference is that rounded x."""
    lib = variant(build_dir, name)
    generator = torch.Generator().manual_seed(3)
    for k in (203, 208, 1000):  # a tail after 16s, a lone 16 after the 32s, several 64s and a tail
        weight = torch.randn(77, k, generator=generator).bfloat16()
        bias = torch.randn(77, generator=generator)
        for rows in (1, 2, 3):
            x = torch.randn(rows, k, generator=generator).to(x_dtype)
            out = torch.empty(rows, 77, dtype=x_dtype)
            kernel_calls.bf16_linear(lib, x, rows, weight, bias, out)
            seen = x.bfloat16() if kernel_calls.rounds_x_to_bf16(lib) else x
            truth = F.linear(seen.float(), weight.float(), bias)
            bound = truth.abs() * (2**-8 if x_dtype is torch.bfloat16 else 1e-5) + 1e-4
            assert bool(((out.float() - truth).abs() <= bound).all()), (name, k, rows)


def test_the_avx512_build_holds_vnni_and_bf16_instructions(build_dir: Path) -> None:
    """On any CPU the compiler targets AVX512: the build's machine code uses vpdpbusd and
    vdpbf16ps (on an AVX2 machine that is all that can be checked of the real build)."""
    objdump = shutil.which("objdump")
    if objdump is None:
        pytest.skip("objdump (binutils) is not installed")
    path = build_dir / "compiled-avx512.so"
    qkernel.build(path, qkernel.build_flags("avx512"))
    code = subprocess.run([objdump, "-d", str(path)], capture_output=True, text=True, check=True).stdout
    assert "vpdpbusd" in code and "vdpbf16ps" in code and "zmm" in code
    portable = build_dir / "compiled-portable.so"
    qkernel.build(portable, qkernel.build_flags("portable"))
    assert (
        "vpdpbusd"
        not in subprocess.run(
            [objdump, "-d", str(portable)], capture_output=True, text=True, check=True
        ).stdout
    )


def test_a_forced_target_this_cpu_cannot_run_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = [f for f in qkernel.TARGET_NEEDS["avx512"] if f not in cpu_policy.cpu_flags()]
    if not missing:
        pytest.skip("this CPU runs every forced target")
    monkeypatch.setenv("EXOCTL_KERNEL_ISA", "avx512")
    with pytest.raises(
        UnsupportedModelError,
        match=f"EXOCTL_KERNEL_ISA=avx512 builds code this CPU cannot run: it lacks {missing[0]}",
    ):
        qkernel.build_flags()
    monkeypatch.setenv("EXOCTL_KERNEL_ISA", "sse9")
    with pytest.raises(
        UnsupportedModelError, match=r"EXOCTL_KERNEL_ISA='sse9' is not one of auto, native, avx512"
    ):
        qkernel.build_flags()
    monkeypatch.setenv("EXOCTL_KERNEL_ISA", "portable")
    assert cpu_policy.kernel_path() == "portable"


def test_the_policy_names_each_cpus_path() -> None:
    avx2 = frozenset({"avx2", "fma", "f16c"})
    zen4 = avx2 | {"avx512f", "avx512bw", "avx512_vnni", "avx512_bf16"}
    assert cpu_policy.kernel_path("native", zen4) == "avx512+vnni+bf16"
    assert cpu_policy.kernel_path("native", avx2 | {"avx512f", "avx512bw", "avx512_vnni"}) == "avx512+vnni"
    assert cpu_policy.kernel_path("native", avx2 | {"avx512f", "avx512bw"}) == "avx512"
    assert cpu_policy.kernel_path("native", avx2) == "avx2"
    assert cpu_policy.kernel_path("native", frozenset({"sse4_2"})) == "portable"
    assert cpu_policy.kernel_path("avx2", zen4) == "avx2"
    assert cpu_policy.kernel_path("portable", zen4) == "portable"
