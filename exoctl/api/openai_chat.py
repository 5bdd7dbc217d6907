"""`POST /v1/chat/completions`: OpenAI's chat completion, one JSON answer or a server-sent stream.

The generation runs on a thread of its own (its ZeroMQ sockets stay in that thread from start to
end) and hands typed events to the event loop through an asyncio queue. Errors use OpenAI's
envelope, also inside a stream; a client that goes away cancels the generation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse

from exoctl.api.errors import classify, error_body, exoctl_error_response
from exoctl.api.metrics import Metrics
from exoctl.api.schemas import ChatRequest, NamedToolChoice
from exoctl.api.service import ClusterService
from exoctl.api.tool_calls import ToolStream, forced_prefix
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire.answer import Completion
from exoctl.wire.chat_options import ChatOptions
from exoctl.wire.sampling_params import (
    SamplingDefaults,
    SamplingParamError,
    SamplingParams,
    SamplingRequest,
)

DISCONNECT_CHECK_S = 0.5  # how often a non-streamed answer checks that its client is still there


@dataclass(frozen=True)
class Started:
    model: str  # the id of the instance's model


@dataclass(frozen=True)
class Delta:
    text: str
    logprobs: list[dict[str, Any]]  # OpenAI's entries for the tokens of this text


@dataclass(frozen=True)
class Done:
    result: Completion


@dataclass(frozen=True)
class Failed:
    error: ExoctlError


Event = Started | Delta | Done | Failed


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def request_params(body: ChatRequest) -> SamplingRequest:
    """What the request set; what it leaves out comes from the model's own defaults, as vLLM
    does (SamplingRequest.resolve: greedy and DEFAULT_MAX_TOKENS where the model declares none).
    max_completion_tokens over the older max_tokens. top_k, min_p and repetition_penalty are
    vLLM's extensions (top_k -1 or 0: off)."""
    return SamplingRequest(
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=None if body.top_k is None else max(body.top_k, 0),
        min_p=body.min_p,
        seed=body.seed,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        stop=tuple(body.stops()),
        frequency_penalty=body.frequency_penalty or 0.0,
        presence_penalty=body.presence_penalty or 0.0,
        repetition_penalty=body.repetition_penalty,
        logprobs=(body.top_logprobs or 0) if body.logprobs else None,
    )


def resolve_params(asked: SamplingRequest, defaults: SamplingDefaults | None) -> SamplingParams:
    try:
        return asked.resolve(defaults)
    except SamplingParamError as exc:
        raise InvalidRequestError(str(exc)) from None


def chat_options(body: ChatRequest, tool_format: str | None) -> tuple[ChatOptions, str]:
    """What the head needs for the request's tools, and the forced start of the answer (also the
    start of the text the calls are read from)."""
    tools = body.tool_specs()
    if tools is None:
        return ChatOptions(), ""
    if tool_format is None:
        raise InvalidRequestError(
            "this model's chat template takes no tools", hint="send the request without 'tools'"
        )
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    if named is not None and named not in body.tool_names():
        raise InvalidRequestError(
            f"tool_choice names function {named!r}, which is not among the tools",
            hint=f"tools: {', '.join(sorted(body.tool_names()))}",
        )
    prefix = forced_prefix(tool_format, named) if (choice == "required" or named) else ""
    return ChatOptions(tools=tools, prefix=prefix, special=True), prefix


def usage(result: Completion) -> dict[str, Any]:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.total_tokens,
        # OpenAI's: the prompt tokens a cached prefix served (not computed again)
        "prompt_tokens_details": {"cached_tokens": result.cached_tokens},
    }


def finish_reason(result: Completion) -> str:
    return "length" if result.finish_reason == "length" else "stop"


