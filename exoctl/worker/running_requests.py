"""The requests this node heads while they run: who asked, and when they last said they still read.

The head sends each client a keepalive every KEEPALIVE_S; the client answers `alive`. A client
silent for CLIENT_SILENT_S is gone (SIGKILLed, its machine lost): its request is cancelled rather
than decoded to max_tokens for nobody. Torch-free.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from exoctl.errors import ExoctlError

KEEPALIVE_S = 1.0  # clients of running requests hear from the head at least this often
CLIENT_SILENT_S = 10.0


@dataclass
class RunningRequest:
    client: bytes
    instance_id: str
    heard: float = field(default_factory=time.monotonic)  # the client's last word ("alive")


class RunningRequests:
    def __init__(self) -> None:
        self.running: dict[str, RunningRequest] = {}  # request id -> who asked

    def start(self, request_id: str, client: bytes, instance_id: str) -> None:
        if request_id in self.running:
            raise ExoctlError(f"request id {request_id} is already running")
        self.running[request_id] = RunningRequest(client, instance_id)

    def get(self, request_id: str) -> RunningRequest | None:
        return self.running.get(request_id)

    def heard(self, request_id: str, client: bytes, now: float) -> None:
        """The client of a request answered a keepalive (only its own client counts)."""
        request = self.running.get(request_id)
        if request is not None and request.client == client:
            request.heard = now

    def answering(self, request_id: str | None, ends: bool) -> bool:
        """Whether a reply about this request still has someone to go to; one that ends the
        request (its answer, its error) also forgets it."""
        if request_id is None or request_id not in self.running:
            return False  # it failed or was answered already
        if ends:
            del self.running[request_id]
        return True

    def silent(self, now: float) -> list[tuple[str, RunningRequest, float]]:
        """The requests whose client said nothing for CLIENT_SILENT_S, with how long, each returned
        once (its clock starts again: one cancel, then the lane ends the sequence)."""
        gone = [(i, r, now - r.heard) for i, r in self.running.items() if now - r.heard > CLIENT_SILENT_S]
        for _, request, _ in gone:
            request.heard = now
        return gone

    def end(self, instance_id: str) -> list[tuple[str, RunningRequest]]:
        """Forget the requests of an instance (it failed or was unloaded); they need an answer."""
        ended = [(i, r) for i, r in self.running.items() if r.instance_id == instance_id]
        for request_id, _ in ended:
            del self.running[request_id]
        return ended
