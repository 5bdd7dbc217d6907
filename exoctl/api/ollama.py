"""Ollama's API, as desktop and editor clients (and the `ollama` Python client) speak it: `/api/chat`,
`/api/generate` (NDJSON streams by default, `options` mapped onto sampling, `format` "json" or a JSON
schema through the constrained decoding), `/api/tags`, `/api/show`, `/api/ps` (what is placed, and
on which nodes), `/api/version`, `/api/pull` (onto the nodes, through `exoctl download`'s machinery,
with progress lines).

Generation is a `GenerationRun`, as every API's; errors are Ollama's `{"error": "..."}`. A model name
may carry Ollama's `:latest` tag. A schema in `format` closes its objects (no properties it does not
name), as Ollama's converter (llama.cpp's) does.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from exoctl import __version__
from exoctl.api.errors import classify
from exoctl.api.generation_run import Delta, Done, Failed, Finished, GenerationRun, Job, Tools, respond
from exoctl.api.metrics import Metrics
from exoctl.api.model_list import family
from exoctl.api.service import ClusterService
from exoctl.api.structured import closed_objects, response_format_grammar, schema_grammar
from exoctl.api.tool_calls import ToolCall
from exoctl.cluster.views import instances_of
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.models.catalog import ModelCard
from exoctl.wire.answer import Completion
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.sampling_params import SamplingRequest

NDJSON = "application/x-ndjson"
FOREVER = "2318-01-01T00:00:00Z"  # an instance stays placed until it is deleted (Ollama's "forever")


class OllamaMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None


class ChatBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    messages: list[OllamaMessage] = Field(default_factory=list)
    tools: list[dict[str, Any]] | None = None
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    keep_alive: Any = None
    think: Any = None


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1)
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    stream: bool = True
    suffix: str | None = None
    images: list[str] | None = None
    keep_alive: Any = None


class ModelBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    name: str | None = None  # older clients' spelling
    stream: bool = True

    def ref(self) -> str:
        ref = self.model or self.name
        if not ref:
            raise InvalidRequestError("the request names no model", hint='send {"model": "<id>"}')
        return strip_tag(ref)


def strip_tag(model: str) -> str:
    return model[: -len(":latest")] if model.endswith(":latest") else model


def error_response(metrics: Metrics, error: ExoctlError) -> JSONResponse:
    status, error_type = classify(error)
    metrics.errors.labels(error_type).inc()
    return JSONResponse({"error": str(error)}, status_code=status)


def sampling(options: dict[str, Any] | None) -> SamplingRequest:
    """Ollama's `options` as sampling: num_predict (-1, -2: as far as the context goes), temperature,
    top_k, top_p, min_p, seed, stop, repeat_penalty and the OpenAI penalties; the rest (num_ctx,
    num_thread, ...) belong to Ollama's own runner and are left alone."""
    o = options or {}
    predict = o.get("num_predict")
    stop = o.get("stop") or ()
    if isinstance(stop, str):
        stop = (stop,)
    try:
        return SamplingRequest(
            temperature=None if o.get("temperature") is None else float(o["temperature"]),
            top_k=None if o.get("top_k") is None else max(int(o["top_k"]), 0),
            top_p=None if o.get("top_p") is None else float(o["top_p"]),
            min_p=None if o.get("min_p") is None else float(o["min_p"]),
            seed=None if o.get("seed") is None else int(o["seed"]),
            max_tokens=int(predict) if predict is not None and int(predict) > 0 else None,
            stop=tuple(str(s) for s in stop),
            repetition_penalty=None if o.get("repeat_penalty") is None else float(o["repeat_penalty"]),
            frequency_penalty=float(o.get("frequency_penalty") or 0.0),
            presence_penalty=float(o.get("presence_penalty") or 0.0),
        )
    except (TypeError, ValueError) as exc:
        raise InvalidRequestError(f"bad options: {exc}") from None


