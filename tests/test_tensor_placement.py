"""Tensor placement on hand-built node sets: divisibility, equal per-rank memory, errors."""

from __future__ import annotations

import re

import pytest

from exoctl.models.catalog import get_card
from exoctl.placement.pipeline import GB, NodeProfile, PlacementError, PlacementRequest, place
from exoctl.placement.tensor import place_tensor, rank_bytes, rank_prefix_bytes, valid_rank_counts


def nodes(*sizes_gb: float) -> list[NodeProfile]:
    return [NodeProfile(f"node{i + 1}", int(s * GB), int(s * GB)) for i, s in enumerate(sizes_gb)]


def test_valid_rank_counts_follow_the_heads_and_experts() -> None:
    assert valid_rank_counts(get_card("llama-3.1-70b-cpu"), 8) == [1, 2, 4, 8]
    assert valid_rank_counts(get_card("qwen2.5-32b-cpu"), 8) == [1, 2, 4, 8]  # 40 heads, 8 KV heads
    assert valid_rank_counts(get_card("mixtral-8x7b-cpu"), 4) == [1, 2, 4]
    assert valid_rank_counts(get_card("smollm2-135m-cpu"), 4) == [1, 3]  # 9 heads, 3 KV heads


def test_one_rank_needs_about_what_the_whole_model_needs() -> None:
    card = get_card("llama-3.1-8b-cpu")
    request = PlacementRequest(dtype="float32")
    whole = place(card, nodes(96), request).shards[0]
    # a rank's budget for cached prefixes is its share of the whole model's
    rank = rank_bytes(card, 1, request) + rank_prefix_bytes(card, 1, nodes(96)[0], request)
    assert whole.prefix_bytes == rank_prefix_bytes(card, 1, nodes(96)[0], request)
    assert abs(rank - whole.memory_bytes) < 0.01 * whole.memory_bytes


def test_four_ranks_of_70b_each_hold_a_quarter_plus_the_embedding() -> None:
    card = get_card("llama-3.1-70b-cpu")
    request = PlacementRequest(dtype="float32", nodes=4)
    placement = place_tensor(card, nodes(96, 96, 96, 96), request)
    assert placement.sharding == "tensor" and placement.nodes == ("node1", "node2", "node3", "node4")
    per_rank = placement.shards[0].memory_bytes
    quarter = card.weight_bytes("float32") / 4
    embedding = card.embedding_parameters * 4
    assert quarter < per_rank < quarter + embedding + 8 * GB
    assert all(s.start_layer == 0 and s.end_layer == card.n_layers for s in placement.shards)


def test_the_fewest_dividing_nodes_that_fit_are_chosen() -> None:
    card = get_card("llama-3.1-70b-cpu")
    # 3 nodes would fit by memory but 8 KV heads do not divide by 3: 4 it is
    placement = place_tensor(card, nodes(120, 120, 120, 120), PlacementRequest(dtype="float32", min_nodes=3))
    assert len(placement.shards) == 4


def test_errors_name_the_counts_and_the_numbers() -> None:
    card = get_card("llama-3.1-70b-cpu")
    with pytest.raises(PlacementError) as caught:
        place_tensor(card, nodes(96, 96, 96, 96), PlacementRequest(nodes=3))
    assert caught.value.message == (
        "llama-3.1-70b-cpu cannot be tensor-split over 3 nodes: its 64 heads, 8 KV heads must each divide "
        "by the node count"
    )
    assert caught.value.hint == "use 1 or 2 or 4 nodes, or --sharding pipeline"
    with pytest.raises(PlacementError) as caught:
        place_tensor(card, nodes(96, 96, 60, 96), PlacementRequest(dtype="float32", nodes=4))
    assert re.search(
        r"by tensor needs \d+\.\d GB per node in float32, but node node3 offers 60\.0 GB$",
        caught.value.message,
    )
    mixtral = get_card("mixtral-8x7b-cpu")
    with pytest.raises(PlacementError, match="8 experts must each divide"):
        place_tensor(mixtral, nodes(96, 96, 96), PlacementRequest(nodes=3))
