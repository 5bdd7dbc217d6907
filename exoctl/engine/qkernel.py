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
    for name in ("quant_matmul.c", "bf16_matmul.c", "f32_matmul.c", "layer_steps.c", "shm_signal.c")
)
HEADER = KERNELS / "exoctl_kernels.h"  # the exported prototypes (engine/kernel_calls.py's table)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# EXOCTL_KERNEL_ISA=portable (exoctl.cpu_policy) builds without -march=native: the plain C loop a
# CPU without AVX2 runs, on any CPU
PORTABLE_FLAGS = ("-O2", "-fopenmp", "-shared", "-fPIC")


_i64, _i32, _u32, _f32, _ptr = ctypes.c_int64, ctypes.c_int, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p
# name: (restype, argtypes), as kernels/exoctl_kernels.h declares them (a test compares the two)
SIGNATURES: dict[str, tuple[type | None, list[type]]] = {
    "qmm_has_avx2": (_i32, []),
    "qmm_linear": (_i32, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _i32, _i32]),
    "bf16_linear": (_i32, [_ptr, _i32, _i64, _i64, _ptr, _ptr, _ptr, _i32, _i64, _i32]),
    "bf16_widen": (None, [_ptr, _ptr, _i64, _i32]),
    "f32_linear": (None, [_ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _i32]),
    "rms_norm": (None, [_ptr, _ptr, _ptr, _i64, _i64, _f32, _i32, _i32]),
    "rope": (None, [_ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _i32]),
    "silu_mul": (None, [_ptr, _ptr, _i64, _i64, _i32, _i32]),
    "shm_publish": (None, [_ptr, _u32]),
    "shm_wait": (_i32, [_ptr, _u32, _i64, _i64]),
}


def build_flags() -> tuple[str, ...]:
    try:
        portable = cpu_policy.portable_kernel()
    except ExoctlError as exc:  # a bad switch: refused as a kernel that cannot be had
        raise UnsupportedModelError(exc.message, hint=exc.hint) from None
    return PORTABLE_FLAGS if portable else FLAGS


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
    torch.get_num_threads()  # torch (and its libgomp) is loaded before the kernel links to it
    lib = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, argtypes
    return lib


def main() -> None:
    """`python -m exoctl.engine.qkernel`: build now (make does this at install), print where."""
    avx2 = library().qmm_has_avx2()
    print(f"{library_path()} (avx2: {'yes' if avx2 else 'no, the portable C loop'})")


if __name__ == "__main__":
    main()
