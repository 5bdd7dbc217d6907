"""One output path for human (rich) and machine (--json) results, and for errors."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console

from exoctl.errors import ExoctlError

# Tables and text go to stdout; errors and progress to stderr, so `--json | jq` stays clean.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)

_json_errors = False


def use_json_errors(enabled: bool) -> None:
    """With --json, errors are printed as a JSON document on stdout as well."""
    global _json_errors
    _json_errors = enabled


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def print_error(exc: ExoctlError) -> None:
    if _json_errors:
        print_json({"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}})
    err_console.print(f"[bold red]error:[/] {exc.message}", markup=True, soft_wrap=True)
    if exc.hint:
        err_console.print(
            f"[dim]hint:[/] {exc.hint}  (set EXOCTL_DEBUG=1 for the full traceback)", soft_wrap=True
        )


def note(text: str) -> None:
    """A side remark on stderr (what a command did for the user on the way), dimmed."""
    err_console.print(f"[dim]{text}[/]")
