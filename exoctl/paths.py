"""Where exoctl keeps its files: `$EXOCTL_HOME`, default `~/.cache/exoctl`."""

from __future__ import annotations

import os
from pathlib import Path


def exoctl_home() -> Path:
    return Path(os.environ.get("EXOCTL_HOME") or Path.home() / ".cache" / "exoctl").expanduser()


def model_store() -> Path:
    """Models exoctl made itself live here, one folder per id (the benchmarks keep SmolLM2's reference
    folder beside it)."""
    return exoctl_home() / "models"
