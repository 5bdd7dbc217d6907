"""Choosing the next token from logits: small pure functions over [B, V] float tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from exoctl.engine.constraint import Constraint
from exoctl.engine.penalties import TokenHistory, penalize
from exoctl.wire.sampling_params import SamplingParams


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] -> [B] token ids."""
    return logits.argmax(dim=-1)


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # float32 keeps bfloat16 logits' small differences; the caller makes temperature >= GREEDY_BELOW
    return logits.float() / temperature


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row; the rest become -inf. k <= 0 keeps all."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches p (always at least the top one)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is dropped when the tokens before it already reach p.
    drop_sorted = (probs.cumsum(dim=-1) - probs) >= p
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep the tokens whose probability is at least min_p x the top one's: in logits, those within
    log(min_p) of the row's largest."""
    if min_p <= 0:
        return logits
    floor = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < floor, float("-inf"))


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history: TokenHistory | None = None,
) -> torch.Tensor:
    """[B, V] float logits -> [B] token ids under `params` (penalties from `history`, one row's)."""
    if params.penalizes and history is not None:
        logits = torch.stack([penalize(row, params, history) for row in logits])
    if params.greedy:
        return greedy(logits)
    logits = apply_temperature(logits, params.temperature)
    logits = min_p_filter(top_p_filter(top_k_filter(logits, params.top_k), params.top_p), params.min_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@dataclass
class Sampler:
    """One sequence's choice of tokens: its parameters, its seeded generator, what it has seen,
    and the grammar its tokens must follow (None: any token)."""

    params: SamplingParams
    generator: torch.Generator | None
    history: TokenHistory
    constraint: Constraint | None = None

    @classmethod
    def create(
        cls, params: SamplingParams, prompt: Sequence[int] = (), constraint: Constraint | None = None
    ) -> Sampler:
        # the prompt is kept only where the repetition penalty reads it
        seen = frozenset(prompt) if params.repetition_penalty != 1 else frozenset()
        return cls(params, make_generator(params.seed), TokenHistory(seen), constraint)

    def choose(self, logits: torch.Tensor) -> int:
        """logits [1, V] -> the token, recorded in the history (and the grammar's matcher)."""
        if self.constraint is not None:
            logits = self.constraint.mask(logits)
        token = int(sample(logits, self.params, self.generator, self.history))
        self._record(token)
        return token

    def _record(self, token: int) -> None:
        self.history.record(token)
        if self.constraint is not None:
            self.constraint.accept(token)

    def verify(self, logits: torch.Tensor, draft: int) -> int:
        """logits [1, V] at a position a drafter guessed `draft` for -> the token, recorded.

        Greedy: the argmax, as `choose` (the draft is accepted when it is that token). Sampled:
        speculative sampling's rule for a draft proposed with certainty (q a point mass, as
        every drafter here proposes: prompt lookup, or a draft model's greedy choice): accept it
        with probability min(1, p/q) = p(draft); otherwise draw from the residual, p with the
        draft taken out and renormalised. The token's distribution is p exactly."""
        if self.params.greedy:
            return self.choose(logits)
        row = logits[0] if self.constraint is None else self.constraint.mask(logits[0])
        if self.params.penalizes:
            row = penalize(row, self.params, self.history)
        scaled = apply_temperature(row, self.params.temperature)
        scaled = min_p_filter(
            top_p_filter(top_k_filter(scaled, self.params.top_k), self.params.top_p), self.params.min_p
        )
        probs = scaled.softmax(dim=-1)
        u = float(torch.rand(1, generator=self.generator, dtype=torch.float64))
        if u < float(probs[draft]):
            token = draft
        else:
            residual = probs.clone()
            residual[draft] = 0
            # the draft held all the mass but for rounding: nothing else can be drawn
            token = (
                draft
                if float(residual.sum()) <= 0
                else int(torch.multinomial(residual, 1, generator=self.generator))
            )
        self._record(token)
        return token


def verify_drafts(sampler: Sampler, logits: torch.Tensor, drafts: Sequence[int]) -> list[int]:
    """logits [k + 1, V] of a step that ran a sequence's last token and k drafted ones -> the
    tokens it accepts: each position's token in turn (`Sampler.verify`), until one is not the
    draft (it is the correction) or after the last draft (the bonus token): 1 to k + 1 tokens."""
    accepted: list[int] = []
    for i in range(len(drafts) + 1):
        row = logits[i : i + 1]
        if i == len(drafts):
            accepted.append(sampler.choose(row))
            break
        token = sampler.verify(row, drafts[i])
        accepted.append(token)
        if token != drafts[i]:
            break
    return accepted
