"""`exoctl serve`: the HTTP API (OpenAI-compatible chat, EXO-compatible cluster control)."""

from __future__ import annotations

import ipaddress
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
        uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    except SystemExit as exc:  # uvicorn exits when it cannot bind
        raise ExoctlError(f"cannot serve on {host}:{port}", hint="is the port taken? pass --port") from exc
    finally:
        if supervise:
            supervisor.stop()
