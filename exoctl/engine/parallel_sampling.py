"""Choosing the next token when each of k ranks holds the logits of its part of the vocabulary.

No rank ever sees the full logits [B, V]: ranks exchange a few numbers per sequence through
`gather` (an all-gather in rank order, the same tensors arriving on every rank), and every rank
then derives the same token.

- Greedy: each rank sends its (max, argmax); the largest wins, ties going to the lower id, as
  `argmax` over the full row would.
- Sampling, exactly as `sampling.sample` over the full row: a rank is picked with probability
  equal to its share of the (filtered) softmax mass — from the ranks' log-sum-exps and one
  uniform draw every rank makes from the same seeded generator — and that rank's own draw
  within its part is the token.
- Penalties change each rank's part of the logits first; every rank keeps the same history.
- A drafted token (speculative decoding) is accepted with probability p(draft), its scaled logit
  against the ranks' log-sum-exps, from a shared draw; otherwise the token is drawn as above
  from p with the draft taken out (each rank's draw and mass leave it out): speculative sampling's
  residual for a draft proposed with certainty, so the token's distribution is still p.
- top_k / top_p / min_p need a global threshold first: each rank sends its C largest scaled logits and
  its log-sum-exp; the k-th largest of the merged values, and the nucleus over them, give the
  same threshold on every rank. C is top_k, or CANDIDATES for top_p alone: a nucleus wider
  than k x CANDIDATES tokens is not cut (a flat distribution, where it hardly matters).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from exoctl.engine.constraint import Constraint
from exoctl.engine.logprobs import PromptScores, merge, part_summary
from exoctl.engine.penalties import TokenHistory, penalize
from exoctl.engine.sampling import apply_temperature
from exoctl.engine.shard import TensorShard
from exoctl.wire.sampling_params import SamplingParams

Gather = Callable[[torch.Tensor], list[torch.Tensor]]
CANDIDATES = 1024


@dataclass
class RankSampler:
    """One sequence's sampling on one rank: `shared` draws the same numbers on every rank,
    `local` is this rank's own (both from the request's seed, which the head always sets)."""

    params: SamplingParams
    shared: torch.Generator
    local: torch.Generator
    # every rank sees the step's token ids and every chosen token: the same history on each
    history: TokenHistory = field(default_factory=TokenHistory)
    prefilling: bool = True  # until its first token: the ids it is given are the prompt's
    # the grammar's matcher, on every rank: each masks its part, all accept the same tokens
    constraint: Constraint | None = None

    @classmethod
    def create(
        cls, params: SamplingParams, seed: int, rank: int, constraint: Constraint | None = None
    ) -> RankSampler:
        shared, local = torch.Generator(), torch.Generator()
        shared.manual_seed(seed)
        local.manual_seed((seed * 1_000_003 + rank + 1) % 2**63)
        return cls(params, shared, local, constraint=constraint)

    def saw_prompt(self, ids: list[int]) -> None:
        if self.prefilling and self.params.repetition_penalty != 1:
            self.history.prompt = self.history.prompt | frozenset(ids)

    def chose(self, token: int) -> None:
        self.prefilling = False
        self.history.record(token)
        if self.constraint is not None:
            self.constraint.accept(token)


def choose_tokens(
    logits: torch.Tensor,
    shard: TensorShard,
    full_vocab: int,
    samplers: list[RankSampler],
    gather: Gather,
    drafts: list[int | None] | None = None,
) -> list[int]:
    """logits [B, |part|] float32 of this rank's part of the vocabulary -> B token ids, the same
    on every rank; a row's draft (speculative decoding) is accepted by the rule above."""
    rows = logits.shape[0]
    guesses = drafts if drafts is not None else [None] * rows
    vocab = shard.part(full_vocab)
    penalized = [penalize(logits[b], s.params, s.history, vocab.start) for b, s in enumerate(samplers)]
    penalized = [
        row if s.constraint is None else s.constraint.mask(row, vocab.start)
        for row, s in zip(penalized, samplers, strict=True)
    ]
    scaled = [
        row if s.params.greedy else apply_temperature(row, s.params.temperature)
        for row, s in zip(penalized, samplers, strict=True)
    ]
    cut = [b for b, s in enumerate(samplers) if not s.params.greedy and s.params.truncates]
    floors = [-math.inf] * rows
    if cut:
        floors = _thresholds(scaled, cut, samplers, full_vocab, shard.world, gather)
    # per row: (value, global id, the draft's scaled logit): the max for greedy rows, the part's
    # log-sum-exp for sampled ones (without the draft's token, which the third column holds)
    mine = torch.empty(rows, 3, dtype=torch.float64)
    mine[:, 2] = -math.inf
    for b, sampler in enumerate(samplers):
        row = scaled[b]
        if sampler.params.greedy:
            best = int(row.argmax())
            mine[b, 0], mine[b, 1] = float(row[best]), vocab.start + best
            continue
        row = row.masked_fill(row < floors[b], -math.inf) if floors[b] > -math.inf else row
        draft = guesses[b]
        if draft is not None and vocab.start <= draft < vocab.stop:
            mine[b, 2] = float(row[draft - vocab.start])
            row = row.clone()
            row[draft - vocab.start] = -math.inf
        mass = float(torch.logsumexp(row, dim=0))
        mine[b, 0] = mass
        mine[b, 1] = -1
        if mass > -math.inf:
            pick = torch.multinomial((row - mass).exp(), 1, generator=sampler.local)
            mine[b, 1] = vocab.start + int(pick)
    parts = gather(mine)  # k x [B, 2]
    tokens = []
    for b, sampler in enumerate(samplers):
        values = [float(p[b, 0]) for p in parts]
        ids = [int(p[b, 1]) for p in parts]
        if sampler.params.greedy:
            # strictly greater: on a tie the lower rank, which holds the lower ids, wins
            best = 0
            for rank in range(1, len(parts)):
                if values[rank] > values[best]:
                    best = rank
            tokens.append(ids[best])
            continue
        guess = guesses[b]
        if guess is not None:
            drafted = max(float(p[b, 2]) for p in parts)
            total = float(torch.logsumexp(torch.tensor([*values, drafted], dtype=torch.float64), dim=0))
            accept = float(torch.rand(1, generator=sampler.shared, dtype=torch.float64))
            if drafted > -math.inf and (
                all(v == -math.inf for v in values) or accept < math.exp(drafted - total)
            ):
                tokens.append(guess)
                continue
        shares = torch.tensor(values, dtype=torch.float64).softmax(dim=0)
        u = float(torch.rand(1, generator=sampler.shared, dtype=torch.float64))
        edges = shares.cumsum(dim=0)
        rank = min(int(torch.searchsorted(edges, torch.tensor([u], dtype=torch.float64))), len(parts) - 1)
        while ids[rank] < 0:  # a rank with no allowed token has no mass; rounding put u there
            rank = (rank + 1) % len(parts)
        tokens.append(ids[rank])
    for sampler, token in zip(samplers, tokens, strict=True):
        sampler.chose(token)
    return tokens


