"""Where a model's files are: a local folder or GGUF file, the embedded default's GGUF in its
package, or the Hugging Face cache (a safetensors repo, or a GGUF repo as `REPO:QUANT`). Torch-free.
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

from exoctl.errors import ExoctlError, ModelFormatError, ModelNotFoundError
from exoctl.models.catalog import DEFAULT_MODEL_ID, ModelCard, card_from_folder, find_card, get_card
from exoctl.models.gguf import hub as hub_gguf
from exoctl.models.gguf.card import card_from_gguf
from exoctl.models.gguf.file import GGUFModel, TensorInfo, is_gguf_model, model_name, open_model
from exoctl.models.gguf.hub import HubGGUF, cached_files, list_files, parse_reference, read_remote_header
from exoctl.models.hub_fetch import Download, cached_path, fetch, hub_error, quiet_hub, remote_sizes

# Files every node needs besides the weights: config, tokenizer, chat template, index.
METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer*", "*.model", "*.txt")
# A Hugging Face repo id (`owner/name`) that is no catalog id and no local path: a safetensors repo.
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def is_model_folder(path: Path) -> bool:
    try:
        return path.is_dir() and (path / "config.json").is_file()
    except OSError:  # a name too long, a loop of links: no folder of ours
        return False


def exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:
        return False


def as_path(model: str) -> Path:
    """`model` as a path, with `~` expanded where it names a home (`~nobody/x` stays as given)."""
    try:
        return Path(model).expanduser()
    except RuntimeError:
        return Path(model)


def allowed_roots(model_dirs: list[Path]) -> list[Path]:
    """The folders models may be opened from: the model directories, exoctl's store, the Hub cache."""
    from huggingface_hub import constants

    from exoctl.paths import model_store

    return [
        *(d.expanduser().resolve() for d in model_dirs),
        model_store().resolve(),
        Path(constants.HF_HUB_CACHE).expanduser().resolve(),
    ]


def hub_reference(model: str) -> HubGGUF | None:
    """`REPO:QUANT`, or `CATALOG_ID:QUANT` (`:gguf` for the card's default quantisation), as a
    Hub GGUF reference; None for anything else."""
    parsed = parse_reference(model)
    if parsed is None:
        return None
    name, quant = parsed
    card = find_card(name)
    if card is None:
        if "/" not in name:
            return None
        return HubGGUF(name, quant)
    if not card.gguf_repo:
        raise ModelNotFoundError(
            f"{card.id} has no GGUF source in the catalog",
            hint="give a GGUF repo instead: OWNER/NAME-GGUF:QUANT",
        )
    return HubGGUF(card.gguf_repo, card.gguf_quant if quant.lower() == "gguf" else quant)


def gguf_card(path: Path) -> ModelCard:
    """The card of a local GGUF model (a file, or a folder of split files), from its header."""
    model = open_model(path)
    if model.missing:  # sizing needs every part's tensor table
        raise ModelFormatError(
            f"{model.path.name} is part 1 of {len(model.files) + len(model.missing)} but "
            f"{len(model.missing)} part(s) are missing: {', '.join(model.missing[:3])}",
            hint="put every split file of the model in the same folder",
        )
    return card_from_gguf(model, model_name(model.path))


def hub_gguf_card(ref: HubGGUF) -> ModelCard:
    """The card of a Hub GGUF model, from its headers (cached files, or their first bytes fetched)."""
    files = list_files(ref)
    metadata: dict[str, Any] = {}
    tensors: dict[str, TensorInfo] = {}
    for index, filename in enumerate(files):
        meta, infos = read_remote_header(ref, filename)
        metadata = meta if index == 0 else metadata
        tensors.update((info.name, info) for info in infos)
    model = GGUFModel(tuple(Path(f) for f in files), metadata, tensors)
    return card_from_gguf(model, ref.reference, hf_repo=ref.repo)


def resolve_card(model: str) -> tuple[ModelCard, str]:
    """The card of `model` (catalog id, Hugging Face repo id, `REPO:QUANT`, a model folder's or
    GGUF file's path) and the reference a worker resolves: the catalog id, `REPO:QUANT`, or the
    absolute path."""
    card = find_card(model)
    if card is not None:
        return card, card.id
    hub = hub_reference(model)
    if hub is not None:
        return hub_gguf_card(hub), hub.reference
    path = as_path(model)
    if is_model_folder(path):
        return card_from_folder(path.resolve()), str(path.resolve())
    if is_gguf_model(path):
        return gguf_card(path.resolve()), str(path.resolve())
    if exists(path):
        raise ModelNotFoundError(
            f"{model} is not a model folder or GGUF file",
            hint="a model folder holds config.json (or .gguf files); a GGUF file starts with the GGUF magic",
        )
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {model}")
    if REPO_ID.match(model):
        return hub_repo_card(model), model
    return get_card(model), model  # raises the unknown-model error with the catalog's ids


