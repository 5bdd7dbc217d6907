"""The command line through its real entry point, in a subprocess, as a script would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

TIMEOUT = 120


def exoctl(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exoctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def test_help_and_models_do_not_import_torch() -> None:
    code = (
        "import sys; from exoctl.cli.app import app; import exoctl.cli.models; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.strip() == "False"
    result = exoctl("--help")
    assert result.returncode == 0 and "models" in result.stdout and "run" in result.stdout


def test_models_json_lists_cpu_models() -> None:
    result = exoctl("models", "--json")
    assert result.returncode == 0
    cards = json.loads(result.stdout)
    cpu = [c["id"] for c in cards if any("cpu" in tag for tag in c["tags"])]
    assert "llama-3.1-70b-cpu" in cpu and "smollm2-135m-cpu" in cpu
    assert {c["id"]: c["storage_size_megabytes"] for c in cards}["llama-3.1-8b-cpu"] == 16061


def test_models_table() -> None:
    result = exoctl("models")
    assert result.returncode == 0
    assert "mixtral-8x7b-cpu" in result.stdout and "93.4 GB" in result.stdout


def test_run_without_workers_says_to_start_them(tmp_path: Path) -> None:
    # an empty home: no inventory anywhere, so the embedded default (two local workers) is used
    result = exoctl("run", "hi", env={"EXOCTL_HOME": str(tmp_path), "EXOCTL_INVENTORY": ""})
    assert result.returncode == 1
    assert result.stderr.startswith("error: no worker of cluster 'local' answers")
    assert "exoctl up" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-m", "gpt-5", "hi"], "error: unknown model 'gpt-5'"),
        (["run", "--temperature", "-1", "hi"], "error: --temperature must be >= 0, got -1.0"),
        (["run", "--dtype", "float64", "hi"], "error: dtype 'float64' is not supported"),
        (["run", "-m", "./no/such/folder", "hi"], "error: no model folder at ./no/such/folder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args: list[str], message: str) -> None:
    result = exoctl(*args)
    assert result.returncode == 1
    assert result.stderr.splitlines()[0].startswith(message)
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["run", "--bogus"], ["nosuch"]])
def test_usage_errors_exit_2_without_traceback(args: list[str]) -> None:
    result = exoctl(*args)
    assert result.returncode == 2
    assert "Usage:" in result.stderr and "Traceback" not in result.stderr


def test_json_errors_stay_json() -> None:
    result = exoctl("run", "--json", "-m", "gpt-5", "hi")
    assert result.returncode == 1
    assert json.loads(result.stdout)["error"]["message"] == "unknown model 'gpt-5'"


def test_debug_shows_the_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "exoctl", "run", "-m", "gpt-5", "hi"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env={**os.environ, "EXOCTL_DEBUG": "1"},
    )
    assert result.returncode != 0 and "Traceback" in result.stderr
