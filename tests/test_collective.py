"""The ZeroMQ all-reduce: the rank-order sum, bit-identical on every rank, and a bounded wait."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import zmq

from exoctl.errors import CollectiveError
from exoctl.keys import find_keys
from exoctl.worker.collective import ZmqCollective
from exoctl.worker.shm_exchange import SHM_DIR, SLOT_BYTES, ShmExchange, host_key, offer_path
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


# --- ranks on one host: partials through shared memory -------------------------------------


def shared_ranks(ctx: zmq.Context[Any], world: int, first_host: int, timeout_s: float) -> list[ZmqCollective]:
    """Ranks as workers on one host make them: bound, then connected with every rank's offer."""
    key = host_key()
    assert key is not None, "this machine has /dev/shm and a C compiler"
    ranks = [
        ZmqCollective(
            ctx, r, world, f"127.0.0.{first_host + r}:*", timeout_s=timeout_s, shm=ShmExchange(r, world, key)
        )
        for r in range(world)
    ]
    addresses = [f"127.0.0.{first_host + r}:{c.port}" for r, c in enumerate(ranks)]
    offers = [c.offer for c in ranks]
    for collective in ranks:
        collective.connect(addresses, offers)
        assert collective.shared
    return ranks


def own_files() -> list[Path]:
    return [p for p in SHM_DIR.glob("exoctl-tp-*") if f"-{os.getpid()}-r" in p.name]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_on_one_host_sum_through_shared_memory_and_big_partials_take_zeromq(world: int) -> None:
    """Exact on one host, even where 8-bit partials are asked for (they are for links)."""
    ctx: zmq.Context[Any] = zmq.Context()
    ranks = shared_ranks(ctx, world, 71 + 5 * world, timeout_s=10)
    for collective in ranks:
        collective.quantize = True
    assert len(own_files()) == world
    # 4-row partials, and every fourth step one larger than a slot, which goes over ZeroMQ
    shapes = [(4, 4096) if step % 4 else (SLOT_BYTES // 4 // 1024 + 1, 1024) for step in range(1, 13)]
    results: list[list[torch.Tensor]] = [[] for _ in range(world)]
    errors: list[BaseException] = []

    def run(r: int) -> None:
        try:
            generator = torch.Generator().manual_seed(r)
            for shape in shapes:
                results[r].append(ranks[r].all_reduce(torch.randn(*shape, generator=generator)))
            gathered = ranks[r].all_gather(torch.full((3,), float(r)))
            results[r].append(torch.stack(gathered))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    try:
        assert not errors, errors
        generators = [torch.Generator().manual_seed(r) for r in range(world)]
        for step, shape in enumerate(shapes):
            partials = [torch.randn(*shape, generator=g) for g in generators]
            expected = partials[0].clone()
            for partial in partials[1:]:
                expected += partial
            for r in range(world):
                assert torch.equal(results[r][step], expected)  # bit-identical on every rank
        for r in range(world):
            assert results[r][-1].tolist() == [[float(q)] * 3 for q in range(world)]
        assert all(c.shared_steps == 10 for c in ranks)  # 9 small all-reduces and the gather
        assert own_files() == []  # unlinked once every peer had mapped them
    finally:
        for collective in ranks:
            collective.close()
        ctx.destroy(linger=0)


def test_a_silent_rank_on_one_host_fails_within_the_timeout_and_an_abort_ends_the_wait() -> None:
    ctx: zmq.Context[Any] = zmq.Context()
    ranks = shared_ranks(ctx, 2, 91, timeout_s=0.5)
    try:
        with pytest.raises(CollectiveError, match=r"no partial from rank 1 \(rank 1\) within 0.5 s"):
            ranks[0].all_reduce(torch.ones(4))
        ranks[0].timeout_ms = 30_000
        timer = threading.Timer(0.3, ranks[0].abort, args=("node node2 stopped answering",))
        timer.start()
        began = time.monotonic()
        with pytest.raises(CollectiveError, match="node node2 stopped answering"):
            ranks[0].all_reduce(torch.ones(4))
        assert time.monotonic() - began < 1.0
    finally:
        for collective in ranks:
            collective.close()
        ctx.destroy(linger=0)
    assert own_files() == []


def test_ranks_use_shared_memory_only_when_every_rank_is_on_this_host() -> None:
    key = host_key()
    assert key is not None
    exchange = ShmExchange(0, 3, key)
    try:
        here = exchange.offer
        assert exchange.colocated([here, f"{key}|/dev/shm/b", f"{key}|/dev/shm/c"])
        assert not exchange.colocated([here, f"{key}|/dev/shm/b", None])  # an older worker
        assert not exchange.colocated([here, f"{key}|/dev/shm/b", "other-host/boot/7|/dev/shm/c"])
    finally:
        exchange.close()
    assert own_files() == []


def test_an_offer_names_only_an_exoctl_file_in_dev_shm_of_the_right_size(tmp_path: Path) -> None:
    """Paths from the network are never opened as given: a hostile or broken hello cannot make a
    rank map another file (mapped past its end, a file kills the reader with SIGBUS)."""
    for bad in ("key|/etc/passwd", "key|/dev/shm/../../etc/passwd", "key|/dev/shm/other", "no separator", ""):
        with pytest.raises(ValueError, match="not an exoctl shared-memory file"):
            offer_path(bad)
    assert offer_path("key|/dev/shm/exoctl-tp-1-r0-abc") == "/dev/shm/exoctl-tp-1-r0-abc"
    key = host_key()
    assert key is not None
    short = SHM_DIR / f"exoctl-tp-0-{os.getpid()}-r9-short"
    short.write_bytes(b"\0" * 64)
    exchange = ShmExchange(0, 2, key)
    try:
        with pytest.raises(CollectiveError, match="is not one a worker of this user made"):
            exchange.attach([exchange.offer, f"{key}|{short}"])
    finally:
        exchange.close()
        short.unlink()
    assert own_files() == []


def test_files_of_workers_that_died_are_swept_when_a_rank_starts() -> None:
    """A worker killed before its ranks' first step never unlinks its file: the next rank made on
    the host removes it (and leaves the files of processes still alive)."""
    key = host_key()
    assert key is not None
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    space = os.stat("/proc/self/ns/pid").st_ino
    stale = SHM_DIR / f"exoctl-tp-{space}-{int(dead.stdout)}-r1-stale"
    alive = SHM_DIR / f"exoctl-tp-{space}-{os.getppid()}-r1-alive"
    stale.write_bytes(b"")
    alive.write_bytes(b"")
    try:
        ShmExchange(0, 2, key).close()
        assert not stale.exists() and alive.exists()
    finally:
        stale.unlink(missing_ok=True)
        alive.unlink(missing_ok=True)


# --- 8-bit partials (EXOCTL_TP_PARTIALS=q8) -------------------------------------------------------


@pytest.mark.parametrize("count", [1, 31, 32, 33, 4096, 2048 * 3 + 5])
def test_an_8_bit_partial_is_a_quarter_the_bytes_and_within_half_a_step(count: int) -> None:
    from exoctl.worker.partials import BLOCK, decode, encode, encoded_size

    torch.manual_seed(count)
    partial = torch.randn(count) * torch.logspace(-3, 2, count)  # blocks of very different scales
    partial[count // 2] = 0.0
    encoded = encode(partial)
    assert encoded.dtype == torch.uint8 and encoded.numel() == encoded_size(count)
    assert encoded.numel() <= 0.29 * 4 * count + 36
    back = decode(encoded, partial)
    padded = torch.zeros(-(-count // BLOCK) * BLOCK)
    padded[:count] = partial
    step = (padded.view(-1, BLOCK).abs().amax(dim=1) / 127).repeat_interleave(BLOCK)[:count]
    assert back.shape == partial.shape and back.dtype == torch.float32
    assert bool(((back - partial).abs() <= step / 2 * (1 + 1e-6) + 1e-30).all())
    assert float(back[count // 2]) == 0.0
    zeros = torch.zeros(40)
    assert torch.equal(decode(encode(zeros), zeros), zeros)  # an all-zero block has no scale to divide by


@pytest.mark.parametrize("count", [1, 33, 2048 * 3 + 5])
def test_the_kernel_encodes_8_bit_partials_as_torch_does_bit_for_bit(count: int) -> None:
    """Ranks whose kernel library is built and ranks without it must agree on every byte: the
    kernel's blocks and values are the torch code's (ties included: a value of exactly half a step)."""
    from exoctl.engine import qkernel
    from exoctl.worker.partials import decode, decode_torch, encode, encode_torch

    assert qkernel.optional_library() is not None, "the kernel library builds on every test machine"
    torch.manual_seed(count)
    partial = torch.randn(count) * torch.logspace(-3, 2, count)
    partial[: min(count, 32)] = torch.arange(min(count, 32)) * 0.5 - 8  # ties at half a step
    assert torch.equal(encode(partial), encode_torch(partial))
    assert torch.equal(decode(encode(partial), partial), decode_torch(encode_torch(partial), count))


def reduce_on_ranks(world: int, partials: list[torch.Tensor], modes: list[str]) -> list[torch.Tensor]:
    """Each rank's all_reduce of its partial, each rank with its own EXOCTL_TP_PARTIALS (threads)."""
    hosts = [f"127.0.0.{61 + r}" for r in range(world)]
    addresses = loopback_addresses(hosts)
    ctx: zmq.Context[Any] = zmq.Context()
    results: list[torch.Tensor | None] = [None] * world
    errors: list[BaseException] = []
    collectives = []
    for r in range(world):
        collective = ZmqCollective(ctx, r, world, addresses[r], None, 10)
        collective.quantize = modes[r] == "q8"
        collectives.append(collective)
    for collective in collectives:
        collective.connect(addresses)

    def rank(r: int) -> None:
        try:
            results[r] = collectives[r].all_reduce(partials[r])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    for collective in collectives:
        collective.close()
    ctx.destroy(linger=0)
    assert not errors, errors
    return [r for r in results if r is not None]


@pytest.mark.parametrize("world", [2, 3, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_8_bit_partials_sum_to_the_same_bits_on_every_rank_within_their_bound(
    world: int, dtype: torch.dtype
) -> None:
    """Every rank adds the values that were sent (its own rounded too): the same bits everywhere,
    within the ranks' half steps of the exact sum; the exact exchange is today's rank-order sum."""
    from exoctl.worker.partials import decode, encode

    torch.manual_seed(world)
    partials = [(torch.randn(3, 1, 2048) * (r + 1)).to(dtype) for r in range(world)]
    packed = reduce_on_ranks(world, partials, ["q8"] * world)
    assert all(torch.equal(p, packed[0]) for p in packed) and packed[0].dtype == dtype
    rounded = [decode(encode(p), p) for p in partials]
    wide = rounded[0].clone()
    for part in rounded[1:]:
        wide += part
    assert torch.equal(packed[0], wide.to(dtype))
    exact = partials[0].float().clone()
    for part in partials[1:]:
        exact += part.float()
    bound = sum(
        p.float().reshape(-1, 32).abs().amax(dim=1).repeat_interleave(32).view(exact.shape) / 254
        for p in partials
    )
    slack = 0.01 * exact.abs() if dtype == torch.bfloat16 else 1e-5
    assert bool(((packed[0].float() - exact).abs() <= bound * 1.0001 + slack).all())
    plain = reduce_on_ranks(world, partials, ["exact"] * world)
    expected = partials[0].clone()
    for part in partials[1:]:
        expected += part
    assert all(torch.equal(p, expected) for p in plain)  # exact mode: bit for bit what it was
    mixed = reduce_on_ranks(world, partials, ["q8"] + ["exact"] * (world - 1))  # workers set apart
    assert all(torch.equal(p, mixed[0]) for p in mixed)


def test_the_switches_choose_the_partials(monkeypatch: pytest.MonkeyPatch) -> None:
    from exoctl.errors import ExoctlError
    from exoctl.worker.partials import quantized_partials

    monkeypatch.delenv("EXOCTL_TP_PARTIALS", raising=False)
    monkeypatch.delenv("EXOCTL_TP_EXACT", raising=False)
    assert not quantized_partials()  # auto: as placement planned it, exact by default
    assert quantized_partials("q8")
    monkeypatch.setenv("EXOCTL_TP_PARTIALS", "q8")
    assert quantized_partials()
    monkeypatch.setenv("EXOCTL_TP_EXACT", "1")
    assert not quantized_partials()  # exact wins
    monkeypatch.setenv("EXOCTL_TP_PARTIALS", "q4")
    monkeypatch.delenv("EXOCTL_TP_EXACT")
    with pytest.raises(ExoctlError, match="EXOCTL_TP_PARTIALS='q4' is not one of auto, exact, q8"):
        quantized_partials()
