"""`POST /v1/completions`: OpenAI's legacy text completion, as evaluation harnesses and serving
benchmarks use it.

`prompt` is a string, a list of strings, token ids, or a list of token-id lists; each prompt gets `n`
choices (index = prompt x n + i). `echo` puts the prompt before the answer, and with `logprobs` the
prompt's tokens are scored too (the first has none): what lm-eval's `local-completions` reads for a
loglikelihood, with `max_tokens` 1 or 0. `max_tokens: 0` (echo only) generates nothing: one token is
computed and dropped. Streamed or not; usage counts each prompt once and every choice's tokens.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, field_validator

from exoctl.api.generation_run import (
    SSE_HEADERS,
    Delta,
    Done,
    Event,
    Failed,
    GenerationRun,
    Job,
    placed,
    run_to_end,
)
from exoctl.api.metrics import Metrics
from exoctl.api.openai_chat import error_response, sse, stream_error
from exoctl.api.schemas import MAX_MODEL_CHARS, OpenAISampling, StreamOptions
from exoctl.api.service import ClusterService
from exoctl.api.structured import response_format_grammar
from exoctl.errors import InvalidRequestError
from exoctl.wire.answer import Completion
from exoctl.wire.sampling_params import SamplingRequest

MAX_CHOICES = 16  # prompts x n in one request: each is a sequence on the instance


class CompletionRequest(OpenAISampling):
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default for this endpoint
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    echo: bool = False
    logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    stream_options: StreamOptions | None = None
    suffix: str | None = None
    response_format: dict[str, Any] | None = None  # vLLM's extension: the answer constrained
    cache_prompt: bool = True
    speculative: bool = True

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix (fill-in-the-middle) is not supported: send the prompt alone")
        return suffix

    def prompts(self) -> list[str | list[int]]:
        """Each prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            items: list[str | list[int]] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            items = [list(prompt)]  # type: ignore[arg-type]
        else:
            items = list(prompt)  # type: ignore[arg-type]
        if not items or any(len(p) == 0 for p in items):
            raise InvalidRequestError("prompt is empty", hint="send text or token ids to complete")
        if len(items) * self.n > MAX_CHOICES:
            raise InvalidRequestError(
                f"{len(items)} prompts x n={self.n} is {len(items) * self.n} choices, over the limit of "
                f"{MAX_CHOICES}",
                hint="send fewer prompts per request",
            )
        if self.max_tokens == 0 and not self.echo:
            raise InvalidRequestError("max_tokens 0 returns nothing without echo", hint="send echo: true")
        return items

    def choice_sampling(self, choice: int) -> SamplingRequest:
        # n > 1 with a seed: each choice its own, still reproducible; max_tokens 0 computes one token
        seed = None if self.seed is None else self.seed + choice
        budget = None if self.max_tokens is None else max(self.max_tokens, 1)
        return self.sampling(seed, budget, self.logprobs)


def legacy_logprobs(entries: list[dict[str, Any]], start: int = 0) -> dict[str, Any]:
    """OpenAI's completion `logprobs` of entries (chat-style {token, logprob, top_logprobs}); offsets
    count characters from `start`."""
    tokens, values, tops, offsets = [], [], [], []
    at = start
    for entry in entries:
        tokens.append(entry["token"])
        values.append(entry["logprob"])
        top = entry.get("top_logprobs") or []
        tops.append({t["token"]: t["logprob"] for t in top} if entry["logprob"] is not None else None)
        offsets.append(at)
        at += len(entry["token"])
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


@dataclass
class Choice:
    """One prompt's one choice as it is written out."""

    prompt: str | list[int]
    echoed: str = ""  # the prompt's text, once known (a token-id prompt's from its tokens)


