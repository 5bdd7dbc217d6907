"""Prompt lookup (n-gram) drafting: guess a sequence's next tokens as what followed the last time
its latest few tokens appeared, in the prompt or in the answer so far. No model: a dictionary
lookup per step, strong where an answer copies its input (edits, code, summaries, RAG).

Torch-free. Each sequence keeps, for every n-gram size, where its most recent earlier occurrence
ended; the longest size that matches wins.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# n-gram sizes tried, longest first: a 1-gram match (one common token) guesses too often wrongly
MAX_NGRAM = 4
MIN_NGRAM = 2


@dataclass
class _Seen:
    """One sequence's token ids, and for each n-gram size n: the n-gram -> the index just past its
    most recent occurrence that has a token after it."""

    ids: list[int] = field(default_factory=list)
    ends: dict[int, dict[tuple[int, ...], int]] = field(
        default_factory=lambda: {n: {} for n in range(MIN_NGRAM, MAX_NGRAM + 1)}
    )

    def extend(self, more: Sequence[int]) -> None:
        for token in more:
            end = len(self.ids)  # the n-grams ending here now have a token after them
            for n, table in self.ends.items():
                if end >= n:
                    table[tuple(self.ids[end - n : end])] = end
            self.ids.append(token)


class PromptLookup:
    """The drafter: `propose` for each step of a sequence, `forget` when it ends."""

    name = "ngram"

    def __init__(self) -> None:
        self.seen: dict[str, _Seen] = {}

    def propose(self, seq: str, ids: Sequence[int], k: int) -> list[int]:
        """Up to k tokens to follow `ids` (the sequence's whole text so far: prompt and answer);
        none when no n-gram of its end appeared before."""
        seen = self.seen.get(seq)
        if seen is None or list(ids[: len(seen.ids)]) != seen.ids:
            seen = self.seen[seq] = _Seen()  # new, or not what it was: read it again
        seen.extend(ids[len(seen.ids) :])
        for n in range(MAX_NGRAM, MIN_NGRAM - 1, -1):
            if len(ids) < n:
                continue
            end = seen.ends[n].get(tuple(ids[-n:]))
            if end is not None:
                return list(seen.ids[end : end + k])
        return []

    def forget(self, seq: str) -> None:
        self.seen.pop(seq, None)
