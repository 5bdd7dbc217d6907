"""A tagged instance document (EXO's `Instance`, as a preview returns it) read back into a placement.

`POST /instance` loads what a preview showed: the same nodes, ranks and layer ranges. The document
comes from a client, so each part is checked and a wrong one named, before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from exoctl.cluster.views import NodeStatus, node_profiles, runtime_dtype
from exoctl.dtypes import check_dtype
from exoctl.errors import InvalidRequestError
from exoctl.models.catalog import ModelCard
from exoctl.placement.pipeline import (
    Placement,
    PlacementError,
    PlacementRequest,
    Shard,
    prefix_budget,
    stage_bytes,
)
from exoctl.placement.tensor import rank_bytes, valid_rank_counts

SHARD_TAGS = {"PipelineShardMetadata": "pipeline", "TensorShardMetadata": "tensor"}


def _field(doc: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise InvalidRequestError(f"instance: {where}{key} is missing or not a {kind.__name__}")
    return value


def planned_placement(
    instance: dict[str, dict[str, Any]],
    statuses: list[NodeStatus],
    reference: Callable[[str], tuple[ModelCard, str]],
) -> tuple[ModelCard, str, Placement, str]:
    """(card, model reference, placement, instance id) of a tagged instance, or an error naming
    what is wrong with it: an unknown model, a node that is not in the inventory or is down, layer
    ranges with a gap, a tensor split the model's heads do not allow."""
    if len(instance) != 1:
        raise InvalidRequestError('instance: give one tagged instance, e.g. {"CpuRingInstance": {...}}')
    ((kind, body),) = instance.items()
    if not isinstance(body, dict):
        raise InvalidRequestError(f"instance: {kind} must be an object")
    assignments = _field(body, "shardAssignments", dict, "")
    model_id = _field(assignments, "modelId", str, "shardAssignments.")
    node_to_runner = _field(assignments, "nodeToRunner", dict, "shardAssignments.")
    runner_to_shard = _field(assignments, "runnerToShard", dict, "shardAssignments.")
    card, ref = reference(model_id)
    parts = _parts(node_to_runner, runner_to_shard, statuses)
    if not parts:
        raise InvalidRequestError("instance: shardAssignments.nodeToRunner names no node")
    parts.sort()
    if [p[0] for p in parts] != list(range(len(parts))):
        raise InvalidRequestError(
            f"instance: device ranks are {[p[0] for p in parts]}, not 0..{len(parts) - 1}"
        )
    shardings = {p[2] for p in parts}
    if len(shardings) != 1:
        raise InvalidRequestError("instance: every shard must be of one sharding, pipeline or tensor")
    sharding = shardings.pop()
    dtype = check_dtype(body.get("dtype", "auto"))
    runtime = runtime_dtype(dtype, statuses, card.native_dtype)
    _check_layers(card, model_id, sharding, runtime, parts)
    memory = body.get("memoryDeltaByNode") or {}
    profiles = {p.name: p for p in node_profiles(statuses)}
    world = len(parts)
    shards = []
    for rank, node, _, start, end in parts:
        # the budget for cached prefixes `place` would have given this node
        layers, kv_heads = card.n_layers, card.num_key_value_heads // world
        if sharding == "pipeline":
            layers, kv_heads = end - start, card.num_key_value_heads
        own = profiles[node].prefix_cache_bytes
        prefix, position = prefix_budget(card, runtime, layers, kv_heads, own)
        # what the preview said: the same count `place` makes (a posted figure only where it gave one)
        request = PlacementRequest(dtype=runtime)
        need = (
            rank_bytes(card, world, request)
            if sharding == "tensor"
            else stage_bytes(card, request, rank, world, start, end)
        )
        delta = int(memory.get(node, 0)) if isinstance(memory, dict) and node in memory else need + prefix
        shards.append(Shard(node, start, end, delta, prefix_bytes=prefix, position_bytes=position))
    placement = Placement(card.id, sharding, runtime, tuple(shards))
    instance_id = body.get("instanceId")
    return card, ref, placement, instance_id if isinstance(instance_id, str) and instance_id else ""


Part = tuple[int, str, str, int, int]  # rank, node, sharding, start layer, end layer


def _parts(
    node_to_runner: dict[str, Any], runner_to_shard: dict[str, Any], statuses: list[NodeStatus]
) -> list[Part]:
    """Each node's shard of a tagged instance, checked: the node in the inventory and up, its
    runner's shard of a known kind with its layer range and rank."""
    known = {s.node.name: s for s in statuses}
    parts: list[Part] = []
    for node, runner_id in node_to_runner.items():
        status = known.get(node)
        if status is None:
            raise InvalidRequestError(
                f"instance: node {node!r} is not in the inventory (its nodes: {', '.join(known)})"
            )
        if not status.up:
            raise PlacementError(
                f"node {node} is down: it cannot take its part of the instance",
                hint="GET /instance/previews again for a placement on the live nodes",
            )
        shard = runner_to_shard.get(runner_id) if isinstance(runner_id, str) else None
        if not isinstance(shard, dict) or len(shard) != 1:
            raise InvalidRequestError(
                f"instance: runner {runner_id!r} of node {node} has no shard in runnerToShard"
            )
        ((tag, meta),) = shard.items()
        if tag not in SHARD_TAGS or not isinstance(meta, dict):
            raise InvalidRequestError(
                f"instance: node {node}'s shard is {tag!r} (use {' or '.join(SHARD_TAGS)})"
            )
        where = f"node {node}'s shard: "
        start = _field(meta, "startLayer", int, where)
        end = _field(meta, "endLayer", int, where)
        rank = _field(meta, "deviceRank", int, where)
        parts.append((rank, node, SHARD_TAGS[tag], start, end))
    return parts


def _check_layers(card: ModelCard, model_id: str, sharding: str, runtime: str, parts: list[Part]) -> None:
    """Pipeline shards cover the layers in rank order; tensor shards each hold them all, over a
    rank count the model's heads allow."""
    n = card.n_layers
    if sharding == "pipeline":
        edges = [0] + [p[4] for p in parts]
        if [p[3] for p in parts] != edges[:-1] or edges[-1] != n or any(p[3] >= p[4] for p in parts):
            ranges = ", ".join(f"{p[1]} [{p[3]}, {p[4]})" for p in parts)
            raise InvalidRequestError(
                f"instance: the layer ranges ({ranges}) must cover {model_id}'s layers [0, {n}) "
                "in rank order, without gaps or overlaps"
            )
    else:
        if any((p[3], p[4]) != (0, n) for p in parts):
            raise InvalidRequestError(
                f"instance: every tensor shard holds all of {model_id}'s layers [0, {n})"
            )
        if len(parts) not in valid_rank_counts(card, len(parts), runtime):
            raise PlacementError(
                f"{card.id} cannot be tensor-split over {len(parts)} nodes",
                hint="GET /instance/previews shows the splits that are possible",
            )
