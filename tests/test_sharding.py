"""`--sharding auto` on hand-built node sets: one node when it fits, else tensor when the heads
divide and equal slices fit, else pipeline; each with its one-line reason. And the errors."""

from __future__ import annotations

import pytest

from exoctl.models.catalog import get_card
from exoctl.placement.pipeline import GB, NodeProfile, PlacementError, PlacementRequest
from exoctl.placement.sharding import UnknownShardingError, plan


def nodes(*sizes_gb: float) -> list[NodeProfile]:
    return [NodeProfile(f"node{i + 1}", int(s * GB), int(s * GB)) for i, s in enumerate(sizes_gb)]


BF16 = PlacementRequest(dtype="bfloat16")


def test_a_model_that_fits_on_one_node_goes_on_one() -> None:
    chosen = plan(get_card("llama-3.1-8b-cpu"), nodes(24, 64, 64), BF16, "auto")
    assert chosen.placement.nodes == ("node2",) and chosen.placement.sharding == "pipeline"
    assert chosen.reason.startswith("one node: llama-3.1-8b-cpu fits on node2 alone (")


def test_a_model_too_big_for_one_node_is_tensor_split_when_the_heads_divide() -> None:
    # 70B in bf16 is 141 GB: four 64 GB nodes each hold a quarter plus the embedding
    chosen = plan(get_card("llama-3.1-70b-cpu"), nodes(64, 64, 64, 64), BF16, "auto")
    placement = chosen.placement
    assert placement.sharding == "tensor" and len(placement.shards) == 4
    assert chosen.reason.startswith("tensor: 16 of 64 heads on each of 4 nodes, ")


def test_auto_takes_the_fewest_dividing_nodes_that_fit() -> None:
    # 3 nodes of 64 GB would hold it, but 8 KV heads do not divide by 3
    chosen = plan(get_card("llama-3.1-70b-cpu"), nodes(64, 64, 64, 64, 64), BF16, "auto")
    assert chosen.placement.sharding == "tensor" and len(chosen.placement.shards) == 4


def test_mixtral_is_split_by_experts() -> None:
    chosen = plan(get_card("mixtral-8x7b-cpu"), nodes(40, 40, 40, 40), BF16, "auto")
    assert chosen.placement.sharding == "tensor"
    assert "4 of 8 experts" in chosen.reason or "2 of 8 experts" in chosen.reason


def test_heads_that_do_not_divide_fall_back_to_pipeline_and_say_why() -> None:
    # SmolLM2 (9 heads, 3 KV heads) on nodes too small for it alone: 2 nodes cannot split heads
    card = get_card("smollm2-135m-cpu")
    tiny = [NodeProfile(f"node{i}", int(2.8 * GB), int(2.8 * GB)) for i in (1, 2)]
    chosen = plan(card, tiny, PlacementRequest(dtype="float32"), "auto")
    assert chosen.placement.sharding == "pipeline" and len(chosen.placement.shards) == 2
    assert chosen.reason.startswith("pipeline: layers node1 [0, ")
    assert chosen.reason.endswith(
        "not tensor because smollm2-135m-cpu cannot be tensor-split over 2 or more of the 2 live nodes: "
        "its 3 KV heads do not divide by any such count"
    )


def test_unequal_nodes_fall_back_to_pipeline() -> None:
    # one small node: an equal slice does not fit it, but a smaller share of the layers does
    card = get_card("llama-3.1-70b-cpu")
    chosen = plan(card, nodes(120, 120, 120, 30), PlacementRequest(dtype="bfloat16", nodes=4), "auto")
    assert chosen.placement.sharding == "pipeline"
    assert "not tensor because" in chosen.reason and "node node4 offers 30.0 GB" in chosen.reason


def test_asking_for_several_nodes_skips_the_one_node_choice() -> None:
    chosen = plan(
        get_card("llama-3.1-8b-cpu"), nodes(64, 64), PlacementRequest(dtype="bfloat16", nodes=2), "auto"
    )
    assert chosen.placement.sharding == "tensor" and chosen.placement.nodes == ("node1", "node2")


def test_explicit_shardings_are_kept_and_their_errors_carry_the_numbers() -> None:
    card = get_card("llama-3.1-8b-cpu")
    piped = plan(card, nodes(64, 64), PlacementRequest(dtype="bfloat16", nodes=2), "Pipeline")
    assert piped.placement.sharding == "pipeline" and piped.reason.startswith("pipeline, as asked: layers ")
    split = plan(card, nodes(64, 64), PlacementRequest(dtype="bfloat16", nodes=2), "TENSOR")
    assert split.placement.sharding == "tensor" and split.reason.startswith(
        "tensor, as asked: 16 of 32 heads"
    )
    with pytest.raises(PlacementError, match="cannot be tensor-split over 3 nodes: its 32 heads, 8 KV heads"):
        plan(card, nodes(64, 64, 64), PlacementRequest(dtype="bfloat16", nodes=3), "tensor")
    with pytest.raises(
        PlacementError, match=r"needs \d+\.\d GB per node in bfloat16, but node node1 offers 5\.0 GB"
    ):
        plan(card, nodes(5, 5), PlacementRequest(dtype="bfloat16", nodes=2), "tensor")
    with pytest.raises(UnknownShardingError, match="unknown sharding 'ring'") as caught:
        plan(card, nodes(64), BF16, "ring")
    assert caught.value.hint == "use one of auto, pipeline, tensor"


def test_auto_on_one_node_that_is_too_small_gives_the_one_node_error() -> None:
    with pytest.raises(PlacementError, match=r"llama-3\.1-70b-cpu needs .* 1 node offers 64\.0 GB"):
        plan(
            get_card("llama-3.1-70b-cpu"), nodes(64, 64), PlacementRequest(dtype="bfloat16", nodes=1), "auto"
        )
