"""ZeroMQ sockets with CurveZMQ, and a request/reply client for one node.

Workers bind one ROUTER; clients and pipeline neighbours connect DEALERs to it. With cluster
keys every socket is encrypted and a worker's ZAP handler admits only the cluster's public key.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any

import zmq
import zmq.auth.thread
import zmq.utils.monitor

from exoctl.errors import ExoctlError
from exoctl.keys import ClusterKeys
from exoctl.wire import protocol
from exoctl.wire.messages import (
    ErrorReply,
    LinksReply,
    Ok,
    Outgoing,
    Pong,
    Reply,
    Request,
    StatusReply,
    WireMessage,
    frames,
    parse,
)

MAX_MESSAGE_BYTES = protocol.MAX_TENSOR_BYTES + protocol.MAX_HEADER_BYTES
_HANDSHAKE_FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
    | zmq.EVENT_HANDSHAKE_FAILED_AUTH
)


class NodeError(ExoctlError):
    """A node that failed a request, refused us, or stopped answering; names the node. `kind` is
    the class of the error behind it (the worker's own, sent by name; a version mismatch)."""

    def __init__(
        self, node: str, message: str, hint: str | None = None, kind: type[ExoctlError] = ExoctlError
    ) -> None:
        super().__init__(message, hint)
        self.node = node
        self.kind = kind


class KeyRefusedError(NodeError):
    """A node whose CurveZMQ handshake refused this client: it holds another cluster key."""


def error_reply(node: str, reply: ErrorReply) -> NodeError:
    """A worker's error reply as an error that names the node (once, if the worker already did)."""
    text = reply.message
    if f"node {node}" not in text:
        text = f"node {node}: {text}"
    return NodeError(node, text, reply.hint, reply.error_class)


@dataclass(frozen=True)
class Received:
    """A message from a worker, with the id of the request it answers (None: not an answer)."""

    reply_to: Any
    message: WireMessage


def secure_server(sock: zmq.Socket[Any], keys: ClusterKeys | None) -> None:
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_server = True


def secure_client(sock: zmq.Socket[Any], keys: ClusterKeys | None) -> None:
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    if keys is not None:
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.curve_serverkey = keys.public


def start_authenticator(ctx: zmq.Context[Any], keys: ClusterKeys) -> zmq.auth.thread.ThreadAuthenticator:
    """Admit only clients presenting a public key found in the keys folder (the cluster's)."""
    auth = zmq.auth.thread.ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(keys.folder))
    return auth


_ids = itertools.count(1)


class NodeClient:
    """Requests to one worker over a DEALER socket; replies are matched by request id."""

    def __init__(
        self, ctx: zmq.Context[Any], name: str, address: str, keys: ClusterKeys | None, timeout: float = 5.0
    ) -> None:
        self.name = name
        self.address = address
        self.timeout = timeout
        self.sock = ctx.socket(zmq.DEALER)
        secure_client(self.sock, keys)
        self.monitor = self.sock.get_monitor_socket(_HANDSHAKE_FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        self.sock.connect(f"tcp://{address}")
        self.refused = False

    def close(self) -> None:
        self.sock.disable_monitor()
        self.monitor.close(0)
        self.sock.close(0)

    def send(self, message: Outgoing) -> int:
        request_id = next(_ids)
        self.sock.send_multipart(frames(message, request_id))
        return request_id

    def _check_handshake(self) -> None:
        while self.monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(self.monitor)
            if event["event"] & _HANDSHAKE_FAILED:
                self.refused = True
            elif event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.refused = False

    def silence_error(self, waited: float) -> NodeError:
        self._check_handshake()
        if self.refused:
            return KeyRefusedError(
                self.name,
                f"node {self.name} ({self.address}) refused this client: the CurveZMQ handshake failed",
                hint="this machine needs the cluster key the workers were started with "
                "(`exoctl keys init` here, then `exoctl down` and `exoctl up` to push it)",
            )
        return NodeError(
            self.name,
            f"node {self.name} ({self.address}) did not answer within {waited:.1f} s",
            hint=f"is the worker running? `exoctl up` starts it, `exoctl logs {self.name}` shows its log",
        )

    def receive(self, timeout: float) -> Received | None:
        """The next message, or None after `timeout` seconds of silence."""
        if not self.sock.poll(int(timeout * 1000)):
            return None
        frames = self.sock.recv_multipart(copy=False)
        try:
            decoded = protocol.decode([f.buffer for f in frames])
            return Received(decoded.get("id"), parse(decoded))
        except ExoctlError as exc:
            raise NodeError(
                self.name, f"node {self.name} sent a bad message: {exc.message}", exc.hint, type(exc)
            ) from None

    def request(self, message: Request, timeout: float | None = None) -> Reply:
        """Send one request and wait for its reply; an error reply becomes a NodeError."""
        timeout = self.timeout if timeout is None else timeout
        request_id = self.send(message)
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            received = self.receive(max(left, 0.0)) if left > 0 else None
            if received is None:
                raise self.silence_error(timeout)
            if received.reply_to != request_id:
                continue  # a late reply to an earlier request
            return reply_or_raise(self.name, received.message)


def reply_or_raise(node: str, message: WireMessage) -> Reply:
    """A worker's answer to a request: its reply, or its error raised as a NodeError."""
    match message:
        case ErrorReply():
            raise error_reply(node, message)
        case Pong() | StatusReply() | Ok() | LinksReply():
            return message
    raise NodeError(node, f"node {node} answered a request with '{message.KIND}'")
