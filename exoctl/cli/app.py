"""The `exoctl` command line: one Typer app, one error boundary.

Commands live one per module; torch is imported only by commands that run the engine, so
`exoctl --help` and `exoctl models` start fast.
"""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer

from exoctl import __version__
from exoctl.cli import bench as bench_cmd
from exoctl.cli import chat as chat_cmd
from exoctl.cli import download as download_cmd
from exoctl.cli import lifecycle
from exoctl.cli import models as models_cmd
from exoctl.cli import place as place_cmd
from exoctl.cli import run as run_cmd
from exoctl.cli import serve as serve_cmd
from exoctl.cli import state as state_cmd
from exoctl.cli.output import out
from exoctl.errors import ExoctlError

app = typer.Typer(
    name="exoctl",
    help="Shard large language models across a small cluster of CPU machines and chat with them.",
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
)
app.command("up", help=lifecycle.UP_HELP, epilog=lifecycle.UP_EXAMPLES)(lifecycle.up)
app.command("down")(lifecycle.down)
app.command("logs")(lifecycle.logs)
app.command("nodes")(state_cmd.nodes)
app.command("models", help=models_cmd.HELP, epilog=models_cmd.EXAMPLES)(models_cmd.models)
app.command("download", help=download_cmd.HELP, epilog=download_cmd.EXAMPLES)(download_cmd.download)
app.command("place", help=place_cmd.PLACE_HELP, epilog=place_cmd.PLACE_EXAMPLES)(place_cmd.place)
app.command("delete")(place_cmd.delete)
app.command("state", epilog=state_cmd.STATE_EXAMPLES)(state_cmd.state)
app.command("chat", help=chat_cmd.HELP)(chat_cmd.chat)
app.command("run", help=run_cmd.HELP, epilog=run_cmd.EXAMPLES)(run_cmd.run)
app.command("bench", help=bench_cmd.HELP, epilog=bench_cmd.EXAMPLES)(bench_cmd.bench)
app.command("serve", help=serve_cmd.HELP, epilog=serve_cmd.EXAMPLES)(serve_cmd.serve)
app.add_typer(lifecycle.keys_app, name="keys")
app.command("worker")(lifecycle.worker)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"exoctl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    pass


def main() -> None:
    """Entry point: known errors become one line and exit 1 (EXOCTL_DEBUG=1 shows the traceback)."""
    # Typer's standalone mode prints usage errors (exit 2) and handles Ctrl-C; other exceptions
    # come through to here.
    try:
        app(prog_name="exoctl")
    except ExoctlError as exc:
        if os.environ.get("EXOCTL_DEBUG"):
            raise
        out.error(exc)
        sys.exit(1)
