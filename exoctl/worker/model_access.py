"""Which model folders a worker will open: catalog models, or folders under its allowed roots.

Paths come from the network, so they are never opened as given: a folder must resolve (after
symlinks) inside one of the worker's model directories, exoctl's own model store, or the
Hugging Face cache.
"""

from __future__ import annotations

from pathlib import Path

from exoctl.catalog import DEFAULT_MODEL_ID, find_card
from exoctl.errors import ModelNotFoundError
from exoctl.model_store import allowed_roots, download_for_layers, is_model_folder


def check_reference(model: str, model_dirs: list[Path], node: str) -> None:
    """Refuse at once a reference this worker will never open (cheap: no download, no conversion)."""
    if find_card(model) is not None:
        return
    path = Path(model)
    if not path.is_absolute():
        if ".." in path.parts or not any(is_model_folder(d.expanduser() / path) for d in model_dirs):
            dirs = ", ".join(str(d) for d in model_dirs) or "(none)"
            raise ModelNotFoundError(
                f"node {node} has no model {model!r} in its model directories ({dirs})",
                hint="use a catalog id, or copy the folder into the node's model_dir",
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
    if not is_model_folder(real):
        raise ModelNotFoundError(f"node {node}: {model} is not a model folder (no config.json)")


def locate(model: str, model_dirs: list[Path], node: str, layers: tuple[int, int], n_layers: int) -> Path:
    """The folder to load from, downloading only this range's safetensors files if needed."""
    check_reference(model, model_dirs, node)
    card = find_card(model)
    if card is None:
        path = Path(model)
        if path.is_absolute():
            return path.resolve()
        return next(
            (d.expanduser() / path).resolve() for d in model_dirs if is_model_folder(d.expanduser() / path)
        )
    if card.id == DEFAULT_MODEL_ID:
        from exoctl.default_model import ensure_default_model

        return ensure_default_model()
    for folder in model_dirs:
        for name in (card.id, card.hf_repo.split("/")[-1]):
            candidate = folder.expanduser() / name
            if is_model_folder(candidate):
                return candidate.resolve()
    return download_for_layers(card, layers, n_layers)
