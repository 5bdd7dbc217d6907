"""A node's downloads: those asked for by `exoctl download` and those a load starts, each on a
thread of its own, kept (bounded) so `status` can report their progress and how they ended.

Torch-free: a download only fetches files (hub_fetch.py); nothing is loaded.
"""

from __future__ import annotations

import logging
import threading
import traceback
import uuid
from collections import OrderedDict
from pathlib import Path

from exoctl.errors import ExoctlError
from exoctl.models.hub_fetch import ONGOING, PENDING, Download
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.messages import DownloadRequest
from exoctl.wire.protocol import ProtocolError
from exoctl.worker.model_access import check_reference, locate

log = logging.getLogger("exoctl.worker")

MAX_KEPT = 32  # ended downloads a node remembers (the oldest are forgotten first)
MAX_LAYERS = 4096


class Downloads:
    def __init__(self, node: str, model_dirs: list[Path]) -> None:
        self.node = node
        self.model_dirs = model_dirs
        self.kept: OrderedDict[str, Download] = OrderedDict()
        self.lock = threading.Lock()

    def new(
        self, model: str, layers: tuple[int, int], n_layers: int, instance_id: str | None = None
    ) -> Download:
        download = Download(uuid.uuid4().hex, model, layers, n_layers, instance_id)
        with self.lock:
            self.kept[download.id] = download
            ended = [k for k, d in self.kept.items() if d.done]
            for key in ended[: max(0, len(self.kept) - MAX_KEPT)]:
                del self.kept[key]
        return download

    def settle(self, download: Download, path: Path | None, error: ExoctlError | None = None) -> None:
        """End `download`: completed at `path`, failed with `error`, or forgotten when it never
        fetched anything (a load from a model directory)."""
        if error is not None:
            download.fail(f"node {self.node}: {error.message}", error.hint)
        elif download.state == PENDING and download.instance_id is not None:
            with self.lock:
                self.kept.pop(download.id, None)
        elif path is not None:
            download.complete(path)

    def start(self, asked: DownloadRequest) -> str:
        """Start the download a `download` message asks for (or join the same one running); its id."""
        model, start, end, n_layers = asked.model, asked.start_layer, asked.end_layer, asked.n_layers
        if not 0 < n_layers <= MAX_LAYERS or not 0 <= start < end <= n_layers:
            raise ProtocolError(
                f"'download' layers [{start}, {end}) of {n_layers} are not a range of the model"
            )
        check_reference(model, self.model_dirs, self.node)
        with self.lock:
            for download in self.kept.values():
                if download.model == model and download.layers == (start, end) and download.state == ONGOING:
                    return download.id
        download = self.new(model, (start, end), n_layers)
        thread = threading.Thread(target=self._run, args=(download,), name="download", daemon=True)
        thread.start()
        return download.id

    def _run(self, download: Download) -> None:
        log.info("downloading %s layers [%d, %d)", download.model, *download.layers)
        try:
            path = locate(
                download.model, self.model_dirs, self.node, download.layers, download.n_layers, download
            )
        except ExoctlError as exc:
            log.warning("download of %s failed: %s", download.model, exc.message)
            self.settle(download, None, exc)
            return
        except Exception as exc:  # a bug: said in the download's state, the worker goes on
            log.error("download of %s failed: %s", download.model, traceback.format_exc())
            self.settle(download, None, ExoctlError(f"{type(exc).__name__}: {exc}"))
            return
        self.settle(download, path)
        log.info("downloaded %s layers [%d, %d) to %s", download.model, *download.layers, path)

    def reports(self) -> list[DownloadReport]:
        with self.lock:
            shown = [d for d in self.kept.values() if d.state != PENDING or d.instance_id is None]
        return [d.report() for d in shown]
