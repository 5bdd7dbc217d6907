"""`exoctl up` / `down` / `logs`: through a real sshd on loopback, and the failures `up` reports."""

from __future__ import annotations

import getpass
import json
import os
import re
import socket
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from exoctl.cluster.views import instances_of
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.profile import NodeProfiler
from tests.cluster_helpers import (
    PYTHON_EXOCTL,
    WorkerCluster,
    exoctl,
    take_ports,
    write_inventory,
)
from tests.sshd import make_keys, running_sshd

SSH_HOSTS = ["127.0.0.21", "127.0.0.22"]


@pytest.fixture
def sshd(tmp_path: Path) -> Iterator[dict[str, str]]:
    """A real sshd on 127.0.0.21-22 with generated host and client keys; stopped afterwards."""
    folder = tmp_path / "ssh"
    make_keys(folder)
    (port,) = take_ports(["127.0.0.21"])
    host_public = (folder / "host_key.pub").read_text().split()
    (folder / "known_hosts").write_text(
        "".join(f"[{h}]:{port} {host_public[0]} {host_public[1]}\n" for h in SSH_HOSTS)
    )
    client_config = folder / "ssh_config"
    client_config.write_text(
        f"Host 127.0.0.*\n  UserKnownHostsFile {folder / 'known_hosts'}\n  StrictHostKeyChecking yes\n"
    )
    with running_sshd(folder, port, SSH_HOSTS):
        yield {"port": str(port), "identity": str(folder / "client_key"), "config": str(client_config)}


