"""What `serve`'s supervisor does next, decided by a pure function of what it sees and remembers.

`plan(seen, memory)` returns the actions of one round, in order; `Supervisor` performs them and
records their outcomes in its memory. No process, socket or clock is touched here, so every case
(a lost node, a leftover, a restore that must wait) is tested on plain values.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import dataclass, field

from exoctl.cluster.views import InstanceStatus, InstanceView


@dataclass(frozen=True)
class Asked:
    """What an instance was placed as, before a lost node made it smaller."""

    model: str  # as asked: catalog id, folder, Hub reference
    sharding: str  # as asked: auto, pipeline, tensor
    nodes: int
    dtype: str
    prefix_cache_bytes: int | None = None  # as asked (None: each node's own budget)
    draft: str | None = None  # the drafter, as asked
    draft_dtype: str = "auto"


@dataclass(frozen=True)
class Seen:
    """One round's reading of the cluster."""

    views: Mapping[str, InstanceView]
    loaded: Set[str]  # instances whose placement by this server finished (its load record is ready)
    live_nodes: int
    now: float  # monotonic


@dataclass(frozen=True)
class Memory:
    """What the supervisor keeps between rounds (read-only here)."""

    served: Set[str] = frozenset()  # instances that once served: only those are placed again
    reformed: Set[str] = frozenset()  # placed again: their leftovers are unloaded, never re-placed
    asked: Mapping[str, Asked] = field(default_factory=dict)  # smaller than asked, and the ask
    restore_at: Mapping[str, float] = field(default_factory=dict)  # when a restore may be tried
    retiring: Set[str] = frozenset()  # restored: unloaded once idle


@dataclass(frozen=True)
class Served:
    """The instances that have served, as of this round (gone ones dropped)."""

    instance_ids: frozenset[str]


@dataclass(frozen=True)
class UnloadLeftovers:
    """What is left of an instance already placed again (a node back with a stale runner)."""

    view: InstanceView


@dataclass(frozen=True)
class Reform:
    """An instance that lost a node: unload what is left, place it again on the live nodes."""

    view: InstanceView


@dataclass(frozen=True)
class Retire:
    """A restored-from instance that is now idle: unload it."""

    view: InstanceView


@dataclass(frozen=True)
class StopRetiring:
    instance_id: str


@dataclass(frozen=True)
class ForgetAsked:
    """A smaller instance that is gone, or itself being placed again: nothing to restore."""

    instance_id: str


@dataclass(frozen=True)
class Restore:
    """Enough nodes are back and the smaller instance is idle: place what was asked."""

    view: InstanceView
    asked: Asked


Action = Served | UnloadLeftovers | Reform | Retire | StopRetiring | ForgetAsked | Restore


def plan(seen: Seen, memory: Memory) -> list[Action]:
    """One round: leftovers unloaded and lost instances placed again first; retirements and
    restores only in a round with nothing else to do (what was just placed is not in `seen`)."""
    views = seen.views
    served = {i for i in memory.served if i in views}
    served |= {i for i, view in views.items() if view.serving or i in seen.loaded}
    actions: list[Action] = [Served(frozenset(served))]
    for instance_id, view in views.items():
        if instance_id in memory.reformed:
            if view.status is InstanceStatus.FAILED or view.lost_node is not None:
                actions.append(UnloadLeftovers(view))
        elif view.lost_node is not None and instance_id in served:
            actions.append(Reform(view))
    if len(actions) > 1:
        return actions
    for instance_id in sorted(memory.retiring):
        old = views.get(instance_id)
        if old is None:
            actions.append(StopRetiring(instance_id))
        elif old.status is InstanceStatus.READY:  # no request runs on it any more
            actions += [Retire(old), StopRetiring(instance_id)]
    for instance_id, asked in memory.asked.items():
        small = views.get(instance_id)
        if small is None or small.lost_node is not None:
            actions.append(ForgetAsked(instance_id))
            continue
        # idle (a running request is never dropped), enough nodes, and not too soon (flapping)
        idle = small.status is InstanceStatus.READY
        if idle and seen.live_nodes >= asked.nodes and seen.now >= memory.restore_at.get(instance_id, 0.0):
            actions.append(Restore(small, asked))
    return actions
