"""`exoctl serve`: OpenAI-compatible chat and EXO-compatible cluster control over HTTP: the routes.

FastAPI on uvicorn. Every error uses OpenAI's envelope (`errors.py`) — also inside a stream
(`openai_chat.py`) — and a request that cannot work gets an error status at once.
"""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any, get_args

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from exoctl import __version__
from exoctl.api.anthropic_messages import AnthropicMessages, MessagesRequest
from exoctl.api.dashboard import DASHBOARD_PATHS, mount_dashboard
from exoctl.api.error_handlers import install_error_handlers
from exoctl.api.errors import error_body
from exoctl.api.metrics import Metrics
from exoctl.api.model_list import model_entry
from exoctl.api.ollama import ollama_routes
from exoctl.api.openai_chat import ChatCompletion
from exoctl.api.openai_completions import CompletionRequest, TextCompletion
from exoctl.api.openai_responses import OpenAIResponse, ResponsesRequest, Stored
from exoctl.api.schemas import (
    MLX_INSTANCE_META,
    ChatRequest,
    CreateInstanceRequest,
    InstanceMeta,
    PlaceRequest,
)
from exoctl.api.service import ClusterService, NotFound, shards_json
from exoctl.cluster.views import no_node_up
from exoctl.errors import InvalidRequestError
from exoctl.paths import exoctl_home

log = logging.getLogger("exoctl.serve")

