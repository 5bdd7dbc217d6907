"""Pipeline placement: which nodes hold which layers of a model. A pure function.

`place(card, nodes, request)` returns frozen data or raises `PlacementError` carrying the
numbers. Memory is counted in the runtime dtype: the layers' weights, the embedding on the
first node, the final norm and lm_head on the last, a KV-cache reserve for each node's layers,
a budget for cached prefixes (the KV of ended sequences kept for reuse), and a fixed runtime
overhead per node (Python, torch, buffers).
"""

from __future__ import annotations

from dataclasses import dataclass

from exoctl.dtypes import embedding_bytes, float_bytes
from exoctl.errors import ExoctlError
from exoctl.models.catalog import ModelCard
from exoctl.wire.node_speed import NodeSpeed

GB = 10**9
RUNTIME_OVERHEAD_BYTES = 2 * GB
KV_RESERVE_TOKENS = 8192  # one sequence of this many tokens fits in every placement
# Cached prefixes by default: the KV of this many positions of the node's layers (a conversation
# or shared system prompt of that length); a node's `prefix_cache_gb` or `place --prefix-cache-gb`
# gives bytes instead, 0 turns caching off.
PREFIX_CACHE_TOKENS = 8192


class PlacementError(ExoctlError):
    """A placement that cannot work; the message carries the numbers."""


@dataclass(frozen=True)
class NodeProfile:
    name: str
    ram_total: int
    ram_available: int
    memory_cap: int | None = None  # declared in the inventory: used instead of reported RAM
    live: bool = True
    prefix_cache_bytes: int | None = None  # declared in the inventory (None: PREFIX_CACHE_TOKENS)
    machine: str = ""  # nodes of one machine share its memory (and /dev/shm)
    host: str = ""  # nodes of one host share its cores and memory bus ("" : as `machine`)
    speed: NodeSpeed | None = None  # measured by its worker (None: not known)
    threads: int = 0  # its worker's compute threads
    cpus: int = 0  # its machine's cores

    @property
    def capacity(self) -> int:
        return self.memory_cap if self.memory_cap is not None else self.ram_available


@dataclass(frozen=True)
class DraftChoice:
    """The head's drafter for speculative decoding: prompt lookup (`reference` "ngram", no model)
    or a draft model: its reference as a worker resolves it, catalog id, dtype, layer count, and
    the bytes it takes on the head's node (weights and a KV reserve; 0 for prompt lookup)."""

    reference: str
    model_id: str = ""
    dtype: str = ""
    layers: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class PlacementRequest:
    dtype: str = "float32"
    nodes: int | None = None  # exactly this many
    min_nodes: int = 1  # otherwise the fewest that fit, at least this many
    kv_tokens: int = KV_RESERVE_TOKENS
    prefix_cache_bytes: int | None = None  # on every node, over what each node declares
    draft: DraftChoice | None = None  # speculative decoding's drafter, on the first node
    partials: str = "auto"  # tensor partials across links: "auto" (by the links), "exact" or "q8"

    @property
    def draft_bytes(self) -> int:
        return self.draft.bytes if self.draft is not None else 0


@dataclass(frozen=True)
class Shard:
    node: str
    start_layer: int
    end_layer: int  # exclusive
    memory_bytes: int  # all of it: weights + kv_bytes + prefix_bytes + runtime_bytes + draft_bytes
    kv_bytes: int = 0  # the KV reserve of its layers (KV_RESERVE_TOKENS tokens of one sequence)
    runtime_bytes: int = 0  # the allowance for activations, the interpreter and torch
    prefix_bytes: int = 0  # the budget for cached prefixes
    position_bytes: int = 0  # what one position of KV costs here (its layers, its heads)
    draft_bytes: int = 0  # the first node: a draft model for speculative decoding

    @property
    def weight_bytes(self) -> int:
        return self.memory_bytes - self.kv_bytes - self.runtime_bytes - self.prefix_bytes - self.draft_bytes

    @property
    def n_layers(self) -> int:
        return self.end_layer - self.start_layer


