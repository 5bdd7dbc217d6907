"""All-reduce latency: exoctl's one-round ZeroMQ all-reduce against torch.distributed gloo's
`all_reduce`, on the same [1, hidden] float32 tensors, 2 and 4 ranks as processes on loopback.

    python benchmarks/allreduce.py [--iterations 300]

Prints the median time per all-reduce on rank 0 (after a warm-up) and checks that both give the
same sums. Tensor-parallel decoding does about 2 x layers of these per token.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def zmq_worker(
    rank: int, world: int, base: int, hidden: int, iterations: int, curve: bool, out: dict
) -> None:
    import zmq

    from exoctl.keys import init_keys
    from exoctl.worker.collective import ZmqCollective

    torch.set_num_threads(1)
    keys = init_keys()[0] if curve else None
    ctx = zmq.Context()
    addresses = [f"127.0.0.{11 + r}:{base + r}" for r in range(world)]
    reduce = ZmqCollective.mesh(ctx, rank, addresses, keys)
    x = torch.full((1, hidden), float(rank + 1))
    times = []
    for i in range(iterations + 20):
        began = time.perf_counter()
        total = reduce.all_reduce(x)
        if i >= 20:
            times.append(time.perf_counter() - began)
    assert float(total[0, 0]) == world * (world + 1) / 2
    if rank == 0:
        out["median"] = statistics.median(times)
    reduce.close()
    ctx.destroy(linger=0)


def gloo_worker(
    rank: int, world: int, base: int, hidden: int, iterations: int, curve: bool, out: dict
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{base}", rank=rank, world_size=world)
    x = torch.full((1, hidden), float(rank + 1))
    times = []
    for i in range(iterations + 20):
        y = x.clone()
        began = time.perf_counter()
        dist.all_reduce(y)
        if i >= 20:
            times.append(time.perf_counter() - began)
    assert float(y[0, 0]) == world * (world + 1) / 2
    if rank == 0:
        out["median"] = statistics.median(times)
    dist.destroy_process_group()


def measure(target, world: int, hidden: int, iterations: int, curve: bool = False) -> float:  # type: ignore[no-untyped-def]
    with mp.Manager() as manager:
        out = manager.dict()
        base = random.randrange(41000, 49000, 10)
        procs = [
            mp.Process(target=target, args=(r, world, base, hidden, iterations, curve, out))
            for r in range(world)
        ]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=300)
            if proc.exitcode != 0:
                raise RuntimeError(f"a rank failed (exit {proc.exitcode})")
        return float(out["median"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args()
    mp.set_start_method("spawn")
    print(
        f"{os.cpu_count()} cores; median per all-reduce of [1, hidden] float32 on rank 0, "
        f"{args.iterations} runs\n"
    )
    print(f"{'ranks':>5} {'hidden':>7} {'gloo':>10} {'zmq':>10} {'zmq+curve':>10} {'zmq vs gloo':>12}")
    for world in (2, 4):
        for hidden in (4096, 8192):
            gloo = measure(gloo_worker, world, hidden, args.iterations)
            plain = measure(zmq_worker, world, hidden, args.iterations)
            curve = measure(zmq_worker, world, hidden, args.iterations, curve=True)
            print(
                f"{world:>5} {hidden:>7} {gloo * 1e6:>8.0f}us {plain * 1e6:>8.0f}us {curve * 1e6:>8.0f}us "
                f"{gloo / plain:>11.2f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
