"""The choices made from the CPU's features, each with a switch that forces it on any CPU.

Torch-free: the worker's profile, the control side and the engine read the same switches, so a
test on an AVX2 machine runs what a bf16-native machine will run, and the other way round.

- `EXOCTL_ACTIVATIONS` (`bfloat16` | `float32` | `auto`): the dtype of activations, norms and the
  KV cache for `auto`, int8 and int4 models. `auto` (the default): bfloat16 where the CPU has
  native bf16 dot products (AVX512-BF16 or AMX), float32 elsewhere (AVX2 runs bf16 maths 2-3x
  slower). A node's inventory field `activations` sets it for that node's worker.
- `EXOCTL_BF16_MATMUL` (`torch` | `kernel` | `auto`): who multiplies bfloat16 weights in decode
  steps. `auto` is exoctl's kernel on every CPU: native bf16 dot products (vdpbf16ps) where the
  CPU has AVX512-BF16, bf16 widened to float32 in registers elsewhere; torch's GEMV reached 0.57x
  llama.cpp's on a bf16-native CPU and half the memory bandwidth without. Prompts go to oneDNN's
  bf16 GEMM where bf16 is native, to float32 GEMM of widened weights elsewhere (engine.linear).
- `EXOCTL_F32_MATMUL` (`torch` | `kernel` | `auto`): who multiplies float32 weights by a step of
  at most 16 rows (decode, speculative decoding's verification). `auto` is the kernel, whose cost
  barely grows with the rows (each weight read once), where oneDNN's sgemm costs 1.7-2.2x one
  row's at 2 to 5 rows on the AVX2 EPYC it was measured on; prompts of more rows go to oneDNN.
- `EXOCTL_DECODE_LAYER` (`fused` | `steps` | `auto`): how a decode step goes through a decoder
  layer whose every piece the kernel library computes (engine.fused_decode). `auto` is `fused`:
  one C call per layer; `steps` is the Python layer's dozen calls, the same bits.
- `EXOCTL_KERNEL_ISA` (`native` | `avx512` | `avx2` | `portable` | `auto`): the target the kernel
  library is built for. `auto` is `native` (`-march=native`: AVX512 with VNNI and BF16, AVX2 or
  the plain C loop, as the CPU has them); the others force one path on any CPU that can run it
  (engine.qkernel refuses one it cannot): `avx2` lets an AVX512 machine run the 256-bit path,
  `portable` the C loop a CPU without AVX2 runs.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from exoctl.errors import ExoctlError

ACTIVATIONS_ENV = "EXOCTL_ACTIVATIONS"
BF16_MATMUL_ENV = "EXOCTL_BF16_MATMUL"
ACTIVATION_CHOICES = ("auto", "bfloat16", "float32")
BF16_MATMUL_CHOICES = ("auto", "torch", "kernel")
F32_MATMUL_ENV = "EXOCTL_F32_MATMUL"
F32_MATMUL_CHOICES = ("auto", "torch", "kernel")
KERNEL_ISA_ENV = "EXOCTL_KERNEL_ISA"
DECODE_LAYER_ENV = "EXOCTL_DECODE_LAYER"
DECODE_LAYER_CHOICES = ("auto", "fused", "steps")
KERNEL_ISA_CHOICES = ("auto", "native", "avx512", "avx2", "portable")
BF16_FLAGS = ("avx512_bf16", "amx_bf16")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.split(":", 1)[1].split()) if ":" in line else frozenset()


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 dot products in hardware."""
    return any(flag in cpu_flags() for flag in BF16_FLAGS)


def forced(env: str, choices: tuple[str, ...]) -> str | None:
    """The switch `env`'s value, or None when it is unset or `auto`; a value outside `choices`
    is an error that lists them."""
    value = os.environ.get(env, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in choices:
        raise ExoctlError(
            f"{env}={os.environ[env]!r} is not one of {', '.join(choices)}",
            hint=f"unset {env} to choose by the CPU's features",
        )
    return value


def check_activations(value: str) -> str:
    """A value for the activations switch (an option or inventory field), checked."""
    if value not in ACTIVATION_CHOICES:
        raise ExoctlError(f"activations must be one of {', '.join(ACTIVATION_CHOICES)}, got {value!r}")
    return value


def bf16_activations(native: bool | None = None) -> bool:
    """Whether `auto`, int8 and int4 models compute in bfloat16 here: the switch, else whether the
    CPU has native bf16 (`native`, where the caller probed it otherwise, e.g. through torch)."""
    choice = forced(ACTIVATIONS_ENV, ACTIVATION_CHOICES)
    if choice is not None:
        return choice == "bfloat16"
    return cpu_has_native_bf16() if native is None else native


def activations_name(native: bool | None = None) -> str:
    return "bfloat16" if bf16_activations(native) else "float32"


def bf16_matmul_by_kernel() -> bool:
    """Whether bfloat16 weights go through exoctl's kernel rather than torch's GEMM here."""
    return forced(BF16_MATMUL_ENV, BF16_MATMUL_CHOICES) != "torch"


def f32_matmul_by_kernel() -> bool:
    """Whether float32 weights go through exoctl's kernel for steps of few rows (EXOCTL_F32_MATMUL)."""
    return forced(F32_MATMUL_ENV, F32_MATMUL_CHOICES) != "torch"


def fused_decode() -> bool:
    """Whether decode steps run a decoder layer as one C call where it can (EXOCTL_DECODE_LAYER)."""
    return forced(DECODE_LAYER_ENV, DECODE_LAYER_CHOICES) != "steps"


def kernel_isa() -> str:
    """The target the kernel library is built for (EXOCTL_KERNEL_ISA): `native` unless forced."""
    return forced(KERNEL_ISA_ENV, KERNEL_ISA_CHOICES) or "native"


# What the kernel library's paths need of the CPU (kernels/exoctl_kernels.h): AVX2 with FMA and
# F16C for any vector path; AVX512F and BW for the 512-bit one; VNNI and BF16 each for its own.
AVX2_FLAGS = ("avx2", "fma", "f16c")
AVX512_FLAGS = ("avx512f", "avx512bw")
TARGET_FEATURES = {"avx512": frozenset({"avx2", "avx512", "vnni", "bf16"}), "avx2": frozenset({"avx2"})}


def path_name(features: frozenset[str]) -> str:
    """A kernel path's name from the features its build holds ("avx2", "avx512", "vnni",
    "bf16"): "avx512+vnni+bf16", "avx512", "avx2" or "portable" (none). Both the policy
    (`kernel_path`) and the built library's own report (engine.qkernel.isa_name) name paths so."""
    widest = [name for name in ("avx512", "vnni", "bf16") if name in features]
    return "+".join(widest) if widest else "avx2" if "avx2" in features else "portable"


def kernel_path(target: str | None = None, flags: frozenset[str] | None = None) -> str:
    """The vector path the kernel library built for `target` (EXOCTL_KERNEL_ISA's, else) runs on a
    CPU with `flags` (this one's, else), as engine.qkernel names the built library's own report
    (a test checks the two)."""
    target = kernel_isa() if target is None else target
    flags = cpu_flags() if flags is None else flags
    if target == "portable":
        return path_name(frozenset())
    if target in TARGET_FEATURES:
        return path_name(TARGET_FEATURES[target])
    if not all(f in flags for f in AVX2_FLAGS):
        return path_name(frozenset())
    features = {"avx2"}
    if all(f in flags for f in AVX512_FLAGS):
        features |= {"avx512"} | {
            n for n, f in (("vnni", "avx512_vnni"), ("bf16", "avx512_bf16")) if f in flags
        }
    return path_name(frozenset(features))
