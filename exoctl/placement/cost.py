"""What a placement will decode and read prompts at, predicted from measured nodes and links. Pure.

One stream's decode step reads every weight once; on CPU that is memory-bound, so a node's share
of a token is the bytes of weights it holds over the rate its kernels read them (`NodeSpeed`),
plus a fixed cost per layer (kernel calls, attention on a short cache). Then the network:

- pipeline: the stages run one after another, and a token crosses `count` links (each stage hands
  its hidden state on, the last sends the token back to the head);
- tensor: the ranks run at once (the slowest decides), but pay 2 all-reduces a layer (after the
  attention and after the MLP) plus one for the token: with every rank on one host through shared
  memory, else a direct exchange in which each rank sends its partial to the k - 1 others over its
  own link (the sender's link is the bottleneck: (k - 1) partials of `hidden` values, each in
  float32 or, `q8`, as 8-bit blocks of 32 with a float32 scale).

Ranks on one host share its memory bus (its best worker's measured rate, scaled to the cores the
ranks use at once), threads beyond its cores slow every rank by the ratio, and each collective
then waits for the scheduler too. Prompts are compute-bound: each
node's share of 2 x parameters x tokens at its GEMM rate, and the same hand-offs carrying every
position at once.

Links never measured are assumed (loopback on one machine, 1 Gbit/s Ethernet between machines),
and the prediction says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from exoctl.models.catalog import ModelCard
from exoctl.placement.pipeline import NodeProfile, Placement

# Fixed costs, in units of the node's measured small-call time (`NodeSpeed.call_s`): per layer in
# a decode step (the fused layer's call, attention over the cache, the residual adds), and per
# token (embedding, final norm, sampling, the head's bookkeeping). Fitted to `exoctl bench` on
# SmolLM2 (30 small layers, where they dominate) and the 1.1B shape (benchmarks/cost_model.py).
LAYER_CALLS = 6.0
TOKEN_CALLS = 60.0
# A message between runners beyond its time on the wire: encoding, the I/O threads on both ends,
# the receiving lane's wake-up (about 1 ms on the 2-core test machine, where a small call is 12 us):
# paid per pipeline hop, and once a tensor step (the head's step to the ranks). Fitted on a tiny
# model, where nothing else costs (a 2-stage pipeline 2.0 ms a token over one node, a 2-rank split 1.4).
MESSAGE_CALLS = 80.0
SHM_ALL_REDUCE_S = 25e-6  # one all-reduce between ranks of one host through shared memory
Q8_BLOCK = 32
PROMPT_TOKENS = 128  # the prompt the prefill prediction is for
# a collective on a host whose ranks want more threads than it has cores waits for the scheduler:
# per collective and per rank's worth of oversubscription (fitted: 4 one-thread ranks on 2 cores)
OVERSUBSCRIBED_SHM_S = 0.5e-3
OVERSUBSCRIBED_ZMQ_S = 1.3e-3
# A host's memory bus serves more threads less than in proportion: a worker's measured rate scales
# by (cores used / its threads) ** BUS_SCALING (1 -> 2 threads on the test machine: 1.35x in int4,
# 1.8x in float32; benchmarks/links.py)
BUS_SCALING = 0.7
Q8_WORTH = 0.05  # 8-bit partials when float32's exchange would be more than this share of a token


@dataclass(frozen=True)
class LinkCost:
    """One direction of a link: round trip of a small frame, throughput, and whether measured."""

    rtt_s: float
    bytes_per_s: float
    measured: bool = True

    def send_s(self, nbytes: float) -> float:
        """One message of `nbytes`: half a round trip, then the bytes at the link's rate."""
        return self.rtt_s / 2 + nbytes / max(self.bytes_per_s, 1.0)


LOOPBACK = LinkCost(150e-6, 1.5e9, measured=False)  # assumed on one machine when not measured
ETHERNET = LinkCost(300e-6, 1.25e8, measured=False)  # assumed between machines: 1 Gbit/s


@dataclass(frozen=True)
class Topology:
    """The links as measured: (source node, sink node) -> its cost; the rest are assumed."""

    links: Mapping[tuple[str, str], LinkCost]

    def link(self, source: NodeProfile, sink: NodeProfile) -> LinkCost:
        measured = self.links.get((source.name, sink.name))
        if measured is not None:
            return measured
        return LOOPBACK if source.machine and source.machine == sink.machine else ETHERNET

    def assumed(self, nodes: list[NodeProfile]) -> bool:
        """Whether any link between `nodes` is assumed rather than measured."""
        return any((a.name, b.name) not in self.links for a in nodes for b in nodes if a is not b)


