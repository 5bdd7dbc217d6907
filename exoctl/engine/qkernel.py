"""Builds and loads exoctl's kernel library (kernels/*.c) on the node that runs it.

The kernel is plain C compiled with the node's own `cc -O3 -march=native -fopenmp` the first
time a quantized model loads (about a second), and cached by source and CPU, so a shared home
folder on machines with different CPUs never runs code built for another. It is called through
ctypes: no torch headers to compile (a torch C++ extension takes a minute to build), and the
OpenMP runtime it links is the libgomp torch has already loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from exoctl import cpu_policy
from exoctl.errors import ExoctlError, UnsupportedModelError
from exoctl.paths import exoctl_home

KERNELS = Path(__file__).with_name("kernels")
# one library: the matmuls and per-layer steps, and the ranks' shared-memory signalling
SOURCES = tuple(
    KERNELS / name
    for name in (
        "quant_matmul.c",
        "bf16_matmul.c",
        "f32_matmul.c",
        "layer_steps.c",
        "attention.c",
        "layer_decode.c",
        "shm_signal.c",
        "partials_q8.c",
    )
)
HEADER = KERNELS / "exoctl_kernels.h"  # the exported prototypes (engine/kernel_calls.py's table)
COMMON_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-Wno-psabi")
# The target each EXOCTL_KERNEL_ISA value builds for (exoctl.cpu_policy): `native` is the node's own
# CPU, every path it has (kernels/exoctl_kernels.h); the others force a path on any CPU that can
# run it: `avx512` the AVX512 paths with VNNI and BF16 (Zen 4, Sapphire Rapids and later), `avx2`
# the 256-bit paths alone (x86-64-v3, so an AVX512 machine tests and measures them), `portable`
# the plain C loop a CPU without AVX2 runs.
TARGETS: dict[str, tuple[str, ...]] = {
    "native": ("-march=native",),
    "avx512": ("-march=x86-64-v4", "-mavx512vnni", "-mavx512bf16", "-mf16c", "-mfma"),
    "avx2": ("-march=x86-64-v3",),
    "portable": (),
}
# The CPU flags (/proc/cpuinfo) a forced target needs to run
TARGET_NEEDS: dict[str, tuple[str, ...]] = {
    "avx512": (*cpu_policy.AVX2_FLAGS, *cpu_policy.AVX512_FLAGS, "avx512vl", "avx512_vnni", "avx512_bf16"),
    "avx2": cpu_policy.AVX2_FLAGS,
}
# Tests only: the AVX512 paths on an AVX2 CPU, their 512-bit intrinsics done in portable C by SIMDe
# (kernels/exoctl_kernels.h): `bw` AVX512BW's dot products, `vnni` vpdpbusd and vdpbf16ps.
EMULATED = {"bw": "-DEXOCTL_EMULATE_AVX512=1", "vnni": "-DEXOCTL_EMULATE_AVX512=2"}
SIMDE_HEADER = Path("/usr/include/simde/x86/avx512.h")
# kernel_isa()'s bits (kernels/exoctl_kernels.h), as the profile and benchmarks name them
ISA_BF16_BIT = 8
ISA_BITS = (("avx2", 1), ("avx512", 2), ("vnni", 4), ("bf16", ISA_BF16_BIT))
ISA_EMULATED = 16

_i64, _i32, _u32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p
# name: (restype, argtypes), as kernels/exoctl_kernels.h declares them (a test compares the two)
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "kernel_isa": (_i32, []),
    "qmm_linear": (_i32, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i32, _i32]),
    "bf16_linear": (_i32, [_ptr, _i32, _i64, _i64, _ptr, _ptr, _ptr, _i32, _i64, _i32]),
    "bf16_widen": (None, [_ptr, _ptr, _i64, _i32]),
    "f32_linear": (None, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i32]),
    "rms_norm": (None, [_ptr, _ptr, _ptr, _i64, _i64, _f32, _i32, _i32]),
    "rope": (None, [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i32]),
    "silu_mul": (None, [_ptr, _ptr, _i64, _i64, _i32, _i32]),
    "attend_decode": (
        _i32,
        [_ptr, _ptr, _ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _f32, _ptr, _i32, _i32],
    ),
    "layer_decode": (_i32, [_ptr, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i32]),
    "shm_publish": (None, [_ptr, _u32]),
    "shm_wait": (_i32, [_ptr, _u32, _i64, _i64]),
    "q8_encode": (None, [_ptr, _i64, _ptr]),
    "q8_decode": (None, [_ptr, _i64, _ptr]),
}


def target() -> str:
    """The target EXOCTL_KERNEL_ISA names (`native` where unset), refused where this CPU cannot run it."""
    try:
        forced = cpu_policy.kernel_isa()
    except ExoctlError as exc:  # a bad switch: refused as a kernel that cannot be had
        raise UnsupportedModelError(exc.message, hint=exc.hint) from None
    missing = [flag for flag in TARGET_NEEDS.get(forced, ()) if flag not in cpu_policy.cpu_flags()]
    if missing:
        raise UnsupportedModelError(
            f"{cpu_policy.KERNEL_ISA_ENV}={forced} builds code this CPU cannot run: "
            f"it lacks {', '.join(missing)}",
            hint=f"unset {cpu_policy.KERNEL_ISA_ENV} to build for this CPU's own features",
        )
    return forced


def build_flags(name: str | None = None) -> tuple[str, ...]:
    """The compiler flags of target `name` (else EXOCTL_KERNEL_ISA's)."""
    return (*COMMON_FLAGS, *TARGETS[target() if name is None else name])


def isa_name(bits: int) -> str:
    """kernel_isa()'s bits as words: "avx512+vnni+bf16", "avx2", "portable" (+ " (emulated)")."""
    text = cpu_policy.path_name(frozenset(name for name, bit in ISA_BITS if bits & bit))
    return f"{text} (emulated)" if bits & ISA_EMULATED else text


def _cpu_key() -> str:
    """What -march=native depends on: the CPU's model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    wanted = [line for line in lines if line.startswith(("model name", "flags"))][:2]
    return "\n".join(wanted) or platform.processor() or platform.machine()


def library_path() -> Path:
    code = b"".join(source.read_bytes() for source in (*SOURCES, HEADER))
    digest = hashlib.sha256(code + " ".join(build_flags()).encode() + _cpu_key().encode())
    return exoctl_home() / "kernels" / f"qmatmul-{digest.hexdigest()[:16]}.so"


def build(target: Path, flags: tuple[str, ...] | None = None) -> None:
    flags = build_flags() if flags is None else flags
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise UnsupportedModelError(
            "int8 and int4 weights need exoctl's quantized kernel, which is built on each node with a C "
            "compiler, and this node has none (no cc or gcc on PATH)",
            hint="install gcc (apt install gcc) on the node, or use --dtype float32 or bfloat16",
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: workers starting at once never load half a file.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        out = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *flags, "-o", str(out), *map(str, SOURCES), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if result.returncode != 0:
            raise UnsupportedModelError(
                f"building exoctl's quantized kernel with {compiler} failed: "
                f"{result.stderr.strip()[-800:] or result.returncode}",
                hint="install gcc (apt install gcc) on the node, or use --dtype float32 or bfloat16",
            )
        os.replace(out, target)


@functools.cache
def optional_library() -> ctypes.CDLL | None:
    """The library where it builds, else None: float models use it for speed, not correctness."""
    try:
        return library()
    except UnsupportedModelError:
        return None


@functools.cache
def library() -> ctypes.CDLL:
    """The kernel, built first if this node has not built this version yet."""
    path = library_path()
    if not path.is_file():
        build(path)
    return load(path)


def load(path: Path) -> ctypes.CDLL:
    """The library at `path`, its functions typed as SIGNATURES says."""
    torch.get_num_threads()  # torch (and its libgomp) is loaded before the kernel links to it
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def build_variant(folder: Path, name: str) -> ctypes.CDLL:
    """Tests: the library for target `name` (TARGETS), or an emulated AVX512 one (`emulated-bw`,
    `emulated-vnni`: EMULATED, needs SIMDe's headers), built into `folder` and loaded."""
    if name.startswith("emulated-"):
        flags = (*build_flags("avx2"), EMULATED[name.removeprefix("emulated-")])
    else:
        flags = build_flags(name)
    path = folder / f"kernels-{name}.so"
    if not path.is_file():
        build(path, flags)
    return load(path)


def path_name() -> str:
    """The vector path this node's kernel runs ("avx512+vnni+bf16", "avx2", "portable"), or why
    it has none: the worker profile and the benchmarks report it."""
    lib = optional_library()
    return "none (no C compiler)" if lib is None else isa_name(lib.kernel_isa())


def main() -> None:
    """`python -m exoctl.engine.qkernel`: build now (make does this at install), print where."""
    print(f"{library_path()} ({isa_name(library().kernel_isa())})")


if __name__ == "__main__":
    main()
