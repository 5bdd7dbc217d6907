"""The cost model and `auto` on hand-built node profiles and links (pure: no processes): pipeline
over tensor on slow links, tensor on fast ones, one node when it fits and is fastest, 8-bit partials
where the exchange is the bottleneck, pipeline layers weighted by measured speed within memory;
and the measurements' wire forms."""

from __future__ import annotations

from dataclasses import replace

import pytest

from exoctl.models.catalog import get_card
from exoctl.placement.cost import LinkCost, Topology, predict
from exoctl.placement.pipeline import GB, NodeProfile, PlacementRequest, place
from exoctl.placement.sharding import plan
from exoctl.wire import protocol
from exoctl.wire.messages import Echo, LinksReply, ProbeLinks, frames, parse
from exoctl.wire.node_speed import LinkMeasure, NodeSpeed
from exoctl.wire.protocol import ProtocolError

BF16 = PlacementRequest(dtype="bfloat16")


def speed(read_gb_s: float = 20.0, call_us: float = 10.0) -> NodeSpeed:
    return NodeSpeed((read_gb_s * 1e9,) * 4, 200e9, call_us * 1e-6, 0.0)


def machines(*memory_gb: float, read_gb_s: float | list[float] = 20.0) -> list[NodeProfile]:
    """Nodes on machines of their own, each with its memory and measured read rate."""
    rates = read_gb_s if isinstance(read_gb_s, list) else [read_gb_s] * len(memory_gb)
    return [
        NodeProfile(
            f"n{i + 1}", int(m * GB), int(m * GB), machine=f"m{i + 1}", speed=speed(r), threads=8, cpus=8
        )
        for i, (m, r) in enumerate(zip(memory_gb, rates, strict=True))
    ]


def links(nodes: list[NodeProfile], rtt_ms: float, mbit: float) -> Topology:
    cost = LinkCost(rtt_ms / 1e3, mbit * 1e6 / 8)
    return Topology({(a.name, b.name): cost for a in nodes for b in nodes if a is not b})


def test_auto_takes_pipeline_on_slow_links_and_tensor_on_fast_ones() -> None:
    card = get_card("llama-3.1-8b-cpu")  # 16 GB in bfloat16: no single 12 GB node holds it
    nodes = machines(12, 12, 12, 12, read_gb_s=100.0)  # 160 ms a token of reading, split or not
    slow = plan(card, nodes, BF16, "auto", links(nodes, rtt_ms=5.0, mbit=100))
    fast = plan(card, nodes, BF16, "auto", links(nodes, rtt_ms=0.05, mbit=25_000))
    assert slow.placement.sharding == "pipeline"
    assert fast.placement.sharding == "tensor"
    assert slow.prediction is not None and fast.prediction is not None
    # a tensor split on the slow link: 65 collectives a token at a 2.5 ms one-way latency alone
    tensor_slow = next(c for c in slow.candidates if c.label.startswith("tensor") and c.prediction)
    assert tensor_slow.prediction is not None
    assert tensor_slow.prediction.network_s > 2 * card.n_layers * 2.5e-3
    assert tensor_slow.prediction.decode_tps < slow.prediction.decode_tps
    assert "the fastest predicted" in slow.reason and "tok/s decode" in slow.reason
    assert fast.prediction.decode_tps > 1.5 * slow.prediction.decode_tps  # k nodes read at once


def test_auto_takes_one_node_when_it_fits_and_the_links_cost_more() -> None:
    card = get_card("llama-3.1-8b-cpu")
    nodes = machines(64, 64, read_gb_s=100.0)
    chosen = plan(card, nodes, BF16, "auto", links(nodes, rtt_ms=5.0, mbit=1000))
    assert chosen.placement.sharding == "pipeline" and len(chosen.placement.shards) == 1
    assert chosen.reason.startswith("one node (n1)")
    labels = {c.label for c in chosen.candidates}
    assert {"one node (n1)", "one node (n2)", "pipeline over 2 nodes", "tensor over 2 nodes"} <= labels


def test_ranks_of_one_host_share_its_cores_and_memory_bus() -> None:
    """Two workers that each measured the whole machine (all its cores) split by tensor read no
    faster together than one alone; two that each measured with half the cores read over 1.5x what
    one does (2 one-thread workers on the 2-core test machine measure 1.5-1.6x, benchmarks/links.py)."""
    card = get_card("llama-3.1-8b-cpu")

    def workers(threads: int) -> list[NodeProfile]:
        return [
            NodeProfile(f"w{i}", 64 * GB, 64 * GB, machine="one", speed=speed(20), threads=threads, cpus=8)
            for i in (1, 2)
        ]

    def tps(nodes: list[NodeProfile], sharding: str, count: int) -> float:
        prediction = plan(card, nodes, PlacementRequest(dtype="bfloat16", nodes=count), sharding).prediction
        assert prediction is not None
        return prediction.decode_tps

    whole = workers(8)
    assert tps(whole, "tensor", 2) <= tps(whole, "pipeline", 1)
    assert plan(card, whole, BF16, "auto").placement.nodes == ("w1",)
    halves = workers(4)
    assert tps(halves, "tensor", 2) > 1.5 * tps(halves, "pipeline", 1)
    assert plan(card, halves, BF16, "auto").placement.sharding == "tensor"
    # namespaces standing for machines (their own machine ids) on one host still share its cores
    apart = [replace(n, machine=f"m{i}", host="one") for i, n in enumerate(whole)]
    assert plan(card, apart, BF16, "auto").placement.nodes == ("w1",)


