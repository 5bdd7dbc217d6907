"""Fetching a model's files from the Hugging Face Hub into this machine's cache, with progress a
status report can carry. Torch-free; huggingface_hub does the HTTP (HF_ENDPOINT, HF_TOKEN,
HF_HUB_OFFLINE, resuming a `.incomplete` file with a range request) and we count its bytes.

One `Download` is one node's fetch of one model part: the files its layer range needs (or all of
them). The worker keeps them for `status`; the control side turns them into EXO's
`DownloadPending / DownloadOngoing / DownloadCompleted / DownloadFailed` (cluster/state.py).
"""

from __future__ import annotations

import errno
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from exoctl.errors import ExoctlError, ModelNotFoundError
from exoctl.wire.download_report import DownloadReport, FileReport

log = logging.getLogger("exoctl.download")

PENDING, ONGOING, COMPLETED, FAILED = "pending", "ongoing", "completed", "failed"


@dataclass
class FileProgress:
    total: int
    downloaded: int = 0
    this_session: int = 0  # bytes fetched by this download (the rest was in the cache, or resumed)


class Download:
    """One fetch's state, written by its thread and read by the worker's I/O loop (under a lock)."""

    def __init__(
        self,
        download_id: str,
        model: str,
        layers: tuple[int, int],
        n_layers: int,
        instance_id: str | None = None,
    ) -> None:
        self.id = download_id
        self.model = model
        self.layers = layers
        self.n_layers = n_layers
        self.instance_id = instance_id
        self.state = PENDING
        self.error: str | None = None
        self.hint: str | None = None
        self.path = ""
        self.files: dict[str, FileProgress] = {}
        self.started = time.monotonic()
        self.started_at = time.time()  # wall clock, for listing downloads newest first
        self.ended: float | None = None
        self.lock = threading.Lock()

    def plan(self, sizes: dict[str, int], present: dict[str, int]) -> None:
        """The files to fetch with their sizes, and the bytes of each already on disk."""
        with self.lock:
            self.files = {n: FileProgress(s, min(present.get(n, 0), s)) for n, s in sizes.items()}
            self.state = ONGOING
            self.started = time.monotonic()

    def resumed(self, name: str, offset: int) -> None:
        """huggingface_hub starts `name` at `offset` (a partial file it found)."""
        with self.lock:
            if name in self.files:
                self.files[name].downloaded = offset

    def advance(self, name: str, count: int) -> None:
        with self.lock:
            progress = self.files.get(name)
            if progress is not None:
                progress.downloaded += count
                progress.this_session += count

    def file_done(self, name: str) -> None:
        with self.lock:
            progress = self.files.get(name)
            if progress is not None:
                progress.downloaded = progress.total

    def complete(self, path: Path) -> None:
        with self.lock:
            self.state, self.path, self.ended = COMPLETED, str(path), time.monotonic()
            for progress in self.files.values():
                progress.downloaded = progress.total

    def fail(self, message: str, hint: str | None = None) -> None:
        with self.lock:
            self.state, self.error, self.hint, self.ended = FAILED, message, hint, time.monotonic()

    @property
    def done(self) -> bool:
        return self.state in (COMPLETED, FAILED)

    def report(self) -> DownloadReport:
        with self.lock:
            total = sum(p.total for p in self.files.values())
            downloaded = sum(p.downloaded for p in self.files.values())
            session = sum(p.this_session for p in self.files.values())
            elapsed = max((self.ended or time.monotonic()) - self.started, 1e-3)
            speed = session / elapsed
            remaining = total - downloaded
            return DownloadReport(
                id=self.id,
                model=self.model,
                instance_id=self.instance_id,
                start_layer=self.layers[0],
                end_layer=self.layers[1],
                n_layers=self.n_layers,
                state=self.state,
                started_at=self.started_at,
                error=self.error,
                hint=self.hint,
                path=self.path,
                total=total,
                downloaded=downloaded,
                downloaded_this_session=session,
                completed_files=sum(p.downloaded >= p.total for p in self.files.values()),
                total_files=len(self.files),
                speed=speed,
                eta_ms=int(remaining / speed * 1000) if speed > 0 and remaining > 0 else 0,
                files={n: FileReport(p.total, p.downloaded, p.this_session) for n, p in self.files.items()},
            )


# --- errors -------------------------------------------------------------------------------------