def test_up_and_down_through_ssh(sshd: dict[str, str], tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    ports = take_ports(SSH_HOSTS)
    work = tmp_path / "remote-work"
    inventory = write_inventory(
        tmp_path / "cluster.yaml",
        [
            {"name": f"ssh{i + 1}", "host": h, "port": p}
            for i, (h, p) in enumerate(zip(SSH_HOSTS, ports, strict=True))
        ],
        {
            "ssh_user": getpass.getuser(),
            "ssh_port": int(sshd["port"]),
            "ssh_identity": sshd["identity"],
            "ssh_config": sshd["config"],
            "command": PYTHON_EXOCTL,
            "work_dir": str(work),
            "model_dir": str(next(iter(tiny_models.values())).parent),
        },
    )
    cluster = WorkerCluster(inventory, work, ["ssh1", "ssh2"])
    try:
        up = cluster.cli("up", "--json")
        assert up.returncode == 0, up.stdout + up.stderr
        assert [n["result"] for n in json.loads(up.stdout)["nodes"]] == ["started", "started"]
        # the key travelled over ssh: the workers serve with the cluster key from this machine
        pushed = (work / "keys" / "cluster.key").read_text()
        assert "public-key" in pushed and oct((work / "keys").stat().st_mode & 0o777) == "0o700"
        assert [n["status"] for n in cluster.cli_json("nodes")] == ["up", "up"]
        # a model placed across the two ssh-started workers answers
        with cluster.client() as client:
            card, ref = resolve_card(str(tiny_models["llama"]))
            placement = client.plan(card, PlacementRequest(dtype="float32", nodes=2), client.statuses())
            instance_id = client.load(card, ref, placement).instance_id
            generation = client.generate(
                instances_of(client.statuses())[instance_id], SamplingParams(max_tokens=4), prompt="hello"
            )
            list(generation)
            assert generation.result is not None and generation.result.completion_tokens >= 1
        logs = cluster.cli("logs", "ssh2", "-n", "50")
        assert logs.returncode == 0 and "exoctl worker ssh2 listening on 127.0.0.22" in logs.stdout
        again = cluster.cli("up", "--json")
        assert [n["result"] for n in json.loads(again.stdout)["nodes"]] == ["running", "running"]
        pids = [cluster.pid(n) for n in cluster.names]
        down = cluster.cli("down", "--json")
        assert down.returncode == 0, down.stderr
        assert [n["result"] for n in json.loads(down.stdout)["nodes"]] == ["stopped", "stopped"]
        time.sleep(0.5)
        for pid in pids:
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
        gone = cluster.cli("nodes", "--json")
        assert gone.returncode == 1 and [n["status"] for n in json.loads(gone.stdout)] == ["down", "down"]
    finally:
        cluster.stop()


def test_up_reports_each_failure_by_node(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    hosts = ["127.0.0.31", "127.0.0.32", "127.0.0.33", "127.0.0.34"]
    ports = take_ports(hosts)
    blocker = socket.socket()
    blocker.bind((hosts[1], ports[1]))
    blocker.listen()
    closed_ssh_port = take_ports([hosts[3]])[0]
    work = tmp_path / "work"
    nodes = [
        {"name": "good", "host": hosts[0], "port": ports[0]},
        {"name": "taken", "host": hosts[1], "port": ports[1]},
        {"name": "nopython", "host": hosts[2], "port": ports[2], "command": "/nonexistent/python3 -m exoctl"},
        {"name": "nossh", "host": hosts[3], "port": ports[3], "ssh_port": closed_ssh_port},
    ]
    inventory = write_inventory(
        tmp_path / "cluster.yaml",
        nodes,
        {"command": PYTHON_EXOCTL, "work_dir": str(work), "model_dir": str(tmp_path)},
    )
    cluster = WorkerCluster(inventory, work, [n["name"] for n in nodes])
    try:
        result = cluster.cli("up", "--json")
        assert result.returncode == 1
        report = {n["node"]: n for n in json.loads(result.stdout)["nodes"]}
        assert report["good"]["result"] == "started"
        assert report["taken"]["result"] == "failed"
        assert report["taken"]["reason"] == f"port {ports[1]} on {hosts[1]} is taken by another process"
        assert report["nopython"]["reason"].startswith(
            "command '/nonexistent/python3' not found on 127.0.0.33"
        )
        assert report["nossh"]["reason"].startswith(f"ssh to {hosts[3]}:{closed_ssh_port} failed:")
        assert "Connection refused" in report["nossh"]["reason"]
        table = cluster.cli("up")  # the human form names the same reasons, one line per node
        assert "already running (reused)" in table.stdout and "is taken by another process" in table.stdout
    finally:
        blocker.close()
        cluster.stop()


def test_up_local_writes_the_inventory_later_commands_use(tmp_path: Path) -> None:
    # the kernel's path forced for this worker: its profile says so (`kernelPath`, `nodes`)
    home = {"EXOCTL_HOME": str(tmp_path / "home"), "EXOCTL_INVENTORY": "", "EXOCTL_KERNEL_ISA": "portable"}
    (port,) = take_ports(["127.0.0.1"])
    up = exoctl("up", "--local", "1", "--base-port", str(port), "--threads", "1", "--json", env=home)
    try:
        assert up.returncode == 0, up.stderr
        assert json.loads(up.stdout)["nodes"][0]["address"] == f"127.0.0.1:{port}"
        written = tmp_path / "home" / "local-cluster.yaml"
        assert written.is_file() and (tmp_path / "home" / "keys" / "cluster.key_secret").is_file()
        assert "threads: 1" in written.read_text()
        nodes = exoctl("nodes", "--json", env=home)  # no --inventory: found in $EXOCTL_HOME
        assert nodes.returncode == 0 and json.loads(nodes.stdout)[0]["node"] == "local1"
        state = json.loads(exoctl("state", "--json", env=home).stdout)
        assert state["nodeProfiles"]["local1"]["threads"] == 1  # the worker runs with the threads asked
        assert state["nodeProfiles"]["local1"]["kernelPath"] == "portable"
        wide = exoctl("nodes", env={**home, "COLUMNS": "200"})
        assert re.search(r"local1 .* cpu +│ portable +│", wide.stdout), wide.stdout
    finally:
        down = exoctl("down", env=home)
    assert down.returncode == 0 and "local1" in down.stdout and "stopped" in down.stdout


def test_a_failed_up_local_never_points_later_commands_at_the_wrong_workers(tmp_path: Path) -> None:
    """`up --local` writes its inventory only for workers that run: another layout is refused while
    the old workers run, and a port taken leaves out that worker (no worker is orphaned)."""
    import socket

    home = {"EXOCTL_HOME": str(tmp_path / "home"), "EXOCTL_INVENTORY": ""}
    written = tmp_path / "home" / "local-cluster.yaml"
    first = take_ports(["127.0.0.1"] * 2)
    other = take_ports(["127.0.0.1"] * 2)
    up = exoctl("up", "--local", "2", "--base-port", str(first[0]), "--threads", "1", env=home)
    try:
        assert up.returncode == 0, up.stderr
        before = written.read_text()
        moved = exoctl("up", "--local", "2", "--base-port", str(other[0]), env=home)
        assert moved.returncode == 1
        assert (
            "error: the local cluster in" in moved.stderr and f"local1 (127.0.0.1:{first[0]})" in moved.stderr
        )
        assert "exoctl down" in moved.stderr and "Traceback" not in moved.stderr
        assert written.read_text() == before
        nodes = json.loads(exoctl("nodes", "--json", env=home).stdout)
        assert [n["address"] for n in nodes] == [f"127.0.0.1:{p}" for p in first]
    finally:
        down = exoctl("down", env=home)
    assert down.returncode == 0 and down.stdout.count("stopped — stopped") == 2
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", other[1]))
    blocker.listen()
    try:
        partly = exoctl("up", "--local", "2", "--base-port", str(other[0]), "--threads", "1", env=home)
        assert partly.returncode == 1
        assert f"port {other[1]} on 127.0.0.1 is taken by another process" in partly.stdout
        text = written.read_text()
        assert f"port: {other[0]}" in text and f"port: {other[1]}" not in text and "local2" not in text
    finally:
        blocker.close()
        down = exoctl("down", env=home)
    assert down.returncode == 0 and "local1" in down.stdout and "stopped" in down.stdout


def test_the_start_timeout_is_an_option_and_its_message_says_what_to_do() -> None:
    from exoctl.cluster.launcher import ShellResult, start_failure, start_script
    from exoctl.inventory import Node

    node = Node("n1", "127.0.0.1", activations="float32")
    script = start_script(node, None, local_keys=True, wait_s=90)
    assert "while [ $i -lt 900 ]" in script and "--activations float32" in script
    reason = start_failure(node, ShellResult(5, "TIMEOUT\n", ""), 90)
    assert reason.startswith("the worker did not start listening within 90 s; it may still be starting")
    assert "exoctl logs n1" in reason and "exoctl up --start-timeout 360" in reason
    helped = exoctl("up", "--help")
    assert "--start-timeout" in helped.stdout and "--activations" in helped.stdout


def test_a_worker_refuses_a_network_address_without_keys(tmp_path: Path) -> None:
    result = exoctl("worker", "--name", "w", "--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: refusing to listen on 0.0.0.0 without the cluster key")
    assert "--insecure" in result.stderr


@pytest.mark.parametrize(
    ("version", "protocol", "reason"),
    [
        ("0.0.1", None, "version mismatch: the node runs exoctl 0.0.1, this is"),
        (None, 99, "version mismatch: node fake sent a bad message: protocol version 99 does not match"),
    ],
)
def test_up_reports_a_version_mismatch(
    tmp_path: Path, version: str | None, protocol: int | None, reason: str
) -> None:
    import threading

    import msgpack
    import zmq

    from exoctl import __version__
    from exoctl.keys import init_keys
    from exoctl.transport import secure_server, start_authenticator
    from exoctl.wire.protocol import PROTOCOL_VERSION

    keys, _ = init_keys()
    (port,) = take_ports(["127.0.0.35"])
    ctx: zmq.Context = zmq.Context()
    auth = start_authenticator(ctx, keys)
    sock = ctx.socket(zmq.ROUTER)
    secure_server(sock, keys)
    sock.bind(f"tcp://127.0.0.35:{port}")
    stop = threading.Event()

    reported = NodeProfiler("fake", "cpu", "boot").profile()

    def fake_worker() -> None:  # an exoctl of another version answering ping
        while not stop.is_set():
            if sock.poll(100):
                ident, raw = sock.recv_multipart()
                header = msgpack.unpackb(raw)
                profile = replace(reported, version=version or __version__)
                reply = {
                    "v": protocol or PROTOCOL_VERSION,
                    "type": "pong",
                    "id": header.get("id"),
                    "profile": profile.to_wire(),
                }
                sock.send_multipart([ident, msgpack.packb(reply)])

    thread = threading.Thread(target=fake_worker, daemon=True)
    thread.start()
    try:
        inventory = write_inventory(
            tmp_path / "cluster.yaml",
            [{"name": "fake", "host": "127.0.0.35", "port": port}],
            {"command": PYTHON_EXOCTL, "work_dir": str(tmp_path / "work")},
        )
        result = exoctl("up", "--json", "-i", str(inventory))
        assert result.returncode == 1
        (entry,) = json.loads(result.stdout)["nodes"]
        assert entry["result"] == "failed" and entry["reason"].startswith(reason), entry
    finally:
        stop.set()
        thread.join(timeout=5)
        auth.stop()
        ctx.destroy(linger=0)
