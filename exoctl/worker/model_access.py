"""Which models a worker will open: catalog models, Hub GGUF references (`REPO:QUANT`), or
folders and GGUF files under its allowed roots.

Paths come from the network, so they are never opened as given: a folder must resolve (after
symlinks) inside one of the worker's model directories, exoctl's own model store, or the
Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

from exoctl.errors import ModelNotFoundError
from exoctl.models.catalog import DEFAULT_MODEL_ID, find_card
from exoctl.models.gguf.file import is_gguf_model
from exoctl.models.gguf.hub import download
from exoctl.models.hub_fetch import Download
from exoctl.models.store import REPO_ID, allowed_roots, download_for_layers, hub_reference, is_model_folder


def is_model(path: Path) -> bool:
    return is_model_folder(path) or is_gguf_model(path)


def in_model_dirs(model: str, model_dirs: list[Path]) -> Path | None:
    """The folder or GGUF file `model` (a relative name) names in one of the model directories."""
    path = Path(model)
    if ".." in path.parts:
        return None
    return next((d.expanduser() / path for d in model_dirs if is_model(d.expanduser() / path)), None)


def check_reference(model: str, model_dirs: list[Path], node: str) -> None:
    """Refuse at once a reference this worker will never open (cheap: no download)."""
    if find_card(model) is not None or hub_reference(model) is not None:
        return
    path = Path(model)
    if not path.is_absolute():
        if in_model_dirs(model, model_dirs) is None and not REPO_ID.match(model):
            dirs = ", ".join(str(d) for d in model_dirs) or "(none)"
            raise ModelNotFoundError(
                f"node {node} has no model {model!r} in its model directories ({dirs})",
                hint="use a catalog id or a Hugging Face repo id (owner/name), or copy the folder into the "
                "node's model_dir",
            )
        return
    real = path.resolve()
    roots = allowed_roots(model_dirs)
    if not any(real.is_relative_to(root) for root in roots):
        raise ModelNotFoundError(
            f"node {node} loads models only from {', '.join(map(str, roots))}; {model} is outside them",
            hint="copy the folder into the node's model_dir (inventory field 'model_dir' or "
            "`exoctl up --model-dir`)",
        )
    if not is_model(real):
        raise ModelNotFoundError(f"node {node}: {model} is not a model folder (no config.json) or GGUF file")


def locate(
    model: str,
    model_dirs: list[Path],
    node: str,
    layers: tuple[int, int],
    n_layers: int,
    progress: Download | None = None,
) -> Path:
    """The folder or GGUF file to load from, downloading only this range's files if needed (the
    bytes counted in `progress`)."""
    check_reference(model, model_dirs, node)
    card = find_card(model)
    hub = hub_reference(model) if card is None else None
    if hub is not None:
        # tied=True: the last range may need the embedding's file for a tied lm_head
        return download(hub, layers, n_layers, tied=True, progress=progress)
    if card is None:
        path = Path(model)
        if path.is_absolute():
            return path.resolve()
        local = in_model_dirs(model, model_dirs)
        if local is not None:
            return local.resolve()
        return download_for_layers(model, layers, n_layers, progress)  # a Hub repo id
    if card.id == DEFAULT_MODEL_ID:
        from exoctl.models.default import find_gguf

        return find_gguf()
    for folder in model_dirs:
        for name in (card.id, card.hf_repo.split("/")[-1]):
            candidate = folder.expanduser() / name
            if is_model_folder(candidate):
                return candidate.resolve()
    return download_for_layers(card.hf_repo, layers, n_layers, progress)
