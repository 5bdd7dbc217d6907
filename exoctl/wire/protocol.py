"""The wire format between exoctl processes: a msgpack header frame plus raw tensor frames.

Torch-free and zmq-free: this module only turns frames into a validated `Message` and back.
Never pickle. Every inbound message is checked — protocol version, type, the fields that type
needs with their types, each tensor's dtype against an allowed set and its shape times item
size against the frame's length, and size limits — and a bad one raises `ProtocolError`,
which a worker answers with an error reply before it goes on serving.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack

from exoctl.dtypes import WIRE_DTYPE_SIZES
from exoctl.errors import ExoctlError

# 2: tensor sharding (tp_hello, int64 ids in "forward"); 3: typed runner reports; 4: "chat" in
# "generate" (tools, an answer's forced start), the head's tool format in its report, logprobs in
# "token" and "delta"; 5: "download", "record" (the supervisor's history), both in "status_reply";
# 7: cached prefixes ("reuse" in a first step, "keep" in "release", "forget", "kept" in "lease",
# the budget in "load", "cache_prompt" in "generate"); 8: speculative decoding ("drafts" in
# "forward", a sequence once per accepted token in "token", the drafter in "load", "speculative"
# in "generate"); 9: the kernel's vector path ("kernel") in every node profile; 10: "grammar" in
# sampling parameters (constrained decoding), "prompt_logprobs" in them and in "token", "prompt_ids"
# in "generate"; 11: measured links and speed ("probe_links", "echo", "links", "speed" and "links"
# in every node profile, "partials" in "load")
PROTOCOL_VERSION = 11
MAX_HEADER_BYTES = 8 * 2**20
MAX_TENSOR_BYTES = 2**31  # one 8192-token prefill of an 8192-wide model in float32 is 268 MB
MAX_TENSORS = 4


_ANY = object()
_NUM = (int, float)
_OPT_STR = (str, type(None))

# type -> {field: accepted python types}; every field listed is required.
SCHEMAS: dict[str, dict[str, Any]] = {
    # requests from a client (each carries an "id" echoed in its replies)
    "ping": {},
    "status": {},
    "probe_links": {"targets": list},
    "echo": {"pad": bytes},
    "load": {
        "instance_id": str,
        "runner_id": str,
        "model": str,
        "model_id": str,
        "sharding": str,
        "dtype": str,
        "start_layer": int,
        "end_layer": int,
        "n_layers": int,
        "rank": int,
        "world": int,
        "peers": list,
        # cached prefixes: the instance's budget in positions, this runner's in bytes, and what a
        # position of KV costs on each rank's node
        "prefix_positions": int,
        "prefix_bytes": int,
        "position_bytes": list,
        # speculative decoding: the head's drafter ("" none, "ngram", or a draft model's reference,
        # id, dtype and layer count)
        "draft": str,
        "draft_model_id": str,
        "draft_dtype": str,
        "draft_layers": int,
        "partials": str,
    },
    "unload": {"instance_id": str},
    # fetch the files of layers [start_layer, end_layer) (all of them for [0, n_layers)); answered
    # at once with a download id, its progress in "status_reply"
    "download": {"model": str, "start_layer": int, "end_layer": int, "n_layers": int},
    # an event of the supervisor's (a reformation, a restore), kept for `exoctl state`
    "record": {"event": dict},
    "generate": {
        "instance_id": str,
        "request_id": str,
        "messages": (list, type(None)),
        "prompt": _OPT_STR,
        "prompt_ids": (list, type(None)),  # or the prompt as token ids
        "params": dict,
        "chat": (dict, type(None)),  # ChatOptions' wire form
        "cache_prompt": bool,  # reuse (and keep) cached prefixes
        "speculative": bool,  # draft and verify several tokens a step where the instance has a drafter
    },
    "cancel": {"request_id": str},
    # the client of a running request, answering the head's keepalive: still reading. A request
    # whose client has said nothing for CLIENT_SILENT_S is cancelled (a SIGKILLed `serve` or `run`)
    "alive": {"request_id": str},
    "shutdown": {},
    # between the runners of one instance
    # a batch of B sequences: hidden [B, T, D] (T > 1 only for one sequence's prefill), or under
    # tensor sharding the token ids [B, T] every rank runs
    "forward": {"instance_id": str, "seqs": list, "positions": list},
    # prompt_logprobs: {seq: [logprob entry of each prompt token after the first]}, with its first token
    "token": {"instance_id": str, "seqs": list, "tokens": list, "logprobs": list, "prompt_logprobs": dict},
    # a sequence ended: free it, or keep its first `keep` positions as a cached prefix
    "release": {"instance_id": str, "seq": str, "keep": (int, type(None))},
    # cached prefixes the head no longer holds
    "forget": {"instance_id": str, "entries": list},
    # `missing`: the cached prefixes the stage lacked (the head runs the sequences again without)
    "seq_error": {"instance_id": str, "seqs": list, "message": str, "missing": list},
    # the head's word on which sequences live and which cached prefixes it keeps, every few
    # seconds: the others free the rest
    "lease": {"instance_id": str, "seqs": list, "kept": list},
    "fail": {"instance_id": str, "message": str, "lost_node": _OPT_STR},
    # a tensor-parallel rank's collective address, sent to the other ranks when it starts loading
    "tp_hello": {"instance_id": str, "rank": int, "address": str},
    # replies
    "pong": {"profile": dict},
    "status_reply": {"profile": dict, "runners": list, "downloads": list, "events": list},
    "ok": {},
    "error": {"message": str},
    "delta": {"request_id": str, "text": str, "tokens": list, "logprobs": list},
    "done": {"request_id": str, "result": dict},
    "keepalive": {"request_id": str},
    "links": {"links": list},
}


class ProtocolError(ExoctlError):
    """A message that does not follow the protocol."""


class VersionMismatchError(ProtocolError):
    """A message of another protocol version: the sender runs another exoctl."""


@dataclass(frozen=True)
class Tensor:
    """Raw tensor bytes with their dtype name and shape; the worker views them with torch."""

    dtype: str
    shape: tuple[int, ...]
    data: Any  # bytes, memoryview or zmq.Frame buffer

    def meta(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class Message:
    type: str
    fields: dict[str, Any]
    tensors: tuple[Tensor, ...] = field(default=())

    def __getitem__(self, key: str) -> Any:
        return self.fields[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.fields.get(key, default)


def encode(kind: str, fields: dict[str, Any] | None = None, tensors: Sequence[Tensor] = ()) -> list[Any]:
    """Frames for one message: the header, then one frame per tensor (sent without copying)."""
    header = {"v": PROTOCOL_VERSION, "type": kind, **(fields or {})}
    if tensors:
        header["tensors"] = [t.meta() for t in tensors]
    return [msgpack.packb(header, use_bin_type=True), *(t.data for t in tensors)]


def _check_fields(kind: str, header: dict[str, Any]) -> None:
    for name, types in SCHEMAS[kind].items():
        if name not in header:
            raise ProtocolError(f"'{kind}' message is missing field '{name}'")
        value = header[name]
        if types is _ANY:
            continue
        accepted = types if isinstance(types, tuple) else (types,)
        if (isinstance(value, bool) and bool not in accepted) or not isinstance(value, accepted):
            names = " or ".join("null" if t is type(None) else t.__name__ for t in accepted)
            raise ProtocolError(f"'{kind}' field '{name}' must be {names}, got {type(value).__name__}")


def _check_tensor(index: int, meta: Any, frame: Any) -> Tensor:
    if not isinstance(meta, dict) or set(meta) != {"dtype", "shape"}:
        raise ProtocolError(f"tensor {index}: metadata must be {{dtype, shape}}")
    dtype, shape = meta["dtype"], meta["shape"]
    if dtype not in WIRE_DTYPE_SIZES:
        raise ProtocolError(f"tensor {index}: dtype {dtype!r} is not one of {', '.join(WIRE_DTYPE_SIZES)}")
    if (
        not isinstance(shape, list)
        or len(shape) > 4
        or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape)
    ):
        raise ProtocolError(f"tensor {index}: shape must be a list of at most 4 sizes >= 0, got {shape!r}")
    expected = math.prod(shape) * WIRE_DTYPE_SIZES[dtype]
    length = len(memoryview(frame))
    if expected > MAX_TENSOR_BYTES:
        raise ProtocolError(f"tensor {index}: {expected} bytes is over the limit of {MAX_TENSOR_BYTES}")
    if length != expected:
        raise ProtocolError(
            f"tensor {index}: shape {shape} of {dtype} needs {expected} bytes but the frame has {length}"
        )
    return Tensor(dtype, tuple(shape), frame)


def decode(frames: Sequence[Any]) -> Message:
    """Validate and unpack the frames of one message; raises ProtocolError on anything wrong."""
    if not frames:
        raise ProtocolError("empty message")
    raw = bytes(frames[0])
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(raw)} bytes is over the limit of {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(raw, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError, TypeError) as exc:
        raise ProtocolError(f"header is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(header, dict):
        raise ProtocolError("header must be a msgpack map")
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise VersionMismatchError(
            f"protocol version {version!r} does not match this exoctl's {PROTOCOL_VERSION}",
            hint="run the same exoctl version everywhere: `exoctl down`, upgrade, then `exoctl up`",
        )
    kind = header.get("type")
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError(f"unknown message type {kind!r}")
    _check_fields(kind, header)
    metas = header.pop("tensors", [])
    if not isinstance(metas, list) or len(metas) > MAX_TENSORS:
        raise ProtocolError(f"'tensors' must be a list of at most {MAX_TENSORS} entries")
    if len(metas) != len(frames) - 1:
        raise ProtocolError(f"header describes {len(metas)} tensors but {len(frames) - 1} frames follow")
    tensors = tuple(_check_tensor(i, m, f) for i, (m, f) in enumerate(zip(metas, frames[1:], strict=True)))
    del header["v"], header["type"]
    return Message(kind, header, tensors)
