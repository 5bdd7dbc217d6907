"""Workers on real network links: each in a network namespace of its own, joined by veth pairs
through a bridge (a switch in a namespace of its own), rate-limited with `tc tbf` where asked.

Addresses come from the benchmarking range 198.18.0.0/15 (a /24 no route on this machine uses
yet); this process reaches the workers through one more veth into the bridge. Workers are started
by the real `exoctl up` over ssh: the inventory's ssh_config maps each node's address to an sshd on
loopback, and each node's `command` enters its namespace (`ip netns exec`) and names its machine
(EXOCTL_MACHINE_ID), so the workers treat each other as other machines: no shared memory between
them, every byte over its link. Everything made is removed on the way out, workers first.
"""

from __future__ import annotations

import getpass
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.cluster_helpers import WorkerCluster, start, take_ports, write_inventory
from tests.sshd import make_keys, running_sshd

SSH_HOST = "127.0.0.41"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _tc(*args: str) -> None:
    subprocess.run(["tc", *args], capture_output=True, text=True, timeout=30, check=True)


def why_no_namespaces() -> str | None:
    """Why network namespaces cannot be made here (None: they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"`{tool}` is missing (apt-get install iproute2)"
    name = f"exoprobe{os.getpid() % 100000}"
    made = _ip("netns", "add", name, check=False)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    _ip("netns", "del", name, check=False)
    return None


def _free_subnet() -> int:
    """A /24 of 198.18.0.0/15 no route here uses: its third octet."""
    routes = _ip("route", "show").stdout
    for third in [*(os.getpid() % 200 + 20 + i for i in range(50)), *range(1, 255)]:
        third %= 255
        if third and f"198.18.{third}." not in routes:
            return third
    raise RuntimeError("no free /24 in 198.18.0.0/16")


def tbf_args(rate_mbit: float) -> list[str]:
    """A token bucket for `rate_mbit` as a wire of that speed behaves: a message goes out at the
    rate, packet after packet (a bucket of two full frames, or 50 us of traffic on a fast link);
    a bucket of milliseconds would let a tensor split's 8 kB partials through at the veth's speed."""
    burst = max(2 * 1514, int(rate_mbit * 1e6 / 8 * 50e-6))
    return ["tbf", "rate", f"{rate_mbit}mbit", "burst", str(burst), "latency", "200ms"]


@dataclass
class Network:
    tag: str
    third: int
    count: int
    made: list[str] = field(default_factory=list)  # namespaces, in the order made
    host_link: str = ""

    def address(self, index: int) -> str:
        """Node `index`'s address (this process is .1)."""
        return f"198.18.{self.third}.{index + 2}"

    def namespace(self, index: int) -> str:
        return f"{self.tag}n{index}"

    @property
    def switch(self) -> str:
        return f"{self.tag}s"

    def up(self) -> None:
        _ip("netns", "add", self.switch)
        self.made.append(self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        self.host_link = f"{self.tag}h"
        _ip(
            "link",
            "add",
            self.host_link,
            "type",
            "veth",
            "peer",
            "name",
            f"{self.tag}hp",
            "netns",
            self.switch,
        )
        self._port(f"{self.tag}hp")
        _ip("addr", "add", f"198.18.{self.third}.1/24", "dev", self.host_link)
        _ip("link", "set", self.host_link, "up")
        for i in range(self.count):
            ns = self.namespace(i)
            _ip("netns", "add", ns)
            self.made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip(
                "-n",
                ns,
                "link",
                "add",
                "eth0",
                "type",
                "veth",
                "peer",
                "name",
                f"{self.tag}p{i}",
                "netns",
                self.switch,
            )
            self._port(f"{self.tag}p{i}")
            _ip("-n", ns, "addr", "add", f"{self.address(i)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")

    def _port(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", name, "master", "br0")
        _ip("-n", self.switch, "link", "set", name, "up")

    def limit(self, rate_mbit: float | None) -> None:
        """Every node's link at `rate_mbit` each way (None: no limit): tbf on the node's side for
        what it sends, on the bridge's port for what it receives."""
        for i in range(self.count):
            for ns, dev in ((self.namespace(i), "eth0"), (self.switch, f"{self.tag}p{i}")):
                subprocess.run(
                    ["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], capture_output=True, timeout=30
                )
                if rate_mbit is not None:
                    _tc("-n", ns, "qdisc", "add", "dev", dev, "root", *tbf_args(rate_mbit))

    def down(self) -> None:
        for ns in reversed(self.made):
            pids = _ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            _ip("netns", "del", ns, check=False)
        if self.host_link:
            _ip("link", "del", self.host_link, check=False)  # gone with its peer's namespace, usually
        self.made.clear()


@contextmanager
def netns_cluster(
    tmp: Path, count: int, model_dir: Path, rate_mbit: float | None = None, threads: int | None = None
) -> Iterator[tuple[WorkerCluster, Network]]:
    """`count` workers, each in its own namespace and started over ssh, on links of `rate_mbit`
    (None: unlimited); yields the cluster and its network (`limit` changes the rate)."""
    why = why_no_namespaces()
    if why is not None:
        pytest.skip(f"no network namespaces here: {why}")
    tag = f"x{os.getpid() % 10000:04d}{int(time.time() * 10) % 100:02d}"[:7]
    network = Network(tag, _free_subnet(), count)
    folder = tmp / "ssh"
    make_keys(folder)
    (ssh_port,) = take_ports([SSH_HOST])
    # every node's address is reached at the loopback sshd; the command then enters its namespace
    (folder / "ssh_config").write_text(
        f"Host 198.18.{network.third}.*\n  HostName {SSH_HOST}\n"
        "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n"
    )
    names = [f"net{i + 1}" for i in range(count)]
    work = tmp / "work"
    share = threads or max(1, (os.cpu_count() or 1) // count)
    nodes = [
        {
            "name": name,
            "host": network.address(i),
            "port": 7100 + i,
            "threads": share,
            "command": f"ip netns exec {network.namespace(i)} env EXOCTL_MACHINE_ID=netns-{name} "
            f"{shlex.quote(sys.executable)} -m exoctl",
        }
        for i, name in enumerate(names)
    ]
    inventory = write_inventory(
        tmp / "cluster.yaml",
        nodes,
        {
            "ssh_user": getpass.getuser(),
            "ssh_port": ssh_port,
            "ssh_identity": str(folder / "client_key"),
            "ssh_config": str(folder / "ssh_config"),
            "work_dir": str(work),
            "model_dir": str(model_dir),
        },
    )
    cluster = WorkerCluster(inventory, work, names)
    try:
        network.up()
        network.limit(rate_mbit)
        with running_sshd(folder, ssh_port, [SSH_HOST]):
            start(cluster)
            try:
                yield cluster, network
            finally:
                cluster.stop()
    finally:
        network.down()
