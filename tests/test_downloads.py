"""Downloads from the Hub onto the nodes, for real: three workers fetch tiny models from a local
server that speaks the Hub's HTTP API (tests/hub_server.py, reached through HF_ENDPOINT), each
into a Hugging Face cache of its own, through huggingface_hub.

node1 has no token, node2 has the token of the gated repo, node3 runs with HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_helpers import (
    PYTHON_EXOCTL,
    WorkerCluster,
    exoctl,
    running,
    take_ports,
    wait_for,
    write_inventory,
)
from tests.hub_server import FakeHub

TOKEN = "hf_test_token"
NODE_ENV = {
    "node1": {},
    "node2": {"HF_TOKEN": TOKEN},
    "node3": {"HF_HUB_OFFLINE": "1"},
}


class HubCluster:
    def __init__(self, cluster: WorkerCluster, hub: FakeHub, env: dict[str, str]) -> None:
        self.cluster, self.hub, self.env = cluster, hub, env

    def cli(self, *args: str, token: bool = True, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        env = dict(self.env)
        if token:
            env["HF_TOKEN"] = TOKEN
        return exoctl(*args, "--inventory", str(self.cluster.inventory), env=env, timeout=timeout)

    def cli_json(self, *args: str, expect: int = 0) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == expect, result.stdout + result.stderr
        return json.loads(result.stdout)

    def cache(self, node: str) -> Path:
        return self.cluster.work_dir.parent / f"hf-{node}" / "hub"

    def snapshot_files(self, node: str, repo: str) -> dict[str, Path]:
        folder = self.cache(node) / f"models--{repo.replace('/', '--')}" / "snapshots"
        return {p.name: p for p in folder.glob("*/*") if p.exists()}


@pytest.fixture(scope="module")
def hub_cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[HubCluster]:
    tmp = tmp_path_factory.mktemp("downloads")
    hub = FakeHub(TOKEN)
    hub.add("tiny/llama", tiny_models["llama"])
    hub.add("tiny/qwen2", tiny_models["qwen2"])
    hub.add("tiny/gated", tiny_models["llama"], gated=True)
    hub.add("tiny/full", tiny_models["llama"])
    hub.add("tiny/resume", tiny_models["llama"])
    hub.add("tiny/watch", tiny_models["llama"])
    hub.add("tiny/pull", tiny_models["qwen2"])
    env = {
        "HF_ENDPOINT": hub.url,
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HOME": str(tmp / "hf-cli"),
        "HF_TOKEN": "",
        "HF_HUB_OFFLINE": "0",
    }
    names = list(NODE_ENV)
    hosts = [f"127.0.0.{11 + i}" for i in range(len(names))]
    ports = take_ports(hosts)
    nodes = []
    for name, host, port in zip(names, hosts, ports, strict=True):
        node_env = {"HF_HOME": str(tmp / f"hf-{name}"), **NODE_ENV[name]}
        command = "env " + " ".join(f"{k}={v}" for k, v in node_env.items()) + f" {PYTHON_EXOCTL}"
        nodes.append({"name": name, "host": host, "port": port, "command": command})
    empty = tmp / "models"
    empty.mkdir()
    work = tmp / "work"
    inventory = write_inventory(
        tmp / "cluster.yaml", nodes, {"work_dir": str(work), "model_dir": str(empty), "threads": 1}
    )
    cluster = WorkerCluster(inventory, work, names)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # `up` and `down` (through exoctl()) pass it on to the workers
    try:
        with running(cluster):
            yield HubCluster(cluster, hub, env)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        hub.close()


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def weight_map(folder: Path) -> dict[str, str]:
    return json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]


def test_each_node_fetches_its_layers_files_then_place_loads_them_without_fetching_again(
    hub_cluster: HubCluster, tiny_models: dict[str, Path]
) -> None:
    from exoctl.models.store import files_for_layers

    source = tiny_models["llama"]
    answer = hub_cluster.cli_json("download", "tiny/llama", "--nodes", "2", "--sharding", "pipeline")
    assert answer["ok"] and sorted(answer["nodes"]) == ["node1", "node2"]
    metadata = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json"}
    every_weight = {n for n in os.listdir(source) if n.endswith(".safetensors")}
    ranges = {}
    for node, report in answer["nodes"].items():
        start, end = report["start_layer"], report["end_layer"]
        ranges[node] = (start, end)
        weights = set(files_for_layers(weight_map(source), (start, end), 4))
        assert weights < every_weight, (node, start, end, report)  # a part, not the whole model
        assert metadata <= set(report["files"])
        assert {f for f in report["files"] if f.endswith(".safetensors")} == weights
        on_disk = hub_cluster.snapshot_files(node, "tiny/llama")
        assert {n for n in on_disk if n.endswith(".safetensors")} == weights
        for name in weights:
            assert sha256(on_disk[name]) == sha256(source / name)
        assert report["state"] == "completed" and report["downloaded"] == report["total"] > 0
    assert ranges["node1"][1] == ranges["node2"][0]

    state = hub_cluster.cli_json("state")
    done = [d["DownloadCompleted"] for d in state["downloads"]["node1"] if "DownloadCompleted" in d]
    assert done and done[-1]["nodeId"] == "node1" and done[-1]["modelId"] == "tiny/llama"
    shard = done[-1]["shardMetadata"]["PipelineShardMetadata"]
    assert (shard["startLayer"], shard["endLayer"], shard["nLayers"]) == (*ranges["node1"], 4)
    assert done[-1]["total"]["inBytes"] == answer["nodes"]["node1"]["total"]

    fetched = len(hub_cluster.hub.fetched("tiny/llama"))
    placed = hub_cluster.cli("place", "tiny/llama", "--nodes", "2", "--sharding", "pipeline", "--json")
    assert placed.returncode == 0, placed.stderr
    weight_gets = [
        e for e in hub_cluster.hub.fetched("tiny/llama")[fetched:] if e.path.endswith(".safetensors")
    ]
    assert weight_gets == []  # loaded from what `download` fetched
    instance = json.loads(placed.stdout)["instance_id"]
    assert hub_cluster.cli("delete", instance).returncode == 0

    # --all: the whole model on every live node; node3 is offline and says so, the others complete
    everything = hub_cluster.cli_json("download", "tiny/llama", "--all", expect=1)
    assert not everything["ok"]
    for node in ("node1", "node2"):
        report = everything["nodes"][node]
        assert report["state"] == "completed"
        assert {f for f in report["files"] if f.endswith(".safetensors")} == every_weight
        missing = every_weight - set(files_for_layers(weight_map(source), ranges[node], 4))
        assert report["downloaded_this_session"] == sum((source / n).stat().st_size for n in missing)
    offline = everything["nodes"]["node3"]
    assert offline["state"] == "failed"
    assert (
        offline["error"]
        == "node node3: tiny/llama is not in the Hugging Face cache and HF_HUB_OFFLINE is set"
    )
    text = hub_cluster.cli("download", "tiny/llama", "--all")
    assert text.returncode == 1 and "node node3: tiny/llama is not in the Hugging Face cache" in text.stderr
    assert "Traceback" not in text.stderr


def test_place_shows_each_nodes_download_before_its_layers(hub_cluster: HubCluster) -> None:
    result = hub_cluster.cli("place", "tiny/qwen2", "--nodes", "2", "--sharding", "pipeline")
    assert result.returncode == 0, result.stderr
    assert "node1 download [0, " in result.stderr and "node2 download [" in result.stderr
    assert "node1 layers [0, " in result.stderr
    assert result.stderr.index("node1 download") < result.stderr.index("node1 layers")
    state = hub_cluster.cli_json("state")
    instance = next(iter(state["instances"].values()))["CpuRingInstance"]["instanceId"]
    by_instance = [
        d["DownloadCompleted"]
        for d in state["downloads"]["node2"]
        if "DownloadCompleted" in d and d["DownloadCompleted"]["instanceId"] == instance
    ]
    assert by_instance and by_instance[0]["modelId"] == "tiny/qwen2"
    assert hub_cluster.cli("delete", instance).returncode == 0


def test_gated_missing_and_full_disk_are_one_clear_error_naming_the_node(
    hub_cluster: HubCluster, tiny_models: dict[str, Path]
) -> None:
    # the CLI holds the token (it reads config.json); node1 does not, node2 does
    answer = hub_cluster.cli_json("download", "tiny/gated", "--nodes", "2", expect=1)
    gated = answer["nodes"]["node1"]
    assert gated["state"] == "failed"
    assert (
        gated["error"]
        == "node node1: tiny/gated is gated: this Hugging Face token has not been granted access"
    )
    assert "HF_TOKEN" in gated["hint"]
    assert answer["nodes"]["node2"]["state"] == "completed"

    no_token = hub_cluster.cli("download", "tiny/gated", "--nodes", "2", token=False)
    assert no_token.returncode == 1 and "tiny/gated is gated" in no_token.stderr

    missing = hub_cluster.cli("download", "nobody/nothing")
    assert missing.returncode == 1
    assert "no repo nobody/nothing on the Hugging Face Hub" in missing.stderr
    assert "Traceback" not in missing.stderr + no_token.stderr

    # node1's disk is full: writing its first weight file fails with ENOSPC
    repo = hub_cluster.hub.repos["tiny/full"]
    blobs = hub_cluster.cache("node1") / "models--tiny--full" / "blobs"
    blobs.mkdir(parents=True)
    for name in repo.files:
        if name.endswith(".safetensors"):
            (blobs / f"{repo.sha256[name]}.incomplete").symlink_to("/dev/full")
    full = hub_cluster.cli_json("download", "tiny/full", "--nodes", "2", expect=1)
    report = full["nodes"]["node1"]
    assert report["state"] == "failed" and report["error"].startswith(
        "node node1: the disk is full writing tiny/full"
    )
    assert "HF_HOME" in report["hint"]
    assert full["nodes"]["node2"]["state"] == "completed"


def test_a_download_killed_mid_file_resumes_where_it_stopped(
    hub_cluster: HubCluster, tiny_models: dict[str, Path]
) -> None:
    source = tiny_models["llama"]
    sizes = {n: (source / n).stat().st_size for n in os.listdir(source) if n.endswith(".safetensors")}
    biggest = max(sizes, key=lambda n: sizes[n])  # the embedding's file, ~25 MB
    hub_cluster.hub.slow[biggest] = 4 * 2**20  # bytes per second: ~6 s for the file
    client = hub_cluster.cluster.client()
    command = [sys.executable, "-m", "exoctl", "download", "tiny/resume", "--nodes", "1", "--json"]
    command += ["--inventory", str(hub_cluster.cluster.inventory)]
    cli = subprocess.Popen(
        command, env={**os.environ, **hub_cluster.env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:

        def part_fetched() -> int:
            for status in client.statuses():
                for report in status.downloads:
                    if report.model == "tiny/resume" and biggest in report.files:
                        return report.files[biggest].downloaded
            return 0

        assert wait_for(lambda: part_fetched() > 6 * 2**20, timeout=60, interval=0.2)
        node = next(
            s.node.name for s in client.statuses() if any(d.model == "tiny/resume" for d in s.downloads)
        )
        os.kill(hub_cluster.cluster.pid(node), signal.SIGKILL)
    finally:
        cli.kill()
        cli.communicate(timeout=30)
        client.close()
    hub_cluster.hub.slow.clear()
    partial = list((hub_cluster.cache(node) / "models--tiny--resume" / "blobs").glob("*.incomplete"))
    # the file on disk may lag the bytes reported by a write buffer or two (seen: exactly 6 MiB)
    assert len(partial) == 1 and partial[0].stat().st_size >= 4 * 2**20
    kept = partial[0].stat().st_size

    assert hub_cluster.cli("up").returncode == 0
    time.sleep(0.5)
    answer = hub_cluster.cli_json("download", "tiny/resume", "--nodes", "1")
    report = answer["nodes"][node]
    assert report["state"] == "completed"
    ranges = [e.range for e in hub_cluster.hub.fetched("tiny/resume") if e.path.endswith(biggest)]
    assert ranges[0] is None and ranges[-1] == f"bytes={kept}-"
    # what was kept is not fetched again
    assert report["downloaded_this_session"] <= report["total"] - kept
    on_disk = hub_cluster.snapshot_files(node, "tiny/resume")
    assert sha256(on_disk[biggest]) == sha256(source / biggest)


def test_serve_and_the_dashboard_show_a_download_while_it_runs(
    hub_cluster: HubCluster, tiny_models: dict[str, Path]
) -> None:
    from selenium.webdriver.common.by import By

    from tests.browser import chromium, console_errors, screenshot, until
    from tests.cluster_helpers import Server, http

    source = tiny_models["llama"]
    biggest = max(
        (n for n in os.listdir(source) if n.endswith(".safetensors")),
        key=lambda n: (source / n).stat().st_size,
    )
    hub_cluster.hub.slow[biggest] = 3 * 2**20  # ~8 s for the file: time to look
    server = Server(hub_cluster.cluster)
    command = [sys.executable, "-m", "exoctl", "download", "tiny/watch", "--nodes", "1", "--json"]
    command += ["--inventory", str(hub_cluster.cluster.inventory)]
    cli = subprocess.Popen(
        command,
        env={**os.environ, **hub_cluster.env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def ongoing() -> dict[str, Any] | None:
            for node, docs in http(server, "GET", "/state")[1]["downloads"].items():
                for doc in docs:
                    body = doc.get("DownloadOngoing")
                    # a download's speed is measured once its first bytes have come: the first
                    # sample after the small metadata files may still say 0
                    if (
                        body
                        and body["modelId"] == "tiny/watch"
                        and body["downloadProgress"]["downloaded"]["inBytes"]
                        and body["downloadProgress"]["speed"] > 0
                    ):
                        return {"node": node, **body}
            return None

        running = until(ongoing, 60, "/state shows the download ongoing")
        progress = running["downloadProgress"]
        assert 0 < progress["downloaded"]["inBytes"] < progress["total"]["inBytes"]
        assert progress["totalFiles"] >= 5 and biggest in progress["files"] and progress["speed"] > 0
        with chromium() as browser:
            browser.get(server.base + "/")
            row = f'.download[data-node="{running["node"]}"][data-model="tiny/watch"]'
            until(
                lambda: browser.find_elements(By.CSS_SELECTOR, row + '[data-state="ongoing"]'),
                20,
                "the page shows it ongoing",
            )
            assert (
                "tiny/watch [0, 4)"
                in browser.find_element(By.CSS_SELECTOR, row + '[data-state="ongoing"]').text
            )
            screenshot(browser, "20-download-ongoing")
            _, err = cli.communicate(timeout=120)
            assert cli.returncode == 0, err
            until(
                lambda: browser.find_elements(By.CSS_SELECTOR, row + '[data-state="completed"]'),
                20,
                "then completed",
            )
            screenshot(browser, "21-download-completed")
            first = browser.find_elements(By.CSS_SELECTOR, '.download[data-state="completed"]')[0]
            assert first.get_attribute("data-model") == "tiny/watch"  # the newest first
            assert console_errors(browser) == []
    finally:
        hub_cluster.hub.slow.clear()
        if cli.poll() is None:
            cli.kill()
            cli.communicate(timeout=30)
        server.stop()
    state = hub_cluster.cli("state")
    assert state.returncode == 0 and "Downloads" in state.stdout and "tiny/watch" in state.stdout


def test_ollamas_pull_fetches_onto_the_nodes_with_progress_lines(
    hub_cluster: HubCluster, tiny_models: dict[str, Path]
) -> None:
    """The `ollama` client's pull against `serve`: `exoctl download`'s machinery (each live node its
    layers), reported as Ollama's progress lines, then loadable without fetching again."""
    import ollama

    from tests.cluster_helpers import Server

    server = Server(hub_cluster.cluster)
    try:
        client = ollama.Client(host=server.base, timeout=300)
        lines = list(client.pull("tiny/pull", stream=True))
        assert lines[0].status == "pulling manifest" and lines[-1].status == "success"
        sizes = [(line.completed, line.total) for line in lines if line.total]
        assert sizes and sizes[-1][0] == sizes[-1][1] > 0
        on_disk = {
            **hub_cluster.snapshot_files("node1", "tiny/pull"),
            **hub_cluster.snapshot_files("node2", "tiny/pull"),
        }
        every_weight = {n for n in os.listdir(tiny_models["qwen2"]) if n.endswith(".safetensors")}
        assert every_weight <= set(on_disk)  # between them the nodes hold every layer
        assert client.pull("tiny/pull", stream=False).status == "success"  # already there: at once
        with pytest.raises(ollama.ResponseError, match="tiny/absent"):
            client.pull("tiny/absent", stream=False)
    finally:
        server.stop()
