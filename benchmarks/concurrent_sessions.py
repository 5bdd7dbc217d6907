"""Aggregate decode tokens/s of 1, 2, 4 and 8 concurrent sessions on one instance, with the
head batching the active sequences each step (continuous batching) and without (--max-batch 1).

    python benchmarks/concurrent_sessions.py [--model smollm2-135m-cpu] [--workers 2] [--tokens 48]

Starts its own workers on 127.0.0.11.. (one set per setting), places the model over all of them
with pipeline sharding, and runs N greedy sessions at once, each in its own client thread.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import threading
import time

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import instances_of
from exoctl.inventory import Inventory, Node
from exoctl.keys import init_keys
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.sampling_params import SamplingParams

PROMPTS = [
    "1, 2, 3, 4,",
    "a, b, c, d,",
    "Monday, Tuesday,",
    "red, orange, yellow,",
    "10, 20, 30,",
    "January, February,",
    "alpha, beta, gamma,",
    "one, two, three,",
]


def aggregate_rate(inventory: Inventory, keys: object, instance_id: str, sessions: int, tokens: int) -> float:
    done: list[int] = []

    def session(index: int) -> None:
        with Cluster(inventory, keys) as cluster:  # type: ignore[arg-type]
            view = instances_of(cluster.statuses())[instance_id]
            generation = cluster.generate(
                view, SamplingParams(max_tokens=tokens), prompt=PROMPTS[index % len(PROMPTS)]
            )
            for _ in generation:
                pass
            assert generation.result is not None
            done.append(generation.result.completion_tokens)

    threads = [threading.Thread(target=session, args=(i,)) for i in range(sessions)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sum(done) / (time.perf_counter() - began)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default=DEFAULT_MODEL_ID)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--sessions", default="1,2,4,8")
    args = parser.parse_args()
    counts = [int(c) for c in args.sessions.split(",")]
    keys, _ = init_keys()
    threads = max(1, (os.cpu_count() or 1) // args.workers)
    print(
        f"{args.model} over {args.workers} local workers ({threads} torch thread(s) each), {args.dtype}, "
        f"{args.tokens} tokens per session, greedy; aggregate tokens/s\n"
    )
    print(f"{'max batch':<10} " + " ".join(f"{f'{n} session(s)':>13}" for n in counts))
    with tempfile.TemporaryDirectory() as tmp:
        for max_batch in (1, 32):
            base = random.randrange(40000, 50000, 10)
            nodes = tuple(Node(f"w{i + 1}", f"127.0.0.{11 + i}", base + i) for i in range(args.workers))
            inventory = Inventory("bench", nodes, "benchmark")
            procs = [
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "exoctl",
                        "worker",
                        "--name",
                        n.name,
                        "--host",
                        n.host,
                        "--port",
                        str(n.port),
                        "--keys-dir",
                        str(keys.folder),
                        "--threads",
                        str(threads),
                        "--max-batch",
                        str(max_batch),
                        "--model-dir",
                        tmp,
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
                for n in nodes
            ]
            try:
                with Cluster(inventory, keys) as cluster:
                    deadline = time.monotonic() + 60
                    while not all(s.up for s in cluster.statuses()) and time.monotonic() < deadline:
                        time.sleep(0.5)
                    card, ref = resolve_card(args.model)
                    request = PlacementRequest(dtype=args.dtype, nodes=args.workers)
                    instance_id = cluster.load(
                        card, ref, cluster.plan(card, request, cluster.statuses())
                    ).instance_id
                aggregate_rate(inventory, keys, instance_id, 1, 8)  # warm-up
                rates = [aggregate_rate(inventory, keys, instance_id, n, args.tokens) for n in counts]
                print(f"{max_batch:<10} " + " ".join(f"{r:>9.1f} t/s" for r in rates), flush=True)
            finally:
                for proc in procs:
                    proc.kill()
                    proc.wait()


if __name__ == "__main__":
    main()
