"""The fields of a step between the runners of one instance, checked once for every runner kind."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exoctl.errors import ExoctlError
from exoctl.wire.protocol import Message, ProtocolError
from exoctl.wire.sampling_params import SamplingParams

PROMPT_IDS = "prompt_ids"  # beside a sequence's sampling parameters on its first step


@dataclass(frozen=True)
class ForwardStep:
    """A `forward`: B sequences, each at its own start position; a sequence's first step also
    carries its sampling parameters (wire form), for the stage or rank that samples."""

    seqs: list[str]
    starts: list[int]
    params: dict[str, Any]  # seq -> SamplingParams wire form, on its first step only
    # a chunk of a prompt with more to come: the last stage samples nothing for it
    partial: bool = False

    @classmethod
    def from_message(cls, message: Message) -> ForwardStep:
        seqs, starts = message["seqs"], message["positions"]
        params = message.get("params") or {}
        partial = message.get("partial", False)
        if (
            not seqs
            or len(starts) != len(seqs)
            or not all(isinstance(x, str) for x in seqs)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in starts)
            or not isinstance(params, dict)
            or len(set(seqs)) != len(seqs)
        ):
            raise ExoctlError("'forward' needs matching lists of distinct sequence ids and positions")
        if not isinstance(partial, bool):
            raise ExoctlError("'forward' field 'partial' must be true or false")
        return cls(seqs, starts, params, partial)

    def first_params(self, seq: str) -> SamplingParams:
        """The sampling parameters of a sequence this runner has not seen before."""
        wire = self.params.get(seq)
        if not isinstance(wire, dict):
            raise ExoctlError(f"sequence {seq} is unknown here and its first message has no params")
        return SamplingParams.from_wire({k: v for k, v in wire.items() if k != PROMPT_IDS})

    def first_prompt(self, seq: str) -> list[int]:
        """The prompt's token ids, sent with a sequence's first step when its repetition penalty
        reads them (the last stage samples, but sees hidden states only)."""
        ids = (self.params.get(seq) or {}).get(PROMPT_IDS, [])
        if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
            raise ExoctlError(f"sequence {seq}: {PROMPT_IDS} must be a list of token ids")
        return ids

    def fields(self, instance_id: str) -> dict[str, Any]:
        """The same step as a `forward` message's fields, for the next stage or the other ranks."""
        fields: dict[str, Any] = {"instance_id": instance_id, "seqs": self.seqs, "positions": self.starts}
        if self.params:
            fields["params"] = self.params
        if self.partial:
            fields["partial"] = True
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
        logprobs = message["logprobs"]
        if len(logprobs) != len(seqs) or not all(lp is None or _is_logprob(lp) for lp in logprobs):
            raise ProtocolError(
                "'token' needs one logprob entry ([logprob, ids, logprobs] or null) per sequence id"
            )


def _is_logprob(entry: object) -> bool:
    """[logprob, [ids], [logprobs]] as `TokenLogprob.to_wire` writes it."""
    if not isinstance(entry, list) or len(entry) != 3:
        return False
    value, ids, values = entry
    return (
        isinstance(value, float)
        and isinstance(ids, list)
        and isinstance(values, list)
        and len(ids) == len(values) <= 20
        and all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        and all(isinstance(v, float) for v in values)
    )


# Sequences one runner holds at once (each a KV cache): several times any batch it decodes.
MAX_SEQUENCES = 256


def check_room(
    seqs: list[str], starts: list[int], count: int, context: int, held: int, new: int, runner_id: str
) -> None:
    """Refuse a step of `count` positions that would go past the context, or that would make a
    runner holding `held` sequences hold more than MAX_SEQUENCES with its `new` ones."""
    for seq, start in zip(seqs, starts, strict=True):
        if start < 0 or start + count > context:
            raise ExoctlError(
                f"sequence {seq}: positions [{start}, {start + count}) "
                f"go past the model's context of {context}"
            )
    if held + new > MAX_SEQUENCES:
        raise ExoctlError(
            f"runner {runner_id} holds {held} sequences; {new} more would pass its limit of {MAX_SEQUENCES}",
            hint="wait for running requests to end",
        )


def check_hidden(dtype: str, shape: tuple[int, ...], seqs: int, width: int) -> None:
    """A pipeline stage's input: hidden states [B, T, D] in a float dtype (T > 1 only for one sequence)."""
    if (
        dtype not in ("float32", "bfloat16", "float16")
        or len(shape) != 3
        or shape[0] != seqs
        or shape[1] < 1
        or shape[2] != width
        or (seqs > 1 and shape[1] != 1)
    ):
        raise ExoctlError(
            f"hidden state {dtype} {list(shape)} does not fit {seqs} sequence(s) of width {width}"
        )
