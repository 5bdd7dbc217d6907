"""Choosing a sharding: pipeline, tensor, or `auto` by model size and topology. A pure function.

`auto` with every live node's speed measured: every candidate that fits (one node, a pipeline
over 2..n nodes, a tensor split over each node count the heads divide by) is predicted by the
cost model (placement.cost: weight bytes over measured read rates, collectives and hand-offs over
the measured links) and the fastest single-stream decode wins; the reason gives the predicted
numbers. Without measurements, a rule of memory: one node when the model fits on one (nothing
crosses the network); otherwise tensor when the heads (and experts) divide by the node count and
each chosen node holds an equal slice, since every node then reads only 1/k of the weights per
token; otherwise pipeline, which fits any split of memory but makes one stream no faster.

A tensor placement's partials go as 8-bit blocks across links where the cost model finds the
float32 exchange a bottleneck (`PlacementRequest.partials` "auto"), or as asked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

from exoctl.errors import ExoctlError
from exoctl.models.catalog import ModelCard
from exoctl.placement.cost import NO_LINKS, Prediction, Topology, can_predict, choose_partials, predict
from exoctl.placement.pipeline import GB, NodeProfile, Placement, PlacementError, PlacementRequest, place
from exoctl.placement.tensor import place_tensor, valid_rank_counts

SHARDINGS = ("auto", "pipeline", "tensor")
PARTIALS_CHOICES = ("auto", "exact", "q8")


class UnknownShardingError(ExoctlError):
    """A sharding name that is none of SHARDINGS."""


@dataclass(frozen=True)
class Candidate:
    """One way to place the model, with its prediction, or why it does not fit."""

    label: str  # "one node (n1)", "pipeline over 3 nodes", "tensor over 2 nodes"
    placement: Placement | None
    prediction: Prediction | None
    error: str | None = None


@dataclass(frozen=True)
class Plan:
    placement: Placement
    reason: str
    prediction: Prediction | None = None
    candidates: tuple[Candidate, ...] = ()


def check_sharding(name: str) -> str:
    """The canonical name of a sharding given in any case ("Tensor" from the API, "tensor")."""
    canonical = name.lower()
    if canonical not in SHARDINGS:
        raise UnknownShardingError(f"unknown sharding {name!r}", hint=f"use one of {', '.join(SHARDINGS)}")
    return canonical


def plan(
    card: ModelCard,
    nodes: list[NodeProfile],
    request: PlacementRequest,
    sharding: str,
    topology: Topology = NO_LINKS,
) -> Plan:
    kind = check_sharding(sharding)
    if request.partials not in PARTIALS_CHOICES:
        raise PlacementError(
            f"unknown partials {request.partials!r}", hint=f"use one of {', '.join(PARTIALS_CHOICES)}"
        )
    candidates = tuple(_candidates(card, nodes, request, topology)) if can_predict(_live(nodes)) else ()
    if kind == "pipeline":
        placement = place(card, nodes, request)
        chosen = _finish(card, placement, nodes, topology, request, candidates)
        return replace(chosen, reason=f"pipeline, as asked: {_layers(placement)}{_predicted(chosen)}")
    if kind == "tensor":
        placement = place_tensor(card, nodes, request)
        chosen = _finish(card, placement, nodes, topology, request, candidates)
        return replace(
            chosen, reason=f"tensor, as asked: {_slices(card, chosen.placement)}{_predicted(chosen)}"
        )
    if candidates:
        return _fastest(card, nodes, request, topology, candidates)
    return _by_memory(card, nodes, request, topology)


def _by_memory(
    card: ModelCard, nodes: list[NodeProfile], request: PlacementRequest, topology: Topology
) -> Plan:
    ruled = _auto(card, nodes, request)
    return replace(_finish(card, ruled.placement, nodes, topology, request), reason=ruled.reason)


def _live(nodes: list[NodeProfile]) -> list[NodeProfile]:
    return [n for n in nodes if n.live]


def _finish(
    card: ModelCard,
    placement: Placement,
    nodes: list[NodeProfile],
    topology: Topology,
    request: PlacementRequest,
    candidates: tuple[Candidate, ...] = (),
) -> Plan:
    """The plan of a chosen placement: its partials settled, its prediction where nodes are measured."""
    partials = choose_partials(card, placement, nodes, topology, request.partials)
    placement = replace(placement, partials=partials if placement.sharding == "tensor" else "exact")
    chosen = [n for n in nodes if n.name in placement.nodes]
    prediction = predict(card, placement, nodes, topology) if can_predict(chosen) else None
    return Plan(placement, "", prediction, candidates)


def _predicted(chosen: Plan) -> str:
    return f"; predicted {chosen.prediction.summary()}" if chosen.prediction is not None else ""


def _candidates(
    card: ModelCard, nodes: list[NodeProfile], request: PlacementRequest, topology: Topology
) -> list[Candidate]:
    """Every placement `auto` weighs: each single node, a pipeline and a tensor split over each
    node count the request allows, predicted; those that do not fit with their error."""
    live = _live(nodes)
    wanted = [request.nodes] if request.nodes is not None else list(range(request.min_nodes, len(live) + 1))
    out: list[Candidate] = []
    for count in wanted:
        tries: list[tuple[str, Callable[[], Placement]]] = []
        if count == 1:
            for node in live:
                tries.append(
                    (f"one node ({node.name})", partial(place, card, [node], replace(request, nodes=1)))
                )
        else:
            tries.append(
                (f"pipeline over {count} nodes", partial(place, card, nodes, replace(request, nodes=count)))
            )
            if count in valid_rank_counts(card, len(live), request.dtype):
                tries.append(
                    (
                        f"tensor over {count} nodes",
                        partial(place_tensor, card, nodes, replace(request, nodes=count)),
                    )
                )
        for label, attempt in tries:
            try:
                finished = _finish(card, attempt(), nodes, topology, request)
            except PlacementError as exc:
                out.append(Candidate(label, None, None, exc.message))
            else:
                out.append(Candidate(label, finished.placement, finished.prediction))
    return out


def _fastest(
    card: ModelCard,
    nodes: list[NodeProfile],
    request: PlacementRequest,
    topology: Topology,
    candidates: tuple[Candidate, ...],
) -> Plan:
    fitting = [c for c in candidates if c.placement is not None and c.prediction is not None]
    if not fitting:
        return _by_memory(card, nodes, request, topology)  # the memory rule's error, with its numbers
    best = max(fitting, key=lambda c: c.prediction.decode_tps if c.prediction else 0.0)
    assert best.placement is not None and best.prediction is not None
    others = sorted(
        (c for c in fitting if c is not best),
        key=lambda c: -(c.prediction.decode_tps if c.prediction else 0.0),
    )
    runner_up = (
        f"; next best {others[0].label} at ~{others[0].prediction.decode_tps:.1f} tok/s"
        if others and others[0].prediction
        else ""
    )
    shape = _slices(card, best.placement) if best.placement.sharding == "tensor" else _layers(best.placement)
    reason = f"{best.label}, the fastest predicted: {best.prediction.summary()}; {shape}{runner_up}"
    return Plan(best.placement, reason, best.prediction, candidates)


def _auto(card: ModelCard, nodes: list[NodeProfile], request: PlacementRequest) -> Plan:
    if request.nodes in (None, 1) and request.min_nodes <= 1:
        try:
            single = place(card, nodes, replace(request, nodes=1))
        except PlacementError:
            if request.nodes == 1:
                raise  # one node was asked for: its error, with the numbers
        else:
            need = single.shards[0].memory_bytes
            return Plan(single, f"one node: {card.id} fits on {single.nodes[0]} alone ({need / GB:.1f} GB)")
    if request.nodes is None:  # one node is ruled out above: split over two or more
        request = replace(request, min_nodes=max(2, request.min_nodes))
    try:
        tensor = place_tensor(card, nodes, request)
    except PlacementError as exc:
        why_not = exc.message
    else:
        return Plan(tensor, f"tensor: {_slices(card, tensor)}")
    pipeline = place(card, nodes, request)
    return Plan(pipeline, f"pipeline: {_layers(pipeline)}; not tensor because {why_not}")


def _slices(card: ModelCard, placement: Placement) -> str:
    count = len(placement.shards)
    experts = f", {card.num_experts // count} of {card.num_experts} experts" if card.num_experts else ""
    return (
        f"{card.num_attention_heads // count} of {card.num_attention_heads} heads{experts} on each of "
        f"{count} nodes, {placement.shards[0].memory_bytes / GB:.1f} GB each"
    )


def _layers(placement: Placement) -> str:
    spans = ", ".join(f"{s.node} [{s.start_layer}, {s.end_layer})" for s in placement.shards)
    return f"layers {spans}"
