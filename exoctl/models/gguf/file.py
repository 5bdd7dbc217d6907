"""A GGUF model: its files, metadata and tensor table (what it means in Hugging Face's terms is in
`hf_names`).

Torch-free: the control side sizes placements from the tensor table; the engine reads tensor
data through `engine.gguf_weights`. The `gguf` package gives the formats (value and tensor type
ids, block sizes) and the dequantizers; the header is parsed here because `gguf.GGUFReader`
builds a numpy view per element of every metadata array (6.7 s for SmolLM2's 49,152-token
vocabulary, about 25 s for Llama 3's): this reads the same header in ~40 ms and keeps string
arrays as counts unless asked for them (the tokenizer reads them through transformers).

A model is one `.gguf` file, or split files `NAME-00001-of-0000N.gguf` (each holds some tensors;
the first holds the metadata), given as the first file or as the folder holding them.
"""

from __future__ import annotations

import math
import mmap
import re
import struct
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exoctl.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError

SPLIT_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
# The tensor types exoctl reads, by name: F32, F16, BF16 values; 32-weight blocks; 256-weight K blocks.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")
# Kept at 8 bits when the model runs in int4: the file holds them above 4 bits on purpose.
ABOVE_4_BITS = ("Q5_0", "Q5_1", "Q5_K", "Q6_K", "Q8_0")
# `auto` for a GGUF model: the closest of exoctl's dtypes to the file's main type.
NATIVE_DTYPE = {
    "Q4_0": "int4",
    "Q4_1": "int4",
    "Q4_K": "int4",
    "F32": "bfloat16",
    "F16": "bfloat16",
    "BF16": "bfloat16",
}
# The architectures exoctl runs (llama.cpp names Mixtral files "llama" with an expert count).
ARCHITECTURES = ("llama", "qwen2")

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType

_SCALAR = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a GGUF file: `shape` in torch order ([rows, cols] for a matrix)."""

    name: str
    shape: tuple[int, ...]
    type_name: str
    file: Path
    offset: int  # absolute, in `file`
    nbytes: int

    @property
    def ggml_type(self) -> GGMLQuantizationType:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType[self.type_name]

    @property
    def row_bytes(self) -> int:
        block, size = block_size(self.type_name)
        return self.shape[-1] // block * size


@dataclass(frozen=True)
class GGUFModel:
    files: tuple[Path, ...]  # the parts on this machine
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo] = field(repr=False)
    # split parts not on this machine: a node downloads only the parts that hold its tensors
    missing: tuple[str, ...] = ()

    @property
    def path(self) -> Path:
        """The first (or only) file: the one that names the model."""
        return self.files[0]

    @property
    def architecture(self) -> str:
        return str(self.metadata["general.architecture"])

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(f"{self.architecture}.{key}", default)

    def main_type(self) -> str:
        """The type that holds most of the layers' matrix bytes (a Q4_K_M file: Q4_K)."""
        by_type: dict[str, int] = {}
        for info in self.tensors.values():
            if info.name.startswith("blk.") and len(info.shape) >= 2:
                by_type[info.type_name] = by_type.get(info.type_name, 0) + info.nbytes
        return max(by_type, key=lambda name: by_type[name]) if by_type else "F32"


