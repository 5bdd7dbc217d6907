"""`POST /v1/responses`: OpenAI's Responses API, as EXO serves it and newer OpenAI clients and agent
SDKs speak it.

`input` as text or items (messages with input_text/output_text parts, function_call and
function_call_output items), `instructions`, function tools and `tool_choice`, `text.format` (a JSON
schema or object, constrained), `max_output_tokens`; the answer as output items (a message with
output_text, function_call items) and usage; streamed as the API's typed events. A response is kept
in memory (the last MAX_STORED) so a later request may continue it with `previous_response_id`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from exoctl.api.generation_run import Delta, Done, Failed, Finished, GenerationRun, Job, Tools, respond
from exoctl.api.metrics import Metrics
from exoctl.api.openai_chat import error_response, stream_error
from exoctl.api.schemas import MAX_MODEL_CHARS
from exoctl.api.service import ClusterService
from exoctl.api.structured import response_format_grammar
from exoctl.api.tool_calls import ToolCall
from exoctl.errors import InvalidRequestError
from exoctl.wire.answer import Completion
from exoctl.wire.sampling_params import SamplingRequest

MAX_STORED = 256  # responses kept for previous_response_id (their conversations, in memory)


class ResponsesRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    previous_response_id: str | None = None
    store: bool = True


class Stored:
    """Conversations of earlier responses, for `previous_response_id` (oldest dropped first)."""

    def __init__(self) -> None:
        self.conversations: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def keep(self, response_id: str, conversation: list[dict[str, Any]]) -> None:
        self.conversations[response_id] = conversation
        while len(self.conversations) > MAX_STORED:
            self.conversations.popitem(last=False)

    def get(self, response_id: str) -> list[dict[str, Any]]:
        found = self.conversations.get(response_id)
        if found is None:
            raise InvalidRequestError(
                f"previous_response_id {response_id[:80]!r} names no response this server keeps",
                hint=f"it keeps the last {MAX_STORED}, and none after a restart: send the whole conversation",
            )
        return found


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise InvalidRequestError("a message's content must be text or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in ("input_text", "output_text", "text"):
            raise InvalidRequestError(f"a {kind!r} content part: this model reads text only")
        parts.append(str(part.get("text", "")))
    return "".join(parts)


def input_messages(items: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as chat templates read it: function_call items are an assistant's tool_calls
    (consecutive ones in one turn), function_call_output items tool turns."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    out: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise InvalidRequestError(f"an input message has role {role!r}")
            out.append(
                {"role": "system" if role == "developer" else role, "content": _text(item.get("content"))}
            )
        elif kind == "function_call":
            arguments = item.get("arguments") or "{}"
            try:
                parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
            except json.JSONDecodeError:
                parsed = arguments
            call = {
                "id": str(item.get("call_id", "")),
                "type": "function",
                "function": {"name": str(item.get("name", "")), "arguments": parsed},
            }
            if out and out[-1]["role"] == "assistant" and out[-1].get("tool_calls") is not None:
                out[-1]["tool_calls"].append(call)
            else:
                out.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output", "")
            text = output if isinstance(output, str) else _text(output)
            out.append({"role": "tool", "tool_call_id": str(item.get("call_id", "")), "content": text})
        else:
            raise InvalidRequestError(f"input item type {kind!r} is not supported here")
    return out


def response_tools(body: ResponsesRequest) -> Tools | None:
    if not body.tools:
        return None
    specs = []
    for tool in body.tools:
        if tool.get("type") != "function":
            raise InvalidRequestError(
                f"tool type {tool.get('type')!r} is not supported: exoctl runs function tools only"
            )
        function = {k: tool[k] for k in ("name", "description", "parameters", "strict") if k in tool}
        specs.append({"type": "function", "function": function})
    choice = body.tool_choice or "auto"
    if isinstance(choice, dict):
        return Tools(specs, "required", str(choice.get("name", "")))
    if choice not in ("auto", "required", "none"):
        raise InvalidRequestError(
            f"unknown tool_choice {choice!r}", hint="use auto, required, none or a function"
        )
    return Tools(specs, choice)  # type: ignore[arg-type]


def answer_grammar(body: ResponsesRequest) -> str | None:
    shape = (body.text or {}).get("format")
    if shape is None:
        return None
    if shape.get("type") == "json_schema":  # the Responses API's flat shape, as chat's nested one
        spec = {"name": shape.get("name"), "schema": shape.get("schema"), "strict": shape.get("strict")}
        return response_format_grammar({"type": "json_schema", "json_schema": spec})
    return response_format_grammar(shape)


class OpenAIResponse:
    def __init__(
        self, service: ClusterService, metrics: Metrics, body: ResponsesRequest, stored: Stored
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.body = body
        self.stored = stored
        self.id = f"resp_{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.sequence = 0
        self.conversation: list[dict[str, Any]] = []

    def _job(self) -> Job:
        body = self.body
        earlier = self.stored.get(body.previous_response_id) if body.previous_response_id else []
        self.conversation = [*earlier, *input_messages(body.input)]
        messages = list(self.conversation)
        if body.instructions:  # not carried over to a continued response (as OpenAI's)
            messages.insert(0, {"role": "system", "content": body.instructions})
        sampling = SamplingRequest(
            temperature=body.temperature, top_p=body.top_p, max_tokens=body.max_output_tokens
        )
        job = Job(
            body.model,
            sampling,
            messages=messages,
            tools=response_tools(body),
            answer_grammar=answer_grammar(body),
        )
        job.check()
        return job

    async def respond(self, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        run = GenerationRun(self.service, self._job())

        def finished(done: Finished) -> Response:
            self.metrics.completed(run.model_id, done.result)
            return JSONResponse(self._finished(done.result, *run.answer(done.result.text)))

        stream = (lambda: self._stream(run)) if self.body.stream else None
        return await respond(run, disconnected, lambda e: error_response(self.metrics, e), finished, stream)

    def _message(self, item_id: str, text: str, status: str) -> dict[str, Any]:
        return {
            "type": "message",
            "id": item_id,
            "status": status,
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}],
        }

    @staticmethod
    def _call(call: ToolCall) -> dict[str, Any]:
        return {
            "type": "function_call",
            "id": f"fc_{call.id[5:]}",
            "call_id": call.id,
            "name": call.name,
            "arguments": call.arguments,
            "status": "completed",
        }

    def _document(
        self, status: str, output: list[dict[str, Any]], result: Completion | None
    ) -> dict[str, Any]:
        body = self.body
        doc: dict[str, Any] = {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "model": body.model,
            "output": output,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "tools": body.tools or [],
            "tool_choice": body.tool_choice or "auto",
            "parallel_tool_calls": body.parallel_tool_calls,
            "previous_response_id": body.previous_response_id,
            "text": body.text or {"format": {"type": "text"}},
            "error": None,
            "incomplete_details": None,
            "usage": None,
        }
        if result is not None:
            if result.finish_reason == "length":
                doc["status"] = "incomplete"
                doc["incomplete_details"] = {"reason": "max_output_tokens"}
            doc["usage"] = {
                "input_tokens": result.prompt_tokens,
                "output_tokens": result.completion_tokens,
                "total_tokens": result.total_tokens,
                "input_tokens_details": {"cached_tokens": result.cached_tokens},
                "output_tokens_details": {"reasoning_tokens": 0},
            }
        return doc

    def _finished(
        self, result: Completion, text: str, calls: list[ToolCall], item_id: str = ""
    ) -> dict[str, Any]:
        output = []
        if text or not calls:
            output.append(self._message(item_id or f"msg_{uuid.uuid4().hex}", text, "completed"))
        output += [self._call(c) for c in calls]
        if self.body.store:
            answer: dict[str, Any] = {"role": "assistant", "content": text}
            if calls:
                answer["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": json.loads(c.arguments)},
                    }
                    for c in calls
                ]
            self.stored.keep(self.id, [*self.conversation, answer])
        return self._document("completed", output, result)

    def _event(self, kind: str, **fields: Any) -> str:
        self.sequence += 1
        data = {"type": kind, "sequence_number": self.sequence, **fields}
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    async def _stream(self, run: GenerationRun) -> AsyncIterator[str]:
        item_id = f"msg_{uuid.uuid4().hex}"
        opened = False
        text = ""

        def text_events(piece: str) -> list[str]:
            """The events of a piece of text: the message item opened first, at the first text."""
            nonlocal opened, text
            events = [] if opened else self._open(item_id)
            opened = True
            text += piece
            delta = self._event(
                "response.output_text.delta",
                item_id=item_id,
                output_index=0,
                content_index=0,
                delta=piece,
                logprobs=[],
            )
            return [*events, delta]

        try:
            yield self._event("response.created", response=self._document("in_progress", [], None))
            yield self._event("response.in_progress", response=self._document("in_progress", [], None))
            while True:
                match await run.next():
                    case Delta(delta, _):
                        shown = run.tools.feed(delta) if run.tools is not None else delta
                        for event in text_events(shown) if shown else []:
                            yield event
                    case Done(result):
                        self.metrics.completed(run.model_id, result)
                        rest, calls = run.tools.finish() if run.tools is not None else ("", [])
                        for event in text_events(rest) if rest else []:
                            yield event
                        if not opened and not calls:
                            opened = True
                            for event in self._open(item_id):
                                yield event
                        index = 0
                        if opened:
                            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
                            yield self._event(
                                "response.output_text.done",
                                item_id=item_id,
                                output_index=0,
                                content_index=0,
                                text=text,
                                logprobs=[],
                            )
                            yield self._event(
                                "response.content_part.done",
                                item_id=item_id,
                                output_index=0,
                                content_index=0,
                                part=part,
                            )
                            yield self._event(
                                "response.output_item.done",
                                output_index=0,
                                item=self._message(item_id, text, "completed"),
                            )
                            index = 1
                        for offset, call in enumerate(calls):
                            item = self._call(call)
                            at = index + offset
                            yield self._event(
                                "response.output_item.added",
                                output_index=at,
                                item={**item, "arguments": "", "status": "in_progress"},
                            )
                            yield self._event(
                                "response.function_call_arguments.delta",
                                item_id=item["id"],
                                output_index=at,
                                delta=call.arguments,
                            )
                            yield self._event(
                                "response.function_call_arguments.done",
                                item_id=item["id"],
                                output_index=at,
                                name=call.name,
                                arguments=call.arguments,
                            )
                            yield self._event("response.output_item.done", output_index=at, item=item)
                        done = self._finished(result, text, calls, item_id)
                        kind = (
                            "response.completed" if done["status"] == "completed" else "response.incomplete"
                        )
                        yield self._event(kind, response=done)
                        break
                    case Failed(error):
                        body = stream_error(self.metrics, error)
                        yield self._event(
                            "error", code=body["error"].get("code"), message=body["error"]["message"]
                        )
                        break
        finally:
            run.cancel()

    def _open(self, item_id: str) -> list[str]:
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            self._event(
                "response.output_item.added",
                output_index=0,
                item={**self._message(item_id, "", "in_progress"), "content": []},
            ),
            self._event(
                "response.content_part.added", item_id=item_id, output_index=0, content_index=0, part=part
            ),
        ]
