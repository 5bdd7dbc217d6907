"""Tensor placement: every node holds 1/k of every layer. A pure function, like `placement`.

Each of k ranks holds q/k/v and gate/up by column in whole heads, o_proj and down_proj by row,
lm_head by vocabulary, and (Mixtral) whole experts; the embedding is replicated, since every
rank needs the full input hidden state. So k must divide the heads, the KV heads and the
experts, and every rank needs the same memory: the smallest chosen node decides.
"""

from __future__ import annotations

from exoctl.dtypes import QUANT_BLOCK, QUANTIZED_BITS, embedding_bytes
from exoctl.models.catalog import ModelCard
from exoctl.placement.pipeline import (
    GB,
    RUNTIME_OVERHEAD_BYTES,
    NodeProfile,
    Placement,
    PlacementError,
    PlacementRequest,
    Shard,
    kv_position_bytes,
    missing_nodes_hint,
    node_prefix_bytes,
    prefix_budget,
)


def plural(count: int) -> str:
    return f"{count} node" if count == 1 else f"{count} nodes"


def divides(card: ModelCard, ranks: int) -> bool:
    counts = [card.num_attention_heads, card.num_key_value_heads]
    if card.num_experts:
        counts.append(card.num_experts)
    return all(count % ranks == 0 for count in counts)


def cut_block(card: ModelCard, ranks: int, dtype: str) -> str | None:
    """What an int8 or int4 split over `ranks` would cut mid-block, or None: an int4 block of 32
    has one scale, and the kernel quantizes activations in blocks of 32 under both. Ranks hold
    input columns of o_proj (whole heads) and, dense models, of down_proj; a matrix whose whole
    width takes no blocks of 32 is held in float (quant.fits_blocks) and cuts nothing."""
    if dtype not in QUANTIZED_BITS or ranks == 1:
        return None
    width = card.num_attention_heads * card.head_dim
    columns = card.num_attention_heads // ranks * card.head_dim
    if width % QUANT_BLOCK == 0 and columns % QUANT_BLOCK:
        return f"o_proj's {columns} input columns per rank"
    if not card.num_experts and card.intermediate_size % QUANT_BLOCK == 0:
        i = card.intermediate_size
        bounds = [i * r // ranks for r in range(ranks + 1)]
        if any(bound % QUANT_BLOCK for bound in bounds):
            return f"down_proj's {i} input columns split {ranks} ways"
    return None


def valid_rank_counts(card: ModelCard, most: int, dtype: str = "float32") -> list[int]:
    return [k for k in range(1, most + 1) if divides(card, k) and cut_block(card, k, dtype) is None]


def rank_position_bytes(card: ModelCard, ranks: int, dtype: str) -> int:
    """What one position of KV costs a rank: its share of the KV heads, over every layer."""
    return card.n_layers * kv_position_bytes(card, dtype, card.num_key_value_heads // ranks)


def rank_kv_bytes(card: ModelCard, ranks: int, request: PlacementRequest) -> int:
    """One rank's share of the KV reserve, over every layer."""
    return rank_position_bytes(card, ranks, request.dtype) * request.kv_tokens


def rank_prefix_bytes(card: ModelCard, ranks: int, node: NodeProfile, request: PlacementRequest) -> int:
    """A rank's budget for cached prefixes: its node's (or the request's) bytes, else the default
    of PREFIX_CACHE_TOKENS positions of its share."""
    kv_heads = card.num_key_value_heads // ranks
    return prefix_budget(card, request.dtype, card.n_layers, kv_heads, node_prefix_bytes(node, request))[0]


def rank_bytes(card: ModelCard, ranks: int, request: PlacementRequest) -> int:
    """Bytes one rank needs besides its budget for cached prefixes: its slice of every layer and of
    lm_head, the whole embedding, its share of the KV reserve, and the runtime overhead."""
    dtype = request.dtype
    return (
        card.n_layers * card.layer_bytes(dtype, ranks)
        + rank_kv_bytes(card, ranks, request)
        + embedding_bytes(dtype, card.vocab_size, card.hidden_size)
        + card.head_bytes(dtype, ranks)
        + RUNTIME_OVERHEAD_BYTES
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
            hint=missing_nodes_hint(wanted, len(nodes)),
        )
    valid = valid_rank_counts(card, len(live), request.dtype)
    experts = f", {card.num_experts} experts" if card.num_experts else ""
    cut = None if request.nodes is None else cut_block(card, request.nodes, request.dtype)
    if cut is not None and divides(card, request.nodes or 1):
        others = [k for k in valid if k > 1]
        why = (
            "an int4 block (one scale) never straddles two ranks"
            if request.dtype == "int4"
            else "the kernel reads a rank's activations in whole blocks"
        )
        other = "--dtype int8" if request.dtype == "int4" else "--dtype bfloat16"
        raise PlacementError(
            f"{card.id} in {request.dtype} cannot be tensor-split over {request.nodes} nodes: {cut} are "
            f"not whole blocks of {QUANT_BLOCK} weights, and {why}",
            hint=f"use {' or '.join(map(str, others)) + ' nodes, ' if others else ''}{other}, or "
            "--sharding pipeline",
        )
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
        prefixes = [rank_prefix_bytes(card, count, n, request) for n in chosen]
        drafts = [request.draft_bytes if i == 0 else 0 for i in range(count)]  # rank 0 drafts
        if all(n.capacity >= need + p + d for n, p, d in zip(chosen, prefixes, drafts, strict=True)):
            kv = rank_kv_bytes(card, count, request)
            position = rank_position_bytes(card, count, request.dtype)
            shards = tuple(
                Shard(n.name, 0, card.n_layers, need + p + d, kv, RUNTIME_OVERHEAD_BYTES, p, position, d)
                for n, p, d in zip(chosen, prefixes, drafts, strict=True)
            )
            return Placement(card.id, "tensor", request.dtype, shards, request.draft)
    count = counts[-1]
    chosen = largest(count)
    needs = {
        n.name: rank_bytes(card, count, request)
        + rank_prefix_bytes(card, count, n, request)
        + (request.draft_bytes if i == 0 else 0)
        for i, n in enumerate(chosen)
    }
    smallest = min(chosen, key=lambda n: n.capacity - needs[n.name])
    need = needs[smallest.name]
    raise PlacementError(
        f"{card.id} split over {plural(count)} by tensor needs {need / GB:.1f} GB per node in "
        f"{request.dtype}, but node {smallest.name} offers {smallest.capacity / GB:.1f} GB",
        hint="add nodes whose count divides the heads, use --dtype bfloat16, or --sharding pipeline",
    )