OPEN_PATHS = frozenset({"/healthz", *DASHBOARD_PATHS})
# The largest request body taken: a 128k-token conversation is about 0.5 MB of JSON, tool schemas
# and long system prompts a few MB more. Bodies are parsed on the event loop, so a huge one would
# stall every stream (a 68 MB body froze /healthz for 8 s and took 1 GB).
MAX_BODY_BYTES = 16 * 1024 * 1024


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives `body` as one message, then what the client sends next (its disconnect)."""
    given = [False]

    async def replayed() -> Message:
        if not given[0]:
            given[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def too_large_response(size: str) -> JSONResponse:
    body = error_body(
        f"the request body is {size}, over the limit of {MAX_BODY_BYTES // (1024 * 1024)} MB",
        "invalid_request_error",
        code="request_too_large",
    )
    return JSONResponse(body, status_code=413)


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
            # refused before routing: counted as "unmatched", so hostile paths add no labels
            self.metrics.requests.labels("unmatched", str(refusal.status_code)).inc()
            await refusal(scope, receive, send)
            return
        status = [500]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        chunked = request.method in ("POST", "PUT", "PATCH") and "content-length" not in request.headers
        if chunked:
            # a body sent without Content-Length (chunked) is read here, up to the limit, and
            # handed on whole: FastAPI would turn an error raised while it reads into a 400
            body = bytearray()
            while True:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client went away
                body += message.get("body", b"")
                if len(body) > MAX_BODY_BYTES:
                    self.metrics.requests.labels("unmatched", "413").inc()
                    await too_large_response(f"over {MAX_BODY_BYTES} bytes")(scope, receive, send)
                    return
                if not message.get("more_body", False):
                    break
            receive = replay(bytes(body), receive)
        try:
            await self.app(scope, receive, counted)
        finally:
            route = scope.get("route")
            self.metrics.requests.labels(getattr(route, "path", "unmatched"), str(status[0])).inc()

    def _refusal(self, request: Request) -> JSONResponse | None:
        if self.api_key is not None and request.url.path not in OPEN_PATHS:
            scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
            # the scheme is case-insensitive (RFC 9110 11.1): "bearer" and "BEARER" are Bearer
            right = scheme.lower() == "bearer" and secrets.compare_digest(
                token.strip().encode(), self.api_key.encode()
            )
            # Anthropic's clients send the key as x-api-key
            given = request.headers.get("x-api-key")
            right = right or (
                given is not None and secrets.compare_digest(given.encode(), self.api_key.encode())
            )
            if not right:
                self.metrics.errors.labels("authentication_error").inc()
                body = error_body(
                    "missing or wrong API key: send 'Authorization: Bearer <key>' (or 'x-api-key: <key>')",
                    "authentication_error",
                    code="invalid_api_key",
                )
                return JSONResponse(body, status_code=401)
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > MAX_BODY_BYTES:
            return too_large_response(f"{int(length)} bytes")
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


def ring_meta(requested: str) -> dict[str, Any]:
    """What an EXO instance kind runs as here: MLX's rings are the cluster's own CPU ring."""
    if requested in MLX_INSTANCE_META:
        return {
            "instance_meta": "CpuRing",
            "instance_meta_requested": requested,
            "note": f"{requested} is Apple's MLX; exoctl runs it as the cluster's own CPU ring (CpuRing)",
        }
    return {"instance_meta": requested}


def check_instance_meta(value: str) -> str:
    if value not in get_args(InstanceMeta):
        raise InvalidRequestError(
            f"unknown instance_meta {value!r}", hint=f"use one of {', '.join(get_args(InstanceMeta))}"
        )
    return value


def ignored(keys: list[str], path: str) -> None:
    """EXO ignores request keys it does not know, and so does exoctl: it logs them."""
    if keys:
        # bounded: a body of 500,000 unknown keys is one short line, not megabytes of log
        shown = ", ".join(k[:40] for k in keys[:10])
        more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
        log.warning("%s: ignored %d unknown request keys: %s%s", path, len(keys), shown, more)


def create_app(
    service: ClusterService, api_key: str | None = None, cors_origins: tuple[str, ...] = ()
) -> FastAPI:
    app = FastAPI(title="exoctl", version=__version__, docs_url=None, redoc_url=None)
    metrics = Metrics(service.statuses)

    app.add_middleware(Guard, api_key=api_key, metrics=metrics)
    if cors_origins:
        # added last, so outermost: a browser's preflight is answered before the key is asked for
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type"],
        )
    mount_dashboard(app)
    install_error_handlers(app, metrics)
    app.include_router(health_routes(service, metrics, api_key))
    for routes in (model_routes, place_routes, instance_routes, state_routes):
        app.include_router(routes(service))
    app.include_router(ollama_routes(service, metrics))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request) -> Response:
        return await ChatCompletion(service, metrics, body).respond(request.is_disconnected)

    stored = Stored()

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request) -> Response:
        return await OpenAIResponse(service, metrics, body, stored).respond(request.is_disconnected)

    @app.post("/v1/messages")
    async def messages(body: MessagesRequest, request: Request) -> Response:
        return await AnthropicMessages(service, metrics, body).respond(request.is_disconnected)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await TextCompletion(service, metrics, body).respond(request.is_disconnected)

    return app


def health_routes(service: ClusterService, metrics: Metrics, api_key: str | None) -> APIRouter:
    app = APIRouter()

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        statuses = await run_in_threadpool(service.statuses)
        up = sum(1 for s in statuses if s.up)
        down = no_node_up(statuses)
        body = {
            # 503 with no node up: a load balancer or a script's check should not call that healthy
            "status": "ok" if down is None else "unavailable",
            "error": None if down is None else f"{down.message} ({down.hint})",
            "version": __version__,
            "cluster": service.inventory.name,
            "nodes": len(statuses),
            "nodes_up": up,
            # the dashboard asks for the key before its first call, rather than after a 401
            "api_key_required": api_key is not None,
        }
        return JSONResponse(body, status_code=200 if down is None else 503)

    @app.get("/metrics")
    async def prometheus() -> PlainTextResponse:
        text = await run_in_threadpool(generate_latest, metrics.registry)
        return PlainTextResponse(text.decode(), media_type=CONTENT_TYPE_LATEST)

    return app


def model_routes(service: ClusterService) -> APIRouter:
    """The models (OpenAI's list, and EXO's name for it) and this cluster's node id."""
    app = APIRouter()

    async def model_list() -> dict[str, Any]:
        entries = await run_in_threadpool(service.models)
        return {
            "object": "list",
            "data": [model_entry(card, local, placed) for card, local, placed in entries],
        }

    app.get("/v1/models")(model_list)
    app.get("/models")(model_list)  # EXO's name for the same list

    @app.get("/node_id")
    async def node_id() -> str:
        return service.node_id()

    # EXO's dashboard asks for these at start: its feature flags (exoctl has no prefill/decode
    # disaggregation), and whether its first-run wizard was done (kept as EXO keeps it, in a file)
    @app.get("/v1/feature-flags")
    async def feature_flags() -> dict[str, bool]:
        return {"disaggregation": False}

    @app.get("/onboarding")
    async def onboarding() -> dict[str, bool]:
        return {"completed": onboarding_file().exists()}

    @app.post("/onboarding")
    async def complete_onboarding() -> dict[str, bool]:
        path = onboarding_file()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("true")
        return {"completed": True}

    return app


