"""The embedded SmolLM2 as a Hugging Face folder: transformers' conversion of the package's GGUF,
made once into $EXOCTL_HOME/reference. exoctl loads the GGUF itself; benchmarks compare against
transformers on this folder and copy its tokenizer files into the random 1.1B model."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from exoctl.paths import model_store
from tests.smollm2_reference import reference_folder


def smollm2_folder() -> Path:
    return reference_folder(model_store().parent / "reference")