def hub_error(repo: str, exc: Exception) -> ExoctlError:
    """One clear error for what the Hub (or the disk) said."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return ModelNotFoundError(
            f"{repo} is gated: this Hugging Face token has not been granted access",
            hint="accept the model's licence on huggingface.co and set HF_TOKEN on the node to a token of "
            "that account",
        )
    if isinstance(exc, RepositoryNotFoundError):
        return ModelNotFoundError(
            f"no repo {repo} on the Hugging Face Hub (or it is private)",
            hint="check the name (owner/name); a private repo needs HF_TOKEN",
        )
    if isinstance(exc, RevisionNotFoundError | EntryNotFoundError):
        return ModelNotFoundError(f"{repo}: {str(exc).splitlines()[0][:160]}")
    if isinstance(exc, OfflineModeIsEnabled | LocalEntryNotFoundError):
        why = "HF_HUB_OFFLINE is set" if isinstance(exc, OfflineModeIsEnabled) else "the Hub is not reachable"
        return ModelNotFoundError(
            f"{repo} is not in the Hugging Face cache and {why}",
            hint=f"unset HF_HUB_OFFLINE, or download it where the Hub is reachable (hf download {repo}) "
            "and copy the folder into the node's model_dir",
        )
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        try:
            free = f" ({shutil.disk_usage(cache_dir()).free / 2**20:.0f} MiB free)"
        except OSError:
            free = ""
        return ExoctlError(
            f"the disk is full writing {repo} into {cache_dir()}{free}",
            hint="free space there, or point HF_HOME (or HF_HUB_CACHE) at a larger disk",
        )
    return ModelNotFoundError(
        f"could not reach the Hugging Face Hub for {repo}: {type(exc).__name__} ({str(exc)[:100]})",
        hint="check the network (or HF_ENDPOINT), or copy the model to the node and give its path",
    )


@contextmanager
def quiet_hub() -> Iterator[None]:
    """huggingface_hub logs each retried request as a warning; the error that follows says it once."""
    hub_logger = logging.getLogger("huggingface_hub")
    level = hub_logger.level
    hub_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hub_logger.setLevel(level)


# --- fetching -----------------------------------------------------------------------------------


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE).expanduser()


def cached_path(repo: str, name: str) -> Path | None:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, name)
    return Path(found) if isinstance(found, str) else None


def remote_sizes(repo: str) -> dict[str, int]:
    """Every file of `repo` and its size, from the Hub's model info."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(repo, files_metadata=True)
    return {s.rfilename: int(s.size or 0) for s in info.siblings or []}


def partial_bytes(repo: str, names: list[str]) -> dict[str, int]:
    """Bytes of each file already in the cache: whole files, and nothing known of partial ones
    (huggingface_hub names those by ETag; it says where it resumes when it starts them)."""
    present: dict[str, int] = {}
    for name in names:
        path = cached_path(repo, name)
        if path is not None:
            present[name] = path.stat().st_size
    return present


def check_space(repo: str, needed: int) -> None:
    """Refuse before writing a byte when the cache's disk cannot hold what is left to fetch."""
    folder = cache_dir()
    for path in [folder, *folder.parents]:
        try:
            free = shutil.disk_usage(path).free
        except OSError:
            continue
        if free < needed:
            raise ExoctlError(
                f"not enough disk space for {repo}: {needed / 2**30:.2f} GiB to download, "
                f"{free / 2**30:.2f} GiB free at {folder}",
                hint="free space there, or point HF_HOME (or HF_HUB_CACHE) at a larger disk",
            )
        return


