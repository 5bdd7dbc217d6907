"""Choosing the next token from logits: small pure functions over [B, V] float tensors."""

from __future__ import annotations

import torch

from exoctl.sampling_params import SamplingParams


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


def make_generator(seed: int | None) -> torch.Generator | None:
    if seed is None:
        return None
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[B, V] float logits -> [B] token ids under `params`."""
    if params.greedy:
        return greedy(logits)
    logits = apply_temperature(logits, params.temperature)
    logits = top_p_filter(top_k_filter(logits, params.top_k), params.top_p)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
