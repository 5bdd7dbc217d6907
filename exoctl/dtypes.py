"""The dtypes exoctl knows, listed once: what a model runs in, and what a tensor frame may carry.

Torch-free: the CLI, the API, placement and the protocol read the names; the engine and the
worker map them to torch dtypes.
"""

from __future__ import annotations

# What a runner holds its weights in; `auto` picks a float one per cluster, never a quantized one.
FLOAT_DTYPES: tuple[str, ...] = ("float32", "bfloat16")
# Weight-only quantization (engine.quant): activations, norms and the KV cache stay in float.
QUANTIZED_BITS: dict[str, int] = {"int8": 8, "int4": 4}
RUNTIME_DTYPES: tuple[str, ...] = (*FLOAT_DTYPES, *QUANTIZED_BITS)
DTYPE_CHOICES: tuple[str, ...] = ("auto", *RUNTIME_DTYPES)

# What a tensor frame on the wire may carry, with its item size: hidden states in the runtime
# dtypes (float16 for peers that send it), token ids as int64.
WIRE_DTYPE_SIZES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4}


FLOAT_BYTES: dict[str, int] = {name: WIRE_DTYPE_SIZES[name] for name in ("float32", "bfloat16", "float16")}
QUANT_BLOCK = 32  # int4 weights per scale and minimum; int8 and int4 need input features in multiples of it


def matrix_bytes(dtype: str, rows: int, cols: int) -> int:
    """Bytes a weight matrix [rows, cols] takes at run time, scales included: int8 has one
    float32 scale per row, int4 a float16 scale and minimum per block of 32 (5 bits a weight, as
    Q4_1). A matrix whose input width takes no blocks of 32 is held in float (counted as float32,
    the larger of the two activation dtypes)."""
    if dtype in QUANTIZED_BITS and cols % QUANT_BLOCK:
        return rows * cols * 4
    if dtype == "int8":
        return rows * cols + 4 * rows
    if dtype == "int4":
        return rows * cols // 2 + 4 * (rows * cols // QUANT_BLOCK)
    return rows * cols * float_bytes(dtype)


def float_bytes(dtype: str) -> int:
    """Bytes per value of what stays in float: activations, norms, biases, routers, the KV cache.
    Quantized models compute in float32 on CPUs without native bf16 maths: counted as float32."""
    if dtype in QUANTIZED_BITS:
        return 4
    try:
        return FLOAT_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(RUNTIME_DTYPES)}") from None


def embedding_bytes(dtype: str, rows: int, cols: int) -> int:
    """The token embedding: a lookup reads one row a token, so quantized models keep it in bfloat16."""
    return rows * cols * (2 if dtype in QUANTIZED_BITS else float_bytes(dtype))


def head_dtype(dtype: str) -> str:
    """lm_head's dtype: int8 under int4 too (the logits decide every token, as in llama.cpp)."""
    return "int8" if dtype in QUANTIZED_BITS else dtype


def choices_text() -> str:
    return ", ".join(DTYPE_CHOICES)