def block_size(type_name: str) -> tuple[int, int]:
    """(weights, bytes) of one block of a ggml type; F32 is (1, 4). The `gguf` package (and numpy)
    is imported only when a GGUF file is read: most commands never touch one."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]]


def runtime_bits(type_name: str, bits: int | None) -> int | None:
    """The bits a tensor stored as `type_name` is held in when the model runs at `bits`."""
    if bits == 4 and type_name in ABOVE_4_BITS:
        return 8
    return bits


def native_dtype(type_name: str) -> str:
    """int4 for 4-bit blocks, int8 for 5 to 8 bits, bfloat16 for float files."""
    return NATIVE_DTYPE.get(type_name, "int8")


class HeaderTruncated(ModelFormatError):
    """The bytes given end inside the header (a fetched prefix too short, or a cut file)."""


def is_gguf_file(path: Path) -> bool:
    try:
        if not path.is_file():
            return False
        with open(path, "rb") as handle:
            return handle.read(4) == b"GGUF"
    except OSError:
        return False


def gguf_files_in(folder: Path) -> list[Path]:
    try:
        return sorted(p for p in folder.glob("*.gguf") if p.is_file()) if folder.is_dir() else []
    except OSError:
        return []


def is_gguf_model(path: Path) -> bool:
    """A GGUF file, or a folder holding GGUF files (one model, possibly split)."""
    return is_gguf_file(path) or bool(gguf_files_in(path))


def model_name(path: Path) -> str:
    """What a GGUF model is called: its file's name without `.gguf` or a split part's suffix."""
    match = SPLIT_NAME.match(path.name)
    return match["stem"] if match else path.name.removesuffix(".gguf")


def is_gguf_source(path: Path) -> bool:
    """What the engine loads as GGUF: a GGUF file, or a folder of them without a config.json."""
    return not (path / "config.json").is_file() and is_gguf_model(path)


def split_parts(first: Path) -> tuple[Path, ...]:
    """Every part of the model whose first (or only) file is `first`, here or not."""
    match = SPLIT_NAME.match(first.name)
    if not match:
        return (first,)
    count = int(match["count"])
    return tuple(first.with_name(f"{match['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1))


def model_files(path: Path) -> tuple[Path, ...]:
    """The files of the model at `path` (a file, or a folder of one model) that are on this
    machine, first file first: a node may hold only the split parts with its tensors."""
    if path.is_dir():
        found = gguf_files_in(path)
        if not found:
            raise ModelNotFoundError(f"no .gguf files in {path}")
        stems = {model_name(p) for p in found}
        if len(stems) > 1:
            raise ModelFormatError(
                f"{path} holds {len(stems)} GGUF models ({', '.join(sorted(stems)[:4])})",
                hint="give the path of one .gguf file (the first of a split model)",
            )
        path = found[0]
    parts = split_parts(path)
    if not parts[0].is_file():
        raise ModelNotFoundError(f"no file {parts[0]} (part 1 of {len(parts)}, which holds the metadata)")
    return tuple(f for f in parts if f.is_file())


def open_model(path: Path, string_arrays: Container[str] = ()) -> GGUFModel:
    """The model at `path`: its first file's metadata and the tensors of all its files (of the
    split parts on this machine). `string_arrays`: metadata arrays to read in full (the others
    longer than 4,096 items are kept as counts)."""
    files = model_files(Path(path))
    metadata: dict[str, Any] = {}
    tensors: dict[str, TensorInfo] = {}
    for index, file in enumerate(files):
        meta, infos = read_header(file, string_arrays if index == 0 else ())
        if index == 0:
            metadata = meta
        for info in infos:
            if info.name in tensors:
                raise ModelFormatError(
                    f"{file}: tensor {info.name!r} is also in {tensors[info.name].file.name}"
                )
            tensors[info.name] = info
    if "general.architecture" not in metadata:
        raise ModelFormatError(f"{files[0]}: no general.architecture in the GGUF metadata")
    missing = tuple(p.name for p in split_parts(files[0]) if p not in files)
    return GGUFModel(files, metadata, tensors, missing)


def read_header(path: Path, string_arrays: Container[str] = ()) -> tuple[dict[str, Any], list[TensorInfo]]:
    """A file's metadata and tensor table. A file that ends before its tensors do is refused."""
    try:
        with open(path, "rb") as handle:
            size = handle.seek(0, 2)
            if size < 24:
                raise ModelFormatError(f"{path}: {size} bytes is too short for a GGUF file")
            with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as blob:
                return _parse(path, blob, size, string_arrays)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read {path}: {exc.strerror or exc}") from None


def header_of(
    data: bytes, name: str, string_arrays: Container[str] = ()
) -> tuple[dict[str, Any], list[TensorInfo]]:
    """The metadata and tensor table of a file's first bytes (a header fetched over the network);
    tensors are not checked against a file size."""
    return _parse(Path(name), data, None, string_arrays)


