"""A small stand-in for the Hugging Face Hub on loopback, speaking the parts of its HTTP API that
huggingface_hub uses to download a model, so the real client code runs against it (HF_ENDPOINT):

- `GET /api/models/{repo}[/revision/{rev}]`: model info with `siblings` (sizes, blob ids, LFS sha256)
- `GET /api/models/{repo}/tree/{rev}`: the file list
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` / `X-Linked-Etag`, `X-Linked-Size`,
  `Content-Length`, and `Range: bytes=N-` answered with 206 (how a `.incomplete` file resumes)

A gated repo answers 403 `X-Error-Code: GatedRepo` without the right token; an unknown repo 404
`RepoNotFound`; a missing file 404 `EntryNotFound`. Files can be served slowly (bytes per second),
so a test can kill a download mid-file. Every request is logged with its Range header.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

CHUNK = 64 * 1024


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    folder: Path
    gated: bool = False
    commit: str = ""
    files: dict[str, Path] = field(default_factory=dict)
    sha256: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.commit = hashlib.sha1(str(self.folder).encode()).hexdigest()
        for path in sorted(p for p in self.folder.rglob("*") if p.is_file()):
            name = path.relative_to(self.folder).as_posix()
            self.files[name] = path
            self.sha256[name] = hashlib.sha256(path.read_bytes()).hexdigest()

    def lfs(self, name: str) -> bool:
        return name.endswith((".safetensors", ".gguf", ".bin"))

    def etag(self, name: str) -> str:
        return self.sha256[name] if self.lfs(name) else git_blob_id(self.files[name].read_bytes())


@dataclass
class Logged:
    method: str
    path: str
    range: str | None


class FakeHub:
    def __init__(self, token: str = "hf_test_token", port: int = 0) -> None:
        self.repos: dict[str, Repo] = {}
        self.token = token
        self.slow: dict[str, int] = {}  # file name suffix -> bytes per second
        self.log: list[Logged] = []
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

            def do_GET(self) -> None:
                hub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def add(self, repo_id: str, folder: Path, gated: bool = False) -> Repo:
        repo = self.repos[repo_id] = Repo(folder, gated)
        return repo

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def fetched(self, repo_id: str) -> list[Logged]:
        """The file GETs of `repo_id`'s resolve URLs."""
        prefix = f"/{repo_id}/resolve/"
        with self.lock:
            return [e for e in self.log if e.method == "GET" and e.path.startswith(prefix)]

    # --- answering ---------------------------------------------------------------------------------

    def handle(self, request: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(request.path).path)
        with self.lock:
            self.log.append(Logged(request.command, path, request.headers.get("Range")))
        try:
            if path.startswith("/api/models/"):
                self.api(request, path[len("/api/models/") :])
            elif "/resolve/" in path:
                self.resolve(request, path, head)
            else:
                self.error(request, 404, "NotFound", f"no route {path}")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed worker)

    def _repo(self, request: BaseHTTPRequestHandler, repo_id: str) -> Repo | None:
        repo = self.repos.get(repo_id)
        if repo is None:
            self.error(request, 404, "RepoNotFound", f"Repository Not Found for url: {repo_id}")
            return None
        if repo.gated and request.headers.get("Authorization") != f"Bearer {self.token}":
            self.error(request, 403, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return None
        return repo

    def api(self, request: BaseHTTPRequestHandler, rest: str) -> None:
        parts = rest.split("/")
        repo_id = "/".join(parts[:2])
        repo = self._repo(request, repo_id)
        if repo is None:
            return
        if len(parts) > 2 and parts[2] == "tree":
            body: Any = [
                {"type": "file", "oid": git_blob_id(b""), "size": p.stat().st_size, "path": n}
                for n, p in repo.files.items()
            ]
        else:
            siblings = []
            for name, path in repo.files.items():
                size = path.stat().st_size
                entry: dict[str, Any] = {"rfilename": name, "size": size, "blobId": git_blob_id(b"")}
                if repo.lfs(name):
                    entry["lfs"] = {"sha256": repo.sha256[name], "size": size, "pointerSize": 134}
                siblings.append(entry)
            body = {
                "_id": repo.commit[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.commit,
                "private": False,
                "gated": "manual" if repo.gated else False,
                "disabled": False,
                "tags": [],
                "siblings": siblings,
            }
        self.send(request, 200, json.dumps(body).encode(), {"Content-Type": "application/json"})

    def resolve(self, request: BaseHTTPRequestHandler, path: str, head: bool) -> None:
        repo_part, _, rest = path[1:].partition("/resolve/")
        repo = self._repo(request, repo_part)
        if repo is None:
            return
        _revision, _, name = rest.partition("/")
        if name not in repo.files:
            self.error(request, 404, "EntryNotFound", f"{name} does not exist on main")
            return
        data = repo.files[name].read_bytes()
        etag = f'"{repo.etag(name)}"'
        headers = {"X-Repo-Commit": repo.commit, "ETag": etag, "Accept-Ranges": "bytes"}
        if repo.lfs(name):
            headers.update({"X-Linked-Etag": etag, "X-Linked-Size": str(len(data))})
        start = 0
        wanted = request.headers.get("Range")
        status = 200
        if wanted and wanted.startswith("bytes=") and not head:
            first, _, last = wanted[len("bytes=") :].partition("-")
            start = int(first or 0)
            end = int(last) + 1 if last else len(data)
            data, status = data[start:end], 206
            headers["Content-Range"] = (
                f"bytes {start}-{start + len(data) - 1}/{repo.files[name].stat().st_size}"
            )
        headers["Content-Length"] = str(len(data))
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.end_headers()
        if head:
            return
        rate = next((r for suffix, r in self.slow.items() if name.endswith(suffix)), None)
        for offset in range(0, len(data), CHUNK):
            request.wfile.write(data[offset : offset + CHUNK])
            if rate:
                request.wfile.flush()
                time.sleep(CHUNK / rate)

    def error(self, request: BaseHTTPRequestHandler, status: int, code: str, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send(
            request,
            status,
            body,
            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message},
        )

    def send(
        self, request: BaseHTTPRequestHandler, status: int, body: bytes, headers: dict[str, str]
    ) -> None:
        request.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            request.send_header(key, value)
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)
