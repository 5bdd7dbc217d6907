"""The instances this node holds a part of: each one's runner and compute lane, and the last
reports of the ones that failed (bounded), so `exoctl state` still shows why. Torch-free at
import: the runner's parts bring torch when the first instance is built."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

from exoctl.errors import ExoctlError
from exoctl.wire.runner_report import RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.worker.lane import Job, Lane
from exoctl.worker.node_memory import MemoryView
from exoctl.worker.outbox import Outbox
from exoctl.worker.tensor_meeting import Meeting

if TYPE_CHECKING:
    from exoctl.worker.instance import InstanceRunner

log = logging.getLogger("exoctl.worker")

MAX_FAILURES = 16  # failed runners whose reports a node keeps (the oldest are forgotten first)


class HeldInstances:
    def __init__(
        self, node: str, max_batch: int, meeting: Meeting, outbox: Outbox, memory: MemoryView | None = None
    ) -> None:
        self.node = node
        self.max_batch = max_batch
        self.meeting = meeting
        self.outbox = outbox
        self.memory = memory  # the nodes' free memory, for heads (cached prefixes go first)
        self.runners: dict[str, InstanceRunner] = {}  # instance id -> this node's runner of it
        self.lanes: dict[str, Lane] = {}  # instance id -> its compute lane
        # failed runners are retired (lane stopped, sockets closed); their last reports stay
        self.failures: OrderedDict[str, RunnerReport] = OrderedDict()

    def get(self, instance_id: str) -> InstanceRunner:
        """The runner of an instance held here; an error that says why not."""
        runner = self.runners.get(instance_id)
        failed = self.failures.get(instance_id)
        if failed is not None:
            raise ExoctlError(
                f"instance {instance_id} is {failed.status.value} on node {self.node}: {failed.message}"
            )
        if runner is None:
            raise ExoctlError(
                f"node {self.node} holds no runner of instance {instance_id}",
                hint="`exoctl state` lists the instances",
            )
        return runner

    def put(self, instance_id: str, job: Job) -> None:
        """A job for an instance's lane (none once it is unloaded or retired: dropped)."""
        lane = self.lanes.get(instance_id)
        if lane is not None:
            lane.put(job)

    def reports(self) -> tuple[RunnerReport, ...]:
        return (*(r.report() for r in self.runners.values()), *self.failures.values())

    def watched(self, own_address: str) -> set[str]:
        """The other workers the runners here belong with."""
        return {a for r in self.runners.values() for _, a in r.spec.peers} - {own_address}

    def following(self) -> list[str]:
        """The ready instances whose runner here follows a head elsewhere (takes its leases)."""
        return [i for i, r in self.runners.items() if r.follows_leases and r.status is RunnerStatus.READY]

    def add(self, spec: RunnerSpec) -> InstanceRunner:
        """Build this node's parts of an instance and start its lane (the load starts after)."""
        if spec.instance_id in self.runners:
            raise ExoctlError(f"instance {spec.instance_id} is already on node {self.node}")
        from exoctl.worker.instance import build_instance

        runner = build_instance(spec, self.max_batch, self.meeting, self.memory)
        self.runners[spec.instance_id] = runner
        lane = self.lanes[spec.instance_id] = Lane(runner, self.node, self.outbox)
        lane.thread.start()
        return runner

    def remove(self, instance_id: str) -> int:
        """Unload an instance: free its runner, stop its lane; the bytes it held."""
        self.failures.pop(instance_id, None)
        runner = self.runners.pop(instance_id, None)
        if runner is None:
            return 0
        freed = runner.memory_bytes
        self.meeting.forget(instance_id)
        runner.free()
        lane = self.lanes.pop(instance_id, None)
        if lane is not None:
            lane.stop()
        log.info("unloaded instance %s (%.1f MB)", instance_id, freed / 1e6)
        return int(freed)

    def retire(self, instance_id: str) -> None:
        """A failed runner gives back its thread and sockets; its last report stays in the state."""
        runner = self.runners.pop(instance_id)
        lane = self.lanes.pop(instance_id, None)
        if lane is not None:
            lane.stop()  # the lane closes the runner's sockets (a tensor rank's collective) as it ends
        self.meeting.forget(instance_id)
        self.failures[instance_id] = runner.report()
        while len(self.failures) > MAX_FAILURES:
            self.failures.popitem(last=False)

    def stop(self) -> None:
        """The worker stops: free every runner and let the lanes end."""
        for runner in list(self.runners.values()):
            runner.free()
        for lane in self.lanes.values():
            lane.stop()
        for lane in self.lanes.values():
            lane.thread.join(2)
