"""GGUF models on the Hugging Face Hub, named as ollama users write them: `REPO:QUANT`.

`bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M` is the repo's Q4_K_M file (or its split files);
a catalog id takes the card's GGUF repo: `llama-3.1-8b-cpu:Q4_K_M` (`llama-3.1-8b-cpu:gguf` for the
card's default quantisation). Torch-free.

Sizing needs only headers: the first file's metadata and every split file's tensor table, read
from the local Hugging Face cache or fetched with range requests (huggingface_hub's HfFileSystem
reads the first megabytes of a file). A node downloads only the split files holding its tensors,
through `hf_hub_download` (progress, resume, HF_TOKEN and HF_HUB_OFFLINE are huggingface_hub's).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exoctl.errors import ModelNotFoundError
from exoctl.models.gguf.file import SPLIT_NAME, HeaderTruncated, TensorInfo, header_of
from exoctl.models.gguf.hf_names import layer_of
from exoctl.models.hub_fetch import Download, fetch, hub_error, quiet_hub

REFERENCE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[\w.-]+)?):(?P<quant>[A-Za-z0-9_]+)$")
HEADER_START = 1 << 21  # bytes fetched first; doubled until the header fits (Llama 3's is ~8 MB)
HEADER_LIMIT = 1 << 28


@dataclass(frozen=True)
class HubGGUF:
    repo: str
    quant: str  # as the user wrote it; matched without regard to case

    @property
    def reference(self) -> str:
        return f"{self.repo}:{self.quant}"


def parse_reference(model: str) -> tuple[str, str] | None:
    """(`repo or catalog id`, `quant`) of `NAME:QUANT`, or None."""
    match = REFERENCE.match(model)
    return (match["repo"], match["quant"]) if match else None


def quant_files(filenames: Iterable[str], quant: str) -> list[str]:
    """The .gguf files of one quantisation in a repo's file list, split parts in order.

    The quantisation is a name component: `...-Q4_K_M.gguf`, `...q4_k_m-00001-of-00005.gguf`,
    `model.Q4_K_M.gguf`, or a folder `Q4_K_M/...`; `Q4_K` does not match a `Q4_K_M` file."""
    pattern = re.compile(rf"(?:^|[-_./]){re.escape(quant)}(?:[-./]|$)", re.IGNORECASE)
    found = [
        f
        for f in filenames
        if f.endswith(".gguf") and "mmproj" not in f.lower() and pattern.search(f[: -len(".gguf")] + ".")
    ]
    groups: dict[tuple[str, str], list[str]] = {}
    for name in found:
        folder, _, base = name.rpartition("/")
        match = SPLIT_NAME.match(base)
        groups.setdefault((folder, match["stem"] if match else base), []).append(name)
    if len(groups) > 1:
        raise ModelNotFoundError(
            f"{len(groups)} GGUF models match quantisation {quant}: "
            f"{', '.join(sorted(g[0] for g in groups.values())[:4])}",
            hint="name the quantisation exactly as the file does",
        )
    return sorted(next(iter(groups.values()))) if groups else []


def files_for_layers(
    tables: dict[str, list[str]], layers: tuple[int, int], n_layers: int, tied: bool
) -> list[str]:
    """The files (of `tables`: file -> its tensor names, first file first) a node holding layers
    [start, end) needs: the first always (the metadata), those with its layers' `blk.N.*`, the
    embedding's on the first range (and on the last when lm_head is tied), the output's on the last."""
    start, end = layers
    files = list(tables)
    wanted = {files[0]}
    for file, names in tables.items():
        for name in names:
            layer = layer_of(name)
            if layer is not None:
                needed = start <= layer < end
            elif name == "token_embd.weight":
                needed = start == 0 or (tied and end == n_layers)
            elif name in ("output.weight", "output_norm.weight"):
                needed = end == n_layers
            else:
                needed = True  # rope_freqs and anything global
            if needed:
                wanted.add(file)
                break
    return [f for f in files if f in wanted]


# --- the Hub --------------------------------------------------------------------------------------


def _quants(names: list[str]) -> list[str]:
    """The quantisations named in a repo's .gguf file names."""
    found = (
        re.search(r"[-_.]((?:I?Q\d|F16|BF16|F32)[A-Z0-9_]*)", n, re.I) for n in names if n.endswith(".gguf")
    )
    return sorted({m[1] for m in found if m})


