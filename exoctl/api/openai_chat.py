"""`POST /v1/chat/completions`: OpenAI's chat completion, one JSON answer or a server-sent stream.

The generation is a `GenerationRun` (the one request path every API shares); this module shapes
its events as OpenAI's chat answers. Errors use OpenAI's envelope, also inside a stream; a client
that goes away cancels the generation.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi.responses import JSONResponse, Response

from exoctl.api.errors import classify, error_body, exoctl_error_response
from exoctl.api.generation_run import Delta, Done, Failed, Finished, GenerationRun, Job, Tools, respond
from exoctl.api.metrics import Metrics
from exoctl.api.schemas import ChatRequest, NamedToolChoice
from exoctl.api.service import ClusterService
from exoctl.api.structured import response_format_grammar
from exoctl.errors import ExoctlError
from exoctl.wire.answer import Completion
from exoctl.wire.sampling_params import SamplingRequest


def sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)}\n\n"


def request_params(body: ChatRequest) -> SamplingRequest:
    """What the request set; what it leaves out comes from the model's own defaults, as vLLM
    does (SamplingRequest.resolve: greedy and DEFAULT_MAX_TOKENS where the model declares none).
    max_completion_tokens over the older max_tokens. top_k, min_p and repetition_penalty are
    vLLM's extensions (top_k -1 or 0: off)."""
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return body.sampling(body.seed, body.max_completion_tokens or body.max_tokens, logprobs)


def chat_job(body: ChatRequest) -> Job:
    choice = body.tool_choice
    named = choice.function.name if isinstance(choice, NamedToolChoice) else None
    specs = body.tool_specs()
    tools = None
    if specs is not None:
        tools = Tools(specs, choice if isinstance(choice, str) else "required" if named else "auto", named)
    job = Job(
        body.model,
        request_params(body),
        messages=body.chat_messages(),
        tools=tools,
        answer_grammar=response_format_grammar(body.response_format),
        cache_prompt=body.cache_prompt,
        speculative=body.speculative,
    )
    job.check()
    return job


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


def error_response(metrics: Metrics, error: ExoctlError) -> JSONResponse:
    metrics.errors.labels(classify(error)[1]).inc()
    return exoctl_error_response(error)


def stream_error(metrics: Metrics, error: ExoctlError) -> dict[str, Any]:
    """OpenAI's error envelope as a stream's last event (the status line was sent long ago)."""
    _, error_type = classify(error)
    metrics.errors.labels(error_type).inc()
    return error_body(error.message, error_type, code=type(error).__name__)


class ChatCompletion:
    """One request: its generation, and the answer shaped from what it reports."""

    def __init__(self, service: ClusterService, metrics: Metrics, body: ChatRequest) -> None:
        self.service = service
        self.metrics = metrics
        self.body = body
        self.id = f"chatcmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.logprobs: list[dict[str, Any]] = []  # entries not yet sent

    async def respond(self, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        """The answer; `disconnected` tells whether the client went away (its generation is then
        cancelled, streamed or not)."""
        run = GenerationRun(self.service, chat_job(self.body))

        def finished(done: Finished) -> Response:
            self.logprobs = done.logprobs
            self.metrics.completed(run.model_id, done.result)
            return JSONResponse(self._answer(run, done.result))

        stream = (lambda: self._stream(run)) if self.body.stream else None
        return await respond(run, disconnected, lambda e: error_response(self.metrics, e), finished, stream)

    def _answer(self, run: GenerationRun, result: Completion) -> dict[str, Any]:
        text, calls = run.answer(result.text)
        message: dict[str, Any] = {"role": "assistant", "content": text}
        finish = finish_reason(result)
        if calls:
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

    async def _stream(self, run: GenerationRun) -> AsyncIterator[str]:
        try:
            yield sse(self._delta({"role": "assistant", "content": ""}))
            while True:
                match await run.next():
                    case Delta(text, logprobs):
                        self.logprobs += logprobs
                        shown = run.tools.feed(text) if run.tools is not None else text
                        if shown:
                            yield sse(self._delta({"content": shown}))
                    case Done(result):
                        self.metrics.completed(run.model_id, result)
                        finish = finish_reason(result)
                        if run.tools is not None:
                            rest, calls = run.tools.finish()
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
                        yield sse(stream_error(self.metrics, error))
                        break
            yield sse("[DONE]")
        finally:
            run.cancel()  # the client went away: the generating thread cancels at its next token
