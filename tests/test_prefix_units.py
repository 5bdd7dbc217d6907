"""Cached prefixes on hand-built values: the head's index (match, keep, cover, evict, pins), a
runner's store and the KV copies it makes, the memory-pressure rule, and the budget placement
reserves (default, per node, per request, off). No processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exoctl.engine.kv_cache import KVCache
from exoctl.errors import ExoctlError
from exoctl.inventory import InventoryError, parse_inventory
from exoctl.models.catalog import get_card
from exoctl.placement.pipeline import (
    GB,
    KV_RESERVE_TOKENS,
    PREFIX_CACHE_TOKENS,
    NodeProfile,
    PlacementRequest,
    place,
)
from exoctl.placement.tensor import place_tensor
from exoctl.wire.instance_messages import Reuse
from exoctl.worker.node_memory import MIN_FREE_BYTES, Room, positions_to_free
from exoctl.worker.prefix_index import MAX_ENTRIES, PrefixIndex, common_prefix
from exoctl.worker.prefix_store import PrefixStore

# --- the head's index ---------------------------------------------------------------------------


def test_common_prefix_counts_leading_ids_across_block_boundaries() -> None:
    long = tuple(range(1000))
    assert common_prefix(long, long) == 1000
    assert common_prefix(long, (*long[:700], -1, *long[701:])) == 700  # inside the third block
    assert common_prefix(long, long[:256]) == 256  # one ends on a block boundary
    assert common_prefix((1, 2), (3,)) == 0 and common_prefix((), (1,)) == 0


def test_the_longest_cached_prefix_is_reused_and_at_least_one_position_is_left_to_run() -> None:
    index = PrefixIndex(budget=1000)
    assert index.keep("a", [1, 2, 3, 4]).kept and index.keep("b", [1, 2, 9]).kept
    match = index.match([1, 2, 3, 4, 5])
    assert match is not None and (match.entry, match.positions) == ("a", 4)
    exact = index.match([1, 2, 3, 4])  # the whole prompt is cached: its last position runs again
    assert exact is not None and (exact.entry, exact.positions) == ("a", 3)
    assert index.match([7, 1, 2]) is None  # nothing shares the first token
    assert index.match([1]) is None  # one position: nothing to reuse (it must run)
    assert (index.stats.lookups, index.stats.hits, index.stats.reused_tokens) == (4, 2, 7)


def test_an_entry_extended_by_a_later_one_is_forgotten_and_a_covered_one_not_kept() -> None:
    index = PrefixIndex(budget=1000)
    index.keep("turn1", [1, 2, 3])
    # the next turn of the conversation holds all of the first: the first is of no more use
    decision = index.keep("turn2", [1, 2, 3, 4, 5])
    assert decision.kept and decision.forget == ("turn1",) and set(index.entries) == {"turn2"}
    assert index.stats.evictions == 0  # covered, not evicted
    # one that a held entry covers already is not kept twice
    assert not index.keep("short", [1, 2, 3]).kept and set(index.entries) == {"turn2"}


def test_the_least_recently_used_entries_make_room_and_pinned_ones_never_go() -> None:
    index = PrefixIndex(budget=10)
    index.keep("a", [1, 1, 1, 1])
    index.keep("b", [2, 2, 2, 2])
    index.match([1, 1, 1, 9])  # a is used after b: b is the least recently used
    decision = index.keep("c", [3, 3, 3, 3])
    assert decision.kept and decision.forget == ("b",) and set(index.entries) == {"a", "c"}
    assert index.held == 8 <= index.budget and index.stats.evictions == 1
    index.pin("a")
    index.pin("c")
    # everything else is pinned: no room for it, and nothing is evicted to try
    assert index.keep("d", [4, 4, 4, 4]) == type(decision)(False)
    assert set(index.entries) == {"a", "c"}
    index.unpin("c")
    assert index.keep("d", [4, 4, 4, 4]).forget == ("c",)
    # longer than the whole budget: never kept
    assert not index.keep("e", list(range(11))).kept


def test_an_entry_a_sequence_copies_from_is_not_replaced_by_one_of_its_name() -> None:
    index = PrefixIndex(budget=100)
    index.keep("x", [1, 2, 3])
    index.pin("x")
    assert not index.keep("x", [5, 6]).kept and index.entries["x"].ids == (1, 2, 3)
    index.unpin("x")
    assert index.keep("x", [5, 6]) == type(index.keep("y", [9]))(True, ())
    assert index.entries["x"].ids == (5, 6)


def test_budget_zero_keeps_and_reuses_nothing() -> None:
    index = PrefixIndex(budget=0)
    assert not index.enabled and not index.keep("a", [1, 2]).kept and index.match([1, 2, 3]) is None
    assert index.stats.lookups == 0


def test_the_index_holds_at_most_max_entries() -> None:
    index = PrefixIndex(budget=10**6)
    for i in range(MAX_ENTRIES + 5):
        index.keep(f"e{i}", [i, i])
    assert len(index.entries) == MAX_ENTRIES and "e0" not in index.entries


def test_memory_pressure_evicts_the_least_recently_used_unpinned_entries() -> None:
    index = PrefixIndex(budget=100)
    for name, token in (("old", 1), ("mid", 2), ("new", 3)):
        index.keep(name, [token] * 10)
    index.pin("old")
    assert index.evict(15) == ("mid", "new") and set(index.entries) == {"old"}
    assert index.evict(1) == ()  # only a pinned one is left


def test_a_new_request_evicts_what_leaves_each_node_its_floor() -> None:
    gib = 2**30
    roomy, tight = Room(20 * gib, 24 * gib), Room(MIN_FREE_BYTES + 1000, 4 * gib)
    assert Room(0, 100 * gib).floor == 5 * gib and Room(0, gib).floor == MIN_FREE_BYTES
    assert positions_to_free([(roomy, 100)], 1000) == 0
    # the tight node needs 1000 * 100 bytes more than it has above its floor: 990 positions there
    assert positions_to_free([(roomy, 100), (tight, 100)], 1000) == 990
    # a position costs twice as much on the other node: fewer positions free as much
    assert positions_to_free([(tight, 200)], 1000) == 995


# --- a runner's store and the KV copies ---------------------------------------------------------


def filled_cache(length: int, layers: range = range(2, 4)) -> KVCache:
    cache = KVCache(layers, num_kv_heads=2, head_dim=4, dtype=torch.float32)
    for start in range(0, length, 3):  # appended in steps, as a prompt and its answer are
        steps = min(3, length - start)
        for layer in layers:
            k = torch.arange(steps * 8, dtype=torch.float32).view(steps, 2, 4) + 100 * start + layer
            cache.append(layer, k, -k)
    return cache


def test_a_copied_prefix_is_the_new_sequences_own() -> None:
    source = filled_cache(10)
    copy = source.copy_prefix(6, room=20)
    assert copy.length == 6 and copy.capacity >= 26
    for layer in source.layers:
        assert torch.equal(copy.keys[layer][:, :6], source.keys[layer][:, :6])
        assert torch.equal(copy.values[layer][:, :6], source.values[layer][:, :6])
    before = source.keys[2][:, :10].clone()
    copy.append(2, torch.ones(1, 2, 4), torch.ones(1, 2, 4))  # the copy grows; the source does not change
    assert torch.equal(source.keys[2][:, :10], before) and source.length == 10
    with pytest.raises(ValueError, match="cannot copy 11 positions of a cache holding 10"):
        source.copy_prefix(11)


def test_a_kept_prefix_holds_exactly_its_positions() -> None:
    source = filled_cache(10)
    assert source.capacity > 10  # grown in chunks
    kept = source.compacted(9)
    assert kept.length == kept.capacity == 9
    assert kept.nbytes == 9 * kept.position_bytes() == 9 * 2 * 2 * 2 * 4 * 4
    assert torch.equal(kept.keys[3], source.keys[3][:, :9])


def test_a_store_keeps_copies_forgets_and_reports_what_the_head_said() -> None:
    store = PrefixStore("n1", budget_bytes=10**6)
    live = {"s1": filled_cache(10)}
    store.keep("s1", live.pop("s1"), 8)
    copy = store.reuse(Reuse("s1", 5), live, room=3)
    assert copy.length == 5 and torch.equal(copy.keys[2][:, :5], store.entries["s1"].keys[2][:, :5])
    report = store.report()
    assert (report.entries, report.positions, report.hits, report.reused_tokens) == (1, 8, 1, 5)
    assert report.bytes == store.nbytes == 8 * store.entries["s1"].position_bytes()
    # the head's word to keep a sequence may come after a step that reuses it: its live cache serves
    live["s2"] = filled_cache(6)
    assert store.reuse(Reuse("s2", 4), live, room=0).length == 4
    with pytest.raises(ExoctlError, match="node n1 holds 8 positions of cached prefix s1, not the 9"):
        store.reuse(Reuse("s1", 9), live, room=0)
    with pytest.raises(ExoctlError, match="node n1 holds nothing of cached prefix gone"):
        store.reuse(Reuse("gone", 1), live, room=0)
    store.keep("s3", filled_cache(4), 7)  # fewer positions than the head counted: not kept
    assert set(store.entries) == {"s1"}
    store.keep("s3", filled_cache(4), 4)
    store.retain(("s3",))  # the head's lease names only s3
    assert set(store.entries) == {"s3"}
    store.forget(("s3", "never-held"))
    assert store.entries == {} and store.report().bytes == 0


# --- what placement reserves --------------------------------------------------------------------


def nodes(*sizes_gb: float, prefix_gb: float | None = None) -> list[NodeProfile]:
    prefix = None if prefix_gb is None else int(prefix_gb * GB)
    return [
        NodeProfile(f"node{i + 1}", int(s * GB), int(s * GB), prefix_cache_bytes=prefix)
        for i, s in enumerate(sizes_gb)
    ]


def test_by_default_each_node_reserves_prefix_positions_of_its_own_layers() -> None:
    card = get_card("llama-3.1-70b-cpu")
    plan = place(card, nodes(96, 96, 96, 96), PlacementRequest(dtype="float32"))
    for shard in plan.shards:
        per_position = shard.n_layers * 2 * card.num_key_value_heads * card.head_dim * 4
        assert shard.position_bytes == per_position
        assert shard.prefix_bytes == per_position * PREFIX_CACHE_TOKENS
        assert shard.kv_bytes == per_position * KV_RESERVE_TOKENS
        assert (
            shard.memory_bytes
            == shard.weight_bytes + shard.kv_bytes + shard.prefix_bytes + shard.runtime_bytes
        )
    assert plan.prefix_positions == PREFIX_CACHE_TOKENS


def test_a_node_or_a_request_sets_the_budget_in_bytes_and_the_tightest_node_decides() -> None:
    card = get_card("llama-3.1-8b-cpu")
    given = place(card, nodes(40, 40, prefix_gb=1.5), PlacementRequest(dtype="float32", nodes=2))
    assert [s.prefix_bytes for s in given.shards] == [int(1.5 * GB)] * 2
    assert given.prefix_positions == min(int(1.5 * GB) // s.position_bytes for s in given.shards)
    # the request's budget is over what the nodes declare; 0 turns the cache off
    off = place(
        card, nodes(40, 40, prefix_gb=1.5), PlacementRequest(dtype="float32", nodes=2, prefix_cache_bytes=0)
    )
    assert [s.prefix_bytes for s in off.shards] == [0, 0] and off.prefix_positions == 0
    assert off.shards[0].memory_bytes == given.shards[0].memory_bytes - int(1.5 * GB)


def test_a_large_budget_that_does_not_fit_moves_the_model_to_more_nodes() -> None:
    card = get_card("llama-3.1-8b-cpu")
    assert len(place(card, nodes(40, 40), PlacementRequest(dtype="float32")).shards) == 1
    big = PlacementRequest(dtype="float32", prefix_cache_bytes=10 * GB)
    assert len(place(card, nodes(40, 40), big).shards) == 2


def test_tensor_ranks_reserve_their_share_of_the_kv_heads() -> None:
    card = get_card("llama-3.1-70b-cpu")
    plan = place_tensor(card, nodes(96, 96, 96, 96), PlacementRequest(dtype="float32", nodes=4))
    per_position = card.n_layers * 2 * (card.num_key_value_heads // 4) * card.head_dim * 4
    assert all(s.position_bytes == per_position for s in plan.shards)
    assert all(s.prefix_bytes == per_position * PREFIX_CACHE_TOKENS for s in plan.shards)
    assert plan.prefix_positions == PREFIX_CACHE_TOKENS


def test_the_inventory_field_takes_gb_and_refuses_what_is_not(tmp_path: Path) -> None:
    inventory = parse_inventory(
        {
            "defaults": {"prefix_cache_gb": 2},
            "nodes": [{"name": "a", "host": "h1"}, {"name": "b", "host": "h2", "prefix_cache_gb": 0}],
        },
        "test.yaml",
    )
    assert [n.prefix_cache_gb for n in inventory.nodes] == [2.0, 0.0]
    with pytest.raises(InventoryError) as caught:
        parse_inventory({"nodes": [{"name": "a", "host": "h", "prefix_cache_gb": -1}]}, "test.yaml")
    assert "node 'a': field 'prefix_cache_gb' must be a number of GB, 0 or more" in caught.value.message