NO_LINKS = Topology({})


@dataclass(frozen=True)
class Prediction:
    """Single-stream decode and prefill of one placement, per token: compute and network seconds."""

    decode_tps: float
    prefill_tps: float
    compute_s: float
    network_s: float
    partials: str = "exact"  # a tensor placement's partials across links
    assumed_links: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "decode_tokens_per_s": round(self.decode_tps, 2),
            "prefill_tokens_per_s": round(self.prefill_tps, 1),
            "compute_ms_per_token": round(self.compute_s * 1e3, 3),
            "network_ms_per_token": round(self.network_s * 1e3, 3),
            "partials": self.partials,
            "links_assumed": self.assumed_links,
        }

    def summary(self) -> str:
        partials = ", 8-bit partials" if self.partials == "q8" else ""
        assumed = " (some links assumed, not measured: `exoctl nodes --probe`)" if self.assumed_links else ""
        return (
            f"~{self.decode_tps:.1f} tok/s decode ({self.compute_s * 1e3:.1f} ms compute + "
            f"{self.network_s * 1e3:.1f} ms network a token{partials}), ~{self.prefill_tps:.0f} tok/s "
            f"prefill{assumed}"
        )


def can_predict(nodes: list[NodeProfile]) -> bool:
    return bool(nodes) and all(n.speed is not None for n in nodes)


def _bytes_per_param(dtype: str) -> float:
    return {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 1.0}.get(dtype, 0.5625)


def _host(node: NodeProfile) -> str:
    return node.host or node.machine


def same_host(node: NodeProfile, nodes: list[NodeProfile]) -> list[NodeProfile]:
    """The nodes running on `node`'s host (itself included): they share its cores and memory bus."""
    return [n for n in nodes if _host(n) and _host(n) == _host(node)] or [node]


def _contention(node: NodeProfile, nodes: list[NodeProfile]) -> float:
    """How much slower a rank runs when the ranks on its host want more threads than it has cores."""
    threads = sum(max(n.threads, 1) for n in same_host(node, nodes))
    return max(1.0, threads / max(node.cpus, 1)) if node.cpus else 1.0


def _bus(dtype: str, ranks: list[NodeProfile]) -> float:
    """What the ranks on one host read together: a worker measured its rate with its own threads,
    so the host's bus is its best worker's rate scaled to the cores the ranks can use at once
    (two one-thread workers on two cores read more than one does, less than twice)."""
    cpus = max((n.cpus for n in ranks), default=0)
    threads = sum(max(n.threads, 1) for n in ranks)
    best = 0.0
    for n in ranks:
        assert n.speed is not None
        usable = min(threads, cpus) if cpus else threads
        scale = (max(usable, 1) / max(n.threads, 1)) ** BUS_SCALING
        best = max(best, n.speed.read_rate(dtype) * scale)
    return best


def _overhead_s(node: NodeProfile, layers: int, head: bool) -> float:
    assert node.speed is not None
    return node.speed.call_s * (LAYER_CALLS * layers + (TOKEN_CALLS if head else 0.0))


def predict(
    card: ModelCard,
    placement: Placement,
    nodes: list[NodeProfile],
    topology: Topology = NO_LINKS,
    partials: str | None = None,
) -> Prediction:
    """Decode and prefill speed of `placement` on `nodes` (each with its measured speed)."""
    by_name = {n.name: n for n in nodes}
    chosen = [by_name[s.node] for s in placement.shards]
    if not can_predict(chosen):
        raise ValueError("every node of the placement needs its measured speed")
    assumed = topology.assumed(chosen) if len(chosen) > 1 else False
    if placement.sharding == "tensor":
        return _tensor(card, placement, chosen, topology, partials or placement.partials, assumed)
    return _pipeline(card, placement, chosen, topology, assumed)