def onboarding_file() -> Path:
    return exoctl_home() / "onboarding-complete"


def place_routes(service: ClusterService) -> APIRouter:
    """EXO's routes to place an instance, or to preview one without loading it (these before
    `/instance/{instance_id}`, which would match their paths)."""
    app = APIRouter()

    @app.post("/place_instance")
    async def place_instance(body: PlaceRequest) -> JSONResponse:
        ignored(body.unknown_keys(), "/place_instance")
        instance_id, chosen = await run_in_threadpool(
            service.place,
            body.model_id,
            body.sharding,
            body.nodes,
            body.min_nodes,
            body.dtype,
            body.wait,
            body.prefix_cache_bytes(),
            body.draft,
            body.draft_dtype,
        )
        placement = chosen.placement
        doc = {
            "instance_id": instance_id,
            "model_id": placement.model_id,
            "sharding": placement.sharding.capitalize(),
            "reason": chosen.reason,
            **ring_meta(body.instance_meta),
            "dtype": placement.dtype,
            "shards": shards_json(placement),
            "status": "ready" if body.wait else "loading",
        }
        return JSONResponse(doc, status_code=200 if body.wait else 202)

    @app.post("/instance")
    async def create_instance(body: CreateInstanceRequest) -> JSONResponse:
        """EXO's: load the instance a preview returned, as it is (its nodes and layer ranges)."""
        ignored(body.unknown_keys(), "/instance")
        instance_id, placement = await run_in_threadpool(service.place_planned, body.instance, body.wait)
        doc = {
            "message": "Command received.",
            "instance_id": instance_id,
            "model_id": placement.model_id,
            "sharding": placement.sharding.capitalize(),
            "dtype": placement.dtype,
            "shards": shards_json(placement),
            "status": "ready" if body.wait else "loading",
        }
        return JSONResponse(doc, status_code=200 if body.wait else 202)

    @app.get("/instance/placement")
    async def placement(
        model_id: str,
        sharding: str = "Pipeline",
        instance_meta: str = "MlxRing",
        min_nodes: int = 1,
        dtype: str = "auto",
    ) -> dict[str, Any]:
        """EXO's: the instance `/place_instance` would load, without loading it."""
        check_instance_meta(instance_meta)  # EXO's kinds, all run as the CPU ring
        return await run_in_threadpool(service.placement_for, model_id, sharding, max(min_nodes, 1), dtype)

    @app.get("/instance/previews")
    async def previews(
        model_id: str,
        dtype: str = "auto",
        instance_meta: str | None = None,
        node_ids: list[str] = Query(default_factory=list),  # noqa: B008  (FastAPI's way to take a list)
    ) -> dict[str, Any]:
        meta = check_instance_meta(instance_meta) if instance_meta is not None else None
        return await run_in_threadpool(service.previews, model_id, dtype, meta, tuple(node_ids))

    return app


def instance_routes(service: ClusterService) -> APIRouter:
    """EXO's routes to read and delete one instance."""
    app = APIRouter()

    @app.get("/instance/{instance_id}")
    async def instance(instance_id: str) -> dict[str, Any]:
        """Tagged as /state tags it (`{"CpuRingInstance": {...}}`); a placement still loading in
        the background, before any runner reports it, as its record."""
        state = await run_in_threadpool(service.state)
        if instance_id in state["instances"]:
            return dict(state["instances"][instance_id])
        record = service.loads.get(instance_id)
        if record is not None:
            return {
                "CpuRingInstance": {
                    "instanceId": instance_id,
                    "status": record.status,
                    "error": record.error or None,
                    "shardAssignments": {"modelId": record.model_id, "runnerToShard": {}, "nodeToRunner": {}},
                }
            }
        raise NotFound(f"no instance {instance_id}", hint="GET /state lists the instances")

    @app.delete("/instance/{instance_id}")
    async def delete_instance(instance_id: str) -> dict[str, Any]:
        freed = await run_in_threadpool(service.delete, instance_id)
        return {"deleted": instance_id, "freed_bytes": freed}

    return app


def state_routes(service: ClusterService) -> APIRouter:
    """EXO's /state document, whole or by path."""
    app = APIRouter()

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

    return app
