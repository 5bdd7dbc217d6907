"""The head's speculative decoding: when to guess, how many tokens, and what it gained.

A drafter guesses a sequence's next k tokens; one verification step through every runner checks
them all (the weights are read once for the k + 1 positions), and the sampling runner accepts the
longest run the target agrees with. What that buys depends on how often the guesses are right and
on what a pass costs, so each sequence adapts:

- k: the count of guesses that gives the most tokens per second by what this sequence has shown.
  Guesses are taken as accepted one after another with probability p (its accepted guesses over
  those and its rejections, recent passes weighing most), so k guesses give (1 - p^(k+1)) / (1 - p)
  tokens a pass; a pass of k guesses costs (1 + k (s + d)) plain passes, s the extra cost of a
  verified position and d the drafter's time per guess, both measured from its passes. It picks the
  k from 1 to MAX_K with the most tokens per cost: long runs where guesses come true and positions
  are cheap, short ones where they fail or cost.
- Worth it: the head times every decode pass of the sequence (sent to tokens back) and the
  drafter's time. Once it has seen JUDGE_AFTER passes of each kind, speculation whose tokens per
  second (tokens per pass over pass + draft time) fall below those of a plain pass pauses for
  PAUSE_PASSES plain passes, twice as many after each loss in a row, then tries again.
- Batches: only a sequence that steps alone speculates (a decode step of one sequence, which is
  every step when one chat runs, and every step of a pipeline whose sequences are no more than its
  stages). With several sequences in one step the step already shares each weight read among them,
  and a sequence's own verification step would read them once more for it alone.

Torch-free: the drafters (`engine.prompt_lookup`, `engine.draft_model`) are given to it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from exoctl.wire.runner_report import SpeculationReport

START_K = 4
MAX_K = 8
# before a sequence has shown anything: guesses accepted 2 times in 3, a verified position 5% of a
# plain pass (SmolLM2 float32, AVX2 EPYC: a step of 5 positions 1.24x one of 1)
PRIOR_ACCEPTED, PRIOR_REJECTED, PRIOR_SLOPE = 2.0, 1.0, 0.05
FORGETTING = 0.7  # each pass, older acceptance counts weigh this much less
JUDGE_AFTER = 3  # passes of each kind timed before speculation is judged
PAUSE_PASSES = 16  # plain passes after speculation lost; doubles while it keeps losing
MAX_PAUSE = 256
SMOOTHING = 0.3  # weight of the newest pass in the running averages


class Drafter(Protocol):
    name: str

    def propose(self, seq: str, ids: Sequence[int], k: int) -> list[int]: ...

    def forget(self, seq: str) -> None: ...


def _average(old: float, new: float, seen: int) -> float:
    return new if seen == 0 else old + SMOOTHING * (new - old)


@dataclass
class _Tally:
    """Running averages of one kind of pass of one sequence."""

    passes: int = 0
    seconds: float = 0.0  # per pass, the draft's time included
    tokens: float = 0.0  # per pass

    def add(self, seconds: float, tokens: int) -> None:
        self.seconds = _average(self.seconds, seconds, self.passes)
        self.tokens = _average(self.tokens, tokens, self.passes)
        self.passes += 1

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class _Sequence:
    k: int = START_K
    accepted: float = PRIOR_ACCEPTED  # guesses accepted and rejections seen, recent ones weighing most
    rejected: float = PRIOR_REJECTED
    slope: float = PRIOR_SLOPE  # a verified position's cost over a plain pass's
    draft_share: float = 0.0  # the drafter's time per guess over a plain pass's
    plain: _Tally = field(default_factory=_Tally)
    guessed: _Tally = field(default_factory=_Tally)
    pause: int = 0  # plain passes left before it guesses again
    losses: int = 0  # judgements lost in a row
    # the pass in flight: when it was sent, the guesses it carries, the drafter's time for them
    sent_at: float = 0.0
    drafts: tuple[int, ...] = ()
    draft_s: float = 0.0


@dataclass
class SpeculationStats:
    """The instance's totals, for /state and /metrics."""

    passes: int = 0  # decode passes of every sequence, plain and verifying
    tokens: int = 0  # tokens those passes gave
    verify_passes: int = 0
    drafted: int = 0  # tokens guessed
    accepted: int = 0  # of them, accepted

    def report(self, drafter: str) -> SpeculationReport:
        return SpeculationReport(
            drafter, self.passes, self.tokens, self.verify_passes, self.drafted, self.accepted
        )


