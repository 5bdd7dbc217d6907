"""Tensor sharding on one machine: decode time per token of one stream with the model split over
2 local workers by tensor, against the same model on 1 worker, and the time spent in the
collectives per token.

    python benchmarks/tensor_decode.py [--model llama-1.1b] [--dtype float32] [--tokens 64] [--ranks 2]

Both runs use all of this machine's cores: the single worker gets them all, each of the k
workers 1/k of them (as `exoctl up` gives co-located workers). The workers share one memory
bus, so the split cannot read weights faster here; what the ratio shows is the cost of tensor
sharding itself — 2 x layers all-reduces and a token agreement per step — which is what decides
the speed-up on k machines that each have their own memory bandwidth.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import instances_of
from exoctl.inventory import load_inventory_file
from exoctl.keys import find_keys
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest


def run_on(
    tmp: Path, models_dir: Path, ref: str, workers: int, sharding: str, dtype: str, tokens: int
) -> dict[str, Any]:
    from bench_cluster import decode_rate, local_workers

    with (
        local_workers(tmp, workers, models_dir, quiet=True) as inventory,
        Cluster(load_inventory_file(inventory), find_keys()) as cluster,
    ):
        card, model_ref = resolve_card(ref)
        request = PlacementRequest(dtype=dtype, nodes=workers)
        placement = cluster.plan(card, request, cluster.statuses(), sharding)
        instance_id = cluster.load(card, model_ref, placement).instance_id
        try:
            rate = decode_rate(cluster, instance_id, tokens)
            runners = instances_of(cluster.statuses())[instance_id].runners.values()
            collective = max(r.collective_ms_per_token or 0.0 for r in runners)
            return {"rate": rate, "collective_ms": collective}
        finally:
            cluster.unload(instance_id)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cluster import model_ref
    from decode_speed import cpu_name

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model", default="llama-1.1b", help="llama-1.1b (random weights), smollm2, or a folder"
    )
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--ranks", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models_dir = tmp / "models"
        models_dir.mkdir()
        ref = model_ref(args.model, models_dir)
        one = run_on(tmp, models_dir, ref, 1, "pipeline", args.dtype, args.tokens)
        split = run_on(tmp, models_dir, ref, args.ranks, "tensor", args.dtype, args.tokens)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores; {args.model}, {args.dtype}, {args.tokens} tokens, "
        "one stream"
    )
    one_ms, split_ms = 1000 / one["rate"], 1000 / split["rate"]
    print(f"1 worker:              {one_ms:7.1f} ms/token  ({one['rate']:.1f} tok/s)")
    print(
        f"{args.ranks} workers by tensor:  {split_ms:7.1f} ms/token  ({split['rate']:.1f} tok/s), "
        f"of which collectives {split['collective_ms']:.1f} ms"
    )
    print(f"ratio (tensor / 1 worker, tokens/s): {split['rate'] / one['rate']:.2f}")


if __name__ == "__main__":
    main()
