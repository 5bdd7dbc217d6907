"""The other workers this one talks to: a DEALER socket each, and whether they are still there.

Used only from the I/O loop. Every runner heartbeats the nodes of its instances. A node is lost,
and the worker fails the instances that use it, when it answers with another boot id (it
restarted and lost its runners), or when it is silent: for DOWN_AFTER_S once its connection is
gone (its process died: the kernel closed the socket), or for SILENT_AFTER_S while the connection
stays up (frozen, hung, or only busy: a machine loading a model on every core, a link cut without
a word). Slow is not gone, so the second wait is the longer.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import zmq
import zmq.utils.monitor

from exoctl.keys import ClusterKeys
from exoctl.transport import secure_client
from exoctl.wire.messages import ErrorReply, Ping, Pong, WireMessage, frames
from exoctl.worker.node_memory import Room

log = logging.getLogger("exoctl.worker")

HEARTBEAT_S = 0.5
DOWN_AFTER_S = 3.0  # a peer whose connection is gone and that is silent this long is down
SILENT_AFTER_S = 10.0  # a peer still connected but silent this long is down too
# A peer no runner here names any more, and not sent to for this long, has its socket closed:
# otherwise every address ever named (instances come and go; a hostile load names hundreds) holds
# a socket and its monitor until ZeroMQ's limit ("Too many open files").
IDLE_CLOSE_S = 5.0
_LINK_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED


class Peers:
    def __init__(self, ctx: zmq.Context[Any], keys: ClusterKeys | None) -> None:
        self.ctx = ctx
        self.keys = keys
        self.sockets: dict[str, zmq.Socket[Any]] = {}  # address -> DEALER
        self.seen: dict[str, float] = {}  # address -> when it was last heard from
        self.boot: dict[str, str] = {}  # address -> the boot id it answered with first
        self.monitors: dict[str, zmq.Socket[Any]] = {}  # address -> its DEALER's connection events
        self.connected: dict[str, bool] = {}
        self.used: dict[str, float] = {}  # address -> when a message was last sent to it
        self.rooms: dict[str, Room] = {}  # address -> its memory, as its last pong said

    def socket(self, address: str) -> zmq.Socket[Any]:
        sock = self.sockets.get(address)
        if sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            try:
                secure_client(sock, self.keys)
                sock.setsockopt(zmq.SNDHWM, 10000)
                monitor = sock.get_monitor_socket(_LINK_EVENTS)
                sock.connect(f"tcp://{address}")
            except zmq.ZMQError:
                sock.close(0)
                raise
            self.sockets[address] = sock
            self.monitors[address] = monitor
        return sock

    def send(self, address: str, frames: list[Any]) -> None:
        # never block the I/O loop on a dead or frozen peer: its messages are dropped, and the
        # heartbeat fails its instances
        self.used[address] = time.monotonic()
        try:
            self.socket(address).send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped a message to unresponsive peer %s", address)
        except zmq.ZMQError as exc:  # an address ZeroMQ cannot use, or no sockets left
            log.warning("cannot reach peer %s: %s", address, exc.strerror)

    def prune(self, keep: set[str], now: float) -> list[zmq.Socket[Any]]:
        """Forget the peers outside `keep` idle for IDLE_CLOSE_S; their sockets, for the caller to
        unregister from its poller and close."""
        gone = []
        for address in list(self.sockets):
            if address in keep or now - self.used.get(address, 0.0) < IDLE_CLOSE_S:
                continue
            gone.append(self.sockets.pop(address))
            monitor = self.monitors.pop(address, None)
            if monitor is not None:
                monitor.close(0)
            for table in (self.seen, self.boot, self.connected, self.used, self.rooms):
                table.pop(address, None)
        return gone

    def expect(self, addresses: list[str], now: float) -> None:
        """A new instance's peers: their clock starts now, not at an older instance's."""
        for address in addresses:
            self.seen[address] = now

    def heard(self, address: str, message: WireMessage, now: float) -> str | None:
        """A reply from a peer; why it is lost if it restarted, else None."""
        self.seen[address] = now
        match message:
            case Pong(profile):
                self.rooms[address] = Room(profile.ram_available, profile.ram_total)
                previous = self.boot.setdefault(address, profile.boot_id)
                if previous != profile.boot_id:
                    self.boot[address] = profile.boot_id
                    return "restarted and lost its runners"
            case ErrorReply(text):
                log.warning("peer %s answered with an error: %s", address, text)
        return None

    def _link_up(self, address: str) -> bool:
        """Whether the TCP connection to `address` is up, from its monitor's latest events."""
        monitor = self.monitors.get(address)
        while monitor is not None and monitor.poll(0):
            event = zmq.utils.monitor.recv_monitor_message(monitor)
            self.connected[address] = event["event"] == zmq.EVENT_CONNECTED
        return self.connected.get(address, False)

    def beat(self, watched: set[str], now: float) -> dict[str, str]:
        """Ping the watched peers; those silent too long, with why they are lost."""
        lost = {}
        for address in watched:
            self.send(address, frames(Ping(), reply_to=0))
            silent = now - self.seen.get(address, now)
            if silent > SILENT_AFTER_S:
                lost[address] = f"stopped answering (no heartbeat for {silent:.1f} s)"
            elif silent > DOWN_AFTER_S and not self._link_up(address):
                lost[address] = f"stopped answering (connection closed, no heartbeat for {silent:.1f} s)"
        return lost