def verify_drafts(
    logits: torch.Tensor,
    shard: TensorShard,
    full_vocab: int,
    sampler: RankSampler,
    drafts: list[int],
    gather: Gather,
) -> list[int]:
    """logits [k + 1, |part|] of one sequence's step over its last token and k drafted ones -> the
    tokens every rank accepts: position by position until one is not the draft (the correction)
    or after the last draft (the bonus token)."""
    accepted: list[int] = []
    for i in range(len(drafts) + 1):
        guess = drafts[i] if i < len(drafts) else None
        token = choose_tokens(logits[i : i + 1], shard, full_vocab, [sampler], gather, [guess])[0]
        accepted.append(token)
        if guess is None or token != guess:
            break
    return accepted


def rank_logprobs(
    logits: torch.Tensor,
    shard: TensorShard,
    full_vocab: int,
    samplers: list[RankSampler],
    tokens: list[int],
    gather: Gather,
) -> list[list[object] | None]:
    """The chosen tokens' logprobs (wire form) for the rows that ask, from each rank's summary of
    its part: one more gather of [B, 2 + 2n], only when some row asks (the same on every rank)."""
    wanted = [b for b, s in enumerate(samplers) if s.params.logprobs is not None]
    out: list[list[object] | None] = [None] * len(samplers)
    if not wanted:
        return out
    n = max(samplers[b].params.logprobs or 0 for b in wanted)
    start = shard.part(full_vocab).start
    mine = torch.stack([part_summary(logits[b], start, tokens[b], n) for b in range(len(samplers))])
    parts = gather(mine)
    for b in wanted:
        out[b] = merge([p[b] for p in parts], samplers[b].params.logprobs or 0).to_wire()
    return out


