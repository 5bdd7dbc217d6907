"""The messages between the runners of one instance, each a frozen type decoded once at the socket.

A worker's I/O loop turns a `forward`, `token`, `release`, `forget`, `seq_error` or `lease` into one of these
(`DECODERS`, through `messages.parse`), refusing a malformed one to its sender; the compute lane dispatches on
the type with `match`, never on a type string. `Prefill` never crosses the wire: it is the head's
note to itself that a prompt has more chunks to run. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from exoctl.errors import ExoctlError
from exoctl.wire import protocol
from exoctl.wire.protocol import Message, ProtocolError, Tensor
from exoctl.wire.sampling_params import SamplingParams

PROMPT_IDS = "prompt_ids"  # beside a sequence's sampling parameters on its first step
REUSE = "reuse"  # and the cached prefix it starts from: [entry, positions]
MAX_TOP_LOGPROBS = 20

# A chosen token's logprob in wire form: [logprob, [ids], [logprobs]] (`TokenLogprob.to_wire`).
LogprobWire = list[Any]


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class Reuse:
    """A new sequence starts from a copy of the first `positions` positions of cached prefix
    `entry` (named by the sequence it was kept from): the head's choice, the same on every runner."""

    entry: str
    positions: int

    def to_wire(self) -> list[Any]:
        return [self.entry, self.positions]

    @classmethod
    def from_wire(cls, seq: str, wire: object) -> Reuse:
        if (
            not isinstance(wire, list)
            or len(wire) != 2
            or not isinstance(wire[0], str)
            or not _is_int(wire[1])
            or wire[1] < 1
        ):
            raise ExoctlError(f"sequence {seq}: {REUSE} must be [entry, positions >= 1]")
        return cls(wire[0], wire[1])


@dataclass(frozen=True)
class SequenceStart:
    """What a runner needs of a sequence it has not seen: its sampling parameters (for the runner
    that samples), its prompt's token ids when a repetition penalty reads them and the runner
    does not see them all (the last pipeline stage sees hidden states only; a reused prefix's ids
    pass no runner), and the cached prefix it starts from."""

    params: SamplingParams
    prompt_ids: tuple[int, ...] = ()
    reuse: Reuse | None = None

    def to_wire(self) -> dict[str, Any]:
        wire = self.params.to_wire()
        if self.prompt_ids:
            wire[PROMPT_IDS] = list(self.prompt_ids)
        if self.reuse is not None:
            wire[REUSE] = self.reuse.to_wire()
        return wire

    @classmethod
    def from_wire(cls, seq: str, wire: object) -> SequenceStart:
        if not isinstance(wire, dict):
            raise ExoctlError(f"sequence {seq}: its first step's params must be a map")
        ids = wire.get(PROMPT_IDS, [])
        if not isinstance(ids, list) or not all(_is_int(i) for i in ids):
            raise ExoctlError(f"sequence {seq}: {PROMPT_IDS} must be a list of token ids")
        reuse = None if wire.get(REUSE) is None else Reuse.from_wire(seq, wire[REUSE])
        params = SamplingParams.from_wire({k: v for k, v in wire.items() if k not in (PROMPT_IDS, REUSE)})
        return cls(params, tuple(ids), reuse)


@dataclass(frozen=True)
class ForwardStep:
    """One step of B sequences, each at its own start position; a sequence's first step also
    carries how to sample it, for the stage or rank that samples.

    A verification step (speculative decoding) runs a sequence's last token and the k tokens a
    drafter guessed after it (`drafts`, [1, k + 1] ids): the sampling runner accepts the longest
    run of guesses the target agrees with, and every runner cuts the positions of the rejected
    ones from its cache when the sequence's next step starts before them."""

    seqs: list[str]
    starts: list[int]
    first: dict[str, SequenceStart] = field(default_factory=dict)  # on a sequence's first step only
    # a chunk of a prompt with more to come: nothing is sampled for it
    partial: bool = False
    drafts: dict[str, tuple[int, ...]] = field(default_factory=dict)  # seq -> its guessed tokens

    def first_of(self, seq: str) -> SequenceStart:
        """How to sample a sequence this runner has not seen before."""
        start = self.first.get(seq)
        if start is None:
            raise ExoctlError(f"sequence {seq} is unknown here and its first message has no params")
        return start