def cached_files(repo_id: str) -> list[str]:
    """The files of `repo_id` in the local Hugging Face cache (every cached revision)."""
    from huggingface_hub import scan_cache_dir

    try:
        repos = [r for r in scan_cache_dir().repos if r.repo_id == repo_id]
    except Exception:  # no cache yet, or one it cannot read
        return []
    return sorted(
        {
            str(f.file_path.relative_to(rev.snapshot_path))
            for r in repos
            for rev in r.revisions
            for f in rev.files
        }
    )


def list_files(ref: HubGGUF) -> list[str]:
    """The repo's files of `ref.quant`: from the local cache when it holds that quantisation
    (no network: a plan is sized from cached headers), else from the Hub."""
    from huggingface_hub import HfApi, constants

    names = cached_files(ref.repo)
    if not quant_files(names, ref.quant):
        try:
            if constants.HF_HUB_OFFLINE:
                raise ConnectionError("HF_HUB_OFFLINE is set")
            with quiet_hub():
                names = HfApi().list_repo_files(ref.repo)
        except Exception as exc:  # offline, gated, missing: say which, with what the cache has
            error = hub_error(ref.repo, exc)
            if names:
                error.message += f"; this machine's cache holds its {', '.join(_quants(names))} only"
            raise error from None
    files = quant_files(names, ref.quant)
    if not files:
        raise ModelNotFoundError(
            f"{ref.repo} has no GGUF file of quantisation {ref.quant}",
            hint=f"it has: {', '.join(_quants(names)[:12]) or 'no .gguf files'}",
        )
    return files


def not_cached(ref: HubGGUF, filename: str) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"{ref.reference}: {filename} is not in this node's Hugging Face cache and the Hub is not reachable "
        "(or HF_HUB_OFFLINE is set)",
        hint=f"download it on the node (hf download {ref.repo} {filename}) or copy the .gguf files into its "
        "model_dir",
    )


def cached(ref: HubGGUF, filename: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(ref.repo, filename)
    return Path(found) if isinstance(found, str) else None


def read_remote_header(
    ref: HubGGUF, filename: str, string_arrays: Any = ()
) -> tuple[dict[str, Any], list[TensorInfo]]:
    """A file's header: from the cache if it is there, else its first bytes over HTTP ranges."""
    local = cached(ref, filename)
    if local is not None:
        from exoctl.models.gguf.file import read_header

        return read_header(local, string_arrays)
    from huggingface_hub import HfFileSystem
    from huggingface_hub.errors import OfflineModeIsEnabled

    size = HEADER_START
    try:
        # HTTP range reads: only the header's bytes cross the network, however large the file
        with quiet_hub(), HfFileSystem().open(f"{ref.repo}/{filename}", "rb") as handle:
            data = b""
            while True:
                data += handle.read(size - len(data))
                try:
                    return header_of(data, filename, string_arrays)
                except HeaderTruncated:
                    if len(data) < size or size >= HEADER_LIMIT:
                        raise
                    size *= 4
    except HeaderTruncated:
        raise
    except OfflineModeIsEnabled:
        raise not_cached(ref, filename) from None
    except Exception as exc:
        raise hub_error(ref.repo, exc) from None


def download(
    ref: HubGGUF,
    layers: tuple[int, int] | None = None,
    n_layers: int = 0,
    tied: bool = False,
    progress: Download | None = None,
) -> Path:
    """The local path of the model's first file, with the files a node holding `layers` needs
    (all of them without `layers`) fetched into the Hugging Face cache, counted in `progress`."""
    from huggingface_hub import constants

    files = list_files(ref)
    needed = files
    if layers is not None and len(files) > 1:
        tables = {f: [t.name for t in read_remote_header(ref, f)[1]] for f in files}
        needed = files_for_layers(tables, layers, n_layers, tied)
    missing = [f for f in needed if cached(ref, f) is None]
    if missing and constants.HF_HUB_OFFLINE:
        raise not_cached(ref, missing[0])
    progress = progress or Download("", ref.reference, layers or (0, n_layers), n_layers)
    return fetch(ref.repo, needed, progress) / needed[0]
