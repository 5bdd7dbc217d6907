"""Reading a GGUF model's tensors under Hugging Face names, as `WeightReader` reads safetensors.

The file is memory-mapped and only the rows a runner holds are touched: a layer range reads
its own `blk.N.*`, a tensor rank its rows (or the blocks of its columns), an expert-parallel
rank its experts' slices of the merged `ffn_*_exps` tensors.

What a tensor becomes (`runtime_bits`; the engine's formats are in `engine.quant`):
- int4 from Q4_0 and Q4_1: repacked exactly. Their block of 32 (float16 d, and m for Q4_1;
  Q4_0 is m = -8d) with weight j in byte j's low nibble and j + 16 in its high one is int4's own.
- int4 from Q4_K: repacked, nibbles exact. A Q4_K block of 256 holds 8 blocks of 32 with 6-bit
  scales and minimums of a float16 d and dmin: each becomes int4's float16 (d·sc, -dmin·m), a
  product rounded to float16 (relative error ≤ 2^-11 per block; tests/test_gguf.py measures it).
- Q5_*, Q6_K and Q8_0 tensors under int4 become int8: the file kept them above 4 bits on purpose
  (a Q4_K_M file's attn_v and ffn_down in some layers), as exoctl keeps lm_head in int8.
- int8 from anything: dequantized (the `gguf` package's dequantizers), then quantized per row; a
  Q8_0 block's own scale is per 32 weights, int8's per row, so this is not exact either.
- float32 / bfloat16: dequantized, a few hundred rows at a time.
Llama files' q and k rows are in llama.cpp's rope order; they are put back in Hugging Face's.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K, dequantize

from exoctl.engine.quant import (
    QuantizedWeight,
    check_block_columns,
    concat_rows,
    fits_blocks,
    quantize,
)
from exoctl.engine.weights import QUANTIZE_ROWS, trim_heap
from exoctl.errors import ModelFormatError
from exoctl.models.gguf.file import GGUFModel, TensorInfo, open_model, runtime_bits
from exoctl.models.gguf.hf_names import Location, locate, permutes_qk

EXACT_INT4 = ("Q4_0", "Q4_1")
REPACKED_INT4 = (*EXACT_INT4, "Q4_K")


class GGUFWeightReader:
    """`WeightReader`'s interface over a GGUF model (see the module doc)."""

    def __init__(self, model: GGUFModel | Path, dtype: torch.dtype, bits: int | None = None) -> None:
        self.model = model if isinstance(model, GGUFModel) else open_model(Path(model))
        self.dtype = dtype
        self.bits = bits
        self.read_names: list[str] = []
        self.held_in_float: list[str] = []
        self.read_parts: list[tuple[str, int, range]] = []
        self.read_tensors: set[str] = set()  # the GGUF tensors touched
        self._maps: dict[Path, np.memmap] = {}
        heads = int(self.model.get("attention.head_count", 1))
        # the heads of the row-permuted tensors: q has the query heads, k the KV heads
        self._heads = {"attn_q": heads, "attn_k": int(self.model.get("attention.head_count_kv", heads))}

    def __contains__(self, name: str) -> bool:
        where = locate(name, self.model.tensors)
        return where is not None and where.name in self.model.tensors

    # --- raw rows ----------------------------------------------------------------------------

    def _where(self, name: str) -> tuple[Location, TensorInfo]:
        where = locate(name, self.model.tensors)
        info = self.model.tensors.get(where.name) if where is not None else None
        if where is None or info is None:
            gguf_name = where.name if where is not None else "(no GGUF name)"
            if self.model.missing:
                raise ModelFormatError(
                    f"{self.model.path}: tensor {gguf_name!r} ({name}) is in none of the split parts here; "
                    f"missing: {', '.join(self.model.missing[:3])}",
                    hint="download the parts that hold this node's layers",
                )
            raise ModelFormatError(
                f"{self.model.path}: tensor {gguf_name!r} ({name}) is missing from the GGUF file",
                hint="the file does not hold the model its metadata describes",
            )
        return where, info

    def _shape(self, name: str, where: Location, info: TensorInfo) -> tuple[int, ...]:
        shape = info.shape[1:] if where.expert is not None else info.shape
        if where.expert is not None and not 0 <= where.expert < info.shape[0]:
            raise ModelFormatError(
                f"{self.model.path}: {info.name} has {info.shape[0]} experts, not {where.expert + 1}"
            )
        return tuple(shape)

    def _raw(self, info: TensorInfo, expert: int | None) -> np.ndarray:
        """The tensor's bytes as [rows, row_bytes] (a vector is one row), memory-mapped."""
        mapped = self._maps.get(info.file)
        if mapped is None:
            mapped = self._maps[info.file] = np.memmap(info.file, dtype=np.uint8, mode="r")
        self.read_tensors.add(info.name)
        rows = 1
        for dim in info.shape[:-1]:
            rows *= dim
        raw = mapped[info.offset : info.offset + info.nbytes].reshape(rows, info.row_bytes)
        if expert is not None:
            per = rows // info.shape[0]
            raw = raw[expert * per : (expert + 1) * per]
        return raw

    def _source_rows(self, info: TensorInfo, rows: range) -> np.ndarray | range:
        """The file's rows holding Hugging Face rows `rows` (q and k of llama files are permuted)."""
        kind = info.name.split(".")[2] if info.name.startswith("blk.") else ""
        if kind not in self._heads or not permutes_qk(self.model):
            return rows
        head_dim = info.shape[0] // self._heads[kind]
        half = head_dim // 2
        # llama.cpp's row 2i + j of a head is Hugging Face's row j * half + i
        r = np.arange(rows.start, rows.stop)
        head, within = r // head_dim, r % head_dim
        return head * head_dim + 2 * (within % half) + within // half

    def _rows(self, name: str, shape: tuple[int, ...], rows: range) -> tuple[np.ndarray, TensorInfo]:
        where, info = self._where(name)
        found = self._shape(name, where, info)
        if found != tuple(shape):
            raise ModelFormatError(
                f"{self.model.path}: tensor {info.name!r} has shape {found}, the metadata implies "
                f"{tuple(shape)}"
            )
        raw = self._raw(info, where.expert)
        source = self._source_rows(info, rows)
        picked = raw[source.start : source.stop] if isinstance(source, range) else raw[source]
        return picked, info

    def _columns(self, raw: np.ndarray, info: TensorInfo, part: range) -> np.ndarray | None:
        """Columns `part` of raw rows, cut on the type's block boundaries; None if that cuts a block."""
        block, size = GGML_QUANT_SIZES[info.ggml_type]
        if part.start % block or part.stop % block:
            return None
        return raw[:, part.start // block * size : part.stop // block * size]

    # --- float --------------------------------------------------------------------------------

    def _floats(self, raw: np.ndarray, info: TensorInfo, out: torch.dtype, cols: int) -> torch.Tensor:
        """Rows of raw bytes -> [rows, cols] in `out`, a few hundred rows at a time."""
        if info.type_name in ("F32", "F16", "BF16"):
            kind = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}[info.type_name]
            values = torch.from_numpy(np.array(raw)).view(kind).view(-1, cols)  # a copy: the map is read-only
            return values.to(out)
        result = torch.empty(raw.shape[0], cols, dtype=out)
        for start in range(0, raw.shape[0], QUANTIZE_ROWS):
            chunk = dequantize(np.ascontiguousarray(raw[start : start + QUANTIZE_ROWS]), info.ggml_type)
            result[start : start + QUANTIZE_ROWS] = torch.from_numpy(chunk).reshape(-1, cols)
        return result

    def get(
        self, name: str, shape: Iterable[int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        where, info = self._where(name)
        wanted = tuple(shape) if shape is not None else self._shape(name, where, info)
        return self.get_part(name, wanted, 0, range(wanted[0]), dtype)

    def get_part(
        self, name: str, shape: Iterable[int], dim: int, part: range, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) `part` of a tensor, in float; only those rows are read,
        and of the columns only the blocks that hold them."""
        shape = tuple(shape)
        out = dtype or self.dtype
        if len(shape) == 1:
            raw, info = self._rows(name, shape, range(1))
            values = self._floats(raw, info, out, shape[0]).view(-1)
            order = self._source_rows(info, range(shape[0]))  # a llama file's q or k bias is permuted too
            if not isinstance(order, range):
                values = values[torch.from_numpy(order)]
            values = values[part.start : part.stop].contiguous()
        else:
            raw, info = self._rows(name, shape, part if dim == 0 else range(shape[0]))
            cut = self._columns(raw, info, part) if dim == 1 else None
            if cut is not None:
                values = self._floats(cut, info, out, len(part))
            else:
                values = self._floats(raw, info, out, shape[1])
                values = values[:, part.start : part.stop].contiguous() if dim == 1 else values
        self.read_names.append(name)
        if part != range(shape[dim]):
            self.read_parts.append((name, dim, part))
        return values

    # --- matrices ------------------------------------------------------------------------------

    def matrix(
        self,
        name: str,
        shape: tuple[int, int],
        dim: int = 0,
        part: range | None = None,
        bits: int | None = None,
    ) -> torch.Tensor | QuantizedWeight:
        """A weight matrix (or its rows/columns `part`) in the bits `runtime_bits` gives its type;
        without bits, in float as `get_part` reads it."""
        bits = bits or self.bits
        part = part if part is not None else range(shape[dim])
        if bits is None:
            return self.get_part(name, shape, dim, part)
        if not fits_blocks(shape[1]):  # no blocks of 32 along its input: float32 (weights.py)
            self.held_in_float.append(name)
            return self.get_part(name, shape, dim, part, torch.float32)
        raw, info = self._rows(name, shape, part if dim == 0 else range(shape[0]))
        held = runtime_bits(info.type_name, bits) or 8
        repack = held == 4 and info.type_name in REPACKED_INT4
        cols = shape[1]
        if dim == 1 and held == 4:
            if not repack:
                check_block_columns(part, name)
            # int4 blocks run along the columns: a rank's columns are its own blocks. (An int8 row's
            # scale spans the whole row, so int8 reads whole rows.)
            cut = self._columns(raw, info, part)
            if cut is not None:
                raw, cols = cut, len(part)
        pieces = []
        for start in range(0, raw.shape[0], QUANTIZE_ROWS):
            chunk = np.array(raw[start : start + QUANTIZE_ROWS])  # a writable copy of the mapped rows
            if repack:
                pieces.append(repack_int4(torch.from_numpy(chunk), info.type_name, cols))
            else:
                pieces.append(quantize(self._floats(chunk, info, torch.float32, cols), held))
        weight = concat_rows(pieces)
        del pieces
        self.read_names.append(name)
        if part != range(shape[dim]):
            self.read_parts.append((name, dim, part))
        if dim == 1 and weight.in_features != len(part):
            if weight.bits == 4:
                check_block_columns(part, name)
            weight = weight.columns(part)
        trim_heap()
        return weight

    def close(self) -> None:
        self._maps.clear()
        if self.bits is not None:
            trim_heap()


def repack_int4(raw: torch.Tensor, type_name: str, cols: int) -> QuantizedWeight:
    """uint8 [N, row_bytes] of Q4_0, Q4_1 or Q4_K rows -> int4 (engine.quant's layout)."""
    n = raw.shape[0]
    if type_name in EXACT_INT4:
        size = 18 if type_name == "Q4_0" else 20
        blocks = raw.view(n, cols // 32, size)
        d = blocks[..., 0:2].contiguous().view(torch.float16)  # [N, B, 1]
        m = -8 * d if type_name == "Q4_0" else blocks[..., 2:4].contiguous().view(torch.float16)
        nibbles = blocks[..., size - 16 :].reshape(n, cols // 2)
        return QuantizedWeight(nibbles.contiguous(), torch.cat((d, m), dim=-1).contiguous(), 4, cols)
    if type_name != "Q4_K":
        raise ValueError(f"{type_name} is not an int4 block type")
    supers = raw.view(n, cols // 256, 144)
    d = supers[..., 0:2].contiguous().view(torch.float16).float()  # [N, S, 1]
    dmin = supers[..., 2:4].contiguous().view(torch.float16).float()
    flat = supers[..., 4:16].reshape(-1, 12).numpy()
    sc, mins = (torch.from_numpy(a.astype(np.float32)).view(n, -1, 8) for a in Q4_K.get_scale_min(flat))
    scales = torch.stack(((d * sc).half(), (-dmin * mins).half()), dim=-1).view(n, cols // 32, 2)
    # 4 chunks of 32 bytes a super-block: the low nibbles are its block 2c, the high ones block 2c + 1
    qs = supers[..., 16:].reshape(n, cols // 256, 4, 1, 32)
    values = torch.cat((qs & 0x0F, qs >> 4), dim=3).view(n, cols // 32, 32)
    packed = values[..., :16] | (values[..., 16:] << 4)
    return QuantizedWeight(packed.reshape(n, cols // 2).contiguous(), scales.contiguous(), 4, cols)


def dequantized(info: TensorInfo, raw: np.ndarray) -> np.ndarray:
    """The float32 values of raw rows, as llama.cpp reads them (for tests and error measurements)."""
    return np.asarray(dequantize(np.ascontiguousarray(raw), GGMLQuantizationType[info.type_name]), np.float32)
