"""The dtypes exoctl knows, listed once: what a model runs in, and what a tensor frame may carry.

Torch-free: the CLI, the API, placement and the protocol read the names; the engine and the
worker map them to torch dtypes.
"""

from __future__ import annotations

# What a runner holds its weights and activations in; `auto` picks one per cluster.
RUNTIME_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
DTYPE_CHOICES: tuple[str, ...] = ("auto", *RUNTIME_DTYPES)

# What a tensor frame on the wire may carry, with its item size: hidden states in the runtime
# dtypes (float16 for peers that send it), token ids as int64.
WIRE_DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}


def choices_text() -> str:
    return ", ".join(DTYPE_CHOICES)
