"""The web dashboard `serve` answers `GET /` with: static files shipped in the package
(`exoctl/dashboard/`), no build step, no CDN. The page polls `/state` and calls the same API as
any client, with the API key the user types in (kept in the browser's session storage)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse

STATIC = Path(str(files("exoctl") / "dashboard"))
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# the page and its assets hold no data: they are served without the API key, which the page asks for
DASHBOARD_PATHS = frozenset({"/", *(f"/dashboard/{name}" for name in ASSETS)})
HEADERS = {
    "Cache-Control": "no-cache",  # an upgraded exoctl's page is picked up at once
    "X-Content-Type-Options": "nosniff",
    # its own files and its own API only: no inline script, nothing from elsewhere, never framed
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
}


def mount_dashboard(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=HEADERS)

    for name, media_type in ASSETS.items():
        app.get(f"/dashboard/{name}", include_in_schema=False)(_asset(name, media_type))


def _asset(name: str, media_type: str) -> Callable[[], Awaitable[FileResponse]]:
    # a route without parameters: the file is fixed here, never taken from the request
    async def asset() -> FileResponse:
        return FileResponse(STATIC / name, media_type=media_type, headers=HEADERS)

    return asset
