"""Workers on real links (tests/netns_cluster.py: a network namespace each, veth pairs through a
bridge, `tc tbf` rate limits): what they measure of their nodes and links, and tensor and pipeline
splits across the links giving the single process's greedy tokens."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exoctl.cluster.state import state_document
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from tests.cluster_helpers import WorkerCluster
from tests.netns_cluster import Network, netns_cluster
from tests.test_cluster import generate, references  # noqa: F401


@pytest.fixture(scope="module")
def linked4(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[tuple[WorkerCluster, Network]]:
    folder = next(iter(tiny_models.values())).parent
    with netns_cluster(tmp_path_factory.mktemp("linked4"), 4, folder) as made:
        yield made


def probed(cluster: WorkerCluster) -> dict[str, dict[str, Any]]:
    result = cluster.cli("nodes", "--probe", "--json")
    assert result.returncode == 0, result.stdout + result.stderr
    return {n["node"]: n["profile"] for n in json.loads(result.stdout)}


def test_nodes_and_links_are_measured(linked4: tuple[WorkerCluster, Network]) -> None:
    cluster, network = linked4
    try:
        network.limit(100)
        limited = probed(cluster)
        for name, profile in limited.items():
            speed = profile["speed"]
            # a decode step's kernels read GB/s on any CPU we run on; GEMM beats 1 GFLOP/s
            assert all(1e8 < rate < 1e12 for rate in speed["read_rates"]), (name, speed)
            assert speed["gemm_flops"] > 1e9 and 0 < speed["call_s"] < 0.01
            assert profile["machine_id"] == f"netns-{name}"  # each namespace is a machine of its own
            links = {link["sink"]: link for link in profile["links"]}
            assert sorted(links) == sorted(n for n in limited if n != name)
            for link in links.values():
                mbit = link["bytes_per_s"] * 8 / 1e6
                assert 60 < mbit < 110, (name, link)  # tbf at 100 Mbit/s, each way
                assert 0 < link["rtt_s"] < 0.05
        network.limit(None)
        unlimited = probed(cluster)
        for name, profile in unlimited.items():
            for link in profile["links"]:
                assert link["bytes_per_s"] * 8 / 1e6 > 300, (name, link)  # veth without a limit
        # /state's topology carries them, as EXO's connections with latency and bandwidth
        with cluster.client() as client:
            topology = state_document(client.statuses(), "test")["topology"]
        edge = topology["connections"]["net1"]["net2"][0]
        assert edge["sinkMultiaddr"]["ip_address"] == network.address(1)
        assert edge["latencyMs"] > 0 and edge["bandwidthMbps"] > 300
    finally:
        network.limit(None)


@pytest.mark.parametrize(("sharding", "nodes"), [("tensor", 2), ("tensor", 4), ("pipeline", 4)])
def test_splits_across_links_give_the_single_process_tokens(
    linked4: tuple[WorkerCluster, Network],
    tiny_models: dict[str, Path],
    references: dict[str, list[int]],  # noqa: F811
    sharding: str,
    nodes: int,
) -> None:
    cluster, _ = linked4
    card, ref = resolve_card(str(tiny_models["llama"]))
    with cluster.client() as client:
        request = PlacementRequest(dtype="float32", nodes=nodes, partials="exact")
        placement = client.plan(card, request, client.statuses(), sharding)
        assert placement.sharding == sharding and placement.partials == "exact"
        instance_id = client.load(card, ref, placement).instance_id
        try:
            assert generate(client, instance_id)["token_ids"] == references["llama"]
            if sharding == "tensor":  # the ranks are machines of their own: partials over the links
                runners = state_document(client.statuses(), "test")["runners"]
                ranks = [next(iter(r.values())) for r in runners.values()]
                ranks = [r for r in ranks if r["instanceId"] == instance_id]
                assert len(ranks) == nodes and all(r["collectiveTransport"] == "zmq" for r in ranks)
        finally:
            client.unload(instance_id)


def test_eight_bit_partials_across_a_slow_link(
    linked4: tuple[WorkerCluster, Network], tiny_models: dict[str, Path]
) -> None:
    """On a 20 Mbit/s link a tensor split's float32 partials are the bottleneck: `auto` sends
    them as 8-bit blocks, and the instance generates."""
    cluster, network = linked4
    card, ref = resolve_card(str(tiny_models["llama"]))
    try:
        network.limit(20)
        with cluster.client() as client:
            statuses = client.measure_links(client.statuses(), force=True)
            placement = client.plan(card, PlacementRequest(dtype="float32", nodes=2), statuses, "tensor")
            assert placement.partials == "q8"
            instance_id = client.load(card, ref, placement).instance_id
            try:
                result = generate(client, instance_id)
                assert result["usage"]["completion_tokens"] >= 1
                runners = state_document(client.statuses(), "test")["runners"]
                ranks = [next(iter(r.values())) for r in runners.values()]
                ranks = [r for r in ranks if r["instanceId"] == instance_id]
                assert len(ranks) == 2 and all(r["collectiveTransport"] == "zmq+q8" for r in ranks)
            finally:
                client.unload(instance_id)
    finally:
        network.limit(None)


def test_a_probe_of_a_missing_node_fails_in_time_and_the_worker_keeps_answering(
    linked4: tuple[WorkerCluster, Network],
) -> None:
    from exoctl.wire.messages import ProbeLinks, StatusRequest
    from exoctl.worker.link_probe import LINK_TIMEOUT_S

    cluster, network = linked4
    ghost = f"{network.address(200)}:7100"  # in the subnet, no host there
    with cluster.client() as client:
        node = client.client("net1")
        started = time.monotonic()
        request_id = node.send(ProbeLinks((("ghost", ghost),)))
        # the probe runs on its own thread: status is answered at once meanwhile
        assert node.request(StatusRequest(), timeout=2.0).KIND == "status_reply"
        while True:
            received = node.receive(LINK_TIMEOUT_S + 5)
            assert received is not None, "the probe never answered"
            if received.reply_to == request_id:
                break
        elapsed = time.monotonic() - started
        assert received.message.KIND == "error" and "ghost" in received.message.message  # type: ignore[attr-defined]
        assert elapsed < LINK_TIMEOUT_S + 3