def test_tensor_partials_go_as_8_bit_blocks_only_where_the_link_is_the_bottleneck() -> None:
    card = get_card("llama-3.1-8b-cpu")
    nodes = machines(12, 12)
    request = PlacementRequest(dtype="bfloat16", nodes=2)
    slow = plan(card, nodes, request, "tensor", links(nodes, rtt_ms=0.2, mbit=100))
    fast = plan(card, nodes, request, "tensor", links(nodes, rtt_ms=0.05, mbit=25_000))
    assert slow.placement.partials == "q8" and fast.placement.partials == "exact"
    exact = plan(
        card,
        nodes,
        PlacementRequest(dtype="bfloat16", nodes=2, partials="exact"),
        "tensor",
        links(nodes, 0.2, 100),
    )
    assert exact.placement.partials == "exact"
    assert slow.prediction is not None and exact.prediction is not None
    assert (
        slow.prediction.network_s < exact.prediction.network_s / 2
    )  # a quarter of float32's bytes, plus latency
    # pipelines never quantize anything
    assert plan(card, nodes, request, "pipeline", links(nodes, 0.2, 100)).placement.partials == "exact"


def test_unknown_partials_is_an_error_naming_the_choices() -> None:
    with pytest.raises(Exception, match="unknown partials 'q4'"):
        plan(get_card("llama-3.1-8b-cpu"), machines(64), PlacementRequest(partials="q4"), "auto")


def test_pipeline_layers_follow_measured_speed_within_memory() -> None:
    card = get_card("llama-3.1-8b-cpu")  # 32 layers
    unequal = machines(64, 64, read_gb_s=[40.0, 20.0])
    layers = [s.n_layers for s in place(card, unequal, PlacementRequest(dtype="bfloat16", nodes=2)).shards]
    assert layers == [21, 11]  # twice the read rate, about twice the layers
    # by memory alone (speeds unknown) the equal nodes would split evenly
    unknown = [NodeProfile(n.name, n.ram_total, n.ram_available) for n in unequal]
    assert [s.n_layers for s in place(card, unknown, PlacementRequest(dtype="bfloat16", nodes=2)).shards] == [
        16,
        16,
    ]
    # the fast node cannot hold 21 layers in 10 GB: it keeps what fits, the rest go to the other
    capped = machines(10, 64, read_gb_s=[40.0, 20.0])
    shards = place(card, capped, PlacementRequest(dtype="bfloat16", nodes=2)).shards
    assert shards[0].memory_bytes <= 10 * GB and shards[0].n_layers < 21
    assert sum(s.n_layers for s in shards) == 32
    # and the weighted split predicts faster decoding than the memory-proportional one
    topology = links(unequal, 0.2, 1000)
    weighted = predict(
        card, place(card, unequal, PlacementRequest(dtype="bfloat16", nodes=2)), unequal, topology
    )
    even = place(card, unknown, PlacementRequest(dtype="bfloat16", nodes=2))
    assert weighted.decode_tps > predict(card, even, unequal, topology).decode_tps


def test_without_measurements_auto_keeps_the_memory_rule() -> None:
    card = get_card("llama-3.1-8b-cpu")
    nodes = [NodeProfile(f"n{i}", 12 * GB, 12 * GB) for i in range(4)]
    chosen = plan(card, nodes, BF16, "auto")
    assert chosen.placement.sharding == "tensor" and chosen.prediction is None and not chosen.candidates


def test_unmeasured_links_are_assumed_and_said_so() -> None:
    card = get_card("llama-3.1-8b-cpu")
    nodes = machines(12, 12, 12, 12)
    chosen = plan(card, nodes, BF16, "auto")
    assert chosen.prediction is not None and chosen.prediction.assumed_links
    assert "exoctl nodes --probe" in chosen.reason


def test_measurements_cross_the_wire() -> None:
    measure = LinkMeasure("n2", "10.0.0.2:7000", "boot", 0.0004, 1.2e8, 1.0)
    assert LinkMeasure.from_wire(measure.to_wire()) == measure
    node = speed()
    assert NodeSpeed.from_wire(node.to_wire()) == node
    assert node.read_rate("q4_k") == node.read_rates[3]
    for message in (ProbeLinks((("n2", "10.0.0.2:7000"),)), Echo(b"x" * 100), LinksReply((measure,))):
        assert parse(protocol.decode(frames(message, 7))) == message
    with pytest.raises(ProtocolError, match="bytes_per_s"):
        LinkMeasure.from_wire({**measure.to_wire(), "bytes_per_s": -1})
    with pytest.raises(ProtocolError, match="targets"):
        parse(protocol.decode(protocol.encode("probe_links", {"id": 1, "targets": [["n2"]]})))


def test_planned_partials_and_the_workers_switches(monkeypatch: pytest.MonkeyPatch) -> None:
    from exoctl.worker.partials import EXACT_ENV, PARTIALS_ENV, quantized_partials

    monkeypatch.delenv(EXACT_ENV, raising=False)
    monkeypatch.delenv(PARTIALS_ENV, raising=False)
    assert quantized_partials("q8") and not quantized_partials("exact")
    monkeypatch.setenv(PARTIALS_ENV, "exact")
    assert not quantized_partials("q8")
    monkeypatch.setenv(PARTIALS_ENV, "q8")
    assert quantized_partials("exact")
    monkeypatch.setenv(EXACT_ENV, "1")
    assert not quantized_partials("q8")
