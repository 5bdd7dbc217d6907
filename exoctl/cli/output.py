"""One output path for human (rich) and machine (--json) results, and for errors."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

from exoctl.errors import ExoctlError

# Tables and text go to stdout; errors and progress to stderr, so `--json | jq` stays clean.
console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


class Output:
    """Where a command's result and its errors go: rich text on the terminal, or one JSON
    document on stdout with --json (errors then a JSON document too, unless the result was
    already printed: stdout stays one document, the error goes to stderr alone)."""

    def __init__(self) -> None:
        self.json = False
        self.printed = False

    def mode(self, json_output: bool) -> None:
        """Each command sets it from its --json option before anything can fail."""
        self.json, self.printed = json_output, False

    def result(self, document: Any, show: Callable[[], None]) -> None:
        """The command's result: `document` as JSON with --json, else drawn by `show`."""
        if self.json:
            print_json(document)
            self.printed = True
        else:
            show()

    def error(self, exc: ExoctlError) -> None:
        if self.json and not self.printed:
            print_json({"error": {"type": type(exc).__name__, "message": exc.message, "hint": exc.hint}})
        err_console.print(f"[bold red]error:[/] {exc.message}", markup=True, soft_wrap=True)
        if exc.hint:
            err_console.print(
                f"[dim]hint:[/] {exc.hint}  (set EXOCTL_DEBUG=1 for the full traceback)", soft_wrap=True
            )


out = Output()


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def note(text: str) -> None:
    """A side remark on stderr (what a command did for the user on the way), dimmed."""
    err_console.print(f"[dim]{text}[/]")
