"""Errors a user can act on: what was wrong, with the numbers, and what to do.

The CLI's error boundary prints `message` and `hint` on one line each and exits non-zero;
anything that is not an `ExoctlError` is a bug and keeps its traceback.
"""

from __future__ import annotations


class ExoctlError(Exception):
    """Base of every error meant for the user rather than for a developer."""

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ModelNotFoundError(ExoctlError):
    """A model id, repo id or folder that names nothing usable."""


class ModelFormatError(ExoctlError):
    """A model folder whose config or weights do not match what the engine expects."""


class UnsupportedModelError(ExoctlError):
    """An architecture, dtype or option the engine does not implement."""


class InvalidRequestError(ExoctlError):
    """A generation request with bad parameters (prompt too long, bad sampling values)."""


class CollectiveError(ExoctlError):
    """A tensor-parallel peer did not deliver its partial in time, or the instance failed while
    a rank was waiting for one (the collective was aborted)."""


class PrefixMissingError(ExoctlError):
    """A step reuses a cached prefix its runner does not hold (a lost word from the head): the head
    forgets the entry and runs the sequence again without it."""

    def __init__(self, message: str, hint: str | None = None, entry: str = "") -> None:
        super().__init__(message, hint)
        self.entry = entry


def error_class(name: str) -> type[ExoctlError]:
    """The error class a wire error names, so a client raises the kind the worker raised: one of
    the ExoctlError subclasses made from (message, hint); ExoctlError for any other name."""
    found: type[ExoctlError] = ExoctlError
    pending: list[type[ExoctlError]] = [ExoctlError]
    while pending:
        cls = pending.pop()
        if cls.__name__ == name and cls.__init__ is ExoctlError.__init__:
            found = cls
        pending += cls.__subclasses__()
    return found
