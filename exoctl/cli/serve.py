"""`exoctl serve`: the HTTP API (OpenAI-compatible chat, EXO-compatible cluster control)."""

from __future__ import annotations

import errno
import ipaddress
import socket
from typing import Annotated

import typer

from exoctl.cli.common import InventoryOption
from exoctl.cli.output import err_console
from exoctl.errors import ExoctlError

HELP = (
    "Serve the HTTP API: OpenAI-compatible /v1/chat/completions and EXO-compatible /state, /place_instance."
)
EXAMPLES = (
    "Examples:\n\n  exoctl serve                                  # http://127.0.0.1:52415\n\n"
    "  EXOCTL_API_KEY=secret exoctl serve --host 0.0.0.0\n\n"
    "  curl -s localhost:52415/state | jq '.instances | .[] | .CpuRingInstance.shardAssignments.nodeToRunner'"
)
DEFAULT_API_PORT = 52415


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind_listener(host: str, port: int) -> socket.socket:
    """The server's listening socket, bound here so that a taken port or a bad address is one
    error naming it (uvicorn would print its own raw `[Errno 98]` line first)."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
    except OSError as exc:
        raise ExoctlError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
        listener.listen(2048)
    except OSError as exc:
        listener.close()
        if exc.errno == errno.EADDRINUSE:
            raise ExoctlError(
                f"cannot serve on {host}:{port}: the port is taken by another process",
                hint=f"pass another --port, or stop what listens there (`ss -ltnp 'sport = :{port}'`)",
            ) from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise ExoctlError(
                f"cannot serve on {host}:{port}: {host} is not an address of this machine",
                hint="pass --host with one of this machine's addresses (127.0.0.1 by default)",
            ) from None
        raise ExoctlError(f"cannot serve on {host}:{port}: {exc.strerror}") from None
    listener.setblocking(False)
    return listener


def serve(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_API_PORT,
    api_key: Annotated[
        str | None, typer.Option(envvar="EXOCTL_API_KEY", help="Require 'Authorization: Bearer KEY'.")
    ] = None,
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback address without an API key.")] = False,
    supervise: Annotated[
        bool, typer.Option(help="Place an instance again on the live nodes when it loses a node.")
    ] = True,
    cors_origin: Annotated[
        list[str] | None,
        typer.Option(
            help="Let a browser app served from ORIGIN (e.g. http://localhost:5173) call the API; "
            "repeat for more. Off by default."
        ),
    ] = None,
    inventory: InventoryOption = None,
) -> None:
    if not is_loopback(host) and not api_key and not insecure:
        raise ExoctlError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could place models",
            hint="pass --api-key (or set EXOCTL_API_KEY), or --insecure on a trusted network",
        )
    import logging

    import uvicorn

    from exoctl.api.app import create_app
    from exoctl.api.service import ClusterService
    from exoctl.api.supervisor import Supervisor
    from exoctl.inventory import load_inventory
    from exoctl.keys import find_keys

    # what the supervisor did and request keys it ignored, one line each, with the time
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s exoctl serve: %(message)s")
    inv = load_inventory(inventory)
    listener = bind_listener(host, port)  # before the banner: a taken port is one clean error
    service = ClusterService(inv, find_keys())
    app = create_app(service, api_key=api_key or None, cors_origins=tuple(cors_origin or ()))
    supervisor = Supervisor(service)
    if supervise:
        supervisor.start()
    err_console.print(
        f"exoctl serve: http://{host}:{port} for cluster {inv.name!r} ({len(inv.nodes)} nodes, {inv.source})"
        + (", API key required" if api_key else "")
        + f"; dashboard at http://{host}:{port}/",
        markup=False,
    )
    try:
        from exoctl.api.http_protocol import HeadTimeoutH11Protocol

        config = uvicorn.Config(
            app,
            log_level="warning",
            access_log=False,
            # an idle keep-alive connection is closed after 5 s, and one that trickles its request
            # head after HEAD_TIMEOUT_S: slow or silent clients hold no socket for long
            timeout_keep_alive=5,
            http=HeadTimeoutH11Protocol,
        )
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        listener.close()
        if supervise:
            supervisor.stop()