def _parse(
    path: Path, blob: Any, size: int | None, string_arrays: Container[str]
) -> tuple[dict[str, Any], list[TensorInfo]]:
    if bytes(blob[:4]) != b"GGUF":
        raise ModelFormatError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", blob, 4)
        if version not in (2, 3):
            raise ModelFormatError(f"{path}: GGUF version {version}; exoctl reads versions 2 and 3")
        pos = 24
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, pos = _string(blob, pos)
            (kind,) = struct.unpack_from("<I", blob, pos)
            metadata[key], pos = _value(blob, pos + 4, kind, key in string_arrays)
        entries = []
        for _ in range(tensor_count):
            name, pos = _string(blob, pos)
            (dims,) = struct.unpack_from("<I", blob, pos)
            shape = struct.unpack_from(f"<{dims}Q", blob, pos + 4)
            kind, offset = struct.unpack_from("<IQ", blob, pos + 4 + 8 * dims)
            pos += 4 + 8 * dims + 12
            entries.append((name, tuple(reversed(shape)), kind, offset))  # ggml lists dims fastest first
    except (struct.error, UnicodeDecodeError, IndexError, MemoryError):
        raise HeaderTruncated(
            f"{path}: the GGUF header is truncated or corrupt", hint="download the file again"
        ) from None
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment
    infos = []
    for name, shape, kind, offset in entries:
        type_name = _type_name(path, name, kind)
        block, block_bytes = block_size(type_name)
        if shape[-1] % block:
            raise ModelFormatError(
                f"{path}: tensor {name!r} has {shape[-1]} columns, not whole {type_name} blocks"
            )
        nbytes = math.prod(shape) // block * block_bytes
        info = TensorInfo(name, shape, type_name, path, data_start + offset, nbytes)
        if size is not None and info.offset + nbytes > size:
            raise ModelFormatError(
                f"{path}: truncated: tensor {name!r} ends at byte {info.offset + nbytes:,} but the file has "
                f"{size:,} bytes",
                hint="the download is incomplete; fetch the file again",
            )
        infos.append(info)
    return metadata, infos


def _type_name(path: Path, tensor: str, kind: int) -> str:
    from gguf import GGMLQuantizationType

    try:
        name = GGMLQuantizationType(kind).name
    except ValueError:
        name = f"type {kind}"
    if name not in SUPPORTED_TYPES:
        raise UnsupportedModelError(
            f"{path}: tensor {tensor!r} is stored as {name}, which exoctl does not read",
            hint=f"use a file quantized as one of {', '.join(SUPPORTED_TYPES)} (Q4_K_M, Q8_0, Q4_0 files)",
        )
    return name


def _string(blob: Any, pos: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", blob, pos)
    end = pos + 8 + length
    if end > len(blob):
        raise IndexError
    return bytes(blob[pos + 8 : end]).decode("utf-8"), end


def _value(blob: Any, pos: int, kind: int, keep_strings: bool) -> tuple[Any, int]:
    if kind in _SCALAR:
        fmt = _SCALAR[kind]
        return struct.unpack_from(fmt, blob, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(blob, pos)
    if kind != _ARRAY:
        raise struct.error(f"value type {kind}")
    item, count = struct.unpack_from("<IQ", blob, pos)
    pos += 12
    if item in _SCALAR:
        fmt = _SCALAR[item]
        width = struct.calcsize(fmt)
        if count > 4096 and not keep_strings:  # token types and scores: only their count, unless asked
            return count, pos + count * width
        return list(struct.unpack_from(f"<{count}{fmt[1]}", blob, pos)), pos + count * width
    if item != _STRING:
        raise struct.error(f"array of type {item}")
    values: list[str] = []
    for _ in range(count):
        if keep_strings:
            text, pos = _string(blob, pos)
            values.append(text)
        else:
            (length,) = struct.unpack_from("<Q", blob, pos)
            pos += 8 + length
    return (values if keep_strings else count), pos
