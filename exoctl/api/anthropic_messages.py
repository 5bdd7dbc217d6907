"""`POST /v1/messages`: Anthropic's Messages API, as coding agents and the `anthropic` client speak it.

A system prompt, content blocks (text, `tool_use`, `tool_result`), tools with an `input_schema` and
`tool_choice` (auto, any, tool, none), stop sequences, and the answer as content blocks with its
stop reason and usage; streamed as Anthropic's events (message_start, content_block_start/delta/stop,
message_delta, message_stop). The generation is a `GenerationRun`, as every API's; errors keep
Anthropic's envelope (`{"type": "error", "error": {...}}`).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Literal

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from exoctl.api.errors import classify
from exoctl.api.generation_run import Delta, Done, Failed, Finished, GenerationRun, Job, Tools, respond
from exoctl.api.metrics import Metrics
from exoctl.api.schemas import MAX_MODEL_CHARS
from exoctl.api.service import ClusterService
from exoctl.api.structured import closed_objects, schema_grammar
from exoctl.api.tool_calls import ToolCall
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire.answer import Completion
from exoctl.wire.sampling_params import SamplingRequest


class AnthropicMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class AnthropicTool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class MessagesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    max_tokens: int = Field(ge=1)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = Field(default=None, max_length=4)
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    stream: bool = False
    tools: list[AnthropicTool] | None = None
    tool_choice: dict[str, Any] | None = None
    # structured outputs: {"format": {"type": "json_schema", "schema": {...}}}
    output_config: dict[str, Any] | None = None

    def answer_grammar(self) -> str | None:
        shape = (self.output_config or {}).get("format")
        if shape is None:
            return None
        if not isinstance(shape, dict) or shape.get("type") != "json_schema":
            raise InvalidRequestError("output_config.format must be {type: json_schema, schema: {...}}")
        # Anthropic's structured outputs are strict: an object takes the properties it names
        return schema_grammar(closed_objects(shape.get("schema")), "output_config.format's JSON schema")


def _text(blocks: str | list[dict[str, Any]], where: str) -> str:
    """The text of content that may only hold text (a system prompt, a tool's result)."""
    if isinstance(blocks, str):
        return blocks
    parts = []
    for block in blocks:
        if block.get("type") != "text":
            raise InvalidRequestError(
                f"{where} has a {block.get('type')!r} block: this model reads text only"
            )
        parts.append(str(block.get("text", "")))
    return "".join(parts)


def template_messages(body: MessagesRequest) -> list[dict[str, Any]]:
    """The conversation as chat templates read it: tool_use blocks are an assistant's tool_calls,
    tool_result blocks tool turns."""
    out: list[dict[str, Any]] = []
    if body.system:
        out.append({"role": "system", "content": _text(body.system, "system")})
    for index, message in enumerate(body.messages):
        where = f"messages.{index}.content"
        if isinstance(message.content, str):
            out.append({"role": message.role, "content": message.content})
            continue
        texts, calls = [], []
        for block in message.content:
            kind = block.get("type")
            if kind == "text":
                texts.append(str(block.get("text", "")))
            elif kind == "tool_use" and message.role == "assistant":
                arguments = block.get("input") or {}
                call = {"name": str(block.get("name", "")), "arguments": arguments}
                calls.append({"id": str(block.get("id", "")), "type": "function", "function": call})
            elif kind == "tool_result" and message.role == "user":
                content = block.get("content", "")
                result = _text(content, where) if isinstance(content, (str, list)) else str(content)
                out.append(
                    {"role": "tool", "tool_call_id": str(block.get("tool_use_id", "")), "content": result}
                )
            else:
                raise InvalidRequestError(
                    f"{where} has a {kind!r} block: this model reads text, tool_use and tool_result",
                )
        if texts or calls:
            entry: dict[str, Any] = {"role": message.role, "content": "".join(texts)}
            if calls:
                entry["tool_calls"] = calls
            out.append(entry)
    return out


def anthropic_tools(body: MessagesRequest) -> Tools | None:
    if not body.tools:
        return None
    specs = [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
        }
        for t in body.tools
    ]
    choice = body.tool_choice or {"type": "auto"}
    kind = choice.get("type")
    if kind == "tool":
        return Tools(specs, "required", str(choice.get("name", "")))
    if kind in ("auto", "any", "none"):
        return Tools(specs, "required" if kind == "any" else kind)
    raise InvalidRequestError(f"unknown tool_choice type {kind!r}", hint="use auto, any, tool or none")


