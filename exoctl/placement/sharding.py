"""Choosing a sharding: pipeline, tensor, or `auto` by model size and topology. A pure function.

`auto`: one node when the model fits on one (nothing crosses the network); otherwise tensor when
the heads (and experts) divide by the node count and each chosen node holds an equal slice,
since every node then reads only 1/k of the weights per token; otherwise pipeline, which fits
any split of memory but makes one stream no faster. Each choice comes with a one-line reason.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from exoctl.errors import ExoctlError
from exoctl.models.catalog import ModelCard
from exoctl.placement.pipeline import GB, NodeProfile, Placement, PlacementError, PlacementRequest, place
from exoctl.placement.tensor import place_tensor

SHARDINGS = ("auto", "pipeline", "tensor")


class UnknownShardingError(ExoctlError):
    """A sharding name that is none of SHARDINGS."""


@dataclass(frozen=True)
class Plan:
    placement: Placement
    reason: str


def check_sharding(name: str) -> str:
    """The canonical name of a sharding given in any case ("Tensor" from the API, "tensor")."""
    canonical = name.lower()
    if canonical not in SHARDINGS:
        raise UnknownShardingError(f"unknown sharding {name!r}", hint=f"use one of {', '.join(SHARDINGS)}")
    return canonical


def plan(card: ModelCard, nodes: list[NodeProfile], request: PlacementRequest, sharding: str) -> Plan:
    kind = check_sharding(sharding)
    if kind == "pipeline":
        placement = place(card, nodes, request)
        return Plan(placement, f"pipeline, as asked: {_layers(placement)}")
    if kind == "tensor":
        placement = place_tensor(card, nodes, request)
        return Plan(placement, f"tensor, as asked: {_slices(card, placement)}")
    return _auto(card, nodes, request)


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
