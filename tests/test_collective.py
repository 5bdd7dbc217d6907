"""The ZeroMQ all-reduce: the rank-order sum, bit-identical on every rank, and a bounded wait."""

from __future__ import annotations

import threading
from typing import Any

import pytest
import torch
import zmq

from exoctl.keys import find_keys
from exoctl.worker.collective import CollectiveError, ZmqCollective
from tests.cluster_helpers import take_ports


def run_ranks(world: int, steps: int, keys: Any = None) -> list[list[torch.Tensor]]:
    hosts = [f"127.0.0.{51 + r}" for r in range(world)]
    addresses = [f"{h}:{p}" for h, p in zip(hosts, take_ports(hosts), strict=True)]
    ctx: zmq.Context[Any] = zmq.Context()
    results: list[list[torch.Tensor]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            reduce = ZmqCollective.mesh(ctx, r, addresses, keys, timeout_s=10)
            generator = torch.Generator().manual_seed(r)
            for _ in range(steps):
                results[r].append(reduce.all_reduce(torch.randn(2, 4096, generator=generator)))
            reduce.close()
        except BaseException as exc:  # surfaced in the main thread
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    ctx.destroy(linger=0)
    assert not errors, errors
    return results


@pytest.mark.parametrize("world", [2, 3, 4])
def test_every_rank_holds_the_same_rank_order_sum(world: int) -> None:
    results = run_ranks(world, steps=5, keys=find_keys())
    generators = [torch.Generator().manual_seed(r) for r in range(world)]
    for step in range(5):
        partials = [torch.randn(2, 4096, generator=g) for g in generators]
        expected = partials[0].clone()
        for partial in partials[1:]:
            expected += partial
        for r in range(world):
            assert torch.equal(results[r][step], expected)  # bit-identical, not just close


def test_a_missing_rank_fails_within_the_timeout() -> None:
    hosts = ["127.0.0.61", "127.0.0.62"]
    addresses = [f"{h}:{p}" for h, p in zip(hosts, take_ports(hosts), strict=True)]
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        reduce = ZmqCollective.mesh(ctx, 0, addresses, timeout_s=0.5)
        with pytest.raises(CollectiveError, match=r"no partial from rank 1 \(rank 1\) within 0.5 s"):
            reduce.all_reduce(torch.ones(4))
        reduce.close()
    finally:
        ctx.destroy(linger=0)
