"""How fast this node decodes and reads prompts: measured once per boot with the engine's own kernels.

Decoding one token reads every weight once (a matrix-vector product per weight, memory-bound on
CPU), so what a node decodes at is the rate its kernels read weights from memory, per weight
format (the int4 kernel does more arithmetic per byte than float32's and may be compute-bound).
Each rate is measured through a set of matrices larger than any CPU cache, with the worker's
threads, as `Linear`/`QuantLinear` call them in a decode step. A prompt is a matrix product
(compute-bound): `gemm_flops` is float32 GEMM's rate. `call_s` is one small kernel call, the
fixed cost a layer pays per token whatever its size.

About 1 s on two cores; the result is cached per boot, thread count and kernel path, in the temp
directory (a restarted worker on the same machine reads it back).
"""

from __future__ import annotations

import fcntl
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from exoctl.engine.linear import Linear, QuantLinear
from exoctl.engine.quant import QuantizedWeight
from exoctl.wire.node_speed import WEIGHT_FORMATS, NodeSpeed

# bytes of weights each format's rate is measured through: beyond the L3 of the CPUs we run on
# (32 MB an EPYC CCX, 105 MB a Sapphire Rapids socket is the exception: it reads ~1.3x fast here)
SWEEP_BYTES = 128 * 2**20
ROWS, COLS = 2048, 4096  # each matrix: the shape of a 7B's projection, halved
PASSES = 3  # the best of these (the first one faults pages in)


def best_pass(run: Callable[[], object], passes: int = PASSES) -> float:
    best = float("inf")
    for _ in range(passes):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def _matrices(fmt: str) -> list[Linear | QuantLinear]:
    """Matrices of one weight format totalling SWEEP_BYTES, their bytes written (never the zero
    page: untouched memory would read from cache)."""
    per_matrix = ROWS * COLS * {"float32": 4, "bfloat16": 2, "int8": 1, "int4": 0.5}[fmt]
    out: list[Linear | QuantLinear] = []
    for _ in range(max(1, int(SWEEP_BYTES // per_matrix))):
        if fmt in ("float32", "bfloat16"):
            weight = torch.empty(ROWS, COLS, dtype=getattr(torch, fmt)).fill_(0.01)
            out.append(Linear(weight))
        elif fmt == "int8":
            data = torch.empty(ROWS, COLS, dtype=torch.int8).fill_(3)
            out.append(QuantLinear(QuantizedWeight(data, torch.full((ROWS,), 0.01), 8, COLS)))
        else:
            data = torch.empty(ROWS, COLS // 2, dtype=torch.uint8).fill_(0x35)
            scales = torch.full((ROWS, COLS // 32, 2), 0.01, dtype=torch.float16)
            out.append(QuantLinear(QuantizedWeight(data, scales, 4, COLS)))
    return out


def read_rate(fmt: str) -> float:
    """Bytes of weights per second one decode step's matrix-vector products read in `fmt`."""
    linears = _matrices(fmt)
    x = torch.full((1, 1, COLS), 0.5)
    if fmt == "bfloat16":
        x = x.to(torch.bfloat16)

    def sweep() -> None:
        for linear in linears:
            linear(x)

    seconds = best_pass(sweep)
    return sum(linear.nbytes for linear in linears) / seconds


def gemm_flops() -> float:
    """float32 GEMM's rate on a 256-row prompt chunk through a 2048-square matrix."""
    x, w = torch.full((256, 2048), 0.5), torch.full((2048, 2048), 0.01)
    F.linear(x, w)
    seconds = best_pass(lambda: F.linear(x, w))
    return 2 * 256 * 2048 * 2048 / seconds


def call_seconds() -> float:
    """One small kernel call (a 64-wide float32 projection): what every call costs at least."""
    linear = Linear(torch.full((64, 64), 0.01))
    x = torch.full((1, 1, 64), 0.5)
    for _ in range(20):
        linear(x)
    calls = 200
    return best_pass(lambda: [linear(x) for _ in range(calls)]) / calls


def measure() -> NodeSpeed:
    rates = tuple(read_rate(fmt) for fmt in WEIGHT_FORMATS)
    return NodeSpeed(rates, gemm_flops(), call_seconds(), time.time())


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown-boot"


def cache_key(kernel: str) -> str:
    """What the numbers depend on: this boot (the machine as it is), the threads and their CPUs,
    and the kernel's vector path."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    return f"{_boot_id()}|threads={torch.get_num_threads()}|cpus={cpus}|kernel={kernel}"


def cache_path() -> Path:
    return Path(
        os.environ.get("EXOCTL_NODE_SPEED_CACHE")
        or Path(tempfile.gettempdir()) / f"exoctl-node-speed-{os.getuid()}.json"
    )


def node_speed(kernel: str) -> NodeSpeed:
    """This node's speed: from the cache when this boot, thread count and kernel measured it.
    Workers of one machine measure one at a time (a lock beside the cache): two measuring at
    once would each see half the memory bus."""
    path = cache_path()
    try:
        lock = open(path.with_suffix(".lock"), "a+")
    except OSError:
        return _cached_or_measured(path, cache_key(kernel))
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _cached_or_measured(path, cache_key(kernel))


def _cached_or_measured(path: Path, key: str) -> NodeSpeed:
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if key in cached:
        try:
            return NodeSpeed.from_wire(cached[key])
        except Exception:  # an older layout: measure again
            pass
    speed = measure()
    cached[key] = speed.to_wire()
    try:
        temporary = path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cached))
        temporary.replace(path)  # workers starting together each write a whole file
    except OSError:
        pass  # a read-only temp directory: measured again next start
    return speed