def format_grammar(shape: str | dict[str, Any] | None) -> str | None:
    if shape is None or shape == "":
        return None
    if shape == "json":
        return response_format_grammar({"type": "json_object"})
    if isinstance(shape, dict):
        return schema_grammar(closed_objects(shape), "format's JSON schema")
    raise InvalidRequestError(f"unknown format {shape!r}", hint='use "json" or a JSON schema')


def chat_messages(body: ChatBody) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    pending: list[str] = []  # ids given to the calls of the last assistant turn, for the tool answers
    for index, message in enumerate(body.messages):
        if message.images:
            raise InvalidRequestError(f"message {index} has images: this model reads text only")
        if message.role not in ("system", "user", "assistant", "tool"):
            raise InvalidRequestError(f"message {index} has role {message.role!r}")
        entry: dict[str, Any] = {"role": message.role, "content": message.content}
        if message.tool_calls:
            pending = [f"call_{index}_{i}" for i in range(len(message.tool_calls))]
            entry["tool_calls"] = [
                {
                    "id": pending[i],
                    "type": "function",
                    "function": {
                        "name": str(call.get("function", {}).get("name", "")),
                        "arguments": call.get("function", {}).get("arguments") or {},
                    },
                }
                for i, call in enumerate(message.tool_calls)
            ]
        if message.role == "tool":
            entry["tool_call_id"] = pending.pop(0) if pending else ""
            if message.tool_name:
                entry["name"] = message.tool_name
        out.append(entry)
    if not out:
        raise InvalidRequestError("a chat needs at least one message")
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def durations(result: Completion) -> dict[str, Any]:
    t = result.timings
    return {
        "total_duration": int(t.total_s * 1e9),
        "load_duration": 0,
        "prompt_eval_count": result.prompt_tokens,
        "prompt_eval_duration": int(t.time_to_first_token_s * 1e9),
        "eval_count": result.completion_tokens,
        "eval_duration": int(max(t.total_s - t.time_to_first_token_s, 0) * 1e9),
    }


def ollama_call(call: ToolCall) -> dict[str, Any]:
    return {"function": {"name": call.name, "arguments": json.loads(call.arguments)}}


def digest(card: ModelCard) -> str:
    return hashlib.sha256(f"{card.id}:{card.hf_repo}".encode()).hexdigest()


def details(card: ModelCard, dtype: str | None = None) -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf" if card.gguf_layers or card.native_dtype else "safetensors",
        "family": family(card),
        "families": [family(card)],
        "parameter_size": parameter_size(card.parameters),
        "quantization_level": (dtype or card.storage_dtype).upper(),
    }


def parameter_size(count: int) -> str:
    if count >= 10**9:
        return f"{count / 10**9:.1f}B"
    return f"{count / 10**6:.0f}M"


