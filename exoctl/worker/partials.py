"""How a tensor rank's partial sums travel to the other ranks over the network: as computed, or as
8-bit blocks (distributed-llama's `q80`): each block of 32 values as int8 with one float32 scale
(its largest magnitude / 127), 36 bytes for 128 of float32, a 0.28x payload. Ranks on one host
exchange through shared memory and keep every bit; this is for partials that cross a link.

The receiver sums in float32, in rank order, and every rank sums the values that were sent (its own
partial too goes through the same rounding), so every rank still holds the same bits. Each value
moves by at most half a step of its block (scale / 2); `tests/test_collective.py` checks that bound.

Placement chooses per instance (`place --partials`, by default `auto`: 8-bit blocks when the
measured links make the float32 exchange cost more than a few percent of a token, placement.cost);
`EXOCTL_TP_PARTIALS` (`exact` | `q8` | `auto`) overrides it on a worker, and `EXOCTL_TP_EXACT=1`
forces `exact` over any other setting. (`EXOCTL_TP_SHM=0`, shm_exchange's, sends partials over
ZeroMQ even between ranks on one host: how one machine tests the path ranks on other hosts take.)
"""

from __future__ import annotations

import os

import torch

from exoctl.engine import qkernel
from exoctl.errors import ExoctlError

BLOCK = 32
PARTIALS_ENV = "EXOCTL_TP_PARTIALS"
EXACT_ENV = "EXOCTL_TP_EXACT"
PARTIALS_CHOICES = ("auto", "exact", "q8")


def _choice(name: str, choices: tuple[str, ...]) -> str:
    value = os.environ.get(name, "auto").strip().lower() or "auto"
    if value not in choices:
        raise ExoctlError(
            f"{name}={value!r} is not one of {', '.join(choices)}", hint=f"unset {name} or fix it"
        )
    return value


def quantized_partials(planned: str = "exact") -> bool:
    """Whether this worker sends its partials across links as 8-bit blocks: as placement `planned`
    them for the instance ("exact" or "q8", chosen by the links), unless this worker's
    EXOCTL_TP_EXACT or EXOCTL_TP_PARTIALS says otherwise."""
    if os.environ.get(EXACT_ENV, "").strip() not in ("", "0"):
        return False
    chosen = _choice(PARTIALS_ENV, PARTIALS_CHOICES)
    return (planned if chosen == "auto" else chosen) == "q8"


def encode(partial: torch.Tensor) -> torch.Tensor:
    """A partial (any shape, float) -> uint8 [4 * blocks + 32 * blocks]: the blocks' float32 scales,
    then each block's 32 int8 values (the last block zero-padded). By the kernel library where it
    is built (kernels/partials_q8.c: microseconds, where these torch calls take 144 us for 2048
    values), with the same result bit for bit."""
    flat = partial.detach().reshape(-1).float().contiguous()
    library = qkernel.optional_library()
    if library is not None:
        out = torch.empty(encoded_size(flat.numel()), dtype=torch.uint8)
        library.q8_encode(flat.data_ptr(), flat.numel(), out.data_ptr())
        return out
    return encode_torch(flat)


def encode_torch(flat: torch.Tensor) -> torch.Tensor:
    """`encode` in torch: flat float32 values -> their blocks."""
    blocks = -(-flat.numel() // BLOCK)
    padded = torch.zeros(blocks * BLOCK, dtype=torch.float32)
    padded[: flat.numel()] = flat
    rows = padded.view(blocks, BLOCK)
    scales = rows.abs().amax(dim=1) / 127.0  # [blocks]
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = torch.round(rows / safe[:, None]).clamp_(-127, 127).to(torch.int8)  # [blocks, 32]
    return torch.cat([scales.view(torch.uint8), q.view(-1).view(torch.uint8)])


def decode(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`encode`'s bytes (uint8) -> float32 values in `like`'s shape."""
    count = like.numel()
    blocks = -(-count // BLOCK)
    if raw.numel() != blocks * (4 + BLOCK):
        raise ExoctlError(
            f"an 8-bit partial of {raw.numel()} bytes does not fit {count} values "
            f"({blocks * (4 + BLOCK)} bytes)"
        )
    library = qkernel.optional_library()
    if library is not None:
        raw = raw.contiguous()
        out = torch.empty(like.shape, dtype=torch.float32)
        library.q8_decode(raw.data_ptr(), count, out.data_ptr())
        return out
    return decode_torch(raw, count).view(like.shape)


def decode_torch(raw: torch.Tensor, count: int) -> torch.Tensor:
    """`decode` in torch: blocks -> `count` float32 values."""
    blocks = -(-count // BLOCK)
    scales = raw[: 4 * blocks].view(torch.float32)
    q = raw[4 * blocks :].view(torch.int8).view(blocks, BLOCK)
    return (q.float() * scales[:, None]).reshape(-1)[:count]


def encoded_size(count: int) -> int:
    return -(-count // BLOCK) * (4 + BLOCK)