class ChatCompletion:
    """One request: its generation thread, and the answer shaped from what the thread reports."""

    def __init__(self, service: ClusterService, metrics: Metrics, body: ChatRequest) -> None:
        self.service = service
        self.metrics = metrics
        self.body = body
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = ""  # the instance's model id (metrics); answers name the model as asked
        self.tools: ToolStream | None = None
        self.logprobs: list[dict[str, Any]] = []  # entries not yet sent
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.cancel = threading.Event()

    async def respond(self, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        """The answer; `disconnected` tells whether the client went away (its generation is then
        cancelled, streamed or not)."""
        params = request_params(self.body)
        resolve_params(params, None)  # a bad value is refused before any node is asked
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._generate, args=(loop, params), name=f"chat-{self.id[-8:]}")
        thread.daemon = True
        thread.start()
        event = await self.events.get()
        if isinstance(event, Failed):
            return self._error(event.error)
        assert isinstance(event, Started)
        self.model = event.model
        if self.body.stream:
            headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
            return StreamingResponse(self._stream(), media_type="text/event-stream", headers=headers)
        checked = time.monotonic()
        while True:
            try:
                got: Event | None = await asyncio.wait_for(self.events.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                got = None
            if time.monotonic() - checked >= DISCONNECT_CHECK_S:  # deltas come faster than that
                checked = time.monotonic()
                if await disconnected():
                    self.cancel.set()  # the generating thread cancels at its next token
                    return Response(status_code=499)
            match got:
                case Delta(_, logprobs):
                    self.logprobs += logprobs
                case Failed(error):
                    return self._error(error)
                case Done(result):
                    self.metrics.completed(self.model, result)
                    return JSONResponse(self._answer(result))

    def _generate(self, loop: asyncio.AbstractEventLoop, asked: SamplingRequest) -> None:
        def put(event: Event) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        try:
            with self.service.cluster() as cluster:
                messages = self.body.chat_messages()
                view = self.service.instance_for(self.body.model, cluster.statuses())
                head = view.runners.get(view.head)
                tool_format = head.tool_format if head is not None else None
                options, prefix = chat_options(self.body, tool_format)
                if options.tools is not None:
                    self.tools = ToolStream(tool_format, self.body.tool_names(), prefix)
                params = resolve_params(asked, view.sampling_defaults)
                generation = cluster.generate(
                    view,
                    params,
                    messages=messages,
                    chat=options,
                    cache_prompt=self.body.cache_prompt,
                    speculative=self.body.speculative,
                )
                put(Started(view.model_id))
                for text, logprobs in generation.deltas():
                    if text or logprobs:
                        put(Delta(text, logprobs))
                    if self.cancel.is_set():
                        generation.cancel()
                        return
                assert generation.result is not None
                put(Done(generation.result))
        except ExoctlError as exc:
            put(Failed(exc))
        except Exception as exc:  # the stream must end even on a bug
            put(Failed(ExoctlError(f"internal error: {exc!r}")))

    def _error(self, error: ExoctlError) -> JSONResponse:
        self.metrics.errors.labels(classify(error)[1]).inc()
        return exoctl_error_response(error)

    def _answer(self, result: Completion) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": result.text}
        finish = finish_reason(result)
        if self.tools is not None:
            self.tools.feed(result.text)
            text, calls = self.tools.finish()
            if calls:
                text = self.tools.shown + text
                message = {
                    "role": "assistant",
                    "content": text or None,
                    "tool_calls": [c.to_openai() for c in calls],
                }
                finish = "tool_calls"
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.body.model,  # as the request named it
            "choices": [
                {"index": 0, "message": message, "finish_reason": finish, "logprobs": self._take_logprobs()}
            ],
            "usage": usage(result),
        }

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
        }
        options = self.body.stream_options
        if options is not None and options.include_usage:
            chunk["usage"] = None  # as OpenAI: null on every chunk but the last
        return {**chunk, **extra}

    def _take_logprobs(self) -> dict[str, Any] | None:
        """OpenAI's choice `logprobs` of the tokens not yet sent (null when not asked for)."""
        if not self.body.logprobs:
            return None
        entries, self.logprobs = self.logprobs, []
        return {"content": entries, "refusal": None}

    def _delta(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        if self.body.logprobs and (self.logprobs or finish is not None):
            choice["logprobs"] = self._take_logprobs()
        return self._chunk([choice])

    async def _stream(self) -> AsyncIterator[str]:
        try:
            yield sse(self._delta({"role": "assistant", "content": ""}))
            while True:
                match await self.events.get():
                    case Delta(text, logprobs):
                        self.logprobs += logprobs
                        shown = self.tools.feed(text) if self.tools is not None else text
                        if shown:
                            yield sse(self._delta({"content": shown}))
                    case Done(result):
                        self.metrics.completed(self.model, result)
                        finish = finish_reason(result)
                        if self.tools is not None:
                            rest, calls = self.tools.finish()
                            if rest:
                                yield sse(self._delta({"content": rest}))
                            for index, call in enumerate(calls):
                                yield sse(self._delta({"tool_calls": [{"index": index, **call.to_openai()}]}))
                            finish = "tool_calls" if calls else finish
                        yield sse(self._delta({}, finish))
                        options = self.body.stream_options
                        if options is not None and options.include_usage:
                            yield sse(self._chunk([], usage=usage(result)))
                        break
                    case Failed(error):
                        _, error_type = classify(error)
                        self.metrics.errors.labels(error_type).inc()
                        yield sse(error_body(error.message, error_type, code=type(error).__name__))
                        break
            yield sse("[DONE]")
        finally:
            self.cancel.set()  # the client went away: the generating thread cancels at its next token
