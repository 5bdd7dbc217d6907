"""When each stage on this node last heard its head name the live sequences (`lease`).

A head says which of its sequences live every LEASE_S; its stages free the rest. A stage that
has heard no lease for LEASE_LOST_S frees every sequence it holds: its head no longer holds the
instance (unloaded there, failed there while this node was cut off), so nothing will. Torch-free.
"""

from __future__ import annotations

from collections.abc import Iterable

LEASE_S = 2.0  # how often a head says which sequences live; the others free the rest within 2 of these
LEASE_LOST_S = 5 * LEASE_S


class LeaseClock:
    def __init__(self) -> None:
        self.last: dict[str, float] = {}  # instance id -> when its head last named its sequences

    def heard(self, instance_id: str, now: float) -> None:
        self.last[instance_id] = now

    def lost(self, following: Iterable[str], now: float) -> list[tuple[str, float]]:
        """The instances (of those whose stages follow a head here) whose head has been quiet
        for LEASE_LOST_S, with how long. Each is due again one LEASE_S later: two empty words
        free everything (what was held at the first, then what came since)."""
        lost = []
        following = list(following)
        for instance_id in following:
            last = self.last.setdefault(instance_id, now)
            if now - last > LEASE_LOST_S:
                lost.append((instance_id, now - last))
                self.last[instance_id] = now - LEASE_LOST_S + LEASE_S
        for instance_id in set(self.last) - set(following):
            del self.last[instance_id]
        return lost