def resolve_model(model: str, download: bool = False) -> Path:
    """The folder (or GGUF file) holding `model`, given as a path, catalog id, Hugging Face repo
    id or `REPO:QUANT`."""
    hub = hub_reference(model)
    if hub is not None:
        return hub_gguf.download(hub)
    card, ref = resolve_card(model)
    if ref != card.id:
        return Path(ref)
    if card.id == DEFAULT_MODEL_ID:
        from exoctl.models.default import find_gguf

        return find_gguf()
    return hub_folder(card, download=download)


def hub_folder(card: ModelCard, download: bool = False) -> Path:
    """The model's snapshot in the Hugging Face cache, downloading it if asked.

    HF_TOKEN, HF_HOME and HF_HUB_OFFLINE are honoured by huggingface_hub itself; downloads resume.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = [*METADATA_PATTERNS, "*.safetensors"]
    try:
        return Path(snapshot_download(card.hf_repo, allow_patterns=patterns, local_files_only=not download))
    except LocalEntryNotFoundError:
        if download:
            raise ModelNotFoundError(
                f"could not download {card.hf_repo}: the Hugging Face Hub is not reachable",
                hint="check the network, or copy the model folder to this machine and give its path",
            ) from None
        raise ModelNotFoundError(
            f"{card.id} ({card.hf_repo}) is not downloaded on this machine",
            hint=f"download it with: hf download {card.hf_repo}, or give a local model folder",
        ) from None
    except HfHubHTTPError as exc:
        raise hub_error(card.hf_repo, exc) from None


def files_for_layers(weight_map: dict[str, str], layers: tuple[int, int], n_layers: int) -> list[str]:
    """The safetensors files holding the tensors of layers [start, end), plus the embedding on the
    first range and the final norm and lm_head on the last (a tied lm_head is the embedding)."""
    start, end = layers
    tied = "lm_head.weight" not in weight_map
    wanted: set[str] = set()
    for name, file in weight_map.items():
        if name.startswith("model.layers."):
            index = int(name.split(".")[2])
            if start <= index < end:
                wanted.add(file)
        elif name == "model.embed_tokens.weight":
            if start == 0 or (tied and end == n_layers):
                wanted.add(file)
        elif end == n_layers:
            wanted.add(file)
    return sorted(wanted)


def repo_sizes(repo: str) -> dict[str, int]:
    """Every file of `repo` and its size: from the Hub, or from the cache when offline."""
    from huggingface_hub import constants

    if not constants.HF_HUB_OFFLINE:
        try:
            with quiet_hub():
                return remote_sizes(repo)
        except Exception as exc:
            raise hub_error(repo, exc) from None
    sizes = {n: p.stat().st_size for n in cached_files(repo) if (p := cached_path(repo, n)) is not None}
    if not sizes:
        from huggingface_hub.errors import OfflineModeIsEnabled

        raise hub_error(repo, OfflineModeIsEnabled("HF_HUB_OFFLINE is set"))
    return sizes


def hub_repo_card(repo: str) -> ModelCard:
    """The card of a safetensors repo on the Hub, from its config.json (fetched, a few KB) and its
    file sizes; the weights stay where they are."""
    from huggingface_hub import hf_hub_download

    sizes = repo_sizes(repo)
    if "config.json" not in sizes:
        raise ModelNotFoundError(
            f"{repo} has no config.json: not a transformers model repo",
            hint="a GGUF repo is named with its quantisation: OWNER/NAME:Q4_K_M",
        )
    try:
        with quiet_hub():
            config = Path(hf_hub_download(repo, "config.json"))
    except Exception as exc:
        raise hub_error(repo, exc) from None
    card = card_from_folder(config.parent)
    storage = sum(size for name, size in sizes.items() if name.endswith(".safetensors"))
    return replace(
        card, id=repo, name=repo, hf_repo=repo, storage_bytes=storage, tags=("cpu", "hub", card.architecture)
    )


def weight_files(repo: str, names: list[str], layers: tuple[int, int], n_layers: int) -> list[str]:
    """The safetensors files of `names` (the repo's files) that a node holding `layers` needs."""
    from huggingface_hub import hf_hub_download

    if "model.safetensors.index.json" not in names:
        return [n for n in names if n.endswith(".safetensors")]
    try:
        with quiet_hub():
            index = Path(hf_hub_download(repo, "model.safetensors.index.json"))
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except ExoctlError:
        raise
    except Exception as exc:
        raise hub_error(repo, exc) from None
    return files_for_layers(weight_map, layers, n_layers)


def download_for_layers(
    repo: str, layers: tuple[int, int], n_layers: int, progress: Download | None = None
) -> Path:
    """The snapshot of `repo` holding its metadata files and the safetensors files a node holding
    `layers` needs (all of them for `(0, n_layers)`), fetched into the Hugging Face cache when they
    are not there, counted in `progress`."""
    sizes = repo_sizes(repo)
    names = sorted(sizes)
    metadata = [n for n in names if "/" not in n and any(fnmatch.fnmatch(n, p) for p in METADATA_PATTERNS)]
    wanted = metadata + [w for w in weight_files(repo, names, layers, n_layers) if w not in metadata]
    progress = progress or Download("", repo, layers, n_layers)
    return fetch(repo, wanted, progress, listed=sizes)  # the Hub's list, asked for once
