"""The one dtype policy: the names exoctl knows, `auto`, what activations compute in, how a
quantized model lays out its embedding and lm_head, and what a tensor frame may carry.

Sizing (the catalog, placement) and loading (the engine) read the same functions here, and
every boundary (the CLI, the API, a `load` message, the engine) checks a name with
`check_dtype`: one wording everywhere. Torch-free: the engine maps the names to torch dtypes.
"""

from __future__ import annotations

from exoctl.errors import InvalidRequestError

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
    """The token embedding, in `embedding_dtype`."""
    return rows * cols * float_bytes(embedding_dtype(dtype))


def head_dtype(dtype: str) -> str:
    """lm_head's dtype: int8 under int4 too (the logits decide every token, as llama.cpp keeps
    its output matrix at higher precision)."""
    return "int8" if dtype in QUANTIZED_BITS else dtype


def choices_text() -> str:
    return ", ".join(DTYPE_CHOICES)


class UnsupportedDtypeError(InvalidRequestError):
    """A dtype name exoctl does not run."""


def check_dtype(dtype: object, choices: tuple[str, ...] = DTYPE_CHOICES) -> str:
    """The name itself when it is one of `choices`; else the one error every boundary gives."""
    if not isinstance(dtype, str) or dtype not in choices:
        raise UnsupportedDtypeError(
            f"dtype {dtype!r} is not supported", hint=f"use one of {', '.join(choices)}"
        )
    return dtype


def auto_dtype(every_node_bf16: bool) -> str:
    """`auto` for a float model: bfloat16 where every node computes in bfloat16 (native bf16
    maths, or the activations switch), else float32 (AVX2 prefills bf16 2-3x slower)."""
    return "bfloat16" if every_node_bf16 else "float32"


def activation_dtype(dtype: str, bf16: bool) -> str:
    """What activations, norms and the KV cache are in on a node that computes in bfloat16 (`bf16`)
    or not: a float dtype is its own; `auto`, int8 and int4 (weights only quantized) the node's."""
    if dtype == "auto" or dtype in QUANTIZED_BITS:
        return auto_dtype(bf16)
    return check_dtype(dtype, FLOAT_DTYPES)


def embedding_dtype(dtype: str) -> str:
    """The token embedding's dtype: a lookup reads one row a token, so a quantized model keeps it
    in bfloat16 (the checkpoints' own dtype, half of a float32 table)."""
    return "bfloat16" if dtype in QUANTIZED_BITS else dtype