class OllamaGeneration:
    """One /api/chat or /api/generate: the run, and its answer as Ollama's lines."""

    def __init__(
        self, service: ClusterService, metrics: Metrics, model: str, stream: bool, kind: str
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.model = model
        self.stream = stream
        self.kind = kind  # "chat" or "generate"

    def _line(self, text: str, done: bool, **extra: Any) -> dict[str, Any]:
        if self.kind == "chat":
            body: dict[str, Any] = {
                "message": {"role": "assistant", "content": text, **extra.pop("message", {})}
            }
        else:
            extra.pop("message", None)
            body = {"response": text}
        return {"model": self.model, "created_at": now(), **body, "done": done, **extra}

    def _last(self, result: Completion, text: str, calls: list[ToolCall]) -> dict[str, Any]:
        reason = "length" if result.finish_reason == "length" else "stop"
        message = {"tool_calls": [ollama_call(c) for c in calls]} if calls else {}
        extra: dict[str, Any] = {"done_reason": reason, **durations(result), "message": message}
        if self.kind == "generate":
            extra["context"] = []
        return self._line(text, True, **extra)

    async def respond(self, job: Job, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        try:
            job.check()
        except ExoctlError as exc:
            return error_response(self.metrics, exc)
        run = GenerationRun(self.service, job)

        def finished(done: Finished) -> Response:
            self.metrics.completed(run.model_id, done.result)
            return JSONResponse(self._last(done.result, *run.answer(done.result.text)))

        stream = (lambda: self._lines(run)) if self.stream else None
        return await respond(
            run, disconnected, lambda e: error_response(self.metrics, e), finished, stream, media_type=NDJSON
        )

    async def _lines(self, run: GenerationRun) -> AsyncIterator[str]:
        try:
            while True:
                match await run.next():
                    case Delta(text, _):
                        shown = run.tools.feed(text) if run.tools is not None else text
                        if shown:
                            yield json.dumps(self._line(shown, False), ensure_ascii=False) + "\n"
                    case Done(result):
                        self.metrics.completed(run.model_id, result)
                        rest, calls = run.tools.finish() if run.tools is not None else ("", [])
                        yield json.dumps(self._last(result, rest, calls), ensure_ascii=False) + "\n"
                        break
                    case Failed(error):
                        _, error_type = classify(error)
                        self.metrics.errors.labels(error_type).inc()
                        yield json.dumps({"error": str(error)}) + "\n"
                        break
        finally:
            run.cancel()


def ollama_routes(service: ClusterService, metrics: Metrics) -> APIRouter:
    app = APIRouter()

    @app.get("/api/version")
    async def version() -> dict[str, str]:
        return {"version": __version__}

    @app.post("/api/chat")
    async def chat(body: ChatBody, request: Request) -> Response:
        model = strip_tag(body.model)
        try:
            tools = None
            if body.tools:
                tools = Tools([{"type": "function", "function": t.get("function", t)} for t in body.tools])
            job = Job(
                model,
                sampling(body.options),
                messages=chat_messages(body),
                tools=tools,
                answer_grammar=format_grammar(body.format),
            )
        except ExoctlError as exc:
            return error_response(metrics, exc)
        generation = OllamaGeneration(service, metrics, body.model, body.stream, "chat")
        return await generation.respond(job, request.is_disconnected)

    @app.post("/api/generate")
    async def generate(body: GenerateBody, request: Request) -> Response:
        model = strip_tag(body.model)
        if not body.prompt:  # Ollama's way to load a model: answer that it is there
            try:
                await run_in_threadpool(lambda: service.instance_for(model, service.statuses()))
            except ExoctlError as exc:
                return error_response(metrics, exc)
            line = {
                "model": body.model,
                "created_at": now(),
                "response": "",
                "done": True,
                "done_reason": "load",
            }
            return (
                JSONResponse(line)
                if not body.stream
                else StreamingResponse(iter([json.dumps(line) + "\n"]), media_type=NDJSON)
            )
        try:
            if body.images:
                raise InvalidRequestError("the request has images: this model reads text only")
            if body.suffix:
                raise InvalidRequestError(
                    "suffix (fill-in-the-middle) is not supported: send the prompt alone"
                )
            grammar = format_grammar(body.format)
            if body.raw:
                job = Job(model, sampling(body.options), prompt=body.prompt, answer_grammar=grammar)
            else:  # the model's chat template around the prompt, as Ollama's own template does
                messages = [{"role": "system", "content": body.system}] if body.system else []
                messages.append({"role": "user", "content": body.prompt})
                job = Job(model, sampling(body.options), messages=messages, answer_grammar=grammar)
        except ExoctlError as exc:
            return error_response(metrics, exc)
        generation = OllamaGeneration(service, metrics, body.model, body.stream, "generate")
        return await generation.respond(job, request.is_disconnected)

    @app.get("/api/tags")
    async def tags() -> dict[str, Any]:
        entries = await run_in_threadpool(service.models)
        models = [
            {
                "name": card.id,
                "model": card.id,
                "modified_at": now(),
                "size": card.storage_bytes,
                "digest": digest(card),
                "details": details(card),
            }
            for card, local, placed in entries
            if local or placed
        ]
        return {"models": models}

    @app.post("/api/show")
    async def show(body: ModelBody) -> Response:
        try:
            card, _ = await run_in_threadpool(service.reference, body.ref())
        except ExoctlError as exc:
            return error_response(metrics, exc)
        info = {
            "general.architecture": card.architecture,
            "general.parameter_count": card.parameters,
            "general.basename": card.name,
            f"{card.architecture}.block_count": card.n_layers,
            f"{card.architecture}.context_length": card.context_length,
            f"{card.architecture}.embedding_length": card.hidden_size,
            f"{card.architecture}.attention.head_count": card.num_attention_heads,
            f"{card.architecture}.attention.head_count_kv": card.num_key_value_heads,
        }
        return JSONResponse(
            {
                "modelfile": f"# exoctl serves {card.id} ({card.hf_repo})\nFROM {card.hf_repo}\n",
                "parameters": "",
                "template": "",
                "details": details(card),
                "model_info": info,
                "capabilities": ["completion", "tools"],
                "modified_at": now(),
            }
        )

    @app.get("/api/ps")
    async def ps() -> dict[str, Any]:
        statuses = await run_in_threadpool(service.statuses)
        models = []
        for view in instances_of(statuses).values():
            if not view.serving:
                continue
            try:
                card, _ = service.reference(view.model_id)
                detail = details(card, view.dtype)
                digest_of = digest(card)
            except ExoctlError:
                detail, digest_of = {}, ""
            memory = sum(r.memory_bytes for r in view.runners.values())
            models.append(
                {
                    "name": view.model_id,
                    "model": view.model_id,
                    "size": memory,
                    "digest": digest_of,
                    "details": detail,
                    "expires_at": FOREVER,
                    "size_vram": 0,
                    # exoctl's own: where it runs
                    "instance_id": view.instance_id,
                    "sharding": view.sharding,
                    "nodes": list(view.nodes),
                }
            )
        return {"models": models}

    @app.post("/api/pull")
    async def pull(body: ModelBody) -> Response:
        try:
            ref = body.ref()
        except ExoctlError as exc:
            return error_response(metrics, exc)
        return await Pull(service, metrics, ref, body.stream).respond()

    return app


class Pull:
    """`/api/pull`: the model's files onto the nodes `place` would give it (as `exoctl download`),
    reported as Ollama's progress lines (status, total and completed bytes) until "success"."""

    def __init__(self, service: ClusterService, metrics: Metrics, ref: str, stream: bool) -> None:
        self.service = service
        self.metrics = metrics
        self.ref = ref
        self.stream = stream
        self.lines: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    async def respond(self) -> Response:
        loop = asyncio.get_running_loop()

        def progress(reports: dict[str, DownloadReport]) -> None:
            total = sum(r.total for r in reports.values())
            done = sum(r.downloaded for r in reports.values())
            line = {"status": f"pulling {self.ref}", "digest": self.ref, "total": total, "completed": done}
            loop.call_soon_threadsafe(self.lines.put_nowait, line)

        def work() -> dict[str, Any]:
            try:
                reports = self.service.pull(self.ref, progress)
            except ExoctlError as exc:
                return {"error": str(exc), "status_code": classify(exc)[0]}
            failed = [f"{node}: {r.error}" for node, r in reports.items() if r.state == "failed"]
            if failed:
                return {"error": "; ".join(failed), "status_code": 502}
            return {"status": "success"}

        async def run() -> dict[str, Any]:
            await self.lines.put({"status": "pulling manifest"})
            last = await run_in_threadpool(work)
            await self.lines.put(last)
            await self.lines.put(None)
            return last

        task = asyncio.create_task(run())
        if not self.stream:
            last = await task
            status = int(last.pop("status_code", 200))
            return JSONResponse(last, status_code=status)
        return StreamingResponse(self._stream(task), media_type=NDJSON)

    async def _stream(self, task: asyncio.Task[dict[str, Any]]) -> AsyncIterator[str]:
        while True:
            line = await self.lines.get()
            if line is None:
                break
            line.pop("status_code", None)
            yield json.dumps(line) + "\n"
        await task
