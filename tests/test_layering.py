"""The layering rules of DESIGN.md §2, checked on the source: which package may import which.

Read from every `import` statement (module level and inside functions alike) with `ast`, so a
new import that breaks a rule fails here before anything runs. `test_cli` checks the same from
the other side: importing the CLI and the client leaves torch unloaded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "exoctl"

# Each layer may import itself and the layers before it, never one after it.
LAYERS = [
    {"exoctl", "exoctl.errors", "exoctl.paths", "exoctl.dtypes", "exoctl.cpu_policy", "exoctl.keys"},
    {"exoctl.wire", "exoctl.inventory"},
    {"exoctl.models", "exoctl.transport"},
    {"exoctl.placement", "exoctl.engine"},
    {"exoctl.worker", "exoctl.cluster"},
    {"exoctl.api"},
    {"exoctl.cli", "exoctl.__main__"},
]
# Packages of one layer that must not import each other either.
APART = [("exoctl.engine", "exoctl.placement"), ("exoctl.worker", "exoctl.cluster")]
# Third-party packages a part of exoctl must never import.
MODEL_CODE = {"torch", "transformers", "safetensors", "exoctl.engine"}
FORBIDDEN = {
    # the control side starts in well under a second: no torch, no model code
    "exoctl.wire": MODEL_CODE | {"zmq", "typer", "rich"},
    "exoctl.models": MODEL_CODE | {"typer", "rich"},
    "exoctl.placement": MODEL_CODE | {"zmq", "typer", "rich"},
    "exoctl.inventory": MODEL_CODE | {"zmq", "typer", "rich"},
    "exoctl.cluster": MODEL_CODE | {"typer", "rich"},
    "exoctl.api": MODEL_CODE | {"typer", "rich", "exoctl.worker"},
    "exoctl.cli": MODEL_CODE,
    # the model only sees tensors: the network and the terminal stay out of it
    "exoctl.engine": {"zmq", "typer", "rich"},
    "exoctl.worker": {"typer", "rich"},
}
# The one import that goes up a layer: `exoctl worker` (the CLI) starts a worker, inside that
# command only.
ALLOWED_UPWARD = {("exoctl.cli.lifecycle", "exoctl.worker")}


def package_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != "exoctl":
        return parts[0]
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            if node.module == "exoctl":  # `from exoctl import protocol` names a module
                found |= {f"exoctl.{alias.name}" for alias in node.names}
    return found


def layer_of(package: str) -> int | None:
    for index, layer in enumerate(LAYERS):
        if package in layer:
            return index
    return None


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_package_has_a_layer() -> None:
    packages = {package_of(module_name(p)) for p in SOURCES}
    assert {p for p in packages if layer_of(p) is None} == set()


def violations(module: str, path: Path) -> list[str]:
    """The imports of `module` (source at `path`) that break a rule, each with why."""
    package = package_of(module)
    mine = layer_of(package)
    assert mine is not None, f"{package} has no layer"
    wrong: list[str] = []
    for target in sorted(imports_of(path)):
        theirs = package_of(target)
        if theirs in FORBIDDEN.get(package, set()):
            wrong.append(f"{target} (never imported by {package})")
            continue
        level = layer_of(theirs) if target.startswith("exoctl") else None
        if level is None:
            continue  # a third-party package, or a name of the top package (`__version__`)
        upward = level > mine and (module, theirs) not in ALLOWED_UPWARD
        apart = theirs != package and ((package, theirs) in APART or (theirs, package) in APART)
        if upward or apart:
            wrong.append(f"{target} ({theirs} is not below {package})")
    return wrong


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_imports_follow_the_layers(path: Path) -> None:
    module = module_name(path)
    assert violations(module, path) == []


def test_a_broken_rule_is_found(tmp_path: Path) -> None:
    """The check itself: an engine module importing zmq or the worker, a wire type importing torch,
    the client importing the worker, each fail."""
    source = tmp_path / "fake.py"
    source.write_text("import zmq\nfrom exoctl.worker.head import Head\n")
    assert violations("exoctl.engine.fake", source) == [
        "exoctl.worker.head (exoctl.worker is not below exoctl.engine)",
        "zmq (never imported by exoctl.engine)",
    ]
    source.write_text("def f():\n    import torch\n")  # inside a function counts too
    assert violations("exoctl.wire.fake", source) == ["torch (never imported by exoctl.wire)"]
    source.write_text("from exoctl.worker import head\nfrom exoctl.engine.model import CausalLM\n")
    assert violations("exoctl.cluster.fake", source) == [
        "exoctl.engine.model (never imported by exoctl.cluster)",
        "exoctl.worker (exoctl.worker is not below exoctl.cluster)",
    ]


@pytest.mark.parametrize("path", SOURCES, ids=module_name)
def test_every_import_of_exoctl_names_a_module_that_exists(path: Path) -> None:
    """Type-only imports included: mypy's ignore_missing_imports would take a moved module's old
    name for an untyped one and check nothing against it."""
    import importlib.util

    missing = []
    for target in sorted(imports_of(path)):
        if not target.startswith("exoctl.") or target.startswith("exoctl.__"):
            continue
        parent, _, name = target.rpartition(".")
        if importlib.util.find_spec(target) is None and not hasattr(importlib.import_module(parent), name):
            missing.append(target)
    assert missing == []