class TextCompletion:
    def __init__(self, service: ClusterService, metrics: Metrics, body: CompletionRequest) -> None:
        self.service = service
        self.metrics = metrics
        self.body = body
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = ""

    def _jobs(self) -> list[tuple[Choice, Job]]:
        body = self.body
        grammar = response_format_grammar(body.response_format)
        extra = {"prompt_logprobs": body.logprobs} if body.echo and body.logprobs is not None else {}
        jobs = []
        for prompt in body.prompts():
            for i in range(body.n):
                job = Job(
                    body.model,
                    body.choice_sampling(i),
                    answer_grammar=grammar,
                    prompt=prompt if isinstance(prompt, str) else None,
                    prompt_ids=prompt if isinstance(prompt, list) else None,
                    cache_prompt=body.cache_prompt,
                    speculative=body.speculative,
                    extra=extra,
                )
                job.check()
                jobs.append((Choice(prompt), job))
        return jobs

    async def respond(self, disconnected: Callable[[], Awaitable[bool]]) -> Response:
        jobs = self._jobs()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        runs = [GenerationRun(self.service, job, queue, i) for i, (_, job) in enumerate(jobs)]
        choices = [choice for choice, _ in jobs]
        if self.body.stream:
            await placed(self.service, self.body.model)  # not placed: an error status, not a stream
            for run in runs:
                run.start()
            return StreamingResponse(
                self._stream(runs, choices), media_type="text/event-stream", headers=SSE_HEADERS
            )
        ended = await run_to_end(runs, disconnected)
        if ended is None:
            return Response(status_code=499)
        if isinstance(ended, Failed):
            return error_response(self.metrics, ended.error)
        out = []
        for index, (choice, finished) in enumerate(zip(choices, ended, strict=True)):
            self.metrics.completed(runs[index].model_id, finished.result)
            out.append(self._choice(index, choice, finished.result, finished.logprobs))
        return JSONResponse(self._document(out, [f.result for f in ended]))

    def _generated(
        self, result: Completion, logprobs: list[dict[str, Any]]
    ) -> tuple[str, list[dict[str, Any]]]:
        """The answer's text and entries (none where max_tokens 0 asked for the prompt alone)."""
        if self.body.max_tokens == 0:
            return "", []
        return result.text, logprobs

    def _echo(self, choice: Choice, result: Completion) -> tuple[str, list[dict[str, Any]]]:
        if not self.body.echo:
            return "", []
        entries = result.prompt_logprobs or []
        if isinstance(choice.prompt, str):
            return choice.prompt, entries
        return "".join(e["token"] for e in entries), entries

    def _choice(
        self, index: int, choice: Choice, result: Completion, logprobs: list[dict[str, Any]]
    ) -> dict[str, Any]:
        echoed, prompt_entries = self._echo(choice, result)
        text, entries = self._generated(result, logprobs)
        doc: dict[str, Any] = {
            "index": index,
            "text": echoed + text,
            "logprobs": None,
            "finish_reason": "length" if self.body.max_tokens == 0 else finish(result),
        }
        if self.body.logprobs is not None:
            doc["logprobs"] = legacy_logprobs(prompt_entries + entries)
        return doc

    def _document(self, choices: list[dict[str, Any]], results: list[Completion]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": choices,
            "usage": self._usage(results),
        }

    def _usage(self, results: list[Completion]) -> dict[str, Any]:
        n = self.body.n
        prompt = sum(r.prompt_tokens for r in results[::n])  # each prompt once, not once a choice
        completion = 0 if self.body.max_tokens == 0 else sum(r.completion_tokens for r in results)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _chunk(self, index: int, text: str, entries: list[dict[str, Any]] | None, reason: str | None) -> str:
        logprobs = None if entries is None or self.body.logprobs is None else legacy_logprobs(entries)
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
        doc = {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.body.model,
            "choices": [choice],
        }
        return sse(doc)

    async def _stream(self, runs: list[GenerationRun], choices: list[Choice]) -> AsyncIterator[str]:
        queue = runs[0].events
        results: dict[int, Completion] = {}
        held: list[list[dict[str, Any]]] = [[] for _ in runs]  # echo: the answer's entries, until the end
        try:
            while len(results) < len(runs):
                index, event = await queue.get()
                match event:
                    case Delta(text, entries):
                        if self.body.echo:
                            # the prompt goes first, and its scores come with the answer's end
                            held[index] += entries
                        elif text or entries:
                            yield self._chunk(index, text, entries, None)
                    case Done(result):
                        results[index] = result
                        self.metrics.completed(runs[index].model_id, result)
                        if self.body.echo:
                            prompt_text, prompt_entries = self._echo(choices[index], result)
                            text, entries = self._generated(result, held[index])
                            yield self._chunk(index, prompt_text + text, prompt_entries + entries, None)
                        reason = "length" if self.body.max_tokens == 0 else finish(result)
                        yield self._chunk(index, "", [], reason)
                    case Failed(error):
                        yield sse(stream_error(self.metrics, error))
                        break
            else:
                options = self.body.stream_options
                if options is not None and options.include_usage:
                    ordered = [results[i] for i in range(len(runs))]
                    usage = {
                        "id": self.id,
                        "object": "text_completion",
                        "created": self.created,
                        "model": self.body.model,
                        "choices": [],
                        "usage": self._usage(ordered),
                    }
                    yield sse(usage)
            yield sse("[DONE]")
        finally:
            for run in runs:
                run.cancel()


def finish(result: Completion) -> str:
    return "length" if result.finish_reason == "length" else "stop"
