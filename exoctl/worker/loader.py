"""Loading a runner's weights on a thread of its own, so the I/O loop keeps answering.

A failed load leaves the runner failed with a message that names the node and the cause (and
its memory freed); an unload during the load cancels it. Torch-free at import: the runner
brings torch.
"""

from __future__ import annotations

import logging
import threading
import traceback
from pathlib import Path
from typing import TYPE_CHECKING

from exoctl.errors import ExoctlError
from exoctl.wire.runner_report import Failure
from exoctl.worker.model_access import locate

if TYPE_CHECKING:
    from exoctl.worker.downloads import Downloads
    from exoctl.worker.instance import InstanceRunner as Runner

log = logging.getLogger("exoctl.worker")


class LoadCancelled(Exception):
    """The runner was unloaded while it was still loading."""


def start_loading(
    runner: Runner, model_dirs: list[Path], node: str, downloads: Downloads
) -> threading.Thread:
    thread = threading.Thread(
        target=load, args=(runner, model_dirs, node, downloads), name="load", daemon=True
    )
    thread.start()
    return thread


def fetch_files(runner: Runner, model_dirs: list[Path], node: str, downloads: Downloads) -> Path:
    """The runner's files, downloaded first when the node lacks them (that download is reported in
    the node's status beside the load, so `place` shows it before the layers load)."""
    spec = runner.spec
    return _fetch(
        spec.model, (spec.start_layer, spec.end_layer), spec.n_layers, runner, model_dirs, node, downloads
    )


def fetch_draft(runner: Runner, model_dirs: list[Path], node: str, downloads: Downloads) -> Path | None:
    """The head's draft model, whole (none for a drafter without one, or on another rank)."""
    spec = runner.spec
    if spec.rank != 0 or not spec.drafts_with_model:
        return None
    return _fetch(spec.draft, (0, spec.draft_layers), spec.draft_layers, runner, model_dirs, node, downloads)


def _fetch(
    model: str,
    layers: tuple[int, int],
    n_layers: int,
    runner: Runner,
    model_dirs: list[Path],
    node: str,
    downloads: Downloads,
) -> Path:
    progress = downloads.new(model, layers, n_layers, instance_id=runner.spec.instance_id)
    try:
        folder = locate(model, model_dirs, node, layers, n_layers, progress)
    except ExoctlError as exc:
        downloads.settle(progress, None, exc)
        raise
    except BaseException as exc:
        downloads.settle(progress, None, ExoctlError(f"{type(exc).__name__}: {exc}"))
        raise
    downloads.settle(progress, folder)
    return folder


def load(runner: Runner, model_dirs: list[Path], node: str, downloads: Downloads) -> None:
    spec = runner.spec
    log.info("loading %s layers [%d, %d) in %s", spec.model_id, spec.start_layer, spec.end_layer, spec.dtype)
    try:
        folder = fetch_files(runner, model_dirs, node, downloads)
        runner.load(folder, fetch_draft(runner, model_dirs, node, downloads))
        log.info("instance %s ready: %.1f MB", spec.instance_id, runner.memory_bytes / 1e6)
    except LoadCancelled:
        log.info("load of instance %s cancelled", spec.instance_id)
    except ExoctlError as exc:
        log.warning("load of instance %s failed: %s", spec.instance_id, exc.message)
        runner.fail(Failure(f"node {node}: {exc.message}"))
    except MemoryError:
        runner.fail(
            Failure(f"node {node} ran out of memory loading layers [{spec.start_layer}, {spec.end_layer})")
        )
    except Exception as exc:
        log.error("load of instance %s failed: %s", spec.instance_id, traceback.format_exc())
        runner.fail(Failure(f"node {node}: {type(exc).__name__}: {exc}"))