@dataclass(frozen=True)
class Placement:
    model_id: str
    sharding: str
    dtype: str
    shards: tuple[Shard, ...]
    draft: DraftChoice | None = None  # the head's drafter (on shards[0]'s node)
    partials: str = "exact"  # tensor partials across links: "exact" or "q8" (8-bit blocks)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(s.node for s in self.shards)

    @property
    def prefix_positions(self) -> int:
        """The positions the instance's cached prefixes may hold together: an entry holds them on
        every node, so the node whose budget holds the fewest decides (0: caching off)."""
        if not self.shards or any(s.position_bytes <= 0 for s in self.shards):
            return 0
        return min(s.prefix_bytes // s.position_bytes for s in self.shards)


def kv_position_bytes(card: ModelCard, dtype: str, kv_heads: int | None = None) -> int:
    """Bytes one position of KV costs in one layer (keys and values of `kv_heads` heads, all of
    them by default), in what the KV cache is held in (float32 where the CPU decides: the bound)."""
    heads = card.num_key_value_heads if kv_heads is None else kv_heads
    return 2 * heads * card.head_dim * float_bytes(dtype)


def prefix_budget(
    card: ModelCard, dtype: str, layers: int, kv_heads: int, given: int | None
) -> tuple[int, int]:
    """(bytes for cached prefixes, bytes of one position of KV) on a node holding `layers` layers
    of `kv_heads` KV heads each; `given` bytes, or by default PREFIX_CACHE_TOKENS positions."""
    position = layers * kv_position_bytes(card, dtype, kv_heads)
    return (given if given is not None else position * PREFIX_CACHE_TOKENS), position


def node_prefix_bytes(node: NodeProfile, request: PlacementRequest) -> int | None:
    """The bytes a node gives cached prefixes: the request's, else the node's own; None for the
    default of PREFIX_CACHE_TOKENS positions of what it holds."""
    return request.prefix_cache_bytes if request.prefix_cache_bytes is not None else node.prefix_cache_bytes


@dataclass(frozen=True)
class _Costs:
    """Bytes of the pieces of a model in one dtype."""

    layers: tuple[int, ...]  # each layer's weights plus its KV reserve (a GGUF's layers may differ)
    kv_per_layer: int
    position_per_layer: int  # one position of KV in one layer
    embed: int
    head: int  # final norm + lm_head
    overhead: int
    draft: int = 0  # a draft model beside the first node's layers

    @classmethod
    def of(cls, card: ModelCard, request: PlacementRequest) -> _Costs:
        dtype = request.dtype
        position = kv_position_bytes(card, dtype)
        kv_per_layer = position * request.kv_tokens
        return cls(
            layers=tuple(b + kv_per_layer for b in card.layer_bytes_each(dtype)),
            kv_per_layer=kv_per_layer,
            position_per_layer=position,
            embed=embedding_bytes(dtype, card.vocab_size, card.hidden_size),
            # final norm + lm_head; a tied lm_head is still a second copy on the last node
            head=card.head_bytes(dtype),
            overhead=RUNTIME_OVERHEAD_BYTES,
            draft=request.draft_bytes,
        )

    @property
    def prefix_per_layer(self) -> int:
        """The default budget for cached prefixes, per layer a node holds."""
        return self.position_per_layer * PREFIX_CACHE_TOKENS

    def fixed(self, index: int, count: int) -> int:
        """Bytes a node needs besides its layers, by its position in the pipeline (the first also
        holds the draft model)."""
        first = self.embed + self.draft if index == 0 else 0
        return self.overhead + first + (self.head if index == count - 1 else 0)

    def total(self, count: int, prefixes: list[int | None]) -> int:
        """All nodes together, with each node's budget for cached prefixes (None: the default)."""
        given = sum(p for p in prefixes if p is not None)
        # the nodes on the default hold their share of the layers, each with its per-layer budget
        defaulted = sum(p is None for p in prefixes)
        default = len(self.layers) * self.prefix_per_layer * defaulted // count
        return (
            sum(self.layers) + self.embed + self.head + count * self.overhead + given + default + self.draft
        )

    def ranges(self, counts: list[int], per_layer: list[int]) -> list[int]:
        """Bytes of each node's layers when nodes hold `counts` consecutive layers, each layer with
        `per_layer` more on its node (the default budget for cached prefixes)."""
        out, start = [], 0
        for n, extra in zip(counts, per_layer, strict=True):
            out.append(sum(self.layers[start : start + n]) + n * extra)
            start += n
        return out


def stage_bytes(
    card: ModelCard, request: PlacementRequest, index: int, count: int, start: int, end: int
) -> int:
    """What stage `index` of `count` holding layers [start, end) needs, as `place` counts it (its
    layers with their KV reserve, the embedding or head its position gives it, the runtime), before
    its budget for cached prefixes."""
    costs = _Costs.of(card, request)
    return sum(costs.layers[start:end]) + costs.fixed(index, count)


def split_layers(n_layers: int, budgets: list[int]) -> list[int]:
    """Layers per node in proportion to `budgets` (largest remainder), at least one each."""
    count = len(budgets)
    if n_layers < count:
        raise PlacementError(f"{n_layers} layers cannot be split over {count} nodes", hint="use fewer nodes")
    spare = n_layers - count  # one layer each is given first
    weights = [max(b, 0) for b in budgets]
    if not any(weights):
        weights = [1] * count
    total = sum(weights)
    exact = [spare * w / total for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(count), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: spare - sum(shares)]:
        shares[i] += 1
    return [s + 1 for s in shares]


def decode_weights(chosen: list[NodeProfile], dtype: str) -> list[int] | None:
    """What a pipeline's layers are split by when every node's speed is measured: the rate each
    reads weights at in `dtype` (a node twice as fast carries twice the layers, so the stages take
    equal time), within memory (`_rebalance` moves layers off a node over its budget). None (split
    by memory) when a speed is unknown."""
    if not chosen or any(n.speed is None for n in chosen):
        return None
    return [max(1, int(n.speed.read_rate(dtype) / 1e6)) for n in chosen if n.speed is not None]


def _rebalance(layers: list[int], budgets: list[int], costs: _Costs, per_layer: list[int]) -> bool:
    """Move single layers from nodes over budget to nodes with room; False if impossible."""
    largest = max(costs.layers)
    for _ in range(len(costs.layers) * len(layers)):  # layers that differ in size could cycle
        held = costs.ranges(layers, per_layer)
        over = [i for i, b in enumerate(held) if b > budgets[i]]
        if not over:
            return True
        room = [i for i, b in enumerate(held) if b + largest + per_layer[i] <= budgets[i]]
        giver = over[0]
        if not room or layers[giver] <= 1:
            return False
        layers[giver] -= 1
        layers[max(room, key=lambda i: budgets[i] - held[i])] += 1
    return False


def _try(
    card: ModelCard, chosen: list[NodeProfile], costs: _Costs, request: PlacementRequest
) -> tuple[Shard, ...] | None:
    count = len(chosen)
    given = [node_prefix_bytes(node, request) for node in chosen]
    # a node's own budget is fixed bytes; the default grows with the layers it holds
    per_layer = [costs.prefix_per_layer if g is None else 0 for g in given]
    budgets = [node.capacity - costs.fixed(i, count) - (given[i] or 0) for i, node in enumerate(chosen)]
    if any(b < min(costs.layers) + extra for b, extra in zip(budgets, per_layer, strict=True)):
        return None
    layers = split_layers(card.n_layers, decode_weights(chosen, request.dtype) or budgets)
    if not _rebalance(layers, budgets, costs, per_layer):
        return None
    shards, start = [], 0
    for i, (node, n, held) in enumerate(zip(chosen, layers, costs.ranges(layers, per_layer), strict=True)):
        own = given[i]
        prefix, position = prefix_budget(card, request.dtype, n, card.num_key_value_heads, own)
        total = held + costs.fixed(i, count) + (own or 0)
        draft = costs.draft if i == 0 else 0
        shards.append(
            Shard(
                node.name,
                start,
                start + n,
                total,
                n * costs.kv_per_layer,
                costs.overhead,
                prefix,
                position,
                draft,
            )
        )
        start += n
    return tuple(shards)


def missing_nodes_hint(wanted: int, known: int) -> str:
    """More nodes asked for than are live: start them, or (more than the inventory has) add them."""
    if wanted > known:
        nodes = f"{known} node{'s' if known != 1 else ''}"
        return f"the inventory has {nodes}: ask for at most {known}, or add nodes to it"
    return "start the missing workers with `exoctl up`, or ask for fewer nodes"


def _gb(value: int) -> str:
    return f"{value / GB:.1f} GB"


def place(card: ModelCard, nodes: list[NodeProfile], request: PlacementRequest) -> Placement:
    """Choose nodes and split the layers; the largest live nodes are used, kept in inventory order."""
    costs = _Costs.of(card, request)
    live = [n for n in nodes if n.live]
    if request.nodes is not None and request.nodes < 1:
        raise PlacementError(f"--nodes must be at least 1, got {request.nodes}")
    if request.min_nodes < 1:
        raise PlacementError(f"--min-nodes must be at least 1, got {request.min_nodes}")
    wanted = request.nodes if request.nodes is not None else request.min_nodes
    if wanted > len(live):
        down = [n.name for n in nodes if not n.live]
        detail = f" ({', '.join(down)} down)" if down else ""
        raise PlacementError(
            f"{card.id} was asked for {wanted} nodes but only {len(live)} of {len(nodes)} are live{detail}",
            hint=missing_nodes_hint(wanted, len(nodes)),
        )
    if wanted > card.n_layers:
        raise PlacementError(
            f"{card.id} has {card.n_layers} layers and cannot be split over {wanted} nodes",
            hint=f"use at most {card.n_layers} nodes",
        )
    by_size = sorted(range(len(live)), key=lambda i: (-live[i].capacity, i))

    def largest(count: int) -> list[NodeProfile]:
        return [live[i] for i in sorted(by_size[:count])]

    counts = [wanted] if request.nodes is not None else range(wanted, min(len(live), card.n_layers) + 1)
    for count in counts:
        shards = _try(card, largest(count), costs, request)
        if shards is not None:
            return Placement(card.id, "pipeline", request.dtype, shards, request.draft)
    count = counts[-1]
    chosen = largest(count)
    offered = sum(n.capacity for n in chosen)
    needed = costs.total(count, [node_prefix_bytes(n, request) for n in chosen])
    weights = card.weight_bytes(request.dtype)
    if request.nodes is not None:
        what = f"{count} nodes offer" if count > 1 else "1 node offers"
    else:
        what = f"the {count} largest live nodes offer" if count > 1 else "the largest live node offers"
    if offered >= needed:
        smallest = min(chosen, key=lambda n: n.capacity)
        raise PlacementError(
            f"{card.id} needs {_gb(needed)} in {request.dtype} and {what} {_gb(offered)}, but node "
            f"{smallest.name} ({_gb(smallest.capacity)}) cannot hold its share",
            hint="use more nodes or --dtype bfloat16",
        )
    hint = "add a node" if request.nodes is None or count == len(live) else f"use more than {count} nodes"
    if request.dtype == "float32":
        hint += " or use --dtype bfloat16"
    raise PlacementError(
        f"{card.id} needs {_gb(weights)} in {request.dtype}; {what} {_gb(offered)} but it needs "
        f"{_gb(needed)} with KV reserve, cached prefixes{', the draft model' if costs.draft else ''} and "
        "runtime overhead",
        hint=hint,
    )
