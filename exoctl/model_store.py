"""Where a model's files are: a local folder, exoctl's converted default, or the Hugging Face cache.

Torch-free except for the one-time conversion of the embedded default (imported lazily).
"""

from __future__ import annotations

from pathlib import Path

from exoctl.catalog import DEFAULT_MODEL_ID, ModelCard, get_card
from exoctl.errors import ModelNotFoundError

# Files every node needs besides the weights: config, tokenizer, chat template, index.
METADATA_PATTERNS = ("*.json", "*.jinja", "tokenizer*", "*.model", "*.txt")


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and (path / "config.json").is_file()


def resolve_model(model: str, download: bool = False) -> Path:
    """The folder holding `model`, given as a folder path, catalog id or Hugging Face repo id."""
    path = Path(model).expanduser()
    if is_model_folder(path):
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"{model} is not a model folder", hint="a model folder holds config.json")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {model}")
    card = get_card(model)
    if card.id == DEFAULT_MODEL_ID:
        from exoctl.engine.default_model import ensure_default_model

        return ensure_default_model()
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
        raise ModelNotFoundError(
            f"could not download {card.hf_repo}: {exc}",
            hint="gated models need HF_TOKEN set to a token that has accepted the model's licence",
        ) from None
