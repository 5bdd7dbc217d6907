"""What a runner asks the I/O loop to send: small typed messages, one class per destination.

A runner only computes; it returns these, and its compute lane posts them to the `Outbox`, which
the worker's I/O loop empties when its doorbell rings: the I/O loop owns every network socket,
and reads where each message goes from its type, never by unpacking what was encoded. Torch-free.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any

import zmq

from exoctl.wire.instance_messages import Forget, Forward, InstanceMessage, Lease, Release, SeqError, Tokens
from exoctl.wire.messages import Delta, Done, ErrorReply, frames
from exoctl.wire.node_speed import LinkMeasure


@dataclass(frozen=True)
class ToClient:
    """A reply about one running request, to the client (ZeroMQ identity) that sent it."""

    client: bytes
    message: Delta | Done | ErrorReply

    @property
    def request_id(self) -> str | None:
        return self.message.request_id

    @property
    def ends_request(self) -> bool:
        return isinstance(self.message, Done | ErrorReply)

    def frames(self) -> list[Any]:
        return frames(self.message)


@dataclass(frozen=True)
class ToPeer:
    """A message to another runner of the instance, by its node's address."""

    address: str
    message: Forward | Tokens | Release | Forget | SeqError | Lease

    def frames(self) -> list[Any]:
        return self.message.frames()


@dataclass(frozen=True)
class ToSelf:
    """A message for this same node's runner of the instance (the head's own sampled tokens, the
    next chunk of its prompt): queued on its lane."""

    message: InstanceMessage


@dataclass(frozen=True)
class FailInstance:
    """The instance is broken (a tensor-parallel step failed part-way): fail it on every node."""

    instance_id: str
    message: str


@dataclass(frozen=True)
class LinksMeasured:
    """A link probe finished (worker.link_probe): keep what it measured, answer the client that
    asked (request `reply_to`), or tell it what failed."""

    client: bytes
    reply_to: Any
    links: tuple[LinkMeasure, ...]
    failure: str | None


Out = ToClient | ToPeer | ToSelf | FailInstance | LinksMeasured


def client_error(
    client: bytes, request_id: str, message: str, hint: str | None = None, kind: str = "ExoctlError"
) -> ToClient:
    return ToClient(client, ErrorReply(message, hint, kind, request_id))


class Outbox:
    """Messages from the compute lanes to the I/O loop: a queue, and an inproc doorbell that
    wakes the loop's poller (ZeroMQ sockets cannot be shared between threads, a queue can)."""

    ENDPOINT = "inproc://outbox"

    def __init__(self, ctx: zmq.Context[Any]) -> None:
        self.ctx = ctx
        self.queue: queue.SimpleQueue[Out] = queue.SimpleQueue()
        self.bell = ctx.socket(zmq.PULL)
        self.bell.setsockopt(zmq.RCVHWM, 0)  # no limit: a ring must never be refused (see Poster)
        self.bell.bind(self.ENDPOINT)

    def take(self) -> list[Out]:
        """Everything posted so far (call when the bell socket is readable)."""
        while True:
            try:
                self.bell.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        taken: list[Out] = []
        while True:
            try:
                taken.append(self.queue.get_nowait())
            except queue.Empty:
                return taken


class Poster:
    """One lane's end of the outbox, used only from that lane's thread."""

    def __init__(self, outbox: Outbox) -> None:
        self.queue = outbox.queue
        self.bell = outbox.ctx.socket(zmq.PUSH)
        # no limit: a writer's view of a full pipe can lag the reader's draining, and a ring
        # dropped then would leave a message in the queue with nothing to wake the loop for it
        self.bell.setsockopt(zmq.SNDHWM, 0)
        self.bell.connect(Outbox.ENDPOINT)

    def post(self, out: Out) -> None:
        self.queue.put(out)
        self.bell.send(b"")

    def close(self) -> None:
        self.bell.close(0)
