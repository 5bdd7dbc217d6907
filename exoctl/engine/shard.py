"""Which part of each weight one rank of a tensor-parallel instance holds.

Rank r of k holds a contiguous part of every split dimension: whole attention heads and KV
heads (k must divide both), whole experts (k must divide them), and an equal-as-possible part
of the MLP's intermediate dimension and of the vocabulary (any k). `WHOLE` is the unsplit model.
"""

from __future__ import annotations

from dataclasses import dataclass

from exoctl.errors import UnsupportedModelError


@dataclass(frozen=True)
class TensorShard:
    rank: int = 0
    world: int = 1

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not in [0, {self.world})")

    @property
    def whole(self) -> bool:
        return self.world == 1

    def part(self, total: int) -> range:
        """This rank's contiguous part of `total` items; sizes differ by at most one."""
        return range(total * self.rank // self.world, total * (self.rank + 1) // self.world)

    def whole_units(self, total: int, what: str) -> range:
        """This rank's part of `total` units that must not be cut (heads, experts)."""
        if total % self.world:
            raise UnsupportedModelError(
                f"{total} {what} cannot be split evenly over {self.world} ranks",
                hint=f"use a node count that divides {total}, or pipeline sharding",
            )
        return self.part(total)


WHOLE = TensorShard()
