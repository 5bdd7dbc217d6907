"""`serve`'s supervisor on hand-built cluster states (no processes): what it places again, and what
it must not: a placement that failed while loading, or an instance it has already placed again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from exoctl.api.supervisor import Supervisor
from exoctl.api.supervisor_plan import (
    Asked,
    ForgetAsked,
    Memory,
    Reform,
    Restore,
    Retire,
    Seen,
    Served,
    StopRetiring,
    UnloadLeftovers,
    plan,
)
from exoctl.cluster.views import InstanceView, NodeStatus, instances_of
from exoctl.errors import ExoctlError
from exoctl.inventory import Inventory, Node
from exoctl.wire.messages import Record
from exoctl.wire.runner_report import Failure, RunnerReport, RunnerStatus
from exoctl.wire.supervisor_event import SupervisorEvent
from exoctl.wire.worker_profile import WorkerProfile

NODES = (Node("a", "127.0.0.1", 1), Node("b", "127.0.0.2", 2))
PROFILE = WorkerProfile.planned("a", "cpu", 100, "m", "float32")


def report(node_rank: int, status: RunnerStatus, failure: Failure | None = None) -> RunnerReport:
    return RunnerReport(
        runner_id=f"r{node_rank}",
        instance_id="inst",
        model_id="smollm2-135m-cpu",
        sharding="pipeline",
        dtype="float32",
        start_layer=15 * node_rank,
        end_layer=15 * (node_rank + 1),
        n_layers=30,
        rank=node_rank,
        world=2,
        nodes=("a", "b"),
        status=status,
        failure=failure,
    )


READY = [
    NodeStatus(NODES[0], PROFILE, [report(0, RunnerStatus.READY)]),
    NodeStatus(NODES[1], PROFILE, [report(1, RunnerStatus.READY)]),
]
LOST = [
    NodeStatus(NODES[0], PROFILE, [report(0, RunnerStatus.FAILED, Failure("node b stopped answering", "b"))]),
    NodeStatus(NODES[1], error="node b did not answer"),
]


class FakeCluster:
    def __init__(self, service: FakeService) -> None:
        self.service = service
        self.inventory = service.inventory

    def unload(self, instance_id: str, nodes: list[Node]) -> dict[str, int]:
        self.service.unloaded.append((instance_id, [n.name for n in nodes]))
        return {}

    def ask_all(self, message: Any, nodes: list[Node]) -> dict[str, Any]:
        self.service.told.append((message, [n.name for n in nodes]))
        return {}


class FakeService:
    def __init__(self) -> None:
        self.inventory = Inventory("lab", NODES, "test")
        self.loads: dict[str, Any] = {}
        self.events: list[SupervisorEvent] = []
        self.now: list[NodeStatus] = []
        self.placed: list[str] = []
        self.unloaded: list[tuple[str, list[str]]] = []
        self.told: list[tuple[Any, list[str]]] = []  # messages to the nodes

    def statuses(self) -> list[NodeStatus]:
        return self.now

    @contextmanager
    def cluster(self) -> Iterator[FakeCluster]:
        yield FakeCluster(self)

    def place(self, model: str, *args: Any, **kwargs: Any) -> Any:
        self.placed.append(model)
        raise ExoctlError("not enough memory on the live nodes")


def supervisor(service: FakeService) -> Supervisor:
    return Supervisor(service)  # type: ignore[arg-type]


def test_an_instance_that_served_and_lost_a_node_is_placed_again_once() -> None:
    service = FakeService()
    watch = supervisor(service)
    service.now = READY
    watch.run_once()
    service.now = LOST
    watch.run_once()
    assert service.placed == ["smollm2-135m-cpu"] and service.unloaded == [("inst", ["a"])]
    assert service.events[-1].action == "not replaced"
    # the event is kept by the live nodes too, for `exoctl state`
    live = [s.node.name for s in LOST if s.up]
    assert service.told == [(Record(service.events[-1]), live)] and service.events[-1].id
    # a node that was frozen comes back with its stale runner, which blames the others: what is
    # left of the instance is unloaded, and it is not placed a second time
    watch.run_once()
    assert service.placed == ["smollm2-135m-cpu"] and service.unloaded == [("inst", ["a"])] * 2
    assert len(service.events) == 1


def test_a_placement_that_failed_while_loading_is_not_placed_behind_its_callers_back() -> None:
    service = FakeService()
    watch = supervisor(service)
    service.now = [
        NodeStatus(NODES[0], PROFILE, [report(0, RunnerStatus.LOADING)]),
        NodeStatus(NODES[1], PROFILE, [report(1, RunnerStatus.LOADING)]),
    ]
    watch.run_once()
    service.now = LOST  # a node killed during the load: the caller got the error
    watch.run_once()
    watch.run_once()
    assert service.placed == [] and service.events == []


def test_a_node_that_flaps_is_not_chased() -> None:
    """Each time the same ask is placed again smaller, the wait before restoring it doubles."""
    from exoctl.api.supervisor import RESTORE_AFTER_S, RESTORE_MAX_S, Asked, smaller
    from exoctl.placement.pipeline import Placement, Shard

    watch = supervisor(FakeService())
    asked = Asked("smollm2-135m-cpu", "pipeline", 3, "float32")
    waits = [watch._flapped(asked) for _ in range(9)]
    assert waits[:4] == [RESTORE_AFTER_S, 2 * RESTORE_AFTER_S, 4 * RESTORE_AFTER_S, 8 * RESTORE_AFTER_S]
    assert waits[-1] == RESTORE_MAX_S
    assert watch._flapped(Asked("smollm2-135m-cpu", "pipeline", 2, "float32")) == RESTORE_AFTER_S
    one = Placement("m", "pipeline", "float32", (Shard("a", 0, 30, 1),))
    assert smaller(one, asked) and not smaller(one, Asked("m", "auto", 1, "float32"))
    assert smaller(one, Asked("m", "tensor", 1, "float32"))  # a fallback sharding


def test_a_frozen_ranks_stale_runner_is_unloaded_after_the_instance_left_the_state() -> None:
    """A tensor rank frozen (SIGSTOP) while the supervisor placed its instance again comes back
    minutes later with a ready runner that blames no one: the state shows the old instance failed
    (its other runners are gone) until the supervisor unloads the leftover."""
    service = FakeService()
    watch = supervisor(service)
    service.now = READY
    watch.run_once()
    service.now = LOST
    watch.run_once()  # placed again (here: not, for memory), its survivors unloaded
    service.now = [NodeStatus(NODES[0], PROFILE), NodeStatus(NODES[1], error="node b did not answer")]
    for _ in range(3):
        watch.run_once()  # the instance is gone from the state for a while
    service.now = [
        NodeStatus(NODES[0], PROFILE),
        NodeStatus(NODES[1], PROFILE, [report(1, RunnerStatus.READY)]),  # b is back, stale
    ]
    watch.run_once()
    assert service.unloaded[-1] == ("inst", ["b"]) and service.placed == ["smollm2-135m-cpu"]


# --- the plan alone: what the supervisor decides, on plain values ------------------------------


def view_of(statuses: list[NodeStatus], instance_id: str = "inst") -> InstanceView:
    return instances_of(statuses)[instance_id]


def seen(
    *views: InstanceView, live: int = 2, now: float = 100.0, loaded: frozenset[str] = frozenset()
) -> Seen:
    return Seen({v.instance_id: v for v in views}, loaded, live, now)


def test_the_plan_places_again_only_what_served_and_lost_a_node() -> None:
    lost = view_of(LOST)
    assert plan(seen(lost), Memory()) == [Served(frozenset())]  # never served: its caller got the error
    assert plan(seen(lost), Memory(served={"inst"})) == [Served(frozenset({"inst"})), Reform(lost)]
    # a view that serves is remembered; one gone from the state is forgotten
    ready = view_of(READY)
    assert plan(seen(ready), Memory(served={"gone"}))[0] == Served(frozenset({"inst"}))
    assert plan(seen(view_of(LOST), loaded=frozenset({"inst"})), Memory())[1] == Reform(lost)


def test_the_plan_unloads_the_leftovers_of_what_was_placed_again() -> None:
    stale = view_of([NodeStatus(NODES[1], PROFILE, [report(1, RunnerStatus.READY)])])  # b back, alone
    assert plan(seen(stale), Memory(reformed={"inst"}))[1:] == [UnloadLeftovers(stale)]
    ready = view_of(READY)
    assert plan(seen(ready), Memory(reformed={"inst"}))[1:] == []  # whole again: nothing to unload


def test_the_plan_restores_an_idle_smaller_instance_once_enough_nodes_are_back() -> None:
    small = view_of(READY)
    asked = Asked("smollm2-135m-cpu", "pipeline", 3, "float32")
    memory = Memory(asked={"inst": asked}, restore_at={"inst": 50.0})
    assert plan(seen(small, live=2), memory)[1:] == []  # 3 asked, 2 live: wait
    assert plan(seen(small, live=3, now=40.0), memory)[1:] == []  # too soon after a flap
    assert plan(seen(small, live=3), memory)[1:] == [Restore(small, asked)]
    busy = view_of(
        [
            NodeStatus(NODES[0], PROFILE, [replace(report(0, RunnerStatus.READY), active_sequences=1)]),
            *READY[1:],
        ]
    )
    assert plan(seen(busy, live=3), memory)[1:] == []  # a running request is never dropped
    assert plan(seen(live=3), memory)[1:] == [ForgetAsked("inst")]  # gone meanwhile


def test_the_plan_retires_a_restored_from_instance_once_idle_and_waits_a_round_after_a_reform() -> None:
    old = view_of(READY)
    assert plan(seen(old), Memory(retiring={"inst"}))[1:] == [Retire(old), StopRetiring("inst")]
    assert plan(seen(), Memory(retiring={"inst"}))[1:] == [StopRetiring("inst")]
    # a round that placed something again does nothing else: what it placed is not seen yet
    lost = replace(view_of(LOST), instance_id="other")
    memory = Memory(served={"other"}, retiring={"inst"})
    assert plan(seen(old, lost), memory)[1:] == [Reform(lost)]
