"""What `serve`'s supervisor did (an instance placed again, restored, or not): kept by every live
node (`record`) so `exoctl state` shows the history from any machine. Typed on both sides; its
wire form is the camelCase map `/state` shows under `reformations`. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exoctl.wire.protocol import ProtocolError

ACTIONS = ("replaced", "not replaced", "restored", "not restored")


@dataclass(frozen=True)
class SupervisorEvent:
    id: str
    time: float  # wall clock
    instance_id: str
    model_id: str
    action: str  # one of ACTIONS
    reason: str | None  # why: the lost node's failure, or the nodes back for what was asked
    new_instance_id: str | None = None
    nodes: tuple[str, ...] | None = None  # where it is now
    restore_after_s: float | None = None  # placed again smaller: a restore is tried after this
    error: str | None = None  # why it was not placed again or restored

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {
            "id": self.id,
            "time": self.time,
            "instanceId": self.instance_id,
            "modelId": self.model_id,
            "action": self.action,
            "reason": self.reason,
        }
        optional = {
            "newInstanceId": self.new_instance_id,
            "nodes": list(self.nodes) if self.nodes is not None else None,
            "restoreAfterSeconds": self.restore_after_s,
            "error": self.error,
        }
        return wire | {k: v for k, v in optional.items() if v is not None}

    @classmethod
    def from_wire(cls, raw: Any) -> SupervisorEvent:
        if not isinstance(raw, dict):
            raise ProtocolError("a supervisor event must be a map")

        def text(key: str, optional: bool = False) -> Any:
            value = raw.get(key)
            if not (isinstance(value, str) or (optional and value is None)):
                raise ProtocolError(f"supervisor event field '{key}' must be a string")
            return value

        event_id = text("id")
        when, after, nodes = raw.get("time"), raw.get("restoreAfterSeconds"), raw.get("nodes")
        if not isinstance(when, int | float) or isinstance(when, bool):
            raise ProtocolError("supervisor event field 'time' must be a number")
        if after is not None and (not isinstance(after, int | float) or isinstance(after, bool)):
            raise ProtocolError("supervisor event field 'restoreAfterSeconds' must be a number")
        if nodes is not None and (not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes)):
            raise ProtocolError("supervisor event field 'nodes' must be a list of node names")
        action = text("action")
        if action not in ACTIONS:
            raise ProtocolError(f"supervisor event action {action!r:.40} is not one of {', '.join(ACTIONS)}")
        return cls(
            id=event_id,
            time=float(when),
            instance_id=text("instanceId"),
            model_id=text("modelId"),
            action=action,
            reason=text("reason", optional=True),
            new_instance_id=text("newInstanceId", optional=True),
            nodes=tuple(nodes) if nodes is not None else None,
            restore_after_s=float(after) if after is not None else None,
            error=text("error", optional=True),
        )
