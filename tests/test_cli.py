"""The command line through its real entry point, in a subprocess, as a script would use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import cluster_helpers

TIMEOUT = 120


def exoctl(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return cluster_helpers.exoctl(*args, stdin=stdin, env=env, timeout=TIMEOUT)


def test_the_control_side_does_not_import_torch() -> None:
    # the CLI, the cluster client, placement, the state document and the HTTP API
    code = (
        "import sys; from exoctl.cli.app import app; import exoctl.cli.models, exoctl.cluster.client, "
        "exoctl.cluster.state, exoctl.cluster.views, exoctl.placement.tensor, exoctl.api.app, "
        "exoctl.api.supervisor, exoctl.models.store, exoctl.models.default; print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.strip() == "False"
    result = exoctl("--help")
    assert result.returncode == 0 and "models" in result.stdout and "run" in result.stdout


def test_the_worker_module_loads_torch_only_when_it_runs() -> None:
    # run_worker sets GOMP_SPINCOUNT and the thread count before torch loads libgomp: the lane,
    # the outbox, the peers and the loader must not bring torch in earlier
    code = "import sys; import exoctl.worker.main; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert out.stdout.strip() == "False", out.stderr


def test_models_json_lists_cpu_models() -> None:
    result = exoctl("models", "--json")
    assert result.returncode == 0
    cards = json.loads(result.stdout)
    cpu = [c["id"] for c in cards if any("cpu" in tag for tag in c["tags"])]
    assert "llama-3.1-70b-cpu" in cpu and "smollm2-135m-cpu" in cpu
    # MiB, as EXO counts them: 16 060 522 496 bytes / 1024²
    assert {c["id"]: c["storage_size_megabytes"] for c in cards}["llama-3.1-8b-cpu"] == 15317


def test_models_table() -> None:
    result = exoctl("models")
    assert result.returncode == 0
    assert "mixtral-8x7b-cpu" in result.stdout and "93.4 GB" in result.stdout


def test_models_keeps_the_ids_whole_at_80_columns() -> None:
    from exoctl.models.catalog import load_catalog

    result = exoctl("models", env={"COLUMNS": "80"})
    assert result.returncode == 0
    assert max(len(line) for line in result.stdout.splitlines()) <= 80
    for card in load_catalog():
        assert f" {card.id} " in result.stdout, card.id
    assert "exoctl models --json" in result.stdout  # where the columns left out are


def test_run_without_workers_says_to_start_them(tmp_path: Path) -> None:
    # an empty home: no inventory anywhere, so the embedded default (two local workers) is used
    result = exoctl("run", "hi", env={"EXOCTL_HOME": str(tmp_path), "EXOCTL_INVENTORY": ""})
    assert result.returncode == 1
    assert result.stderr.startswith("error: no node is up: none of the 2 nodes answered (local1 (127.0.0.1:")
    assert "exoctl up" in result.stderr


def test_dry_run_with_no_node_up_plans_a_local_cluster_from_this_machine(tmp_path: Path) -> None:
    """The embedded default with no worker running: loopback nodes share this machine's free memory."""
    import psutil

    env = {"EXOCTL_HOME": str(tmp_path), "EXOCTL_INVENTORY": ""}
    result = exoctl("place", "smollm2-135m-cpu", "--nodes", "2", "--dry-run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["planned_from"] == "inventory" and [s["node"] for s in plan["shards"]] == ["local1", "local2"]
    for shard in plan["shards"]:
        parts = ("weight_bytes", "kv_bytes", "prefix_cache_bytes", "runtime_bytes")
        assert shard["memory_bytes"] == sum(shard[part] for part in parts)
        assert 0 < shard["weight_bytes"] < 200e6 and shard["kv_bytes"] > 0 and shard["runtime_bytes"] > 0
        # by default the same number of positions as the KV reserve
        assert shard["prefix_cache_bytes"] == shard["kv_bytes"]
    assert plan["prefix_cache_positions"] == 8192
    assert sum(s["memory_bytes"] for s in plan["shards"]) < psutil.virtual_memory().total
    table = exoctl("place", "smollm2-135m-cpu", "--nodes", "2", "--dry-run", env=env)
    assert table.returncode == 0 and "planned from the inventory: no node is up" in table.stdout
    for column in ("weights", "KV reserve", "prefix cache", "runtime", "needs"):
        assert column in table.stdout
    # not a dry run: the one "no node is up" error, not a placement's "0.0 GB" or "use --dtype"
    real = exoctl("place", "smollm2-135m-cpu", "--nodes", "2", env=env)
    assert real.returncode == 1 and real.stderr.startswith("error: no node is up")
    assert "0.0 GB" not in real.stderr and "--dtype" not in real.stderr


def test_more_nodes_than_the_inventory_has_says_so() -> None:
    from exoctl.models.catalog import get_card
    from exoctl.placement.pipeline import GB, NodeProfile, PlacementError, PlacementRequest, place

    nodes = [NodeProfile(f"n{i}", 64 * GB, 64 * GB) for i in range(3)]
    with pytest.raises(PlacementError) as raised:
        place(get_card("llama-3.1-8b-cpu"), nodes, PlacementRequest(nodes=9))
    assert raised.value.hint == "the inventory has 3 nodes: ask for at most 3, or add nodes to it"
    nodes[2] = NodeProfile("n2", 0, 0, live=False)
    with pytest.raises(PlacementError) as raised:
        place(get_card("llama-3.1-8b-cpu"), nodes, PlacementRequest(nodes=3))
    assert "only 2 of 3 are live (n2 down)" in raised.value.message
    assert raised.value.hint is not None and "exoctl up" in raised.value.hint


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", "-m", "gpt-5", "hi"], "error: unknown model 'gpt-5'"),
        (["run", "--temperature", "-1", "hi"], "error: --temperature must be >= 0, got -1.0"),
        (["run", "--temperature", "nan", "hi"], "error: --temperature must be a finite number, got nan"),
        (["run", "--max-tokens", "0", "hi"], "error: --max-tokens must be >= 1, got 0"),
        (["run", "--frequency-penalty", "3", "hi"], "error: --frequency-penalty must be in [-2, 2], got 3.0"),
        (["chat", "--repetition-penalty", "0"], "error: --repetition-penalty must be in (0, 10]"),
        (["chat", "--min-p", "2"], "error: --min-p must be in [0, 1], got 2.0"),
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


def loopback_copy_of_the_example(tmp_path: Path) -> Path:
    """cluster.example.yaml with its hosts moved to unused loopback ports (tests never leave 127/8)."""
    import yaml

    from tests.cluster_helpers import take_ports

    data = yaml.safe_load((Path(__file__).parent.parent / "cluster.example.yaml").read_text())
    hosts = [f"127.0.0.{41 + i}" for i in range(len(data["nodes"]))]
    for node, host, port in zip(data["nodes"], hosts, take_ports(hosts), strict=True):
        node.update(host=host, port=port)
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize(
    ("model", "nodes"),
    [("llama-3.1-8b-cpu", 1), ("qwen2.5-32b-cpu", 2), ("mixtral-8x7b-cpu", 3), ("llama-3.1-70b-cpu", 4)],
)
def test_dry_run_on_the_example_inventory_uses_the_test_plans_node_counts(
    tmp_path: Path, model: str, nodes: int
) -> None:
    inventory = loopback_copy_of_the_example(tmp_path)
    args = ("place", model, "--dry-run", "--sharding", "pipeline", "--dtype", "float32", "-i", str(inventory))
    result = exoctl(*args, "--json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["model_id"] == model and plan["sharding"] == "pipeline" and plan["dtype"] == "float32"
    assert [s["node"] for s in plan["shards"]] == [f"node{i + 1}" for i in range(nodes)]
    assert all(s["memory_bytes"] <= 96e9 for s in plan["shards"])
    assert set(plan["shards"][0]) == {
        "node",
        "start_layer",
        "end_layer",
        "memory_bytes",
        "weight_bytes",
        "kv_bytes",
        "prefix_cache_bytes",
        "runtime_bytes",
        "draft_bytes",
    }
    assert plan["draft"] is None  # no drafter unless asked (--draft)
    assert plan["reason"].startswith("pipeline, as asked: layers node1 [0, ")
    table = exoctl(*args)
    assert table.returncode == 0 and "node1" in table.stdout and "GB" in table.stdout


@pytest.mark.parametrize(
    ("model", "sharding", "nodes", "reason"),
    [
        ("llama-3.1-8b-cpu", "pipeline", 1, "one node: llama-3.1-8b-cpu fits on node1 alone (38.4 GB)"),
        ("qwen2.5-32b-cpu", "tensor", 2, "tensor: 20 of 40 heads on each of 2 nodes, 73.4 GB each"),
        (
            "mixtral-8x7b-cpu",
            "tensor",
            4,
            "tensor: 8 of 32 heads, 2 of 8 experts on each of 4 nodes, 50.2 GB each",
        ),
        ("llama-3.1-70b-cpu", "tensor", 4, "tensor: 16 of 64 heads on each of 4 nodes, 78.4 GB each"),
    ],
)
def test_auto_sharding_on_the_example_inventory_says_what_it_chose_and_why(
    tmp_path: Path, model: str, sharding: str, nodes: int, reason: str
) -> None:
    inventory = loopback_copy_of_the_example(tmp_path)
    table = exoctl("place", model, "--dry-run", "--dtype", "float32", "-i", str(inventory))
    assert table.returncode == 0, table.stderr
    assert f"sharding: {reason}" in table.stdout.replace("\n", " ")
    plan = json.loads(
        exoctl("place", model, "--dry-run", "--dtype", "float32", "--json", "-i", str(inventory)).stdout
    )
    assert plan["sharding"] == sharding and len(plan["shards"]) == nodes and plan["reason"] == reason
    if sharding == "tensor":
        assert "1/" + str(nodes) + " of [0, " in table.stdout


def test_too_little_memory_says_by_how_much(tmp_path: Path) -> None:
    inventory = loopback_copy_of_the_example(tmp_path)
    args = (
        "place",
        "llama-3.1-70b-cpu",
        "--dry-run",
        "--dtype",
        "float32",
        "--nodes",
        "3",
        "-i",
        str(inventory),
    )
    result = exoctl(*args)
    assert result.returncode == 1
    assert result.stderr.startswith(
        "error: llama-3.1-70b-cpu needs 282.2 GB in float32; 3 nodes offer 288.0 GB but it needs 299.0 GB"
    )
    assert "hint: use more than 3 nodes or use --dtype bfloat16" in result.stderr
    assert "Traceback" not in result.stderr
    as_json = exoctl(*args, "--json")
    assert "282.2 GB" in json.loads(as_json.stdout)["error"]["message"]


def test_a_broken_inventory_lists_every_problem(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(
        "cluster: bad\nnodes:\n"
        "  - {name: a, host: 127.0.0.1}\n"
        "  - {name: a, host: 127.0.0.2}\n"
        "  - {name: c, colour: blue, host: 127.0.0.3}\n"
        "  - {name: d}\n"
        "  - {name: e, host: 127.0.0.5, port: 70000}\n"
    )
    result = exoctl("nodes", "-i", str(broken))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert f"4 problems in {broken}:" in result.stderr
    for expected in (
        "node 'e': field 'port' must be a port number from 1 to 65535, got 70000",
        "node 'a': duplicate node name",
        "node 'c': unknown field 'colour'",
        "node 'd': missing field 'host'",
    ):
        assert expected in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["place", "gpt-5", "--dry-run"], "error: unknown model 'gpt-5'"),
        (
            ["place", "smollm2-135m-cpu", "--sharding", "ring", "--dry-run"],
            "error: unknown sharding 'ring'\nhint: use one of auto, pipeline, tensor",
        ),
        (
            ["place", "smollm2-135m-cpu", "--sharding", "tensor", "--nodes", "2", "--dry-run"],
            "error: smollm2-135m-cpu cannot be tensor-split over 2 nodes: its 9 heads, 3 KV heads must "
            "each divide by the node count",
        ),
        (
            ["place", "smollm2-135m-cpu", "--dtype", "int3", "--dry-run"],
            "error: dtype 'int3' is not supported",
        ),
        (["logs", "nosuchnode"], "error: no node named 'nosuchnode'"),
    ],
)
def test_cluster_command_errors(tmp_path: Path, args: list[str], message: str) -> None:
    result = exoctl(*args, "-i", str(loopback_copy_of_the_example(tmp_path)))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith(message), result.stderr


def test_keys_init_makes_the_pair_once(tmp_path: Path) -> None:
    home = {"EXOCTL_HOME": str(tmp_path)}
    first = exoctl("keys", "init", env=home)
    second = exoctl("keys", "init", env=home)
    assert first.returncode == second.returncode == 0
    assert first.stdout.startswith("made the cluster key") and second.stdout.startswith("kept the existing")
    public = exoctl("keys", "show", env=home).stdout.strip()
    assert len(public) == 40 and public in first.stdout
    assert oct((tmp_path / "keys" / "cluster.key_secret").stat().st_mode & 0o777) == "0o600"