def messages_job(body: MessagesRequest) -> Job:
    sampling = SamplingRequest(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        max_tokens=body.max_tokens,
        stop=tuple(body.stop_sequences or ()),
    )
    job = Job(
        body.model,
        sampling,
        messages=template_messages(body),
        tools=anthropic_tools(body),
        answer_grammar=body.answer_grammar(),
    )
    job.check()
    return job


def error_body(error: ExoctlError) -> tuple[int, dict[str, Any]]:
    status, error_type = classify(error)
    message = error.message + (f" ({error.hint})" if error.hint else "")
    return status, {"type": "error", "error": {"type": error_type, "message": message}}


def stop_reason(result: Completion, calls: list[ToolCall]) -> tuple[str, str | None]:
    if calls:
        return "tool_use", None
    if result.finish_reason == "length":
        return "max_tokens", None
    if result.stop_string is not None:
        return "stop_sequence", result.stop_string
    return "end_turn", None


def tool_use(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": f"toolu_{call.id[5:]}",
        "name": call.name,
        "input": json.loads(call.arguments),
    }


def sse_event(kind: str, data: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data}, ensure_ascii=False)}\n\n"


class AnthropicMessages:
    def __init__(self, service: ClusterService, metrics: Metrics, body: MessagesRequest) -> None:
        self.service = service
        self.metrics = metrics
        self.body = body
        self.id = f"msg_{uuid.uuid4().hex[:24]}"

    def _error(self, error: ExoctlError) -> JSONResponse:
        status, body = error_body(error)
        self.metrics.errors.labels(body["error"]["type"]).inc()
        return JSONResponse(body, status_code=status)

    async def respond(self, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        try:
            job = messages_job(self.body)
        except ExoctlError as exc:
            return self._error(exc)
        run = GenerationRun(self.service, job)

        def finished(done: Finished) -> Response:
            result = done.result
            self.metrics.completed(run.model_id, result)
            text, calls = run.answer(result.text)
            content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text or not calls else []
            content += [tool_use(c) for c in calls]
            reason, sequence = stop_reason(result, calls)
            return JSONResponse(self._message(content, reason, sequence, result))

        stream = (lambda: self._stream(run)) if self.body.stream else None
        return await respond(run, disconnected, self._error, finished, stream)

    def _message(
        self,
        content: list[dict[str, Any]],
        reason: str | None,
        sequence: str | None,
        result: Completion | None,
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.body.model,
            "content": content,
            "stop_reason": reason,
            "stop_sequence": sequence,
            "usage": {
                "input_tokens": result.prompt_tokens if result else 0,
                "output_tokens": result.completion_tokens if result else 0,
                "cache_read_input_tokens": result.cached_tokens if result else 0,
            },
        }

    async def _stream(self, run: GenerationRun) -> AsyncIterator[str]:
        block = -1  # the index of the open text block (-1: none yet)

        def text(piece: str) -> list[str]:
            """The events of a text delta: the text block opened first, at the first text."""
            nonlocal block
            events = []
            if block < 0:
                block = 0
                start = {"index": 0, "content_block": {"type": "text", "text": ""}}
                events.append(sse_event("content_block_start", start))
            delta = {"index": 0, "delta": {"type": "text_delta", "text": piece}}
            return [*events, sse_event("content_block_delta", delta)]

        try:
            yield sse_event("message_start", {"message": self._message([], None, None, None)})
            while True:
                match await run.next():
                    case Delta(delta, _):
                        shown = run.tools.feed(delta) if run.tools is not None else delta
                        for event in text(shown) if shown else []:
                            yield event
                    case Done(result):
                        self.metrics.completed(run.model_id, result)
                        rest, calls = run.tools.finish() if run.tools is not None else ("", [])
                        for event in text(rest) if rest else []:
                            yield event
                        if block >= 0:
                            yield sse_event("content_block_stop", {"index": block})
                        for offset, call in enumerate(calls):
                            index = block + 1 + offset
                            start = {**tool_use(call), "input": {}}
                            yield sse_event("content_block_start", {"index": index, "content_block": start})
                            json_delta = {"type": "input_json_delta", "partial_json": call.arguments}
                            yield sse_event("content_block_delta", {"index": index, "delta": json_delta})
                            yield sse_event("content_block_stop", {"index": index})
                        reason, sequence = stop_reason(result, calls)
                        yield sse_event(
                            "message_delta",
                            {
                                "delta": {"stop_reason": reason, "stop_sequence": sequence},
                                "usage": {"output_tokens": result.completion_tokens},
                            },
                        )
                        yield sse_event("message_stop", {})
                        break
                    case Failed(error):
                        _, body = error_body(error)
                        yield f"event: error\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"
                        break
        finally:
            run.cancel()
