"""`exoctl serve`: OpenAI-compatible chat and EXO-compatible cluster control over HTTP: the routes.

FastAPI on uvicorn. Every error uses OpenAI's envelope (`errors.py`) — also inside a stream
(`openai_chat.py`) — and a request that cannot work gets an error status at once.
"""

from __future__ import annotations

import secrets
from typing import Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exoctl import __version__
from exoctl.api.errors import classify, error_body, exoctl_error_response
from exoctl.api.metrics import Metrics
from exoctl.api.openai_chat import ChatCompletion
from exoctl.api.schemas import ChatRequest, PlaceRequest
from exoctl.api.service import ClusterService, NotFound, shards_json
from exoctl.errors import ExoctlError
from exoctl.tensor_placement import valid_rank_counts

OPEN_PATHS = frozenset({"/healthz"})


class Guard:
    """The API key, JSON bodies only, and request counts, around every route.

    A plain ASGI middleware rather than `@app.middleware("http")`: that one hands the route a
    `receive` of its own, through which a client that went away is never seen."""

    def __init__(self, app: ASGIApp, api_key: str | None, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        refusal = self._refusal(request)
        if refusal is not None:
            self.metrics.requests.labels(request.url.path, str(refusal.status_code)).inc()
            await refusal(scope, receive, send)
            return
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status[0])).inc()

    def _refusal(self, request: Request) -> JSONResponse | None:
        if self.api_key is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                self.metrics.errors.labels("authentication_error").inc()
                body = error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    "authentication_error",
                    code="invalid_api_key",
                )
                return JSONResponse(body, status_code=401)
        content_type = request.headers.get("content-type")
        if request.method == "POST" and content_type and not content_type.startswith("application/json"):
            # a browser page may POST text/plain or a form to localhost without asking (no CORS
            # preflight); JSON alone keeps other sites from placing models or chatting through it
            body = error_body(
                f"send the request body as JSON (Content-Type: application/json), not {content_type}",
                "invalid_request_error",
                code="unsupported_media_type",
            )
            return JSONResponse(body, status_code=415)
        return None


def create_app(service: ClusterService, api_key: str | None = None) -> FastAPI:
    app = FastAPI(title="exoctl", version=__version__, docs_url=None, redoc_url=None)
    metrics = Metrics(service.statuses)

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", ""
        metrics.errors.labels("invalid_request_error").inc()
        text = f"{where}: {message}" if where else message
        return JSONResponse(error_body(text, "invalid_request_error", param=where or None), status_code=400)

    @app.exception_handler(ExoctlError)
    async def exoctl_error(_: Request, exc: ExoctlError) -> JSONResponse:
        metrics.errors.labels(classify(exc)[1]).inc()
        return exoctl_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    # --- health and metrics -------------------------------------------------------------------

    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        statuses = await run_in_threadpool(service.statuses)
        up = sum(1 for s in statuses if s.up)
        return {"status": "ok", "version": __version__, "nodes": len(statuses), "nodes_up": up}

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = await run_in_threadpool(generate_latest, metrics.registry)
        return PlainTextResponse(text.decode(), media_type=CONTENT_TYPE_LATEST)

    # --- models, instances, state -------------------------------------------------------------

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        entries = []
        for card, downloaded, placed in await run_in_threadpool(service.models):
            entries.append(
                {
                    "id": card.id,
                    "object": "model",
                    "created": 0,
                    "owned_by": "exoctl",
                    "name": card.name,
                    "hugging_face_id": card.hf_repo,
                    "tags": list(card.tags),
                    "storage_size_megabytes": round(card.storage_bytes / 1e6),
                    "n_layers": card.n_layers,
                    "supports_tensor": len(valid_rank_counts(card, 8)) > 1,
                    "downloaded": downloaded,
                    "placed": bool(placed),
                    "instances": placed,
                }
            )
        return {"object": "list", "data": entries}

    @app.post("/place_instance")
    async def place_instance(body: PlaceRequest) -> JSONResponse:
        instance_id, chosen = await run_in_threadpool(
            service.place, body.model_id, body.sharding, body.nodes, body.min_nodes, body.dtype, body.wait
        )
        placement = chosen.placement
        doc = {
            "instance_id": instance_id,
            "model_id": placement.model_id,
            "sharding": placement.sharding.capitalize(),
            "reason": chosen.reason,
            "instance_meta": body.instance_meta,
            "dtype": placement.dtype,
            "shards": shards_json(placement),
            "status": "ready" if body.wait else "loading",
        }
        return JSONResponse(doc, status_code=200 if body.wait else 202)

    @app.get("/instance/previews")
    async def previews(model_id: str, dtype: str = "auto") -> dict[str, Any]:
        return await run_in_threadpool(service.previews, model_id, dtype)

    @app.get("/instance/{instance_id}")
    async def instance(instance_id: str) -> dict[str, Any]:
        state = await run_in_threadpool(service.state)
        for doc in state["instances"].get(instance_id, {}).values():
            return dict(doc)
        record = service.loads.get(instance_id)
        if record is not None:
            return {
                "instanceId": instance_id,
                "modelId": record.model_id,
                "status": record.status,
                "error": record.error or None,
            }
        raise NotFound(f"no instance {instance_id}", hint="GET /state lists the instances")

    @app.delete("/instance/{instance_id}")
    async def delete_instance(instance_id: str) -> dict[str, Any]:
        freed = await run_in_threadpool(service.delete, instance_id)
        return {"deleted": instance_id, "freed_bytes": freed}

    @app.get("/state")
    async def state() -> dict[str, Any]:
        return await run_in_threadpool(service.state)

    @app.get("/state/{path:path}")
    async def state_part(path: str) -> Any:
        node: Any = await run_in_threadpool(service.state)
        for part in [p for p in path.split("/") if p]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise NotFound(f"/state/{path}: no {part!r} here", hint="GET /state shows the whole document")
        return node

    # --- chat -----------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await ChatCompletion(service, metrics, body).respond(request.is_disconnected)

    return app