def best_k(p: float, cost: float) -> int:
    """The guesses per pass with the most expected tokens per cost, for guesses accepted in turn
    with probability p and each costing `cost` of a plain pass."""

    def rate(k: int) -> float:
        tokens = k + 1 if p >= 1 else (1 - p ** (k + 1)) / (1 - p)
        return tokens / (1 + k * cost)

    return max(range(1, MAX_K + 1), key=rate)


class Speculator:
    def __init__(self, drafter: Drafter | None, clock: Callable[[], float] = time.perf_counter) -> None:
        self.drafter = drafter
        self.clock = clock
        self.sequences: dict[str, _Sequence] = {}
        self.stats = SpeculationStats()

    def guesses(self, seq: str, ids: Sequence[int], room: int, allowed: bool) -> tuple[int, ...]:
        """The tokens to verify in this sequence's next decode step (none: a plain step); `room`:
        how many more tokens it may take (its budget and the context), `allowed`: whether it may
        guess now (the request asked, it steps alone)."""
        state = self.sequences.setdefault(seq, _Sequence())
        state.sent_at = self.clock()
        state.drafts, state.draft_s = (), 0.0
        if self.drafter is None or not allowed or room < 2:
            return ()
        if state.pause > 0:
            state.pause -= 1
            return ()
        if state.plain.passes < JUDGE_AFTER and state.guessed.passes >= JUDGE_AFTER:
            return ()  # time plain passes too, to judge against
        began = self.clock()
        # the bonus token comes with the guesses: k + 1 must fit the room
        drafts = tuple(self.drafter.propose(seq, ids, min(state.k, room - 1)))
        state.draft_s = self.clock() - began
        state.drafts = drafts
        return drafts

    def took(self, seq: str, tokens: int) -> None:
        """The pass of a sequence came back with `tokens` tokens (a plain pass: 1)."""
        state = self.sequences.get(seq)
        if state is None:
            return  # its first token, from the prompt's step: no decode pass
        stats = self.stats
        stats.passes += 1
        stats.tokens += tokens
        seconds = self.clock() - state.sent_at
        if not state.drafts:
            state.plain.add(seconds, tokens)
            self._judge(state)
            return
        drafted, accepted = len(state.drafts), tokens - 1
        stats.verify_passes += 1
        stats.drafted += drafted
        stats.accepted += accepted
        state.guessed.add(seconds + state.draft_s, tokens)
        self._learn(state, drafted, accepted, seconds)
        self._judge(state)

    def _learn(self, state: _Sequence, drafted: int, accepted: int, seconds: float) -> None:
        """Update the sequence's acceptance and costs from a verification pass, and choose its k."""
        state.accepted = FORGETTING * state.accepted + accepted
        state.rejected = FORGETTING * state.rejected + (1 if accepted < drafted else 0)
        plain = state.plain.seconds
        if plain > 0:
            slope = min(max((seconds / plain - 1) / drafted, 0.0), 1.0)
            state.slope += SMOOTHING * (slope - state.slope)
            state.draft_share += SMOOTHING * (state.draft_s / drafted / plain - state.draft_share)
        state.k = best_k(state.accepted / (state.accepted + state.rejected), state.slope + state.draft_share)

    def _judge(self, state: _Sequence) -> None:
        if state.plain.passes < JUDGE_AFTER or state.guessed.passes < JUDGE_AFTER:
            return
        if state.guessed.rate >= state.plain.rate:
            state.losses = 0
            return
        state.pause = min(MAX_PAUSE, PAUSE_PASSES << state.losses)
        state.losses += 1
        state.guessed = _Tally()  # judged again on fresh passes when it tries again (with the k it learned)

    def forget(self, seq: str) -> None:
        self.sequences.pop(seq, None)
        if self.drafter is not None:
            self.drafter.forget(seq)

    def clear(self) -> None:
        for seq in list(self.sequences):
            self.forget(seq)
