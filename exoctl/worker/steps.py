"""The fields of a step between the runners of one instance, checked once for every runner kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exoctl.errors import ExoctlError
from exoctl.protocol import Message, ProtocolError
from exoctl.sampling_params import SamplingParams


@dataclass(frozen=True)
class ForwardStep:
    """A `forward`: B sequences, each at its own start position; a sequence's first step also
    carries its sampling parameters (wire form), for the stage or rank that samples."""

    seqs: list[str]
    starts: list[int]
    params: dict[str, Any]  # seq -> SamplingParams wire form, on its first step only

    @classmethod
    def from_message(cls, message: Message) -> ForwardStep:
        seqs, starts = message["seqs"], message["positions"]
        params = message.get("params") or {}
        if (
            not seqs
            or len(starts) != len(seqs)
            or not all(isinstance(x, str) for x in seqs)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in starts)
            or not isinstance(params, dict)
            or len(set(seqs)) != len(seqs)
        ):
            raise ExoctlError("'forward' needs matching lists of distinct sequence ids and positions")
        return cls(seqs, starts, params)

    def first_params(self, seq: str) -> SamplingParams:
        """The sampling parameters of a sequence this runner has not seen before."""
        wire = self.params.get(seq)
        if not isinstance(wire, dict):
            raise ExoctlError(f"sequence {seq} is unknown here and its first message has no params")
        return SamplingParams.from_wire(wire)

    def fields(self, instance_id: str) -> dict[str, Any]:
        """The same step as a `forward` message's fields, for the next stage or the other ranks."""
        fields: dict[str, Any] = {"instance_id": instance_id, "seqs": self.seqs, "positions": self.starts}
        if self.params:
            fields["params"] = self.params
        return fields


def check_peer_message(message: Message) -> None:
    """A `token`, `seq_error` or `lease` checked before it is queued: in the head's lane a token
    message is merged with other runners' messages, and a bad one must fail only itself."""
    seqs = message["seqs"]
    if not all(isinstance(s, str) for s in seqs):
        raise ProtocolError(f"'{message.type}' needs a list of sequence ids")
    if message.type == "token":
        tokens = message["tokens"]
        if len(tokens) != len(seqs) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in tokens
        ):
            raise ProtocolError("'token' needs one token id (an int) per sequence id")
