"""Repetition, frequency and presence penalties: a sequence's logits changed by the tokens it has
seen, before temperature and the cuts (as `SamplingParams` describes them).

A rank of a tensor-parallel instance holds the logits of its part of the vocabulary only: it
penalizes that part (`offset` = the part's first id), and every rank, knowing every chosen token,
keeps the same history.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

from exoctl.wire.sampling_params import SamplingParams


@dataclass
class TokenHistory:
    """What one sequence has seen: the prompt's token ids (for the repetition penalty) and the
    count of each token it generated."""

    prompt: frozenset[int] = frozenset()
    generated: Counter[int] = field(default_factory=Counter)

    def record(self, token: int) -> None:
        self.generated[token] += 1

    def seen(self) -> set[int]:
        return set(self.prompt) | set(self.generated)


def _in_part(ids: Iterable[int], offset: int, size: int) -> list[int]:
    return [i - offset for i in ids if offset <= i < offset + size]


def penalize(
    logits: torch.Tensor, params: SamplingParams, history: TokenHistory, offset: int = 0
) -> torch.Tensor:
    """logits [V] (a part of the vocabulary from `offset`) -> penalized float32 logits [V]."""
    if not params.penalizes:
        return logits
    out = logits.float().clone()
    size = out.shape[-1]
    if params.repetition_penalty != 1:
        seen = torch.tensor(_in_part(history.seen(), offset, size), dtype=torch.long)
        if seen.numel():
            values = out[seen]
            rp = params.repetition_penalty
            out[seen] = torch.where(values > 0, values / rp, values * rp)
    if params.frequency_penalty or params.presence_penalty:
        pairs = [(i - offset, n) for i, n in history.generated.items() if offset <= i < offset + size]
        if pairs:
            ids = torch.tensor([i for i, _ in pairs], dtype=torch.long)
            counts = torch.tensor([n for _, n in pairs], dtype=torch.float32)
            out[ids] -= params.frequency_penalty * counts + params.presence_penalty
    return out
