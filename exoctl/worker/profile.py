"""What a worker reports about its node: memory, CPUs, load, its own RSS, device, version."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import psutil

from exoctl import __version__, cpu_policy
from exoctl.wire.node_speed import LinkMeasure, NodeSpeed
from exoctl.wire.protocol import PROTOCOL_VERSION
from exoctl.wire.worker_profile import WorkerProfile


def cpu_model() -> str:
    """The CPU's marketing name ("AMD EPYC 7551 32-Core Processor"), shown by `state` and the dashboard."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


MACHINE_ID_ENV = "EXOCTL_MACHINE_ID"


def machine_id() -> str:
    """Which machine this is, so that placement sees workers that share one machine's memory.
    EXOCTL_MACHINE_ID names it instead: workers on one host that are to act as machines of their
    own (the tests' network namespaces, containers) share neither memory budget nor /dev/shm."""
    return os.environ.get(MACHINE_ID_ENV) or host_id()


def host_id() -> str:
    """The machine this process really runs on, whatever EXOCTL_MACHINE_ID says: workers that share
    it share its cores and memory bus (what the cost model needs of the tests' namespaces)."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            text = Path(path).read_text(encoding="utf-8").strip()
        except OSError:
            continue
        if text:
            return text
    return platform.node()


class NodeProfiler:
    def __init__(self, name: str, device: str, boot_id: str, speed: NodeSpeed | None = None) -> None:
        self.name = name
        self.device = device
        self.boot_id = boot_id
        self.started = time.time()
        self.process = psutil.Process()
        self.bf16 = cpu_policy.cpu_has_native_bf16()
        self.kernel = cpu_policy.kernel_path()  # the worker checked EXOCTL_KERNEL_ISA at its start
        self.machine_id = machine_id()
        self.host_id = host_id()
        self.cpu_model = cpu_model()
        self.cpu_percent = 0.0
        self.speed = speed
        self.links: dict[str, LinkMeasure] = {}  # by the sink's node name: the latest measure
        psutil.cpu_percent(interval=None)  # primes the counter: later calls measure since the last

    def keep_links(self, links: tuple[LinkMeasure, ...]) -> None:
        for link in links:
            self.links[link.sink] = link

    def sample_cpu(self) -> None:
        self.cpu_percent = psutil.cpu_percent(interval=None)

    def profile(self) -> WorkerProfile:
        memory = psutil.virtual_memory()
        return WorkerProfile(
            name=self.name,
            version=__version__,
            protocol=PROTOCOL_VERSION,
            boot_id=self.boot_id,
            pid=os.getpid(),
            hostname=platform.node(),
            machine_id=self.machine_id,
            ram_total=memory.total,
            ram_available=memory.available,
            cpu_count=psutil.cpu_count() or 1,
            cpu_model=self.cpu_model,
            # the worker's compute threads: --threads (OMP_NUM_THREADS), else torch's default of one per core
            threads=int(os.environ.get("OMP_NUM_THREADS") or psutil.cpu_count() or 1),
            cpu_percent=self.cpu_percent,
            load_avg=tuple(round(x, 2) for x in os.getloadavg()),
            rss=self.process.memory_info().rss,
            device=self.device,
            bf16_native=self.bf16,
            # what `auto`, int8 and int4 compute in here: the CPU's choice, or EXOCTL_ACTIVATIONS's
            activations=cpu_policy.activations_name(self.bf16),
            uptime_s=round(time.time() - self.started, 1),
            kernel=self.kernel,
            speed=self.speed,
            host_id=self.host_id,
            links=tuple(self.links.values()),
        )