@dataclass(frozen=True)
class Forward:
    """A step for the next stage (hidden [B, T, D]) or for the other ranks (token ids [B, T])."""

    KIND: ClassVar[str] = "forward"

    instance_id: str
    step: ForwardStep
    tensor: Tensor

    def frames(self) -> list[Any]:
        step = self.step
        fields: dict[str, Any] = {
            "instance_id": self.instance_id,
            "seqs": step.seqs,
            "positions": step.starts,
        }
        if step.first:
            fields["params"] = {seq: start.to_wire() for seq, start in step.first.items()}
        if step.partial:
            fields["partial"] = True
        if step.drafts:
            fields["drafts"] = {seq: list(ids) for seq, ids in step.drafts.items()}
        return protocol.encode(self.KIND, fields, (self.tensor,))


@dataclass(frozen=True)
class Tokens:
    """The sampled next token of each sequence (and its logprobs where asked), for the head. After
    a verification step a sequence appears once per token it accepted, in order."""

    KIND: ClassVar[str] = "token"

    instance_id: str
    seqs: tuple[str, ...]
    tokens: tuple[int, ...]
    logprobs: tuple[LogprobWire | None, ...]
    # with a sequence's first token, where it asked: the logprob entry of each prompt token but the first
    prompt_logprobs: dict[str, list[LogprobWire]] = field(default_factory=dict)

    def frames(self) -> list[Any]:
        fields = {
            "instance_id": self.instance_id,
            "seqs": list(self.seqs),
            "tokens": list(self.tokens),
            "logprobs": list(self.logprobs),
            "prompt_logprobs": self.prompt_logprobs,
        }
        return protocol.encode(self.KIND, fields)


@dataclass(frozen=True)
class Release:
    """The head's word that a sequence has ended: free it, or keep its first `keep` positions as
    a cached prefix of its name."""

    KIND: ClassVar[str] = "release"

    instance_id: str
    seq: str
    keep: int | None = None

    def frames(self) -> list[Any]:
        fields = {"instance_id": self.instance_id, "seq": self.seq, "keep": self.keep}
        return protocol.encode(self.KIND, fields)


@dataclass(frozen=True)
class Forget:
    """The head's word that these cached prefixes are gone from its index: free them."""

    KIND: ClassVar[str] = "forget"

    instance_id: str
    entries: tuple[str, ...]

    def frames(self) -> list[Any]:
        return protocol.encode(self.KIND, {"instance_id": self.instance_id, "entries": list(self.entries)})


@dataclass(frozen=True)
class SeqError:
    """Sequences that failed on a stage, with why: the head ends them and tells their clients; or,
    where the stage lacked the cached prefixes they reuse (`missing`), forgets those and runs the
    sequences again without them."""

    KIND: ClassVar[str] = "seq_error"

    instance_id: str
    seqs: tuple[str, ...]
    message: str
    missing: tuple[str, ...] = ()

    def frames(self) -> list[Any]:
        fields = {
            "instance_id": self.instance_id,
            "seqs": list(self.seqs),
            "message": self.message,
            "missing": list(self.missing),
        }
        return protocol.encode(self.KIND, fields)


@dataclass(frozen=True)
class Lease:
    """The head's word on which sequences live and which cached prefixes it keeps, every few
    seconds: the others free the rest."""

    KIND: ClassVar[str] = "lease"

    instance_id: str
    seqs: tuple[str, ...]
    kept: tuple[str, ...] = ()

    def frames(self) -> list[Any]:
        fields = {"instance_id": self.instance_id, "seqs": list(self.seqs), "kept": list(self.kept)}
        return protocol.encode(self.KIND, fields)


@dataclass(frozen=True)
class Prefill:
    """The head's own note: run the next chunk of this sequence's prompt (never on the wire)."""

    KIND: ClassVar[str] = "prefill"

    instance_id: str
    seq: str


InstanceMessage = Forward | Tokens | Release | Forget | SeqError | Lease | Prefill


def _seq_ids(message: Message, name: str = "seqs") -> tuple[str, ...]:
    seqs = message[name]
    if not all(isinstance(s, str) for s in seqs):
        raise ProtocolError(f"'{message.type}' needs a list of sequence ids in '{name}'")
    return tuple(seqs)


def _release(message: Message) -> Release:
    keep = message["keep"]
    if keep is not None and (not _is_int(keep) or keep < 1):
        raise ProtocolError("'release' field 'keep' must be null or a count of positions >= 1")
    return Release(message["instance_id"], message["seq"], keep)


