"""How far a tensor split's logits are from the whole model's, under each activation policy.

    python benchmarks/tensor_partials.py [--dtypes int8,int4,bfloat16] [--ranks 2,4]

A tiny random Qwen2 (the test suite's shape) is loaded whole and as k ranks (threads with an
all-reduce in rank order); the relative norm of the difference of their logits is printed beside
what computing in bfloat16 rather than float32 activations changes the whole model's logits by
(the scale of every rounding difference, the test's bound is a quarter of it), and whether the
greedy choices agree. Ranks hand on float32 partials where the matmul computes in float32 (the
quantized and bf16 kernels) and round once after the sum; bfloat16 models' torch GEMM hands on
bfloat16 partials.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from exoctl import cpu_policy
from exoctl.engine.model import load_model
from exoctl.engine.shard import TensorShard
from tests.test_tensor_engine import on_ranks
from tests.tiny_models import make_tiny_model

IDS = torch.tensor([[1, 50, 300, 4000, 7, 99, 1234, 5, 42, 17000, 8, 600]])
POSITIONS = torch.arange(IDS.shape[1])[None]


def logits(folder: Path, dtype: str, shard: TensorShard | None = None, reduce=None) -> torch.Tensor:  # type: ignore[no-untyped-def]
    kwargs = {} if shard is None else {"shard": shard, "reduce": reduce}
    model = load_model(folder, dtype=dtype, **kwargs)
    return model.forward(IDS, POSITIONS, [model.new_cache()], all_logits=True)


def split_runner(folder: Path, dtype: str, ranks: int):  # type: ignore[no-untyped-def]
    return lambda rank, exchange: logits(folder, dtype, TensorShard(rank, ranks), exchange.reduce(rank))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dtypes", default="int8,int4,bfloat16")
    parser.add_argument("--ranks", default="2,4")
    args = parser.parse_args()
    from tests.smollm2_reference import reference_folder

    root = Path(os.environ.get("EXOCTL_TEST_HOME", Path(__file__).resolve().parent.parent / ".test-cache"))
    tokenizer = reference_folder(root / "reference")
    flags = cpu_policy.cpu_flags()
    print(
        f"machine: {platform.processor() or platform.machine()}, native bf16: "
        f"{cpu_policy.cpu_has_native_bf16()}, avx512f: {'avx512f' in flags}, torch {torch.__version__}"
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = make_tiny_model("qwen2", Path(scratch) / "qwen2", tokenizer)
        print("dtype  activations  ranks  split-vs-whole  bf16-vs-f32  ratio  same-argmax")
        for dtype in args.dtypes.split(","):
            wide_narrow = {}
            for policy in ("float32", "bfloat16"):
                os.environ[cpu_policy.ACTIVATIONS_ENV] = policy
                wide_narrow[policy] = logits(folder, dtype)
            scale = relative(wide_narrow["bfloat16"], wide_narrow["float32"])
            for policy in ("float32", "bfloat16"):
                os.environ[cpu_policy.ACTIVATIONS_ENV] = policy
                whole = wide_narrow[policy]
                for ranks in map(int, args.ranks.split(",")):
                    parts = on_ranks(ranks, split_runner(folder, dtype, ranks))
                    merged = torch.cat(parts, dim=-1)
                    error = relative(merged, whole)
                    same = torch.equal(merged.argmax(-1), whole.argmax(-1))
                    row = (
                        dtype,
                        policy,
                        str(ranks),
                        f"{error:.5f}",
                        f"{scale:.5f}",
                        f"{error / scale:.3f}" if scale else "-",
                        str(same),
                    )
                    print("  ".join(row))
        os.environ.pop(cpu_policy.ACTIVATIONS_ENV, None)


if __name__ == "__main__":
    main()
