"""Real worker processes on loopback addresses for tests, started and stopped by the real CLI.

127.0.0.11-14 stand for four nodes. Ports are drawn at random per test session and never
reused within it; every cluster is stopped by `exoctl down`, and any worker left (a frozen
or killed one) is killed by its pid file, so no process outlives its test.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest
import yaml
import zmq

PYTHON_EXOCTL = f"{shlex.quote(sys.executable)} -m exoctl"
CLI_TIMEOUT = 180
_next_port = random.Random(os.getpid() ^ int(time.time())).randrange(20000, 45000, 100)


def sigint_default() -> None:
    """preexec_fn for a CLI child a test sends SIGINT: a shell's background job ignores SIGINT
    and its children inherit that, so the child restores the default and Python's Ctrl-C handler
    applies (the test exercises the CLI, not the caller's shell)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _free(host: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def take_ports(hosts: list[str]) -> list[int]:
    """One port per host, fresh in this session and free right now."""
    global _next_port
    while True:
        base = _next_port
        _next_port += len(hosts) + 1
        ports = [base + i for i in range(len(hosts))]
        if all(_free(h, p) for h, p in zip(hosts, ports, strict=True)):
            return ports


def exoctl(
    *args: str, stdin: str | None = None, timeout: float = CLI_TIMEOUT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exoctl", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def write_inventory(path: Path, nodes: list[dict[str, Any]], defaults: dict[str, Any]) -> Path:
    path.write_text(
        yaml.safe_dump({"cluster": "test", "defaults": defaults, "nodes": nodes}), encoding="utf-8"
    )
    return path


@dataclass
class WorkerCluster:
    inventory: Path
    work_dir: Path
    names: list[str]

    def cli(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return exoctl(*args, "--inventory", str(self.inventory), **kwargs)

    def cli_json(self, *args: str) -> Any:
        result = self.cli(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def client(self):  # type: ignore[no-untyped-def]
        from exoctl.cluster.client import Cluster
        from exoctl.inventory import load_inventory_file
        from exoctl.keys import find_keys

        return Cluster(load_inventory_file(self.inventory), find_keys())

    def pid(self, name: str) -> int:
        return int((self.work_dir / "run" / f"{name}.pid").read_text())

    def log(self, name: str) -> str:
        path = self.work_dir / "logs" / f"{name}.log"
        return path.read_text() if path.is_file() else ""

    def stop(self) -> None:
        for name in self.names:  # a frozen worker must run again to exit
            try:
                os.kill(self.pid(name), signal.SIGCONT)
            except (OSError, ValueError):
                pass
        self.cli("down", timeout=60)
        for name in self.names:
            try:
                pid = self.pid(name)
            except (OSError, ValueError):
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def make_cluster(tmp: Path, count: int, model_dir: Path, **defaults: Any) -> WorkerCluster:
    hosts = [f"127.0.0.{11 + i}" for i in range(count)]
    ports = take_ports(hosts)
    names = [f"node{i + 1}" for i in range(count)]
    work = tmp / "work"
    nodes = [{"name": n, "host": h, "port": p} for n, h, p in zip(names, hosts, ports, strict=True)]
    inventory = write_inventory(
        tmp / "cluster.yaml",
        nodes,
        {"command": PYTHON_EXOCTL, "work_dir": str(work), "model_dir": str(model_dir), **defaults},
    )
    return WorkerCluster(inventory, work, names)


@contextmanager
def tiny_cluster(
    tmp_path_factory: pytest.TempPathFactory,
    name: str,
    count: int,
    tiny_models: dict[str, Path],
    activations: str | None = None,
) -> Iterator[WorkerCluster]:
    """`count` running workers whose model directory holds the tiny models (a module's cluster);
    `activations` forces the workers' activation dtype policy (inventory field `activations`)."""
    folder = next(iter(tiny_models.values())).parent
    defaults = {} if activations is None else {"activations": activations}
    with running(make_cluster(tmp_path_factory.mktemp(name), count, folder, **defaults)) as cluster:
        yield cluster


@contextmanager
def running(cluster: WorkerCluster) -> Iterator[WorkerCluster]:
    """The cluster started with `exoctl up`, stopped (every worker gone) on the way out."""
    start(cluster)
    try:
        yield cluster
    finally:
        cluster.stop()


def start(cluster: WorkerCluster) -> None:
    result = cluster.cli("up")
    if result.returncode != 0:
        cluster.stop()
        raise AssertionError(f"exoctl up failed:\n{result.stdout}\n{result.stderr}")


def wait_for(predicate: Any, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Server:
    def __init__(self, cluster: WorkerCluster, *args: str) -> None:
        (self.port,) = take_ports(["127.0.0.1"])
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = cluster.work_dir.parent / f"serve-{self.port}.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exoctl",
                "serve",
                "--port",
                str(self.port),
                "-i",
                str(cluster.inventory),
                *args,
            ],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        if not wait_for(lambda: self.up(), timeout=60):
            self.stop()
            raise AssertionError("exoctl serve did not come up")

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()

    def up(self) -> bool:
        """Serving: /healthz answers (503 when no node of its cluster is up)."""
        try:
            with urllib.request.urlopen(f"{self.base}/healthz", timeout=5) as response:
                return response.status == 200
        except urllib.error.HTTPError as error:
            return error.code == 503
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def http(
    server: Server,
    method: str,
    path: str,
    body: Any = None,
    raw: bytes | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    request = urllib.request.Request(
        f"{server.base}{path}",
        data=data,
        method=method,
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            text = response.read().decode()
            status = response.status
    except urllib.error.HTTPError as error:
        text, status = error.read().decode(), error.code
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


# --- raw messages to a worker, as a client holding the cluster key ------------------------------


def raw_socket(cluster: WorkerCluster, node: str = "node1") -> tuple[zmq.Context[Any], zmq.Socket[Any]]:
    from exoctl.inventory import load_inventory_file
    from exoctl.keys import find_keys
    from exoctl.transport import secure_client

    inventory = load_inventory_file(cluster.inventory)
    ctx: zmq.Context[Any] = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    secure_client(sock, find_keys())
    sock.connect(f"tcp://{inventory.node(node).address}")
    return ctx, sock


def header(kind: str, **fields: Any) -> bytes:
    from exoctl.wire.protocol import PROTOCOL_VERSION

    return msgpack.packb({"v": PROTOCOL_VERSION, "type": kind, "id": 7, **fields})


def load_header(**changes: Any) -> bytes:
    """A 'load' of one layer of a model in /etc (outside the model directories), with `changes`."""
    fields = {
        "instance_id": "i",
        "runner_id": "r",
        "model": "/etc",
        "model_id": "m",
        "sharding": "pipeline",
        "dtype": "float32",
        "start_layer": 0,
        "end_layer": 1,
        "n_layers": 1,
        "rank": 0,
        "world": 1,
        "peers": [["node1", "127.0.0.11:1"]],
        "prefix_positions": 0,
        "prefix_bytes": 0,
        "position_bytes": [],
        "draft": "",
        "draft_model_id": "",
        "draft_dtype": "",
        "draft_layers": 0,
        "partials": "exact",
    }
    return header("load", **{**fields, **changes})
