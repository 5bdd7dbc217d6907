"""Tensor placement: every node holds 1/k of every layer. A pure function, like `placement`.

Each of k ranks holds q/k/v and gate/up by column in whole heads, o_proj and down_proj by row,
lm_head by vocabulary, and (Mixtral) whole experts; the embedding is replicated, since every
rank needs the full input hidden state. So k must divide the heads, the KV heads and the
experts, and every rank needs the same memory: the smallest chosen node decides.
"""

from __future__ import annotations

from exoctl.catalog import ModelCard, dtype_bytes
from exoctl.placement import (
    GB,
    RUNTIME_OVERHEAD_BYTES,
    NodeProfile,
    Placement,
    PlacementError,
    PlacementRequest,
    Shard,
)


def plural(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def divides(card: ModelCard, ranks: int) -> bool:
    counts = [card.num_attention_heads, card.num_key_value_heads]
    if card.num_experts:
        counts.append(card.num_experts)
    return all(count % ranks == 0 for count in counts)


def valid_rank_counts(card: ModelCard, most: int) -> list[int]:
    return [k for k in range(1, most + 1) if divides(card, k)]


def rank_bytes(card: ModelCard, ranks: int, request: PlacementRequest) -> int:
    """Bytes one rank needs: its slice of every layer and of lm_head, the whole embedding, its
    share of the KV reserve, and the runtime overhead."""
    size = dtype_bytes(request.dtype)
    d = card.hidden_size
    norms = 2 * d
    layer = (card.layer_parameters - norms) // ranks + norms
    if card.num_experts:  # the router is replicated: add back what the division took from it
        layer += card.num_experts * d - card.num_experts * d // ranks
    kv = 2 * (card.num_key_value_heads // ranks) * card.head_dim * size * request.kv_tokens
    head = card.embedding_parameters // ranks + d
    return (
        (card.n_layers * layer + card.embedding_parameters + head) * size
        + card.n_layers * kv
        + (RUNTIME_OVERHEAD_BYTES)
    )


def place_tensor(card: ModelCard, nodes: list[NodeProfile], request: PlacementRequest) -> Placement:
    live = [n for n in nodes if n.live]
    by_size = sorted(range(len(live)), key=lambda i: (-live[i].capacity, i))

    def largest(count: int) -> list[NodeProfile]:
        return [live[i] for i in sorted(by_size[:count])]

    wanted = request.nodes if request.nodes is not None else request.min_nodes
    if wanted < 1:
        raise PlacementError(f"the node count must be at least 1, got {wanted}")
    if wanted > len(live):
        raise PlacementError(
            f"{card.id} was asked for {wanted} nodes but only {len(live)} of {len(nodes)} are live",
            hint="start the missing workers with `exoctl up`, or ask for fewer nodes",
        )
    valid = valid_rank_counts(card, len(live))
    experts = f", {card.num_experts} experts" if card.num_experts else ""
    if request.nodes is not None and request.nodes not in valid:
        raise PlacementError(
            f"{card.id} cannot be tensor-split over {request.nodes} nodes: its {card.num_attention_heads} "
            f"heads, {card.num_key_value_heads} KV heads{experts} must each divide by the node count",
            hint=f"use {' or '.join(map(str, [*valid[:-1], plural(valid[-1])]))}, or --sharding pipeline",
        )
    counts = [request.nodes] if request.nodes is not None else [k for k in valid if k >= wanted]
    if not counts:
        raise PlacementError(
            f"{card.id} cannot be tensor-split over {wanted} or more of the {len(live)} live nodes: its "
            f"{card.num_key_value_heads} KV heads{experts} do not divide by any such count",
            hint="use --sharding pipeline",
        )
    for count in counts:
        chosen = largest(count)
        need = rank_bytes(card, count, request)
        if min(n.capacity for n in chosen) >= need:
            shards = tuple(Shard(n.name, 0, card.n_layers, need) for n in chosen)
            return Placement(card.id, "tensor", request.dtype, shards)
    count = counts[-1]
    chosen = largest(count)
    smallest = min(chosen, key=lambda n: n.capacity)
    need = rank_bytes(card, count, request)
    raise PlacementError(
        f"{card.id} split over {plural(count)} by tensor needs {need / GB:.1f} GB per node in "
        f"{request.dtype}, but node {smallest.name} offers {smallest.capacity / GB:.1f} GB",
        hint="add nodes whose count divides the heads, use --dtype bfloat16, or --sharding pipeline",
    )
