"""Where a model's files are: a local folder or GGUF file, the embedded default's GGUF in its
package, or the Hugging Face cache (a safetensors repo, or a GGUF repo as `REPO:QUANT`). Torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from exoctl import hub_gguf
from exoctl.catalog import DEFAULT_MODEL_ID, ModelCard, card_from_folder, find_card, get_card
from exoctl.errors import ModelFormatError, ModelNotFoundError
from exoctl.gguf_card import card_from_gguf
from exoctl.gguf_file import GGUFModel, TensorInfo, is_gguf_model, model_name, open_model
from exoctl.hub_gguf import HubGGUF, list_files, parse_reference, read_remote_header

# Files every node needs besides the weights: config, tokenizer, chat template, index.
METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer*", "*.model", "*.txt")


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
        from exoctl.default_model import find_gguf

        return find_gguf()
    return hub_folder(card, download=download)


def hub_http_error(card: ModelCard, exc: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not download {card.hf_repo}: {exc}",
        hint="gated models need HF_TOKEN set to a token that has accepted the model's licence",
    )


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
        raise hub_http_error(card, exc) from None


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


def download_for_layers(card: ModelCard, layers: tuple[int, int], n_layers: int) -> Path:
    """The model's snapshot with only the safetensors files this node's layers need.

    Uses the local cache when the files are there; otherwise downloads through huggingface_hub
    (progress, resume, HF_TOKEN and HF_HUB_OFFLINE are its own).
    """
    import json

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        meta = Path(snapshot_download(card.hf_repo, allow_patterns=list(METADATA_PATTERNS)))
        index = meta / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = files_for_layers(weight_map, layers, n_layers)
        else:
            files = ["model.safetensors"]
        return Path(snapshot_download(card.hf_repo, allow_patterns=[*METADATA_PATTERNS, *files]))
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(
            f"{card.id} ({card.hf_repo}) is not in this node's Hugging Face cache "
            "and the Hub is not reachable",
            hint=f"download it on the node (hf download {card.hf_repo}) "
            "or copy the folder into its model_dir",
        ) from None
    except HfHubHTTPError as exc:
        raise hub_http_error(card, exc) from None
