"""The ZeroMQ all-reduce: the rank-order sum, bit-identical on every rank, and a bounded wait."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch
import zmq

from exoctl.errors import CollectiveError
from exoctl.keys import find_keys
from exoctl.worker.collective import ZmqCollective
from tests.cluster_helpers import take_ports


def loopback_addresses(hosts: list[str]) -> list[str]:
    return [f"{h}:{p}" for h, p in zip(hosts, take_ports(hosts), strict=True)]


def run_ranks(world: int, steps: int, keys: Any = None) -> list[list[torch.Tensor]]:
    hosts = [f"127.0.0.{51 + r}" for r in range(world)]
    addresses = loopback_addresses(hosts)
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
    addresses = loopback_addresses(hosts)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        reduce = ZmqCollective.mesh(ctx, 0, addresses, timeout_s=0.5)
        with pytest.raises(CollectiveError, match=r"no partial from rank 1 \(rank 1\) within 0.5 s"):
            reduce.all_reduce(torch.ones(4))
        reduce.close()
    finally:
        ctx.destroy(linger=0)


def test_an_abort_from_another_thread_ends_a_wait_at_once() -> None:
    hosts = ["127.0.0.63", "127.0.0.64"]
    addresses = loopback_addresses(hosts)
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        reduce = ZmqCollective.mesh(ctx, 0, addresses, timeout_s=30)
        timer = threading.Timer(0.3, reduce.abort, args=("node node2 (127.0.0.64) stopped answering",))
        timer.start()
        began = time.monotonic()
        with pytest.raises(CollectiveError, match=r"node node2 \(127.0.0.64\) stopped answering"):
            reduce.all_reduce(torch.ones(4))
        assert time.monotonic() - began < 1.0  # not the 30 s timeout
        reduce.close()
    finally:
        ctx.destroy(linger=0)


def test_ranks_bind_first_and_connect_once_they_know_each_other() -> None:
    """As workers do: a port the OS picks, the addresses exchanged, then connect."""
    ctx: zmq.Context[Any] = zmq.Context()
    try:
        ranks = [ZmqCollective(ctx, r, 2, f"127.0.0.{65 + r}:*", timeout_s=10) for r in range(2)]
        addresses = [f"127.0.0.{65 + r}:{c.port}" for r, c in enumerate(ranks)]
        for collective in ranks:
            assert not collective.connected
            collective.connect(addresses)
            assert collective.connected
        results: list[Any] = [None, None]

        def run(r: int) -> None:
            results[r] = ranks[r].all_gather(torch.full((3,), float(r)))

        threads = [threading.Thread(target=run, args=(r,)) for r in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(10)
        for parts in results:
            assert [p.tolist() for p in parts] == [[0.0] * 3, [1.0] * 3]
        for collective in ranks:
            collective.close()
    finally:
        ctx.destroy(linger=0)
