"""The head's index of an instance's cached prefixes: which token ids each cached KV holds, which
one a new request reuses, and what is kept or evicted. Pure and torch-free: the head acts on what
it returns (tells every runner in the step, in `Release` and in `Forget`), so every stage and rank
holds the same entries.

An entry is named by the sequence it came from and holds the KV of its first `len(ids)` positions
on every runner. The budget counts positions: placement turned each node's byte budget into the
positions the tightest node can hold, so no runner goes over its bytes when the index keeps within
it. An entry that a sequence is reusing is pinned until that sequence's first step has passed every
runner (its first token came back): until then a runner may still have to copy from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_ENTRIES = 256  # a bound on the index's size (a match compares against each entry)
_BLOCK = 256  # token ids compared a slice at a time (a C-speed comparison) before one by one


def common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    """How many leading token ids `a` and `b` share."""
    n = min(len(a), len(b))
    i = 0
    while i < n:
        j = min(i + _BLOCK, n)
        if a[i:j] != b[i:j]:
            while a[i] == b[i]:
                i += 1
            return i
        i = j
    return n


@dataclass
class Entry:
    ids: tuple[int, ...]  # the token id of each position it holds
    used: int  # the index's clock when it was last kept or reused (least recently used goes first)
    pins: int = 0  # sequences whose first step may still copy from it


@dataclass(frozen=True)
class Match:
    """A new sequence reuses the first `positions` positions of `entry`."""

    entry: str
    positions: int


@dataclass(frozen=True)
class KeepDecision:
    """What ending a sequence does to the index: whether its KV is kept as an entry of its name,
    and the entries to forget (covered by it, or evicted to make room)."""

    kept: bool
    forget: tuple[str, ...] = ()


@dataclass
class PrefixStats:
    lookups: int = 0  # requests that could reuse (caching on, a budget)
    hits: int = 0  # of them, the ones that reused a prefix
    reused_tokens: int = 0  # positions not computed again
    evictions: int = 0  # entries forgotten for room or memory (not those covered by a longer one)


@dataclass
class PrefixIndex:
    budget: int  # positions all entries may hold together; 0 turns caching off
    entries: dict[str, Entry] = field(default_factory=dict)
    stats: PrefixStats = field(default_factory=PrefixStats)
    clock: int = 0

    @property
    def enabled(self) -> bool:
        return self.budget > 0

    @property
    def held(self) -> int:
        """Positions the entries hold together."""
        return sum(len(e.ids) for e in self.entries.values())

    def _tick(self) -> int:
        self.clock += 1
        return self.clock

    def match(self, ids: Sequence[int]) -> Match | None:
        """The longest cached prefix of `ids`, leaving at least the last position to run (its
        logits choose the first token); None when no entry shares a first token with it."""
        if not self.enabled:
            return None
        self.stats.lookups += 1
        wanted = tuple(ids)
        best: Match | None = None
        for name, entry in self.entries.items():
            shared = min(common_prefix(wanted, entry.ids), len(wanted) - 1)
            if shared > 0 and (best is None or shared > best.positions):
                best = Match(name, shared)
        if best is not None:
            self.entries[best.entry].used = self._tick()
            self.stats.hits += 1
            self.stats.reused_tokens += best.positions
        return best

    def pin(self, name: str) -> None:
        self.entries[name].pins += 1

    def unpin(self, name: str) -> None:
        entry = self.entries.get(name)
        if entry is not None and entry.pins > 0:
            entry.pins -= 1

    def keep(self, name: str, ids: Sequence[int]) -> KeepDecision:
        """A sequence ended holding the KV of `ids`: keep it (evicting the least recently used
        entries if the budget needs it), unless it cannot fit, or an entry already covers it."""
        held = tuple(ids)
        old = self.entries.get(name)
        if not held or len(held) > self.budget or (old is not None and old.pins):
            return KeepDecision(False)
        others = {n: e for n, e in self.entries.items() if n != name}
        if any(common_prefix(held, e.ids) == len(held) for e in others.values()):
            return KeepDecision(False)  # a longer entry holds all of it already
        # entries this one extends are of no more use: any request matching them matches it
        covered = [n for n, e in others.items() if not e.pins and common_prefix(held, e.ids) == len(e.ids)]
        room = self.budget - len(held) - sum(len(e.ids) for n, e in others.items() if n not in covered)
        count = len(others) - len(covered) + 1
        evicted: list[str] = []
        for n, e in sorted(others.items(), key=lambda item: item[1].used):
            if room >= 0 and count <= MAX_ENTRIES:
                break
            if n in covered or e.pins:
                continue
            evicted.append(n)
            room += len(e.ids)
            count -= 1
        if room < 0 or count > MAX_ENTRIES:
            return KeepDecision(False)  # what is pinned leaves no room for it
        for n in (*covered, *evicted):
            del self.entries[n]
        self.stats.evictions += len(evicted)
        self.entries[name] = Entry(held, self._tick())
        return KeepDecision(True, (*covered, *evicted))

    def drop(self, name: str) -> tuple[str, ...]:
        """Forget an entry a runner lacks; what was forgotten (nothing if it was not held)."""
        return (name,) if self.entries.pop(name, None) is not None else ()

    def evict(self, positions: int) -> tuple[str, ...]:
        """Free at least `positions` (memory pressure), least recently used first, pinned entries
        never; what was evicted."""
        evicted: list[str] = []
        freed = 0
        for name, entry in sorted(self.entries.items(), key=lambda item: item[1].used):
            if freed >= positions:
                break
            if entry.pins:
                continue
            evicted.append(name)
            freed += len(entry.ids)
        for name in evicted:
            del self.entries[name]
        self.stats.evictions += len(evicted)
        return tuple(evicted)

    def clear(self) -> None:
        self.entries.clear()
