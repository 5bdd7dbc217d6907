from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from exoctl.errors import ExoctlError
from exoctl.inventory import (
    InventoryError,
    find_inventory_path,
    load_inventory_file,
    local_inventory,
)

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(text)
    return path


def test_the_example_inventory_describes_the_test_plan_cluster() -> None:
    inventory = load_inventory_file(ROOT / "cluster.example.yaml")
    assert inventory.name == "lab"
    assert [n.name for n in inventory.nodes] == ["node1", "node2", "node3", "node4"]
    assert all(n.memory_gb == 96 and n.port == 52416 and n.ssh_user == "exo" for n in inventory.nodes)
    assert not any(n.is_loopback for n in inventory.nodes)


def test_defaults_apply_and_nodes_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
cluster: test
defaults: {port: 6000, device: cpu, command: /opt/exo/bin/exoctl}
nodes:
  - {name: a, host: 127.0.0.11}
  - {name: b, host: 127.0.0.12, port: 6001, memory_gb: 8, threads: 3}
""",
    )
    a, b = load_inventory_file(path).nodes
    assert (a.port, a.command, a.memory_gb, a.is_loopback) == (6000, "/opt/exo/bin/exoctl", None, True)
    assert (b.port, b.memory_gb, a.threads, b.threads) == (6001, 8.0, None, 3)


def test_every_problem_is_reported_with_node_and_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
cluster: broken
colour: blue
defaults: {port: 99999}
nodes:
  - {name: a, host: 10.0.0.1, memroy_gb: 96}
  - {name: b}
  - {name: c, host: 10.0.0.3, ssh_port: "22"}
  - {name: d, host: 10.0.0.4, device: tpu}
  - {name: e, host: 10.0.0.5, port: 7000}
  - {name: e, host: 10.0.0.6, port: 7000}
  - {name: f, host: 10.0.0.5, port: 7000}
  - {name: g, host: 10.0.0.7, threads: 0}
""",
    )
    with pytest.raises(InventoryError) as info:
        load_inventory_file(path)
    problems = info.value.problems
    assert problems == [
        "unknown top-level key 'colour' (expected cluster, defaults, nodes)",
        "defaults: field 'port' must be a port number from 1 to 65535, got 99999",
        "node 'a': unknown field 'memroy_gb'",
        "node 'b': missing field 'host'",
        "node 'c': field 'ssh_port' must be a port number from 1 to 65535, got '22'",
        "node 'd': field 'device' must be one of cpu, cuda, got 'tpu'",
        "node 'e': duplicate node name (also node 5)",
        "node 'f': duplicate address 10.0.0.5:7000 (also node 'e')",
        "node 'g': field 'threads' must be a whole number of threads from 1 to 1024, got 0",
    ]
    assert str(path) in info.value.message and "9 problems" in info.value.message


def test_broken_yaml_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "cluster: x\nnodes:\n  - {name: a, host: [\n")
    with pytest.raises(InventoryError, match=r"not valid YAML at line 4"):
        load_inventory_file(path)


@pytest.mark.parametrize("data", [b"\x00\x01\xff\xfe binary", "nodes: []\n".encode("utf-16")])
def test_an_inventory_that_is_not_utf8_is_refused_with_a_reason(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "cluster.yaml"
    path.write_bytes(data)
    with pytest.raises(InventoryError) as info:
        load_inventory_file(path)
    assert "not UTF-8 text: byte" in info.value.problems[0] and str(path) in info.value.message


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("- just\n- a list\n", "the file must be a mapping"),
        ("cluster: x\n", "'nodes' must be a non-empty list of nodes"),
        ("nodes: [5]\n", "node 1: must be a mapping with at least 'name' and 'host'"),
    ],
)
def test_wrong_shapes(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(InventoryError) as info:
        load_inventory_file(write(tmp_path, text))
    assert any(problem in p for p in info.value.problems)


def test_lookup_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EXOCTL_INVENTORY", raising=False)
    assert find_inventory_path(None, cwd=tmp_path) is None  # embedded default
    local = write(tmp_path, "nodes: []\n")
    assert find_inventory_path(None, cwd=tmp_path) == local
    env = tmp_path / "env.yaml"
    shutil.copy(local, env)
    monkeypatch.setenv("EXOCTL_INVENTORY", str(env))
    assert find_inventory_path(None, cwd=tmp_path) == env
    explicit = tmp_path / "explicit.yaml"
    shutil.copy(local, explicit)
    assert find_inventory_path(str(explicit), cwd=tmp_path) == explicit
    with pytest.raises(ExoctlError, match=r"--inventory names .*missing.yaml, which is not a file"):
        find_inventory_path(str(tmp_path / "missing.yaml"), cwd=tmp_path)


def test_local_default_cluster() -> None:
    inventory = local_inventory(3, base_port=6100)
    assert [n.address for n in inventory.nodes] == ["127.0.0.1:6100", "127.0.0.1:6101", "127.0.0.1:6102"]
    assert all(n.is_loopback for n in inventory.nodes)
    with pytest.raises(ExoctlError, match="--local must be at least 1, got 0"):
        local_inventory(0)
    with pytest.raises(ExoctlError, match="no node named 'x'"):
        inventory.node("x")
