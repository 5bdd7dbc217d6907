"""What a runner reports about itself in a worker's status reply, typed on both sides.

Torch-free: the worker builds a `RunnerReport` from its runner and sends `to_wire()`; the cluster
client rebuilds it with `from_wire`, and the state document, the tables and the supervisor read
it by attribute. A failed runner carries a `Failure` whose `lost_node` says whether a node was
lost (the supervisor re-places such instances) or something else went wrong.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from exoctl.wire.protocol import ProtocolError
from exoctl.wire.sampling_params import SamplingDefaults


class RunnerStatus(str, Enum):
    """EXO's names; they are also the tags of the runners in the state document."""

    LOADING = "RunnerLoading"
    READY = "RunnerReady"
    FAILED = "RunnerFailed"


@dataclass(frozen=True)
class Failure:
    message: str  # for the user: names the node and what happened
    lost_node: str | None = None  # the node the instance lost (stopped answering, restarted)

    @property
    def is_node_lost(self) -> bool:
        return self.lost_node is not None


@dataclass(frozen=True)
class ExpertLoad:
    """Mixtral: one expert this runner holds and the tokens routed to it over its layers."""

    expert: int
    tokens: int


@dataclass(frozen=True)
class PrefixReport:
    """A runner's cached prefixes: what it holds (entries, positions, bytes) against what placement
    reserved for them, and what they saved (sequences started from a copy, positions not run)."""

    entries: int = 0
    positions: int = 0
    bytes: int = 0
    budget_bytes: int = 0
    hits: int = 0
    reused_tokens: int = 0

    def to_wire(self) -> list[int]:
        return [self.entries, self.positions, self.bytes, self.budget_bytes, self.hits, self.reused_tokens]

    @classmethod
    def from_wire(cls, raw: Any) -> PrefixReport:
        if not isinstance(raw, list) or len(raw) != 6:
            raise TypeError("a prefix report is a list of 6 counts")
        return cls(*(int(v) for v in raw))


@dataclass(frozen=True)
class HeadPrefixStats:
    """The head's side of an instance's cached prefixes: the requests that could reuse one, those
    that did, the positions they did not run again, the entries evicted for room or memory, and the
    budget in positions."""

    budget_positions: int = 0
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    evictions: int = 0

    def to_wire(self) -> list[int]:
        return [self.budget_positions, self.lookups, self.hits, self.reused_tokens, self.evictions]

    @classmethod
    def from_wire(cls, raw: Any) -> HeadPrefixStats | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) != 5:
            raise TypeError("a head's prefix statistics are a list of 5 counts")
        return cls(*(int(v) for v in raw))


@dataclass(frozen=True)
class SpeculationReport:
    """The head's speculative decoding since load: its drafter ("ngram" or the draft model's id),
    the decode passes of every sequence and the tokens they gave, the verification passes among
    them, and the tokens guessed and accepted there."""

    drafter: str
    passes: int = 0
    tokens: int = 0
    verify_passes: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.passes if self.passes else 0.0

    def to_wire(self) -> list[Any]:
        return [self.drafter, self.passes, self.tokens, self.verify_passes, self.drafted, self.accepted]

    @classmethod
    def from_wire(cls, raw: Any) -> SpeculationReport | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or len(raw) != 6 or not isinstance(raw[0], str):
            raise TypeError("a head's speculation report is [drafter, 5 counts]")
        return cls(raw[0], *(int(v) for v in raw[1:]))


@dataclass(frozen=True)
class RunnerReport:
    runner_id: str
    instance_id: str
    model_id: str
    sharding: str
    dtype: str
    start_layer: int
    end_layer: int
    n_layers: int
    rank: int
    world: int
    nodes: tuple[str, ...]  # the instance's nodes by rank
    status: RunnerStatus
    failure: Failure | None = None
    layers_loaded: int = 0
    memory_bytes: int = 0
    tokens_per_s: float = 0.0  # this runner's own compute per decoded token
    decode_tokens_per_s: float = 0.0  # head: end to end, of the last request
    active_sequences: int = 0
    experts: tuple[ExpertLoad, ...] = field(default_factory=tuple)
    collective_ms_per_token: float | None = None  # tensor ranks: time in collectives
    collective_transport: str | None = None  # tensor ranks: "shm" (ranks on one host), "zmq" or "zmq+q8"
    tool_format: str | None = None  # head: how its chat template calls tools (Tokenizer.tool_format)
    sampling_defaults: SamplingDefaults | None = None  # head: the model's own sampling defaults
    note: str | None = None  # what the load kept other than asked (matrices held in float)
    # counters since load, for a benchmark's differences: tokens decoded (one per sequence per
    # step), seconds in those steps' forward passes, and (tensor ranks) seconds of that in collectives
    decoded_tokens: int = 0
    compute_s: float = 0.0
    collective_s: float = 0.0
    prefix: PrefixReport = field(default_factory=PrefixReport)  # this runner's cached prefixes
    head_prefix: HeadPrefixStats | None = None  # head: the instance's lookups, hits and evictions
    speculation: SpeculationReport | None = None  # head of an instance with a drafter

    @property
    def message(self) -> str:
        return self.failure.message if self.failure else ""

    @property
    def layers_total(self) -> int:
        return self.end_layer - self.start_layer

    def to_wire(self) -> dict[str, Any]:
        raw = asdict(self)
        raw["status"] = self.status.value
        raw["nodes"] = list(self.nodes)
        raw["experts"] = [[e.expert, e.tokens] for e in self.experts]
        raw["sampling_defaults"] = (
            None if self.sampling_defaults is None else self.sampling_defaults.to_wire()
        )
        raw["prefix"] = self.prefix.to_wire()
        raw["head_prefix"] = None if self.head_prefix is None else self.head_prefix.to_wire()
        raw["speculation"] = None if self.speculation is None else self.speculation.to_wire()
        return raw

    @classmethod
    def from_wire(cls, raw: Any) -> RunnerReport:
        """A report from a worker's status reply; ProtocolError if it is not one."""
        try:
            failure = raw["failure"]
            return cls(
                **{k: raw[k] for k in _PLAIN_FIELDS},
                nodes=tuple(str(n) for n in raw["nodes"]),
                status=RunnerStatus(raw["status"]),
                failure=Failure(str(failure["message"]), failure["lost_node"]) if failure else None,
                experts=tuple(ExpertLoad(int(e), int(t)) for e, t in raw["experts"]),
                sampling_defaults=SamplingDefaults.from_wire(raw.get("sampling_defaults")),
                prefix=PrefixReport.from_wire(raw["prefix"]),
                head_prefix=HeadPrefixStats.from_wire(raw["head_prefix"]),
                speculation=SpeculationReport.from_wire(raw.get("speculation")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"a runner report is malformed ({type(exc).__name__}: {exc})") from None


_PLAIN_FIELDS = tuple(
    name
    for name in RunnerReport.__dataclass_fields__
    if name
    not in (
        "nodes",
        "status",
        "failure",
        "experts",
        "sampling_defaults",
        "prefix",
        "head_prefix",
        "speculation",
    )
)
