"""`serve`'s supervisor on hand-built cluster states (no processes): what it places again, and what
it must not: a placement that failed while loading, or an instance it has already placed again."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from exoctl.api.supervisor import Supervisor
from exoctl.cluster.views import NodeStatus
from exoctl.errors import ExoctlError
from exoctl.inventory import Inventory, Node
from exoctl.wire.runner_report import Failure, RunnerReport, RunnerStatus

NODES = (Node("a", "127.0.0.1", 1), Node("b", "127.0.0.2", 2))
PROFILE = {"ram_total": 100, "ram_available": 60}


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

    def ask_all(self, kind: str, nodes: list[Node], fields: dict[str, Any]) -> dict[str, Any]:
        self.service.told.append((kind, [n.name for n in nodes], fields))
        return {}


class FakeService:
    def __init__(self) -> None:
        self.inventory = Inventory("lab", NODES, "test")
        self.loads: dict[str, Any] = {}
        self.events: list[dict[str, Any]] = []
        self.now: list[NodeStatus] = []
        self.placed: list[str] = []
        self.unloaded: list[tuple[str, list[str]]] = []
        self.told: list[tuple[str, list[str], dict[str, Any]]] = []  # messages to the nodes

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
    assert service.events[-1]["action"] == "not replaced"
    # the event is kept by the live nodes too, for `exoctl state`
    live = [s.node.name for s in LOST if s.up]
    assert service.told == [("record", live, {"event": service.events[-1]})] and service.events[-1]["id"]
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
