"""uvicorn's h11 protocol with a deadline for a request's head.

uvicorn closes a keep-alive connection that sits idle, but not one that trickles its request
line and headers a byte at a time: such clients (or a slowloris) each held a socket and a
parser for as long as they liked. Here a connection that is waiting for a request head and has
not completed it within HEAD_TIMEOUT_S is closed. Bodies are bounded by the Guard's size limit.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

HEAD_TIMEOUT_S = 10.0


class HeadTimeoutH11Protocol(H11Protocol):
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._clear_head_timer()
        super().connection_lost(exc)

    def _watch_head(self) -> None:
        """Armed while the client owes a request head (h11's IDLE), cleared once it has sent one."""
        waiting = self.conn.their_state is h11.IDLE
        if waiting and self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(HEAD_TIMEOUT_S, self._head_overdue)
        elif not waiting:
            self._clear_head_timer()

    def _clear_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_overdue(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.close()
