"""The supervisor's events this node keeps for `exoctl state` (`record`): bounded in count and
size, each kept once however many times it is sent. Torch-free."""

from __future__ import annotations

from collections import deque

import msgpack

from exoctl.wire.protocol import ProtocolError
from exoctl.wire.supervisor_event import SupervisorEvent

MAX_EVENTS = 64
MAX_EVENT_BYTES = 4096


class EventLog:
    def __init__(self) -> None:
        self.events: deque[SupervisorEvent] = deque(maxlen=MAX_EVENTS)

    def record(self, event: SupervisorEvent) -> None:
        if len(msgpack.packb(event.to_wire())) > MAX_EVENT_BYTES:
            raise ProtocolError(f"an event is at most {MAX_EVENT_BYTES} bytes")
        if all(e.id != event.id for e in self.events):
            self.events.append(event)
