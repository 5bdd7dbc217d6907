"""Where exoctl keeps its files: `$EXOCTL_HOME`, default `~/.cache/exoctl`."""

from __future__ import annotations

import os
from pathlib import Path


def exoctl_home() -> Path:
    return Path(os.environ.get("EXOCTL_HOME") or Path.home() / ".cache" / "exoctl").expanduser()


def model_store() -> Path:
    """Models exoctl made itself (the converted embedded default) live here, one folder per id."""
    return exoctl_home() / "models"
