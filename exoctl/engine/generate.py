"""Generation on one process: prefill, then decode token by token, streaming text deltas."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from exoctl.engine.model import CausalLM
from exoctl.engine.sampling import SamplingParams, make_generator, sample
from exoctl.engine.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer
from exoctl.errors import InvalidRequestError


@dataclass
class Timings:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        decode_time = self.total_s - self.time_to_first_token_s
        return (
            (self.completion_tokens - 1) / decode_time
            if self.completion_tokens > 1 and decode_time > 0
            else 0.0
        )


@dataclass
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    timings: Timings = field(default_factory=Timings)


def check_prompt(prompt_ids: Sequence[int], context_length: int) -> None:
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt_ids) >= context_length:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context holds {context_length}",
            hint="shorten the prompt or start a new conversation",
        )


def generate_ids(
    model: CausalLM, prompt_ids: Sequence[int], params: SamplingParams, eos_ids: frozenset[int]
) -> Iterator[tuple[int, bool]]:
    """Yield (token id, is_eos) until EOS, max_tokens or the context is full.

    The EOS token itself is yielded (flagged) so the caller can count it but not print it.
    """
    context = model.config.max_position_embeddings
    check_prompt(prompt_ids, context)
    generator = make_generator(params.seed)
    cache = model.new_cache()
    tokens = torch.tensor([list(prompt_ids)])  # [1, T]
    positions = torch.arange(len(prompt_ids))[None, :]
    budget = min(params.max_tokens, context - len(prompt_ids))
    for _ in range(budget):
        logits = model.forward(tokens, positions, [cache])[:, -1]  # [1, V]
        token = sample(logits, params, generator)  # [1]
        token_id = int(token)
        is_eos = token_id in eos_ids
        yield token_id, is_eos
        if is_eos:
            return
        tokens = token.view(1, 1)
        positions = torch.tensor([[cache.length]])


class TextStream:
    """Token ids in, text deltas out: incremental detokenisation, then stop strings."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str]) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, token_id: int) -> str:
        return self.stops.feed(self.decoder.push(token_id))

    def finish(self) -> str:
        return self.stops.feed(self.decoder.flush()) + self.stops.flush()


def stream_completion(
    model: CausalLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams
) -> Iterator[str | Completion]:
    """Yield text deltas as they are decoded, then the finished `Completion`."""
    completion = Completion()
    timings = completion.timings
    timings.prompt_tokens = len(prompt_ids)
    text = TextStream(tokenizer, params.stop)
    start = time.perf_counter()
    completion.finish_reason = "length"
    for token_id, is_eos in generate_ids(model, prompt_ids, params, tokenizer.eos_token_ids):
        if not completion.token_ids:
            timings.time_to_first_token_s = time.perf_counter() - start
        completion.token_ids.append(token_id)
        if is_eos:
            completion.finish_reason = "stop"
            break
        delta = text.push(token_id)
        if delta:
            completion.text += delta
            yield delta
        if text.stopped:
            completion.finish_reason = "stop"
            break
    tail = "" if text.stopped else text.finish()
    if tail:
        completion.text += tail
        yield tail
    timings.completion_tokens = len(completion.token_ids)
    timings.total_s = time.perf_counter() - start
    yield completion


def complete(
    model: CausalLM, tokenizer: Tokenizer, prompt_ids: Sequence[int], params: SamplingParams
) -> Completion:
    for item in stream_completion(model, tokenizer, prompt_ids, params):
        if isinstance(item, Completion):
            return item
    raise AssertionError("stream_completion always ends with a Completion")
