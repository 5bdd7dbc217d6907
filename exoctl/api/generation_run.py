"""One generation on the cluster, whichever API asked for it: the one request path inside `serve`.

Every API (OpenAI chat and completions, OpenAI responses, Anthropic messages, Ollama's chat and
generate) turns its request into a `Job` and reads typed events back; the shapes of their answers
are theirs, what happens on the cluster is this. The generation runs on a thread of its own (its
ZeroMQ sockets stay in that thread from start to end) and hands events to the event loop through an
asyncio queue; a client that goes away cancels it at its next token.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from fastapi.responses import Response, StreamingResponse

from exoctl.api.chat_setup import ToolChoice, chat_setup
from exoctl.api.service import ClusterService
from exoctl.api.tool_calls import ToolCall, ToolStream
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire.answer import Completion
from exoctl.wire.sampling_params import SamplingDefaults, SamplingParamError, SamplingParams, SamplingRequest

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


@dataclass(frozen=True)
class Tools:
    """A chat's tools as chat templates take them, and how the answer may use them."""

    specs: list[dict[str, Any]]
    choice: ToolChoice = "auto"
    named: str | None = None  # a function the answer must call


@dataclass(frozen=True)
class Job:
    """What an API asks of an instance. A chat (`messages`, with its tools and the grammar of a
    structured answer) or a prompt (text, or token ids as they are)."""

    model: str
    sampling: SamplingRequest
    messages: list[dict[str, Any]] | None = None
    tools: Tools | None = None
    answer_grammar: str | None = None  # `structured.response_format_grammar`'s
    prompt: str | None = None
    prompt_ids: list[int] | None = None
    cache_prompt: bool = True
    speculative: bool = True
    # SamplingParams fields no request shape has a place for: prompt_logprobs, ignore_eos
    extra: dict[str, Any] = field(default_factory=dict)

    def check(self) -> None:
        """Refuse a bad sampling value before any node is asked."""
        resolve(self.sampling, None, self.extra)


def resolve(
    asked: SamplingRequest, defaults: SamplingDefaults | None, extra: dict[str, Any]
) -> SamplingParams:
    try:
        return replace(asked.resolve(defaults), **extra)
    except SamplingParamError as exc:
        raise InvalidRequestError(str(exc)) from None


class GenerationRun:
    """One job's generation: `start` it, then read its events; `cancel` ends it at its next token.

    `tools` is set once the instance is known (the head's tool format decides how the answer's
    calls are read): a ToolStream for the API to pass the text through."""

    def __init__(
        self,
        service: ClusterService,
        job: Job,
        events: asyncio.Queue[tuple[int, Event]] | None = None,
        index: int = 0,
    ) -> None:
        self.service = service
        self.job = job
        self.index = index  # which of several runs sharing one queue (n > 1)
        self.events: asyncio.Queue[tuple[int, Event]] = events if events is not None else asyncio.Queue()
        self.cancelled = threading.Event()
        self.tools: ToolStream | None = None
        self.model_id = ""  # the instance's model, once found (metrics count by it)

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        thread = threading.Thread(target=self._generate, args=(loop,), name="generate", daemon=True)
        thread.start()

    def cancel(self) -> None:
        self.cancelled.set()

    async def next(self) -> Event:
        _, event = await self.events.get()
        return event

    def answer(self, text: str) -> tuple[str, list[ToolCall]]:
        """A finished answer's text without its tool calls, and the calls (none without tools)."""
        if self.tools is None:
            return text, []
        self.tools.feed(text)
        rest, calls = self.tools.finish()
        return self.tools.shown + rest, calls

    def _generate(self, loop: asyncio.AbstractEventLoop) -> None:
        def put(event: Event) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, (self.index, event))

        job = self.job
        try:
            with self.service.cluster() as cluster:
                view = self.service.instance_for(job.model, cluster.statuses())
                messages, chat, grammar = job.messages, None, job.answer_grammar
                if messages is not None:
                    head = view.runners.get(view.head)
                    tools = job.tools
                    setup = chat_setup(
                        messages,
                        tools.specs if tools else None,
                        tools.choice if tools else "auto",
                        tools.named if tools else None,
                        job.answer_grammar,
                        head.tool_format if head is not None else None,
                    )
                    if setup.tool_format is not None and tools is not None:
                        names = frozenset(t["function"]["name"] for t in tools.specs)
                        self.tools = ToolStream(setup.tool_format, names, setup.prefix)
                    messages, chat, grammar = setup.messages, setup.options, setup.grammar
                params = replace(resolve(job.sampling, view.sampling_defaults, job.extra), grammar=grammar)
                generation = cluster.generate(
                    view,
                    params,
                    messages=messages,
                    prompt=job.prompt,
                    prompt_ids=job.prompt_ids,
                    chat=chat,
                    cache_prompt=job.cache_prompt,
                    speculative=job.speculative,
                )
                self.model_id = view.model_id  # read by the loop only after an event below
                put(Started(view.model_id))
                for text, logprobs in generation.deltas():
                    if text or logprobs:
                        put(Delta(text, logprobs))
                    if self.cancelled.is_set():
                        generation.cancel()
                        return
                assert generation.result is not None
                put(Done(generation.result))
        except ExoctlError as exc:
            put(Failed(exc))
        except Exception as exc:  # the stream must end even on a bug
            put(Failed(ExoctlError(f"internal error: {exc!r}")))


SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


async def respond(
    run: GenerationRun,
    disconnected: Callable[[], Awaitable[bool]],
    error: Callable[[ExoctlError], Response],
    finished: Callable[[Finished], Response],
    stream: Callable[[], AsyncIterator[str]] | None = None,
    media_type: str = "text/event-stream",
) -> Response:
    """Start `run` and answer: its error (before anything is sent: an error status), a stream of
    `stream()` when given, or `finished` of the whole answer; 499 when the client went away."""
    run.start()
    event = await run.next()
    if isinstance(event, Failed):
        return error(event.error)
    if stream is not None:
        return StreamingResponse(stream(), media_type=media_type, headers=SSE_HEADERS)
    ended = await run_to_end([run], disconnected, start=False)
    if ended is None:
        return Response(status_code=499)
    if isinstance(ended, Failed):
        return error(ended.error)
    return finished(ended[0])


async def placed(service: ClusterService, model: str) -> None:
    """Raise the error of a model no instance serves, before a stream's status line is sent."""
    from fastapi.concurrency import run_in_threadpool

    def find() -> None:
        service.instance_for(model, service.statuses())

    await run_in_threadpool(find)


@dataclass
class Finished:
    """A run read to its end: the result, and every logprob entry of its tokens."""

    result: Completion
    logprobs: list[dict[str, Any]]


async def run_to_end(
    runs: list[GenerationRun], disconnected: Callable[[], Awaitable[bool]], start: bool = True
) -> list[Finished] | Failed | None:
    """Runs that share one queue, started (unless `start` is False: the caller did), read to their
    ends: each one's result, the first failure, or None when the client went away (every run is
    then cancelled)."""
    if start:
        for run in runs:
            run.start()
    queue = runs[0].events
    logprobs: list[list[dict[str, Any]]] = [[] for _ in runs]
    finished: dict[int, Finished] = {}
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while len(finished) < len(runs):
            try:
                got: tuple[int, Event] | None = await asyncio.wait_for(queue.get(), DISCONNECT_CHECK_S)
            except asyncio.TimeoutError:
                got = None
            if loop.time() - checked >= DISCONNECT_CHECK_S:  # deltas come faster than that
                checked = loop.time()
                if await disconnected():
                    return None
            if got is None:
                continue
            index, event = got
            match event:
                case Delta(_, entries):
                    logprobs[index] += entries
                case Failed():
                    return event
                case Done(result):
                    finished[index] = Finished(result, logprobs[index])
        return [finished[i] for i in range(len(runs))]
    finally:
        if len(finished) < len(runs):
            for run in runs:
                run.cancel()
