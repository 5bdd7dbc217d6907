"""The wire format: round trips, and every check `decode` makes on a message."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from exoctl.transport import NodeClient  # noqa: F401  (the transport imports cleanly without torch)
from exoctl.wire.protocol import PROTOCOL_VERSION, ProtocolError, Tensor, decode, encode


def test_round_trip_with_tensors() -> None:
    data = bytes(range(24))
    frames = encode(
        "forward", {"instance_id": "i", "seqs": ["s"], "positions": [3]}, [Tensor("float32", (1, 2, 3), data)]
    )
    message = decode(frames)
    assert message.type == "forward" and message["positions"] == [3] and message.get("missing") is None
    (tensor,) = message.tensors
    assert tensor.dtype == "float32" and tensor.shape == (1, 2, 3) and bytes(tensor.data) == data


def header(**fields: Any) -> bytes:
    return msgpack.packb({"v": PROTOCOL_VERSION, **fields})


@pytest.mark.parametrize(
    ("frames", "error"),
    [
        ([], "empty message"),
        ([b"\xc1"], "not valid msgpack"),
        ([msgpack.packb("text")], "must be a msgpack map"),
        ([msgpack.packb({"type": "ping"})], "protocol version None does not match"),
        ([header(type=5)], "unknown message type 5"),
        ([header(type="token", instance_id="i", seqs=["s"])], "missing field 'tokens'"),
        ([header(type="release", instance_id="i", seq=True)], "'seq' must be str, got bool"),
        ([header(type="token", instance_id="i", seqs=["s"], tokens="1")], "'tokens' must be list, got str"),
        (
            [header(type="generate", instance_id="i", request_id="r", messages="hi", prompt=None, params={})],
            "'messages' must be list or null",
        ),
        (
            [header(type="ping", tensors=[{"dtype": "float32", "shape": [2]}]), b"\0" * 4],
            "shape [2] of float32 needs 8 bytes but the frame has 4",
        ),
        (
            [header(type="ping", tensors=[{"dtype": "object", "shape": [1]}]), b"\0"],
            "dtype 'object' is not one of",
        ),
        ([header(type="ping", tensors=[{"dtype": "int64", "shape": [-1]}]), b""], "shape must be a list"),
        (
            [header(type="ping", tensors=[{"dtype": "int64", "shape": [1], "x": 1}]), b"\0" * 8],
            "metadata must be",
        ),
        (
            [header(type="ping", tensors=[{"dtype": "float32", "shape": [2**20, 2**20]}]), b""],
            "over the limit",
        ),
        ([header(type="ping")] + [b""] * 2, "describes 0 tensors but 2 frames follow"),
        ([header(type="ping", tensors="x")], "'tensors' must be a list"),
        ([b"\x91" + b"\x91" * 100_000], "not valid msgpack"),
        (
            [msgpack.packb({"v": PROTOCOL_VERSION, "type": "ping", "pad": "x" * (9 * 2**20)})],
            "over the limit",
        ),
    ],
)
def test_decode_rejects(frames: list[bytes], error: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        decode(frames)
    assert error in caught.value.message


def test_version_mismatch_says_what_to_do() -> None:
    with pytest.raises(ProtocolError) as caught:
        decode([msgpack.packb({"v": PROTOCOL_VERSION + 1, "type": "ping"})])
    assert "run the same exoctl version everywhere" in (caught.value.hint or "")