def _pipeline(
    card: ModelCard, placement: Placement, chosen: list[NodeProfile], topology: Topology, assumed: bool
) -> Prediction:
    dtype = placement.dtype
    layers = card.layer_bytes_each(dtype)
    compute = prefill = network = prompt_network = 0.0
    count = len(chosen)
    for i, (shard, node) in enumerate(zip(placement.shards, chosen, strict=True)):
        assert node.speed is not None
        read = sum(layers[shard.start_layer : shard.end_layer])
        if i == count - 1:
            read += card.head_bytes(dtype)
        compute += read / node.speed.read_rate(dtype) + _overhead_s(node, shard.n_layers, i == 0)
        prefill += 2 * (read / _bytes_per_param(dtype)) * PROMPT_TOKENS / node.speed.gemm_flops
        if count > 1:  # this stage hands its hidden state on (the last hands the token to the head)
            link = topology.link(node, chosen[(i + 1) % count])
            last = i == count - 1
            network += link.send_s(8 if last else card.hidden_size * 4) + MESSAGE_CALLS * node.speed.call_s
            prompt_network += link.send_s(8 if last else card.hidden_size * 4 * PROMPT_TOKENS)
    return Prediction(
        1 / (compute + network),
        PROMPT_TOKENS / (prefill + prompt_network),
        compute,
        network,
        assumed_links=assumed,
    )


def _all_reduce_s(chosen: list[NodeProfile], topology: Topology, values: int, partials: str) -> float:
    """One all-reduce of `values` numbers among `chosen`: shared memory on one host, else the
    slowest rank's direct exchange (it sends its part to each other rank)."""
    if len(chosen) == 1:
        return 0.0
    machines = {n.machine for n in chosen}
    if len(machines) == 1 and "" not in machines:
        return SHM_ALL_REDUCE_S
    payload = -(-values // Q8_BLOCK) * (Q8_BLOCK + 4) if partials == "q8" else values * 4
    worst = 0.0
    for source in chosen:
        links = [topology.link(source, sink) for sink in chosen if sink is not source]
        latency = max(link.rtt_s / 2 for link in links)
        rate = min(link.bytes_per_s for link in links)
        worst = max(worst, latency + (len(chosen) - 1) * payload / max(rate, 1.0))
    return worst


def _tensor(
    card: ModelCard,
    placement: Placement,
    chosen: list[NodeProfile],
    topology: Topology,
    partials: str,
    assumed: bool,
) -> Prediction:
    dtype, k = placement.dtype, len(chosen)
    read = (sum(card.layer_bytes_each(dtype)) + card.head_bytes(dtype)) / k
    compute = prefill = 0.0
    for rank, node in enumerate(chosen):
        assert node.speed is not None
        slower = _contention(node, chosen)
        # ranks on one host read through its one memory bus
        same = same_host(node, chosen)
        alone = read / node.speed.read_rate(dtype) * slower
        shared = read * len(same) / _bus(dtype, same)
        compute = max(compute, max(alone, shared) + _overhead_s(node, card.n_layers, rank == 0) * slower)
        flops = node.speed.gemm_flops / slower
        prefill = max(prefill, 2 * (read / _bytes_per_param(dtype)) * PROMPT_TOKENS * len(same) / flops)
    collectives = 2 * card.n_layers + 1
    # a host with more ranks' threads than cores: each collective waits for a rank to get a core
    waits = max(_contention(n, chosen) for n in chosen) - 1
    machines = {n.machine for n in chosen}
    shared_memory = len(machines) == 1 and "" not in machines
    waits *= OVERSUBSCRIBED_SHM_S if shared_memory else OVERSUBSCRIBED_ZMQ_S
    network = collectives * (_all_reduce_s(chosen, topology, card.hidden_size, partials) + waits)
    network += MESSAGE_CALLS * max(n.speed.call_s for n in chosen if n.speed is not None)
    prompt_network = collectives * _all_reduce_s(chosen, topology, card.hidden_size * PROMPT_TOKENS, partials)
    return Prediction(
        1 / (compute + network),
        PROMPT_TOKENS / (prefill + prompt_network),
        compute,
        network,
        partials,
        assumed,
    )


def choose_partials(
    card: ModelCard, placement: Placement, nodes: list[NodeProfile], topology: Topology, asked: str
) -> str:
    """ "exact" or "q8" for a tensor placement: as `asked`, or (auto) 8-bit blocks where the
    float32 exchange would cost more than Q8_WORTH of a token and the blocks save time."""
    if asked != "auto":
        return asked
    by_name = {n.name: n for n in nodes}
    chosen = [by_name[s.node] for s in placement.shards]
    if placement.sharding != "tensor" or len(chosen) < 2 or not can_predict(chosen):
        return "exact"
    exact = predict(card, placement, nodes, topology, "exact")
    q8 = predict(card, placement, nodes, topology, "q8")
    worth = exact.network_s > Q8_WORTH * (exact.compute_s + exact.network_s)
    return "q8" if worth and q8.decode_tps > exact.decode_tps else "exact"
