"""Live per-node bars on stderr: bytes downloaded, then layers loaded. Started on the first
report, so a request refused at once prints nothing but its error."""

from __future__ import annotations

from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

from exoctl.cli.output import err_console
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.runner_report import RunnerReport, RunnerStatus


def size_text(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def download_detail(report: DownloadReport) -> str:
    """`12.3 MB / 30.6 MB  5.1 MB/s  eta 4s`, or how it ended."""
    if report.state == "failed":
        return f"failed: {report.error or ''}"
    done = f"{size_text(report.downloaded)} / {size_text(report.total)}"
    if report.state == "completed":
        fetched = report.downloaded_this_session
        return f"{done}  " + (f"fetched {size_text(fetched)}" if fetched else "already here")
    return f"{done}  {size_text(report.speed)}/s  eta {report.eta_ms / 1000:.0f}s"


class NodeBars:
    def __init__(self, enabled: bool) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=err_console,
            disable=not enabled,
        )
        self.tasks: dict[str, TaskID] = {}

    def show(self, key: str, label: str, total: float, completed: float, detail: str) -> None:
        if not self.tasks:
            self.progress.start()
        if key not in self.tasks:
            self.tasks[key] = self.progress.add_task(label, total=max(total, 1), detail=detail)
        self.progress.update(self.tasks[key], total=max(total, 1), completed=completed, detail=detail)

    def show_download(self, node: str, report: DownloadReport) -> None:
        label = f"{node} download [{report.start_layer}, {report.end_layer})"
        total = report.total or 1
        done = total if report.state == "completed" else report.downloaded
        self.show(f"download {node}", label, total, done, download_detail(report))

    def stop(self) -> None:
        if self.tasks:
            self.progress.stop()


class LoadProgress(NodeBars):
    """`place`: each node's download (when it has to fetch its files), then its layers."""

    def update(self, runners: dict[str, RunnerReport], downloads: dict[str, DownloadReport]) -> None:
        for node, runner in runners.items():
            report = downloads.get(node)
            if report is not None:
                self.show_download(node, report)
                if report.state != "completed":
                    continue
            total = runner.layers_total
            done = total if runner.status is RunnerStatus.READY else runner.layers_loaded
            if not done and f"load {node}" not in self.tasks:
                continue  # its files may still be being found or fetched: that bar comes first
            label = f"{node} layers [{runner.start_layer}, {runner.end_layer})"
            self.show(f"load {node}", label, total, done, f"{done}/{total} layers")


class DownloadProgress(NodeBars):
    """`download`: one bar of bytes per node."""

    def update(self, reports: dict[str, DownloadReport]) -> None:
        for node, report in reports.items():
            self.show_download(node, report)
