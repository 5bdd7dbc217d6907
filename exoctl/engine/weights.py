"""Lazy, memory-mapped access to a model folder's safetensors, one tensor at a time.

A runner asks for the tensors of its own layers only; the files are opened with `safe_open`
(memory-mapped) and nothing else is read; a tensor-parallel rank reads only its slice of a
tensor (`get_part`). `read_names` records what was read, so tests (and
memory accounting) can check that a layer range touched only its own tensors.
"""

from __future__ import annotations

import ctypes
import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import safe_open

from exoctl.engine.quant import (
    QuantizedWeight,
    check_block_columns,
    concat_rows,
    fits_blocks,
    quantize,
)
from exoctl.errors import ModelFormatError, ModelNotFoundError

INDEX_FILE = "model.safetensors.index.json"
QUANTIZE_ROWS = 128  # rows read, converted and quantized at a time: the float copies stay small


def read_weight_map(folder: Path) -> dict[str, str]:
    """Tensor name -> file name, from the index, or from the headers of the folder's files."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelFormatError(f"{index}: not a safetensors index ({exc})") from None
        # Files the index names may be absent: a node downloads only the files of its layers. A
        # tensor read from an absent file is an error then (`WeightReader._handle`).
        return dict(weight_map)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelNotFoundError(f"no *.safetensors files in {folder}")
    weight_map = {}
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                weight_map[name] = file.name
    return weight_map


class WeightSource(Protocol):
    """What a layer loader reads tensors through: `WeightReader` (safetensors) or
    `gguf_weights.GGUFWeightReader`, both under Hugging Face tensor names."""

    read_names: list[str]
    held_in_float: list[str]  # matrices asked for in int8/int4 whose width takes no blocks of 32

    def __contains__(self, name: str) -> bool: ...

    def get(
        self, name: str, shape: Iterable[int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor: ...

    def get_part(
        self, name: str, shape: Iterable[int], dim: int, part: range, dtype: torch.dtype | None = None
    ) -> torch.Tensor: ...

    def matrix(
        self,
        name: str,
        shape: tuple[int, int],
        dim: int = 0,
        part: range | None = None,
        bits: int | None = None,
    ) -> torch.Tensor | QuantizedWeight: ...

    def close(self) -> None: ...


class WeightReader:
    """Reads named tensors from a folder's safetensors files, converting to `dtype` on the way.

    With `bits` (8 or 4), `matrix` quantizes each weight matrix as it is read, a few hundred
    rows at a time, and unmaps the file afterwards: the pages of a memory-mapped file count in
    the process's RSS for as long as they stay mapped, so a runner would otherwise peak at the
    whole full-precision range it read before the reader closes.
    """

    def __init__(self, folder: Path, dtype: torch.dtype, bits: int | None = None) -> None:
        self.folder = Path(folder)
        self.dtype = dtype
        self.bits = bits
        self.weight_map = read_weight_map(self.folder)
        self._handles: dict[str, Any] = {}
        self.read_names: list[str] = []
        self.held_in_float: list[str] = []
        self.read_parts: list[tuple[str, int, range]] = []  # what get_part read: name, dim, part

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _handle(self, name: str) -> Any:
        try:
            file = self.weight_map[name]
        except KeyError:
            raise ModelFormatError(
                f"{self.folder}: tensor {name!r} is missing from the checkpoint",
                hint="the folder does not hold the model its config.json describes",
            ) from None
        if file not in self._handles:
            if not (self.folder / file).is_file():
                raise ModelFormatError(
                    f"{self.folder}: {file}, which holds {name!r}, is not in the folder",
                    hint="the download is incomplete, or holds other layers: `exoctl download` it again",
                )
            self._handles[file] = safe_open(self.folder / file, framework="pt")
        return self._handles[file]

    def get(
        self, name: str, shape: Iterable[int] | None = None, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """One tensor, checked against the shape the config implies, in `dtype` (default the reader's)."""
        tensor = self._handle(name).get_tensor(name)
        self.read_names.append(name)
        if self.bits is not None:
            self._release(name)
        if shape is not None and tuple(tensor.shape) != tuple(shape):
            raise ModelFormatError(
                f"{self.folder}: tensor {name!r} has shape {tuple(tensor.shape)}, config.json implies "
                f"{tuple(shape)}"
            )
        return tensor.to(dtype or self.dtype)

    def get_part(
        self, name: str, shape: Iterable[int], dim: int, part: range, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) `part` of a tensor of `shape`, read from the file
        through a slice view: only those bytes are read and converted, never the whole tensor."""
        shape = tuple(shape)
        if part == range(shape[dim]):
            return self.get(name, shape, dtype)
        view = self._slice_view(name, shape)
        index: list[slice] = [slice(None)] * len(shape)
        index[dim] = slice(part.start, part.stop)
        self.read_names.append(name)
        self.read_parts.append((name, dim, part))
        return view[tuple(index)].to(dtype or self.dtype)

    def matrix(
        self,
        name: str,
        shape: tuple[int, int],
        dim: int = 0,
        part: range | None = None,
        bits: int | None = None,
    ) -> torch.Tensor | QuantizedWeight:
        """A weight matrix [out, in] (or its rows/columns `part`), quantized to `bits` (default the
        reader's) or, without bits, in the reader's dtype as `get_part` reads it."""
        bits = bits or self.bits
        part = part if part is not None else range(shape[dim])
        if bits is None:
            return self.get_part(name, shape, dim, part)
        if not fits_blocks(shape[1]):
            # as llama.cpp's quantizer keeps such a tensor in a wider type: float32, whatever the
            # activations (a tensor rank's partial sum of it stays float32 until the all-reduce)
            self.held_in_float.append(name)
            return self.get_part(name, shape, dim, part, torch.float32)
        view = self._slice_view(name, shape)
        rows = part if dim == 0 else range(shape[0])
        # int4 blocks run along the input dimension, so a column part is read as it is (the
        # part's own blocks); an int8 row's scale spans the whole row, so int8 reads whole rows.
        read_part = dim == 1 and bits == 4
        if read_part:
            check_block_columns(part, name)
        columns = part if read_part else range(shape[1])
        pieces = []
        for start in range(rows.start, rows.stop, QUANTIZE_ROWS):
            stop = min(start + QUANTIZE_ROWS, rows.stop)
            chunk = view[start:stop, columns.start : columns.stop]
            quantized = quantize(chunk, bits)
            del chunk
            pieces.append(quantized.columns(part) if dim == 1 and bits == 8 else quantized)
        self.read_names.append(name)
        if part != range(shape[dim]):
            self.read_parts.append((name, dim, part))
        self._release(name)
        result = concat_rows(pieces)
        del pieces
        trim_heap()
        return result

    def _slice_view(self, name: str, shape: tuple[int, ...]) -> Any:
        """The file's slice view of a tensor, checked against the shape the config implies."""
        view = self._handle(name).get_slice(name)
        found = tuple(view.get_shape())
        if found != tuple(shape):
            raise ModelFormatError(
                f"{self.folder}: tensor {name!r} has shape {found}, config.json implies {tuple(shape)}"
            )
        return view

    def _release(self, name: str) -> None:
        """Unmap the file `name` lives in; the next read maps it again (a header parse)."""
        self._handles.pop(self.weight_map[name], None)

    def close(self) -> None:
        self._handles.clear()
        if self.bits is not None:
            trim_heap()


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def trim_heap() -> None:
    """Give the allocator's free memory back to the OS. Quantizing frees many float chunks of a few
    MB; glibc keeps such blocks on its heap once its mmap threshold has risen past their size, so
    without a trim the RSS after a quantized load stays 50-100 MB above what the model holds."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is not None:
        trim(0)
