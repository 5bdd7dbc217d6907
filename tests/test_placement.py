"""Pipeline placement on hand-built node sets: no processes, no weights."""

from __future__ import annotations

import pytest

from exoctl.models.catalog import get_card
from exoctl.placement.pipeline import (
    GB,
    NodeProfile,
    PlacementError,
    PlacementRequest,
    place,
    split_layers,
)


def nodes(*sizes_gb: float, down: tuple[int, ...] = ()) -> list[NodeProfile]:
    return [
        NodeProfile(f"node{i + 1}", int(s * GB), int(s * GB), int(s * GB), live=i not in down)
        for i, s in enumerate(sizes_gb)
    ]


TEST_PLAN = nodes(96, 96, 96, 96)


@pytest.mark.parametrize(
    ("model", "expected_nodes"),
    [("llama-3.1-8b-cpu", 1), ("qwen2.5-32b-cpu", 2), ("mixtral-8x7b-cpu", 3), ("llama-3.1-70b-cpu", 4)],
)
def test_fewest_nodes_match_the_test_plan_in_float32(model: str, expected_nodes: int) -> None:
    plan = place(get_card(model), TEST_PLAN, PlacementRequest(dtype="float32"))
    assert len(plan.shards) == expected_nodes
    assert plan.sharding == "pipeline" and plan.dtype == "float32"


BIG = ["llama-3.1-8b-cpu", "qwen2.5-32b-cpu", "mixtral-8x7b-cpu", "llama-3.1-70b-cpu"]


@pytest.mark.parametrize("model", BIG)
@pytest.mark.parametrize("count", [1, 2, 3, 4])
def test_shards_cover_every_layer_once_and_fit(model: str, count: int) -> None:
    card = get_card(model)
    try:
        plan = place(card, TEST_PLAN, PlacementRequest(dtype="bfloat16", nodes=count))
    except PlacementError:
        assert card.weight_bytes("bfloat16") > count * 90 * GB  # only refused when it cannot fit
        return
    assert len(plan.shards) == count
    assert plan.shards[0].start_layer == 0 and plan.shards[-1].end_layer == card.n_layers
    for before, after in zip(plan.shards, plan.shards[1:], strict=False):
        assert before.end_layer == after.start_layer
    assert all(s.n_layers >= 1 for s in plan.shards)
    assert all(s.memory_bytes <= 96 * GB for s in plan.shards)
    assert sum(s.memory_bytes for s in plan.shards) > card.weight_bytes("bfloat16")


def test_equal_nodes_get_near_equal_shares() -> None:
    plan = place(get_card("llama-3.1-70b-cpu"), TEST_PLAN, PlacementRequest(nodes=4))
    assert [s.n_layers for s in plan.shards] == [20, 20, 20, 20]
    assert plan.nodes == ("node1", "node2", "node3", "node4")


def test_layers_follow_memory_on_heterogeneous_nodes() -> None:
    request = PlacementRequest(nodes=4, dtype="bfloat16")
    plan = place(get_card("llama-3.1-70b-cpu"), nodes(64, 128, 64, 128), request)
    layers = {s.node: s.n_layers for s in plan.shards}
    assert layers["node2"] > layers["node1"] and layers["node4"] > layers["node3"]
    assert sum(layers.values()) == 80


def test_largest_nodes_are_chosen_and_kept_in_inventory_order() -> None:
    plan = place(get_card("qwen2.5-32b-cpu"), nodes(32, 96, 48, 96), PlacementRequest())
    assert plan.nodes == ("node2", "node4")


def test_down_nodes_are_never_used() -> None:
    plan = place(get_card("qwen2.5-32b-cpu"), nodes(96, 96, 96, 96, down=(0, 1)), PlacementRequest())
    assert plan.nodes == ("node3", "node4")


def test_reported_ram_is_used_without_a_declared_cap() -> None:
    profile = NodeProfile("solo", ram_total=64 * GB, ram_available=30 * GB)
    assert profile.capacity == 30 * GB
    expected = r"needs 32\.1 GB in float32; the largest live node offers 30\.0 GB"
    with pytest.raises(PlacementError, match=expected):
        place(get_card("llama-3.1-8b-cpu"), [profile], PlacementRequest())


def test_too_little_memory_carries_the_numbers() -> None:
    with pytest.raises(PlacementError) as info:
        place(get_card("llama-3.1-70b-cpu"), nodes(96, 96, 96), PlacementRequest(dtype="float32"))
    message = str(info.value)
    assert "llama-3.1-70b-cpu needs 282.2 GB in float32" in message
    assert (
        "the 3 largest live nodes offer 288.0 GB but it needs 299.0 GB with KV reserve, cached prefixes"
        in message
    )
    assert "add a node or use --dtype bfloat16" in message


def test_bfloat16_halves_the_nodes_needed() -> None:
    plan = place(get_card("llama-3.1-70b-cpu"), TEST_PLAN, PlacementRequest(dtype="bfloat16"))
    assert len(plan.shards) == 2


def test_exact_node_count_that_cannot_hold_the_model() -> None:
    with pytest.raises(PlacementError, match=r"2 nodes offer 192.0 GB.*use more than 2 nodes"):
        place(get_card("llama-3.1-70b-cpu"), TEST_PLAN, PlacementRequest(nodes=2))


def test_more_nodes_than_are_live() -> None:
    with pytest.raises(PlacementError, match=r"asked for 4 nodes but only 3 of 4 are live \(node2 down\)"):
        place(get_card("llama-3.1-8b-cpu"), nodes(96, 96, 96, 96, down=(1,)), PlacementRequest(nodes=4))


def test_more_nodes_than_layers() -> None:
    tiny = nodes(*([8] * 31))
    with pytest.raises(PlacementError, match="has 30 layers and cannot be split over 31 nodes"):
        place(get_card("smollm2-135m-cpu"), tiny, PlacementRequest(nodes=31))


def test_bad_counts_are_refused() -> None:
    with pytest.raises(PlacementError, match="--nodes must be at least 1, got 0"):
        place(get_card("llama-3.1-8b-cpu"), TEST_PLAN, PlacementRequest(nodes=0))


def test_a_node_too_small_for_its_share() -> None:
    # Plenty in total, but the first node cannot hold even the embedding plus one layer.
    with pytest.raises(PlacementError):
        place(get_card("llama-3.1-70b-cpu"), nodes(5, 200, 200), PlacementRequest(nodes=3))


def test_smollm2_splits_over_local_workers() -> None:
    local = nodes(8, 8, 8, 8)
    for count in (2, 3, 4):
        plan = place(get_card("smollm2-135m-cpu"), local, PlacementRequest(nodes=count))
        layers = [s.n_layers for s in plan.shards]
        assert sum(layers) == 30 and max(layers) - min(layers) <= 1
    # The end nodes also hold the embedding and the lm_head, so the middle ones take the extra layers.
    plan = place(get_card("smollm2-135m-cpu"), local, PlacementRequest(nodes=4))
    assert [s.n_layers for s in plan.shards] == [7, 8, 8, 7]


@pytest.mark.parametrize(
    ("layers", "budgets", "expected"),
    [
        (10, [1, 1], [5, 5]),
        (10, [1, 3], [3, 7]),
        (7, [1, 1, 1], [3, 2, 2]),
        (4, [100, 1, 1, 1], [1, 1, 1, 1]),
        (5, [0, 0], [3, 2]),
    ],
)
def test_split_layers_by_largest_remainder(layers: int, budgets: list[int], expected: list[int]) -> None:
    assert split_layers(layers, budgets) == expected
