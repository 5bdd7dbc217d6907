"""A runner's cached prefixes: the KV of ended sequences that its head decided to keep, each
compacted to exactly its positions, copied from when a new sequence reuses it.

The store only does what the head says (`keep`, `forget`, `retain`), so the runners of an instance
hold the same entries; it counts what it did for the state (`PrefixReport`).
"""

from __future__ import annotations

from exoctl.engine.kv_cache import KVCache
from exoctl.errors import PrefixMissingError
from exoctl.wire.instance_messages import Reuse
from exoctl.wire.runner_report import PrefixReport

# Positions of room a reused cache gets beyond the step that follows (the answer's first tokens),
# so decoding does not grow it by doubling at once.
DECODE_ROOM = 256


class PrefixStore:
    def __init__(self, node: str, budget_bytes: int) -> None:
        self.node = node
        self.budget_bytes = budget_bytes  # what placement reserved here (the head keeps within it)
        self.entries: dict[str, KVCache] = {}
        self.hits = 0  # sequences that started from a copy of an entry here
        self.reused_tokens = 0

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in list(self.entries.values()))

    def reuse(self, reuse: Reuse, live: dict[str, KVCache], room: int) -> KVCache:
        """A new sequence's cache: a copy of the first positions of an entry (or, when the head's
        word to keep it has not come yet, of the live sequence it will be kept from)."""
        source = self.entries.get(reuse.entry) or live.get(reuse.entry)
        if source is None or source.length < reuse.positions:
            held = "nothing" if source is None else f"{source.length} positions"
            raise PrefixMissingError(
                f"node {self.node} holds {held} of cached prefix {reuse.entry}, "
                f"not the {reuse.positions} positions the head reuses",
                hint="send the request again (`cache_prompt: false` skips the cache)",
                entry=reuse.entry,
            )
        copy = source.copy_prefix(reuse.positions, room + DECODE_ROOM)
        self.hits += 1
        self.reused_tokens += reuse.positions
        return copy

    def holds(self, reuse: Reuse) -> bool:
        entry = self.entries.get(reuse.entry)
        return entry is not None and entry.length >= reuse.positions

    def keep(self, name: str, cache: KVCache, positions: int) -> None:
        """Keep an ended sequence's first `positions` positions under its name (replacing an
        entry of the same name). A cache that holds fewer than the head counted is not kept: a
        reuse of it would fail (and says so)."""
        self.entries.pop(name, None)
        if 0 < positions <= cache.length:
            self.entries[name] = cache.compacted(positions)

    def forget(self, names: tuple[str, ...]) -> None:
        for name in names:
            self.entries.pop(name, None)

    def retain(self, names: tuple[str, ...]) -> None:
        """The head's word on which entries it holds: forget the others (a lost `forget`)."""
        for name in set(self.entries) - set(names):
            del self.entries[name]

    def clear(self) -> None:
        self.entries.clear()

    def report(self) -> PrefixReport:
        entries = list(self.entries.values())
        return PrefixReport(
            entries=len(entries),
            positions=sum(c.length for c in entries),
            bytes=sum(c.nbytes for c in entries),
            budget_bytes=self.budget_bytes,
            hits=self.hits,
            reused_tokens=self.reused_tokens,
        )
