"""Tensor frames of the wire format as torch tensors, and back (no copy on the way out)."""

from __future__ import annotations

import torch

from exoctl.dtypes import WIRE_DTYPE_SIZES
from exoctl.wire.protocol import Tensor

TORCH_DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in WIRE_DTYPE_SIZES}


def to_tensor(t: Tensor) -> torch.Tensor:
    # bytearray: a writable copy, so torch owns memory that outlives the ZMQ frame
    return torch.frombuffer(bytearray(t.data), dtype=TORCH_DTYPES[t.dtype]).view(t.shape)


def from_tensor(x: torch.Tensor) -> Tensor:
    x = x.contiguous()
    name = next(k for k, v in TORCH_DTYPES.items() if v == x.dtype)
    return Tensor(name, tuple(x.shape), x.view(torch.uint8).numpy().data)
