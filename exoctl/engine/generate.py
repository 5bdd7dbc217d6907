"""One sequence's generation: token ids in, text deltas, a finish reason and timings out.

`SequenceStream` is the per-sequence bookkeeping the head worker keeps for each request (and
`stream_completion` for a model in this process): incremental detokenisation, stop strings, EOS,
the token budget, cancellation, time to first token and decode rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from exoctl.engine.constraint import Constraint
from exoctl.engine.model import CausalLM
from exoctl.engine.sampling import Sampler
from exoctl.engine.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer
from exoctl.errors import InvalidRequestError
from exoctl.wire.answer import Completion, Timings
from exoctl.wire.sampling_params import SamplingParams


def check_prompt(prompt_ids: Sequence[int], context_length: int) -> None:
    if not prompt_ids:
        raise InvalidRequestError("the prompt is empty")
    if len(prompt_ids) >= context_length:
        raise InvalidRequestError(
            f"the prompt has {len(prompt_ids)} tokens but the model's context holds {context_length}",
            hint="shorten the prompt or start a new conversation",
        )


class TextStream:
    """Token ids in, text deltas out: incremental detokenisation, then stop strings."""

    def __init__(self, tokenizer: Tokenizer, stops: Sequence[str], special: bool = False) -> None:
        self.decoder = IncrementalDecoder(tokenizer, special)
        self.stops = StopMatcher(stops)

    @property
    def stopped(self) -> bool:
        return self.stops.stopped

    def push(self, token_id: int) -> str:
        return self.stops.feed(self.decoder.push(token_id))

    def finish(self) -> str:
        return self.stops.feed(self.decoder.flush()) + self.stops.flush()


class SequenceStream:
    """One sequence from its first sampled token to its finish: `push` each token, read the delta."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        params: SamplingParams,
        prompt_tokens: int,
        context: int,
        special: bool = False,  # keep special tokens in the text (a tool call's markers)
        cached_tokens: int = 0,  # of the prompt, the positions a cached prefix holds
    ) -> None:
        self.text = TextStream(tokenizer, params.stop, special)
        self.eos_ids = frozenset() if params.ignore_eos else tokenizer.eos_token_ids
        self.prompt_tokens = prompt_tokens
        self.cached_tokens = cached_tokens
        self.budget = min(params.max_tokens, context - prompt_tokens)
        self.started = time.perf_counter()
        self.first_token_at = 0.0
        self.token_ids: list[int] = []
        self.output = ""
        self.finish_reason = ""  # set once the sequence is done
        self.cancelled = False
        self.prompt_logprobs: list[dict[str, Any]] | None = None  # OpenAI's entries, where asked

    @property
    def done(self) -> bool:
        return bool(self.finish_reason)

    @property
    def next_position(self) -> int:
        """Where the last token goes in the cache (it is the next step's input)."""
        return self.prompt_tokens + len(self.token_ids) - 1

    def push(self, token: int) -> str:
        """One sampled token; the text it adds (EOS adds none; a finish flushes what was held)."""
        if not self.token_ids:
            self.first_token_at = time.perf_counter()
        self.token_ids.append(token)
        is_eos = token in self.eos_ids
        delta = "" if is_eos else self.text.push(token)
        if is_eos or self.text.stopped:
            self.finish_reason = "stop"
        elif self.cancelled:
            self.finish_reason = "cancelled"
        elif len(self.token_ids) >= self.budget:
            self.finish_reason = "length"
        if self.finish_reason and not self.text.stopped:
            delta += self.text.finish()
        self.output += delta
        return delta

    def completion(self) -> Completion:
        total = time.perf_counter() - self.started
        ttft = self.first_token_at - self.started if self.first_token_at else total
        decode = total - ttft
        count = len(self.token_ids)
        tps = (count - 1) / decode if count > 1 and decode > 0 else 0.0
        return Completion(
            self.output,
            list(self.token_ids),
            self.finish_reason or "length",
            self.prompt_tokens,
            Timings(ttft, total, tps),
            self.cached_tokens,
            self.prompt_logprobs,
            self.text.stops.matched,
        )


def generate_ids(
    model: CausalLM, prompt_ids: Sequence[int], params: SamplingParams, constraint: Constraint | None = None
) -> Iterator[int]:
    """Sampled token ids, one per step, until the context is full (the caller decides when to stop);
    `constraint` the matcher of `params.grammar`, where it has one."""
    context = model.config.max_position_embeddings
    check_prompt(prompt_ids, context)
    sampler = Sampler.create(params, prompt_ids, constraint)
    cache = model.new_cache()
    tokens = torch.tensor([list(prompt_ids)])  # [1, T]
    positions = torch.arange(len(prompt_ids))[None, :]
    for _ in range(context - len(prompt_ids)):
        logits = model.forward(tokens, positions, [cache])[:, -1]  # [1, V]
        token = sampler.choose(logits)
        yield token
        tokens = torch.tensor([[token]])
        positions = torch.tensor([[cache.length]])


def stream_completion(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    constraint: Constraint | None = None,
) -> Iterator[str | Completion]:
    """Yield text deltas as they are decoded, then the finished `Completion`."""
    context = model.config.max_position_embeddings
    check_prompt(prompt_ids, context)
    seq = SequenceStream(tokenizer, params, len(prompt_ids), context)
    for token in generate_ids(model, prompt_ids, params, constraint):
        delta = seq.push(token)
        if delta:
            yield delta
        if seq.done:
            break
    yield seq.completion()


def generate_in_process(
    model: CausalLM,
    tokenizer: Tokenizer,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    constraint: Constraint | None = None,
) -> Completion:
    for item in stream_completion(model, tokenizer, prompt_ids, params, constraint):
        if isinstance(item, Completion):
            return item
    raise AssertionError("stream_completion always ends with a Completion")
