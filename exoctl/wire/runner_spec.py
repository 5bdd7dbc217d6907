"""What one runner is asked to hold: the `load` message, built and checked in one place.

Torch-free: the cluster client makes one per rank and sends `to_fields()`; a worker rebuilds it
with `from_message`, which refuses anything inconsistent before a thread or a byte is spent.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from exoctl.dtypes import RUNTIME_DTYPES, check_dtype
from exoctl.errors import ExoctlError
from exoctl.wire.protocol import Message, ProtocolError

WORKER_SHARDINGS = ("pipeline", "tensor")
MAX_WORLD = 64  # a runner holds a socket to each other rank: a bound, and far above a real cluster
NGRAM_DRAFT = "ngram"  # the drafter that needs no model: prompt lookup


def check_address(address: str) -> None:
    """`host:port` with a port from 1 to 65535: what a worker can connect to."""
    host, _, port = address.rpartition(":")
    if not host or any(c.isspace() for c in host) or not port.isdigit() or not 0 < int(port) < 65536:
        shown = address if len(address) <= 64 else address[:64] + "…"
        raise ProtocolError(f"peer address {shown!r} is not host:port with a port from 1 to 65535")


PARTIALS = ("exact", "q8")  # how tensor partials cross links


@dataclass(frozen=True)
class RunnerSpec:
    instance_id: str
    runner_id: str
    model: str  # what the worker resolves: catalog id, repo id, or a folder under its model dirs
    model_id: str
    sharding: str  # one of WORKER_SHARDINGS
    dtype: str  # one of RUNTIME_DTYPES
    start_layer: int
    end_layer: int
    n_layers: int
    rank: int
    world: int
    peers: tuple[tuple[str, str], ...]  # (node name, address) by rank
    # Cached prefixes (placement's reserve): the positions the instance's entries may hold together
    # (0: none are kept), the bytes reserved for them on this runner's node, and what one position
    # of KV costs on each rank's node (an upper bound: float32 where the dtype leaves it open).
    prefix_positions: int = 0
    prefix_bytes: int = 0
    position_bytes: tuple[int, ...] = ()
    # Speculative decoding: the head's drafter, "" for none, NGRAM_DRAFT for prompt lookup, else a
    # draft model's reference (resolved as `model` is), loaded whole beside rank 0's part in
    # `draft_dtype`; its catalog id and layer count (what to fetch) come with it.
    draft: str = ""
    draft_model_id: str = ""
    draft_dtype: str = ""
    draft_layers: int = 0
    # how tensor partials cross links: "exact" (as computed) or "q8" (8-bit blocks), as placement
    # chose by the links (worker.partials; the worker's EXOCTL_TP_EXACT / EXOCTL_TP_PARTIALS win)
    partials: str = "exact"

    @property
    def drafts_with_model(self) -> bool:
        return self.draft not in ("", NGRAM_DRAFT)

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.peers)

    @property
    def address(self) -> str:
        """Where the other ranks reach this runner's node."""
        return self.peers[self.rank][1]

    def to_fields(self) -> dict[str, Any]:
        fields = asdict(self)
        return {**fields, "peers": [list(p) for p in self.peers], "position_bytes": list(self.position_bytes)}

    @classmethod
    def from_message(cls, message: Message) -> RunnerSpec:
        """The spec of a `load` message (its field types are checked by the protocol already)."""
        peers = message["peers"]
        if len(peers) > MAX_WORLD:
            raise ProtocolError(
                f"'load' names {len(peers)} peers; an instance spans at most {MAX_WORLD} nodes"
            )
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in peers):
            raise ProtocolError("'peers' must be a list of [node name, address] pairs")
        for _, address in peers:
            check_address(address)
        position_bytes = message["position_bytes"]
        plain = {k: message[k] for k in cls.__dataclass_fields__ if k not in ("peers", "position_bytes")}
        spec = cls(
            **plain,
            peers=tuple((name, address) for name, address in peers),
            position_bytes=tuple(position_bytes),
        )
        if spec.sharding not in WORKER_SHARDINGS:
            raise ExoctlError(
                f"sharding {spec.sharding!r} is not supported by this worker", hint="use pipeline or tensor"
            )
        if not (0 <= spec.rank < spec.world == len(spec.peers)) or not (
            0 <= spec.start_layer < spec.end_layer <= spec.n_layers
        ):
            raise ProtocolError("inconsistent rank, world, peers or layer range in 'load'")
        if spec.sharding == "tensor" and (spec.start_layer, spec.end_layer) != (0, spec.n_layers):
            raise ProtocolError("a tensor-parallel rank holds every layer: give [0, n_layers)")
        check_dtype(spec.dtype, RUNTIME_DTYPES)  # a placement's dtype: never `auto`
        # what a position of KV costs on each rank (none given: no cached prefixes)
        sized = len(position_bytes) == spec.world and all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in position_bytes
        )
        if not sized and (position_bytes or spec.prefix_positions):
            raise ProtocolError("'position_bytes' must give a positive byte count for each rank")
        if spec.prefix_positions < 0 or spec.prefix_bytes < 0:
            raise ProtocolError("'prefix_positions' and 'prefix_bytes' must be 0 or more")
        if spec.partials not in PARTIALS:
            raise ProtocolError(f"'partials' must be one of {', '.join(PARTIALS)}, got {spec.partials!r:.20}")
        if spec.drafts_with_model:
            check_dtype(spec.draft_dtype, RUNTIME_DTYPES)
            if spec.draft_layers < 1:
                raise ProtocolError("a draft model's 'draft_layers' must be 1 or more")
        return spec
