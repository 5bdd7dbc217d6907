"""What a node says of one download in its `status_reply`: which model and layers, its state, and
its bytes, files, speed and ETA. Built by the worker (`hub_fetch.Download.report`), read by the
client, the CLI's progress bars and `/state.downloads`. Torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from exoctl.wire.field_types import checked_fields
from exoctl.wire.protocol import ProtocolError

STATES = ("pending", "ongoing", "completed", "failed")
ENDED = ("completed", "failed")


@dataclass(frozen=True)
class FileReport:
    total: int
    downloaded: int = 0
    downloaded_this_session: int = 0  # fetched by this download (the rest was cached, or resumed)


@dataclass(frozen=True)
class DownloadReport:
    id: str
    model: str
    instance_id: str | None  # the load it is fetching for, if any
    start_layer: int
    end_layer: int
    n_layers: int
    state: str  # one of STATES
    started_at: float  # wall clock
    error: str | None = None
    hint: str | None = None
    path: str = ""  # where the files are, once completed
    total: int = 0
    downloaded: int = 0
    downloaded_this_session: int = 0
    completed_files: int = 0
    total_files: int = 0
    speed: float = 0.0  # bytes/s fetched by this download
    eta_ms: int = 0
    files: dict[str, FileReport] = field(default_factory=dict)

    @property
    def ended(self) -> bool:
        return self.state in ENDED

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, raw: Any) -> DownloadReport:
        if not isinstance(raw, dict) or not isinstance(raw.get("files"), dict):
            raise ProtocolError("a download report must be a map with its 'files'")
        values = checked_fields(cls, raw, "download report", skip=("files",))
        if values["state"] not in STATES:
            raise ProtocolError(f"download state {values['state']!r:.20} is not one of {', '.join(STATES)}")
        files = {}
        for name, entry in raw["files"].items():
            if not isinstance(name, str) or not isinstance(entry, dict):
                raise ProtocolError("a download report's files must map names to their bytes")
            sizes = [entry.get(k) for k in ("total", "downloaded", "downloaded_this_session")]
            if not all(isinstance(v, int) and not isinstance(v, bool) for v in sizes):
                raise ProtocolError(f"download file {name!r:.60}: its bytes must be integers")
            files[name] = FileReport(*(int(v or 0) for v in sizes))
        return cls(**values, files=files)
