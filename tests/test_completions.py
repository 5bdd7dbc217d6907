"""The committed completion scripts are what exoctl generates, and exoctl answers them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import typer.completion

COMPLETIONS = Path(__file__).resolve().parent.parent / "completions"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_committed_scripts_are_current(shell: str) -> None:
    expected = typer.completion.get_completion_script(
        prog_name="exoctl", complete_var="_EXOCTL_COMPLETE", shell=shell
    )
    assert (COMPLETIONS / f"exoctl.{shell}").read_text() == expected, "run `make completions`"


def complete_bash(words: str) -> list[str]:
    env = {
        **os.environ,
        "_EXOCTL_COMPLETE": "complete_bash",
        "COMP_WORDS": words,
        "COMP_CWORD": str(len(words.split()) - 1),
    }
    out = subprocess.run(
        [sys.executable, "-m", "exoctl"], env=env, capture_output=True, text=True, timeout=60
    )
    return out.stdout.split()


def test_bash_completes_commands_options_and_model_ids() -> None:
    assert complete_bash("exoctl pl") == ["place"]
    assert "--dry-run" in complete_bash("exoctl place --dr")
    assert complete_bash("exoctl place qwen2.5-3") == ["qwen2.5-32b-cpu", "qwen2.5-32b-cuda"]
