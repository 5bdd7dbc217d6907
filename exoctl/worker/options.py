"""What a worker process is started with (`exoctl worker`'s options), and the check of where it
may listen."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from exoctl.errors import ExoctlError
from exoctl.keys import ClusterKeys


@dataclass
class WorkerOptions:
    name: str
    host: str
    port: int
    keys: ClusterKeys | None
    model_dirs: list[Path]
    device: str = "cpu"
    insecure: bool = False
    threads: int | None = None
    max_batch: int = 32
    activations: str | None = None  # EXOCTL_ACTIVATIONS for this worker (exoctl.cpu_policy)


def check_bind(host: str, keys: ClusterKeys | None, insecure: bool) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and keys is None and not insecure:
        raise ExoctlError(
            f"refusing to listen on {host} without the cluster key: anyone on the network could load models",
            hint="make keys with `exoctl keys init` and pass --keys-dir, "
            "or pass --insecure on a trusted network",
        )
