"""What a worker says about its node in every `pong` and `status_reply`: who it is, its memory,
its CPU and what it computes in. Typed on both sides; torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from exoctl.wire.field_types import checked_fields
from exoctl.wire.node_speed import LinkMeasure, NodeSpeed
from exoctl.wire.protocol import ProtocolError


@dataclass(frozen=True)
class WorkerProfile:
    name: str
    version: str  # of exoctl
    protocol: int
    boot_id: str  # new at every worker start: a node that restarted lost what it held
    pid: int
    hostname: str
    machine_id: str  # the same on workers that share a machine (their memory is one)
    ram_total: int
    ram_available: int
    cpu_count: int
    cpu_model: str | None
    threads: int  # the worker's compute threads
    cpu_percent: float
    load_avg: tuple[float, ...]
    rss: int
    device: str
    bf16_native: bool
    activations: str  # what `auto`, int8 and int4 compute in here (cpu_policy)
    uptime_s: float
    kernel: str  # the kernel library's vector path here: "avx512+vnni+bf16", "avx2", "portable"
    speed: NodeSpeed | None = None  # measured at the worker's start (None: not measured)
    links: tuple[LinkMeasure, ...] = ()  # its links to other workers, as it last measured them
    host_id: str = ""  # the machine it really runs on (machine_id may be set to stand for another)

    @classmethod
    def planned(cls, name: str, device: str, ram: int, machine_id: str, activations: str) -> WorkerProfile:
        """A node as `place --dry-run` plans on it with no worker up: only its memory and what it
        computes in are known."""
        return cls(
            name,
            "",
            0,
            "",
            0,
            "",
            machine_id,
            ram,
            ram,
            0,
            None,
            0,
            0.0,
            (),
            0,
            device,
            False,
            activations,
            0.0,
            "",
        )

    def to_wire(self) -> dict[str, Any]:
        wire = asdict(self)
        wire["load_avg"] = list(self.load_avg)
        wire["speed"] = None if self.speed is None else self.speed.to_wire()
        wire["links"] = [link.to_wire() for link in self.links]
        return wire

    @classmethod
    def from_wire(cls, raw: Any) -> WorkerProfile:
        values = checked_fields(cls, raw, "node profile", skip=("speed", "links"))
        values["load_avg"] = tuple(values["load_avg"])
        speed, links = raw.get("speed"), raw.get("links")
        if not isinstance(links, list):
            raise ProtocolError("node profile field 'links' must be a list")
        values["speed"] = None if speed is None else NodeSpeed.from_wire(speed)
        values["links"] = tuple(LinkMeasure.from_wire(link) for link in links)
        return cls(**values)
