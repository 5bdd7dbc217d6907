"""Pipeline overhead: decode tokens/s of one stream on 1 worker against the same model split over
2 and 4 local workers, in one run.

    python benchmarks/pipeline_overhead.py [--models smollm2,llama-1.1b] [--dtype float32] [--tokens 64]

Starts four real workers on 127.0.0.11-14 with `exoctl up` (its own inventory, random ports),
places each model on 1, 2 and 4 of them with pipeline sharding, and reads the decode speed the
head measures. All workers share this machine's cores and memory bandwidth, so what the ratio
shows is the cost of the pipeline itself: the hops, the (de)serialisation, the handoffs.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import instances_of
from exoctl.inventory import load_inventory_file
from exoctl.keys import find_keys
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest


def stage_ms(cluster: Cluster, instance_id: str) -> float:
    """Sum over stages of each stage's own compute time per decoded token (ms)."""
    runners = instances_of(cluster.statuses())[instance_id].runners.values()
    return sum(1000 / r.tokens_per_s for r in runners if r.tokens_per_s > 0)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cluster import decode_rate, local_workers, model_ref
    from decode_speed import cpu_name

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,llama-1.1b")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--workers", default="1,2,4")
    args = parser.parse_args()
    counts = [int(c) for c in args.workers.split(",")]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models_dir = tmp / "models"
        models_dir.mkdir()
        refs = {name: model_ref(name, models_dir) for name in args.models.split(",")}
        with local_workers(tmp, max(counts), models_dir) as inventory:
            print(
                f"machine: {cpu_name()}, {os.cpu_count()} cores; {max(counts)} workers on this one machine; "
                f"{args.dtype}, {args.tokens} tokens, one stream\n"
            )
            header = (
                f"{'model':<12} "
                + " ".join(f"{f'{k} worker(s)':>12}" for k in counts)
                + "   ratio to 1 worker"
            )
            print(header)
            print("-" * len(header))
            with Cluster(load_inventory_file(inventory), find_keys()) as cluster:
                for name, ref in refs.items():
                    card, resolved = resolve_card(ref)
                    rates, details = [], []
                    for count in counts:
                        request = PlacementRequest(dtype=args.dtype, nodes=count)
                        placement = cluster.plan(card, request, cluster.statuses())
                        instance_id = cluster.load(card, resolved, placement).instance_id
                        try:
                            rates.append(decode_rate(cluster, instance_id, args.tokens))
                            compute = stage_ms(cluster, instance_id)
                            details.append(
                                f"{count}: {1000 / rates[-1]:.1f} ms/token, stages compute {compute:.1f}, "
                                f"pipeline {1000 / rates[-1] - compute:.1f}"
                            )
                        finally:
                            cluster.unload(instance_id)
                    ratios = " ".join(f"{r / rates[0]:.2f}" for r in rates[1:])
                    print(
                        f"{name:<12} " + " ".join(f"{r:>8.1f} t/s" for r in rates) + f"   {ratios}",
                        flush=True,
                    )
                    print("             " + "; ".join(details), flush=True)


if __name__ == "__main__":
    main()
