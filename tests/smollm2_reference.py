"""The embedded SmolLM2 as a Hugging Face folder, converted from its GGUF by transformers.

exoctl loads the GGUF itself; the tests keep this folder as the reference it is compared with
(transformers runs it, the tiny models borrow its tokenizer files). Converted once per test
cache (about 30 s) and reused.
"""

from __future__ import annotations

import fcntl
import shutil
import tempfile
from pathlib import Path

from exoctl.models.default import find_gguf


def is_converted(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def reference_folder(store: Path) -> Path:
    folder = store / "smollm2-135m-reference"
    if is_converted(folder):
        return folder
    store.mkdir(parents=True, exist_ok=True)
    with open(store / ".smollm2-135m-reference.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not is_converted(folder):
            _convert(find_gguf(), folder)
    return folder


def _convert(gguf: Path, folder: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    staging = Path(tempfile.mkdtemp(prefix=".smollm2-", dir=folder.parent))
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
