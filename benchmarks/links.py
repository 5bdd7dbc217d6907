"""Real links (issue 31): a tensor split across network namespaces on rate-limited links, the cost
model's predictions against measured decoding, `auto`'s choice against the best candidate, and
pipeline layers weighted by measured speed on unequal nodes.

    python benchmarks/links.py [--parts links,model,unequal] [--tokens 48] [--dtype int4]

Needs root (network namespaces, `tc tbf`; tests/netns_cluster.py makes and removes them).

- links: the 1.1B shape split over 2 ranks by tensor, each rank in its own namespace (a machine of
  its own: no shared memory), decoding one stream on an unlimited veth, on 1 Gbit/s and on
  100 Mbit/s, with float32 partials and with `auto`'s (8-bit blocks where the link is slow).
- model: predicted against measured decode tokens/s for pipeline and tensor on 1, 2 and 4 workers
  on loopback, and on 2 and 4 namespaces at 100 Mbit/s; per setup, the plan `auto` picks and how
  it measures against the best candidate measured.
- unequal: 2 workers, one given half the threads of the other: the pipeline split by measured
  speed against the split by memory (equal nodes: half the layers each).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent))

from bench_cluster import decode_rate, local_workers, model_ref
from decode_speed import cpu_name

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import node_profiles, topology
from exoctl.inventory import load_inventory_file
from exoctl.keys import find_keys
from exoctl.models.catalog import ModelCard
from exoctl.models.store import resolve_card
from exoctl.placement.cost import predict
from exoctl.placement.pipeline import NodeProfile, Placement, PlacementRequest, place
from exoctl.placement.sharding import plan


def measure(cluster: Cluster, card: ModelCard, ref: str, placement: Placement, tokens: int) -> float:
    instance_id = cluster.load(card, ref, placement).instance_id
    try:
        return decode_rate(cluster, instance_id, tokens)
    finally:
        cluster.unload(instance_id)


@contextmanager
def namespaces(
    tmp: Path, count: int, models_dir: Path, threads: int | None = None
) -> Iterator[tuple[Cluster, object]]:
    from tests.netns_cluster import netns_cluster

    with netns_cluster(tmp, count, models_dir, threads=threads) as (workers, network):
        with Cluster(load_inventory_file(workers.inventory), find_keys()) as cluster:
            yield cluster, network


def links_part(tmp: Path, models_dir: Path, ref: str, dtype: str, tokens: int) -> None:
    card, ref = resolve_card(ref)
    rates: list[float | None] = [None, 1000, 100]
    results: dict[str, dict[float | None, float]] = {}
    with namespaces(tmp / "links", 2, models_dir) as (cluster, network):
        statuses = cluster.measure_links(cluster.statuses(), force=True)
        for partials in ("exact", "q8"):
            request = PlacementRequest(dtype=dtype, nodes=2, partials=partials)
            placement = plan(card, node_profiles(statuses), request, "tensor", topology(statuses)).placement
            instance_id = cluster.load(card, ref, placement).instance_id
            try:
                for rate in rates:
                    network.limit(rate)  # type: ignore[attr-defined]
                    results.setdefault(partials, {})[rate] = decode_rate(cluster, instance_id, tokens)
            finally:
                network.limit(None)  # type: ignore[attr-defined]
                cluster.unload(instance_id)
    print(
        f"\n## 2-rank tensor split of {card.id} in {dtype} across two namespaces (decode tok/s, one stream)"
    )
    print("| link | float32 partials | vs unlimited | 8-bit partials | vs unlimited (float32) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    base = results["exact"][None]
    for rate in rates:
        exact, q8 = results["exact"][rate], results["q8"][rate]
        name = "unlimited veth" if rate is None else f"{rate:g} Mbit/s tbf"
        print(f"| {name} | {exact:.2f} | {exact / base:.2f}x | {q8:.2f} | {q8 / base:.2f}x |")


def model_part(tmp: Path, models_dir: Path, ref: str, dtype: str, tokens: int) -> None:
    card, ref = resolve_card(ref)
    print(f"\n## Cost model against measurement: {card.id} in {dtype}, decode tok/s, one stream")
    print("| setup | plan | predicted | measured | measured / predicted | auto's pick |")
    print("| --- | --- | ---: | ---: | ---: | --- |")
    setups: list[tuple[str, int, Callable[[], object], float | None]] = [
        ("loopback", 1, lambda: local_workers(tmp / "l1", 1, models_dir, quiet=True), None),
        ("loopback", 2, lambda: local_workers(tmp / "l2", 2, models_dir, quiet=True), None),
        ("loopback", 4, lambda: local_workers(tmp / "l4", 4, models_dir, quiet=True), None),
        ("namespaces, 100 Mbit/s", 2, lambda: None, 100.0),
        ("namespaces, 1 Gbit/s", 4, lambda: None, 1000.0),
    ]
    for name, count, make, rate in setups:
        for sub in ("l1", "l2", "l4"):
            (tmp / sub).mkdir(exist_ok=True)
        if rate is None:
            with make() as inventory, Cluster(load_inventory_file(inventory), find_keys()) as cluster:  # type: ignore[attr-defined]
                _compare(cluster, card, ref, dtype, tokens, name, count)
        else:
            with namespaces(tmp / f"ns{count}", count, models_dir) as (cluster, network):
                network.limit(rate)  # type: ignore[attr-defined]
                _compare(cluster, card, ref, dtype, tokens, name, count)


def _compare(
    cluster: Cluster, card: ModelCard, ref: str, dtype: str, tokens: int, name: str, count: int
) -> None:
    statuses = cluster.measure_links(cluster.statuses(), force=True)
    nodes, links = node_profiles(statuses), topology(statuses)
    plans = [("pipeline", count)] + ([("tensor", count)] if count > 1 else [])
    measured: dict[str, float] = {}
    for sharding, n in plans:
        chosen = plan(card, nodes, PlacementRequest(dtype=dtype, nodes=n), sharding, links)
        rate = measure(cluster, card, ref, chosen.placement, tokens)
        label = f"{sharding} over {n}" + (" (q8)" if chosen.placement.partials == "q8" else "")
        measured[label] = rate
        assert chosen.prediction is not None
        predicted = chosen.prediction.decode_tps
        print(
            f"| {name}, {count} workers | {label} | {predicted:.2f} | {rate:.2f} | {rate / predicted:.2f} | |"
        )
    auto = plan(card, nodes, PlacementRequest(dtype=dtype, min_nodes=count), "auto", links)
    label = f"{auto.placement.sharding} over {len(auto.placement.shards)}" + (
        " (q8)" if auto.placement.partials == "q8" else ""
    )
    got = measured.get(label)
    if got is None:
        got = measure(cluster, card, ref, auto.placement, tokens)
    best = max(measured.values())
    print(f"| {name}, {count} workers | auto: {label} | | {got:.2f} | | {got / best:.2f}x of the best |")


def unequal_part(tmp: Path, models_dir: Path, ref: str, dtype: str, tokens: int) -> None:
    import yaml

    card, ref = resolve_card(ref)
    (tmp / "unequal").mkdir(exist_ok=True)
    with local_workers(tmp / "unequal", 2, models_dir, quiet=True) as inventory:
        # one worker given half the threads of the other (`threads` in the inventory), restarted
        doc = yaml.safe_load(inventory.read_text())
        cores = os.cpu_count() or 2
        doc["nodes"][0]["threads"] = cores
        doc["nodes"][1]["threads"] = max(1, cores // 2)
        inventory.write_text(yaml.safe_dump(doc))
        import subprocess

        exoctl = [sys.executable, "-m", "exoctl"]
        subprocess.run([*exoctl, "down", "-i", str(inventory)], capture_output=True, timeout=120)
        subprocess.run([*exoctl, "up", "-i", str(inventory)], check=True, capture_output=True, timeout=120)
        with Cluster(load_inventory_file(inventory), find_keys()) as cluster:
            statuses = cluster.statuses()
            nodes = node_profiles(statuses)
            request = PlacementRequest(dtype=dtype, nodes=2)
            weighted = place(card, nodes, request)
            blind = place(card, [NodeProfile(n.name, n.ram_total, n.ram_available) for n in nodes], request)
            rows = []
            for label, placement in (("by measured speed", weighted), ("by memory", blind)):
                rate = measure(cluster, card, ref, placement, tokens)
                predicted = predict(card, replace(placement), nodes, topology(statuses)).decode_tps
                rows.append((label, placement, rate, predicted))
    print(
        f"\n## Unequal nodes: {card.id} in {dtype} over 2 workers ({cores} and {max(1, cores // 2)} threads)"
    )
    print("| pipeline split | layers | predicted tok/s | measured tok/s |")
    print("| --- | --- | ---: | ---: |")
    for label, placement, rate, predicted in rows:
        layers = ", ".join(f"{s.node} {s.n_layers}" for s in placement.shards)
        print(f"| {label} | {layers} | {predicted:.2f} | {rate:.2f} |")
    print(f"weighted / by memory: {rows[0][2] / rows[1][2]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", default="links,model,unequal")
    parser.add_argument("--model", default="llama-1.1b")
    parser.add_argument("--dtype", default="int4")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--models-dir", default=str(Path(tempfile.gettempdir()) / "exoctl-bench-models"))
    args = parser.parse_args()
    print(f"machine: {cpu_name()}, {os.cpu_count()} cores")
    parts = {"links": links_part, "model": model_part, "unequal": unequal_part}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        # the random 1.1B is made once (about a minute) and kept for the next run
        models_dir = Path(args.models_dir)
        models_dir.mkdir(parents=True, exist_ok=True)
        made = models_dir / "llama-1.1b"
        ref = (
            str(made)
            if args.model == "llama-1.1b" and (made / "config.json").is_file()
            else model_ref(args.model, models_dir)
        )
        for part in args.parts.split(","):
            parts[part](tmp, models_dir, ref, args.dtype, args.tokens)


if __name__ == "__main__":
    main()
