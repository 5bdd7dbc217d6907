"""Log-probabilities of the chosen tokens and their most likely alternatives (OpenAI's `logprobs`
and `top_logprobs`), from the model's own logits: before penalties, temperature and cuts.

Under tensor sharding a rank holds only its part of the vocabulary: each rank sends a summary of
its part (its log-sum-exp, the chosen token's logit if the part holds it, its n largest logits and
their ids), and `merge` gives what the full row would: a distributed log-sum-exp and a merge of
the ranks' top n. The full logits are never gathered.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_TOP = 20  # OpenAI's limit on top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first

    def to_wire(self) -> list[object]:
        return [self.logprob, [i for i, _ in self.top], [p for _, p in self.top]]


def token_logprob(logits: torch.Tensor, token: int, n: int) -> TokenLogprob:
    """logits [V] (the full row) -> the chosen token's logprob and the n most likely tokens'."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, min(n, logprobs.numel())) if n else (logprobs[:0], logprobs[:0])
    return TokenLogprob(
        float(logprobs[token]), [(int(i), float(v)) for v, i in zip(values, ids, strict=True)]
    )


def part_summary(logits: torch.Tensor, offset: int, token: int, n: int) -> torch.Tensor:
    """One rank's part of a row, logits [|part|] from id `offset` -> float64 [2 + 2n]: its
    log-sum-exp, the chosen token's logit (-inf if another rank holds it), its n largest logits
    (-inf padded) and their ids (-1 padded)."""
    row = logits.double()
    summary = torch.full((2 + 2 * n,), -math.inf, dtype=torch.float64)
    summary[0] = torch.logsumexp(row, dim=0)
    if offset <= token < offset + row.numel():
        summary[1] = row[token - offset]
    if n:
        k = min(n, row.numel())
        values, ids = torch.topk(row, k)
        summary[2 : 2 + k] = values
        summary[2 + n : 2 + 2 * n] = -1
        summary[2 + n : 2 + n + k] = ids.double() + offset
    return summary


def merge(parts: list[torch.Tensor], n: int) -> TokenLogprob:
    """The ranks' summaries (rank order) -> the row's TokenLogprob, as `token_logprob` gives."""
    total = float(torch.logsumexp(torch.stack([p[0] for p in parts]), dim=0))
    chosen = max(float(p[1]) for p in parts)
    top: list[tuple[int, float]] = []
    if n:
        values = torch.cat([p[2 : 2 + n] for p in parts])
        ids = torch.cat([p[2 + n : 2 + 2 * n] for p in parts])
        # the largest first; on a tie the lower id, as topk over the full row tends to
        order = sorted(range(values.numel()), key=lambda i: (-float(values[i]), float(ids[i])))
        top = [(int(ids[i]), float(values[i]) - total) for i in order[:n] if ids[i] >= 0]
    return TokenLogprob(chosen - total, top)


@dataclass
class PromptScores:
    """One sequence's prompt logprobs, gathered by the runner that samples as the prompt's chunks pass
    it: the logprob of each prompt token after the first, given the ones before it."""

    prompt: tuple[int, ...]
    n: int  # alternatives per position
    entries: list[TokenLogprob]

    def targets(self, start: int, count: int) -> list[int]:
        """The prompt token each of positions start..start+count-1 predicts, where there is one (the
        last prompt position predicts the first sampled token: not the prompt's)."""
        return list(self.prompt[start + 1 : start + count + 1])

    def add(self, logits: torch.Tensor, start: int) -> None:
        """logits [T, V] of a prompt chunk at positions start..start+T-1 (the full rows)."""
        for i, target in enumerate(self.targets(start, logits.shape[0])):
            self.entries.append(token_logprob(logits[i], target, self.n))

    def to_wire(self) -> list[list[object]]:
        return [entry.to_wire() for entry in self.entries]
