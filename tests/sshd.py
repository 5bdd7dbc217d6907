"""A real sshd for tests, on loopback addresses, with generated host and client keys: what the
launch tests and the network-namespace cluster start workers through."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def find_sshd() -> str:
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd"):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.fail("openssh-server is not installed (.ci/run installs it: apt-get install openssh-server)")


def make_keys(folder: Path) -> None:
    """host_key and client_key (ed25519) in `folder`, the client's public key authorized."""
    folder.mkdir(mode=0o700, parents=True)
    for name in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(folder / name)], check=True)
    (folder / "authorized_keys").write_text((folder / "client_key.pub").read_text())


@contextmanager
def running_sshd(folder: Path, port: int, hosts: list[str]) -> Iterator[None]:
    """sshd listening on `hosts` at `port` with `folder`'s keys (make_keys), until the block ends."""
    config = folder / "sshd_config"
    config.write_text(
        "\n".join(
            [
                f"Port {port}",
                *(f"ListenAddress {h}" for h in hosts),
                f"HostKey {folder / 'host_key'}",
                f"AuthorizedKeysFile {folder / 'authorized_keys'}",
                f"PidFile {folder / 'sshd.pid'}",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PubkeyAuthentication yes",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "",
            ]
        )
    )
    if os.geteuid() == 0:
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)  # sshd's privilege-separation directory
    daemon = subprocess.Popen([find_sshd(), "-D", "-e", "-f", str(config)], stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with socket.socket() as probe:
                if probe.connect_ex((hosts[0], port)) == 0:
                    break
            if daemon.poll() is not None:
                pytest.fail(f"sshd did not start: {daemon.stderr.read() if daemon.stderr else ''}")
            time.sleep(0.1)
        yield
    finally:
        daemon.terminate()
        try:
            daemon.wait(timeout=10)
        except subprocess.TimeoutExpired:
            daemon.kill()
