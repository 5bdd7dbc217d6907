"""One instance's parts on this node, built in one place: the only code that asks which rank
this node is.

Every node has a stage (`PipelineStage` with `HandOn` or `SampleHere`, or a `TensorRank`) and a
role: the `Head` on rank 0, a `Follower` elsewhere. The worker's I/O loop and the instance's
compute lane talk to an `InstanceRunner`, which passes each call to the part it belongs to.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from exoctl.wire.instance_messages import Forward, SeqError, Tokens
from exoctl.wire.runner_report import Failure, RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.worker.head import Follower, Head, Role
from exoctl.worker.node_memory import MemoryView
from exoctl.worker.outbox import Out, ToPeer, ToSelf
from exoctl.worker.pipeline_stage import HandOn, Onward, PipelineStage, SampleHere
from exoctl.worker.stage import HeadRoute, Stage

if TYPE_CHECKING:
    from exoctl.worker.tensor_meeting import Meeting


class InstanceRunner:
    def __init__(self, spec: RunnerSpec, stage: Stage, role: Role) -> None:
        self.spec = spec
        self.stage = stage
        self.role = role
        self.follows_leases = isinstance(role, Follower)  # frees what the head's leases no longer name

    @property
    def status(self) -> RunnerStatus:
        return self.stage.status

    @property
    def failed(self) -> bool:
        return self.stage.failed

    @property
    def failure(self) -> Failure | None:
        return self.stage.failure

    @property
    def unloading(self) -> bool:
        return self.stage.unloading

    @property
    def memory_bytes(self) -> int:
        draft = self.role.memory_bytes if isinstance(self.role, Head) else 0
        return self.stage.memory_bytes + draft

    @property
    def breaks_instance_on_error(self) -> bool:
        return self.stage.breaks_instance_on_error

    def load(self, folder: Path, draft_folder: Path | None = None) -> None:
        # the tokenizer (and a draft model's) first: cheap, and a bad one fails before the weights
        self.role.load(folder, draft_folder)
        self.stage.load(folder)

    def fail(self, failure: Failure) -> None:
        self.role.free()
        self.stage.fail(failure)

    def free(self) -> None:
        self.role.free()
        self.stage.free()

    def close(self) -> None:
        self.stage.close()

    def report(self) -> RunnerReport:
        return self.role.report(self.stage.report())

    def set_emit(self, emit: Callable[[Out], None]) -> None:
        self.stage.emit = emit

    def check(self, message: Forward) -> None:
        self.stage.check(message)

    def leases(self) -> list[Out]:
        return self.role.leases() if self.status is RunnerStatus.READY else []


def head_route(spec: RunnerSpec) -> HeadRoute:
    """How this node's stage reaches the head: its own lane on rank 0, the head's node elsewhere."""
    if spec.rank == 0:
        return ToSelf
    head = spec.peers[0][1]

    def to_head(message: Tokens | SeqError) -> Out:
        return ToPeer(head, message)

    return to_head


def build_instance(
    spec: RunnerSpec, max_batch: int, meeting: Meeting, memory: MemoryView | None = None
) -> InstanceRunner:
    """This node's parts of an instance, by its rank and the instance's sharding; `memory` tells
    the head its nodes' free memory."""
    to_head = head_route(spec)
    if spec.sharding == "tensor":
        stage: Stage = meeting.rank(spec, to_head)
    else:
        onward: Onward
        if spec.rank == spec.world - 1:
            onward = SampleHere(spec.instance_id, spec.nodes[spec.rank], to_head)
        else:
            onward = HandOn(spec.instance_id, spec.peers[spec.rank + 1][1])
        stage = PipelineStage(spec, max_batch, to_head, onward)
    role: Role = Head(spec, stage, memory) if spec.rank == 0 else Follower(spec, stage)
    return InstanceRunner(spec, stage, role)