def _counting_bar(download: Download, name: str) -> type:
    """A tqdm class that feeds the bytes huggingface_hub has written into `download` (and draws
    nothing). `http_get` counts a chunk before it writes it (chunks of up to 10 MB), so a chunk is
    counted when the next one arrives, or at the end: a worker killed mid-file has on disk at least
    what it reported, and the resume starts where the report said."""
    from tqdm import tqdm

    class CountingBar(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self.unwritten = 0  # the last chunk's bytes, counted but maybe not on disk yet
            download.resumed(name, int(kwargs.get("initial") or 0))

        def update(self, n: float | None = 1) -> bool | None:
            count = int(n or 0)
            if count < 0:  # a correction (a resume's start taken back): at once
                download.advance(name, count)
            else:
                download.advance(name, self.unwritten)
                self.unwritten = count
            shown: bool | None = super().update(n)
            return shown

        def close(self) -> None:
            download.advance(name, self.unwritten)
            self.unwritten = 0
            super().close()

    return CountingBar


def snapshot_of(path: Path, name: str) -> Path:
    """The snapshot folder of a file `hf_hub_download` returned for `name`."""
    return path.parents[len(PurePosixPath(name).parts) - 1]


def blob_folder(repo: str) -> Path:
    from huggingface_hub.file_download import repo_folder_name

    return cache_dir() / repo_folder_name(repo_id=repo, repo_type="model") / "blobs"


def fetch_blob(repo: str, name: str, download: Download) -> None:
    """`name`'s blob in the cache, fetched into `blobs/<etag>.incomplete` and renamed when whole.

    Why not `hf_hub_download` alone: it writes each attempt to a file unique to its process, so a
    worker killed mid-file starts that file again from byte 0 (and leaves the old part behind). The
    partial file here is named by the file's ETag, so the next attempt, in any process, resumes it
    with a range request; huggingface_hub's `http_get` does the HTTP. A file lock keeps two
    downloads of one node (a `download` and a `load`) from writing the same part at once.
    """
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils._fixes import WeakFileLock
    from huggingface_hub.utils._headers import build_hf_headers

    meta = get_hf_file_metadata(hf_hub_url(repo, name))
    if meta.etag is None or meta.size is None:
        raise ExoctlError(f"{repo}: the Hub sent no ETag or size for {name}", hint="try again later")
    blobs = blob_folder(repo)
    blobs.mkdir(parents=True, exist_ok=True)
    blob = blobs / meta.etag
    partial = blobs / f"{meta.etag}.incomplete"
    locks = cache_dir() / ".locks" / blobs.parent.name  # where huggingface_hub locks the same blob
    locks.mkdir(parents=True, exist_ok=True)
    with WeakFileLock(locks / f"{meta.etag}.lock"):
        if blob.exists():
            return
        with partial.open("ab") as out:
            resume = out.tell()
            if resume > meta.size:  # not this file's bytes: start again
                out.truncate(0)
                resume = 0
            download.resumed(name, resume)
            if resume:
                log.info("resuming %s of %s at byte %d of %d", name, repo, resume, meta.size)
            http_get(
                meta.location,
                out,
                resume_size=resume,
                headers=build_hf_headers(),
                expected_size=meta.size,
                tqdm_class=_counting_bar(download, name),
            )
        got = partial.stat().st_size
        if got != meta.size:
            raise ExoctlError(
                f"{repo}: {name} came to {got} bytes, the Hub says {meta.size}", hint="try again"
            )
        partial.replace(blob)


def fetch(repo: str, names: list[str], download: Download, listed: dict[str, int] | None = None) -> Path:
    """The snapshot folder of `repo` holding each of `names`, fetched into the Hugging Face cache
    (resuming partial files), with `download` kept up to date. `listed`: the repo's file sizes when
    the caller has asked the Hub for them already. Raises `ExoctlError` (say what)."""
    from huggingface_hub import constants, hf_hub_download

    present = partial_bytes(repo, names)
    try:
        with quiet_hub():
            if all(n in present for n in names):
                sizes = present  # nothing to fetch: no need of the Hub (works offline too)
            else:
                if constants.HF_HUB_OFFLINE:
                    from huggingface_hub.errors import OfflineModeIsEnabled

                    raise OfflineModeIsEnabled("HF_HUB_OFFLINE is set")
                listed = listed if listed is not None else remote_sizes(repo)
                missing = [n for n in names if n not in listed]
                if missing:
                    raise ModelNotFoundError(
                        f"{repo} on the Hub has no file {missing[0]}"
                        + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
                    )
                sizes = {n: listed[n] for n in names}
                check_space(repo, sum(sizes[n] - present.get(n, 0) for n in names))
            download.plan(sizes, present)
            folder: Path | None = None
            for name in names:
                if name not in present:
                    fetch_blob(repo, name, download)
                # the blob is there: this lays out the snapshot's link to it (and the ref)
                path = Path(hf_hub_download(repo, name))
                download.file_done(name)
                folder = folder or snapshot_of(path, name)
    except ExoctlError:
        raise
    except Exception as exc:
        raise hub_error(repo, exc) from None
    assert folder is not None, "fetch needs at least one file"
    return folder