def _is_logprob(entry: object) -> bool:
    """[logprob, [ids], [logprobs]] as `TokenLogprob.to_wire` writes it."""
    if not isinstance(entry, list) or len(entry) != 3:
        return False
    value, ids, values = entry
    return (
        isinstance(value, float)
        and isinstance(ids, list)
        and isinstance(values, list)
        and len(ids) == len(values) <= MAX_TOP_LOGPROBS
        and all(_is_int(i) for i in ids)
        and all(isinstance(v, float) for v in values)
    )


class StepRefused(ProtocolError):
    """A `forward` refused before it was queued; names its instance and sequences, so the head
    can end the requests that wait on them."""

    def __init__(self, message: str, instance_id: str, seqs: tuple[str, ...]) -> None:
        super().__init__(message)
        self.instance_id = instance_id
        self.seqs = seqs


def _forward(message: Message) -> Forward:
    seqs, starts = message["seqs"], message["positions"]
    params = message.get("params") or {}
    partial = message.get("partial", False)
    drafts = message.get("drafts") or {}
    if (
        not seqs
        or len(starts) != len(seqs)
        or not all(isinstance(x, str) for x in seqs)
        or not all(_is_int(x) for x in starts)
        or not isinstance(params, dict)
        or len(set(seqs)) != len(seqs)
    ):
        raise ProtocolError("'forward' needs matching lists of distinct sequence ids and positions")
    instance_id = message["instance_id"]
    try:
        if not isinstance(partial, bool):
            raise ProtocolError("'forward' field 'partial' must be true or false")
        if len(message.tensors) != 1:
            raise ProtocolError("'forward' needs exactly one tensor")
        first = {seq: SequenceStart.from_wire(seq, params[seq]) for seq in seqs if seq in params}
        guessed = _drafts(drafts, seqs, partial)
    except ExoctlError as exc:
        raise StepRefused(exc.message, instance_id, tuple(seqs)) from None
    return Forward(instance_id, ForwardStep(seqs, starts, first, partial, guessed), message.tensors[0])


def _drafts(drafts: object, seqs: list[str], partial: bool) -> dict[str, tuple[int, ...]]:
    """A verification step's guesses: {seq: [token ids]}, of the step's own sequences, never on a
    prompt chunk."""
    if not isinstance(drafts, dict) or not all(
        seq in seqs and isinstance(ids, list) and ids and all(_is_int(i) and i >= 0 for i in ids)
        for seq, ids in drafts.items()
    ):
        raise ProtocolError("'forward' field 'drafts' must map the step's sequence ids to token ids")
    if drafts and partial:
        raise ProtocolError("'forward' of a prompt chunk carries no drafts")
    return {seq: tuple(ids) for seq, ids in drafts.items()}


def _tokens(message: Message) -> Tokens:
    seqs, tokens, logprobs = _seq_ids(message), message["tokens"], message["logprobs"]
    if len(tokens) != len(seqs) or not all(_is_int(t) for t in tokens):
        raise ProtocolError("'token' needs one token id (an int) per sequence id")
    if len(logprobs) != len(seqs) or not all(lp is None or _is_logprob(lp) for lp in logprobs):
        raise ProtocolError(
            "'token' needs one logprob entry ([logprob, ids, logprobs] or null) per sequence id"
        )
    prompt = message["prompt_logprobs"]
    if not all(
        seq in seqs and isinstance(entries, list) and all(_is_logprob(e) for e in entries)
        for seq, entries in prompt.items()
    ):
        raise ProtocolError("'token' field 'prompt_logprobs' must map its sequence ids to logprob entries")
    return Tokens(message["instance_id"], seqs, tuple(tokens), tuple(logprobs), prompt)


# type name -> decoder of the messages between runners (`messages.KINDS` holds them with the rest)
DECODERS: dict[str, Callable[[Message], InstanceMessage]] = {
    Forward.KIND: _forward,
    Tokens.KIND: _tokens,
    Release.KIND: _release,
    Forget.KIND: lambda m: Forget(m["instance_id"], _seq_ids(m, "entries")),
    SeqError.KIND: lambda m: SeqError(m["instance_id"], _seq_ids(m), m["message"], _seq_ids(m, "missing")),
    Lease.KIND: lambda m: Lease(m["instance_id"], _seq_ids(m), _seq_ids(m, "kept")),
}
