"""What a head knows of the free memory on its instance's nodes, and how much of the cached prefixes
a new request makes it evict: cached prefixes are the first thing to go when memory runs short,
before a node would have to refuse a request or run out.

Its own node is read at once (psutil); the others from the profile each sends in its heartbeat
answer (`pong`, every HEARTBEAT_S). Torch-free.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import psutil

# What a node keeps free for everything else: a share of its RAM, at least MIN_FREE_BYTES.
FREE_SHARE = 0.05
MIN_FREE_BYTES = 256 * 2**20


@dataclass(frozen=True)
class Room:
    available: int
    total: int

    @property
    def floor(self) -> int:
        return max(MIN_FREE_BYTES, int(self.total * FREE_SHARE))


# the room on the node at an address, or None where nothing is known of it (yet)
MemoryView = Callable[[str], Room | None]


def positions_to_free(rooms: list[tuple[Room, int]], positions: int) -> int:
    """Positions of cached prefixes to evict so that a new sequence of `positions` positions leaves
    every node its floor free; `rooms` pairs each node's room with what a position of KV costs
    there (a cached position frees as much as a new one takes)."""
    most = 0
    for room, position_bytes in rooms:
        short = positions * position_bytes + room.floor - room.available
        if short > 0 and position_bytes > 0:
            most = max(most, math.ceil(short / position_bytes))
    return most


class NodeMemory:
    """The worker's `MemoryView`: its own node from psutil, its peers from their last pong."""

    def __init__(self, own_address: str, peer_rooms: Callable[[str], Room | None]) -> None:
        self.own_address = own_address
        self.peer_rooms = peer_rooms

    def __call__(self, address: str) -> Room | None:
        if address == self.own_address:
            memory = psutil.virtual_memory()
            return Room(memory.available, memory.total)
        return self.peer_rooms(address)
