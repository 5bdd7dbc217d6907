"""Measuring this worker's links to other workers: the round trip of a small frame, and the
throughput of a few megabytes sent in a window of frames, as a tensor split's partials and a
pipeline's activations travel. Runs on a thread of its own (a probe of a slow link takes a second;
the I/O loop goes on answering meanwhile), over its own sockets; torch-free."""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import zmq

from exoctl.errors import ExoctlError
from exoctl.keys import ClusterKeys
from exoctl.transport import NodeClient
from exoctl.wire.messages import Echo, Ping, Pong
from exoctl.wire.node_speed import LinkMeasure

RTT_PINGS = 8  # the median of these small round trips
CHUNK = 256 * 2**10  # bytes of one throughput frame
WINDOW = 8  # frames in flight: the link stays busy while replies come back
MIN_S, MIN_BYTES = 0.25, 2**20  # throughput: at least this long and this many bytes...
MAX_BYTES = 64 * 2**20  # ...and no more than this (a fast link is done in milliseconds)
LINK_TIMEOUT_S = 10.0


def measure_link(client: NodeClient, name: str) -> LinkMeasure:
    """One link, from here to the worker `client` talks to."""
    pong = client.request(Ping(), timeout=LINK_TIMEOUT_S)  # its run's id; the handshake is done here
    boot = pong.profile.boot_id if isinstance(pong, Pong) else ""
    rtts = []
    for _ in range(RTT_PINGS):
        start = time.perf_counter()
        client.request(Echo(), timeout=LINK_TIMEOUT_S)
        rtts.append(time.perf_counter() - start)
    pad = bytes(CHUNK)
    pending: set[int] = set()
    sent = acked = 0
    start = time.perf_counter()
    deadline = start + LINK_TIMEOUT_S
    while True:
        elapsed = time.perf_counter() - start
        enough = (elapsed >= MIN_S and sent >= MIN_BYTES) or sent >= MAX_BYTES
        while len(pending) < WINDOW and not enough:
            pending.add(client.send(Echo(pad)))
            sent += CHUNK
            enough = sent >= MAX_BYTES
        if not pending:
            break
        received = client.receive(max(deadline - time.perf_counter(), 0.0))
        if received is None:
            raise client.silence_error(LINK_TIMEOUT_S)
        if received.reply_to in pending:
            pending.discard(received.reply_to)
            acked += CHUNK
    seconds = time.perf_counter() - start
    return LinkMeasure(name, client.address, boot, statistics.median(rtts), acked / seconds, time.time())


def probe_links(
    ctx: zmq.Context[Any],
    keys: ClusterKeys | None,
    targets: tuple[tuple[str, str], ...],
    done: Callable[[tuple[LinkMeasure, ...], str | None], None],
) -> threading.Thread:
    """Measure the links to `targets` (name, address) one after another on a new thread; `done`
    gets what was measured and, if a target failed, why (the others are still measured)."""

    def run() -> None:
        measured: list[LinkMeasure] = []
        failures: list[str] = []
        for name, address in targets:
            client = NodeClient(ctx, name, address, keys, LINK_TIMEOUT_S)
            try:
                measured.append(measure_link(client, name))
            except ExoctlError as exc:
                failures.append(exc.message)
            except zmq.ZMQError as exc:
                failures.append(f"node {name} ({address}): {exc.strerror}")
            finally:
                client.close()
        done(tuple(measured), "; ".join(failures) or None)

    thread = threading.Thread(target=run, name="link-probe", daemon=True)
    thread.start()
    return thread