def rank_prompt_logprobs(
    logits: torch.Tensor,
    shard: TensorShard,
    full_vocab: int,
    scores: PromptScores,
    start: int,
    gather: Gather,
) -> None:
    """A prompt chunk's logits [T, |part|] at positions start..start+T-1 -> each position's logprob
    of the prompt token after it, added to `scores` (one gather of [T', 2 + 2n]; every rank calls it
    for the same chunks, as every rank knows the prompt)."""
    targets = scores.targets(start, logits.shape[0])
    if not targets:
        return
    offset = shard.part(full_vocab).start
    mine = torch.stack([part_summary(logits[i], offset, t, scores.n) for i, t in enumerate(targets)])
    parts = gather(mine)
    scores.entries += [merge([p[i] for p in parts], scores.n) for i in range(len(targets))]


def _width(params: SamplingParams) -> int:
    if params.top_k:
        return params.top_k
    return CANDIDATES if params.top_p < 1 else 1


def _thresholds(
    scaled: list[torch.Tensor],
    cut: list[int],
    samplers: list[RankSampler],
    full_vocab: int,
    world: int,
    gather: Gather,
) -> list[float]:
    """The smallest scaled logit each row keeps under its top_k and top_p (-inf: keep all)."""
    # the same width on every rank, so the gathered tensors agree; a part smaller than the width
    # (parts differ by one) is padded with -inf. A top_k wider than a part takes whole parts: exact.
    # min_p alone needs only the largest
    width = min(max(_width(samplers[b].params) for b in cut), -(-full_vocab // world))
    mine = torch.full((len(scaled), width + 1), -math.inf, dtype=torch.float64)
    for b in cut:
        row = scaled[b]
        mine[b, 0] = float(torch.logsumexp(row, dim=0))
        values = torch.topk(row, min(width, row.numel())).values.double()
        mine[b, 1 : 1 + values.numel()] = values
    parts = gather(mine)
    floors = [-math.inf] * len(scaled)
    for b in cut:
        params = samplers[b].params
        merged = torch.cat([p[b, 1:] for p in parts]).sort(descending=True).values
        floor = -math.inf
        if params.top_k and params.top_k <= merged.numel():
            floor = float(merged[params.top_k - 1])
        if params.top_p < 1:
            if params.top_k:
                kept = merged[merged >= floor]
                total = float(torch.logsumexp(kept, dim=0))
            else:
                kept = merged
                total = float(torch.logsumexp(torch.tensor([float(p[b, 0]) for p in parts]), dim=0))
            probs = (kept - total).exp()
            before = probs.cumsum(dim=0) - probs  # a token is dropped when those before reach p
            inside = (before < params.top_p).nonzero()
            reached = float(probs.sum()) >= params.top_p
            if reached:
                floor = max(floor, float(kept[int(inside[-1])]))
        if params.min_p > 0:  # within log(min_p) of the largest logit of all ranks
            floor = max(floor, float(merged[0]) + math.log(params.min_p))
        floors[b] = floor
    return floors
