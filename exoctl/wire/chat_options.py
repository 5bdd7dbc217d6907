"""What a chat request asks of the head beyond sampling: the tools its template renders, the start
of the answer a required tool call forces, and whether the text keeps special tokens (the
markers of a tool call). Torch-free: the API builds it, the head reads it; `to_wire`/`from_wire`
are its form in a `generate` message."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from exoctl.errors import InvalidRequestError

MAX_PREFIX = 4096  # a forced answer start is a call's opening, never a document


@dataclass(frozen=True)
class ChatOptions:
    tools: list[dict[str, Any]] | None = None
    prefix: str = ""
    special: bool = False

    def to_wire(self) -> dict[str, Any] | None:
        if self == ChatOptions():
            return None
        return {"tools": self.tools, "prefix": self.prefix, "special": self.special}

    @classmethod
    def from_wire(cls, raw: Any) -> ChatOptions:
        if raw is None:
            return cls()
        if not isinstance(raw, dict) or set(raw) != {"tools", "prefix", "special"}:
            raise InvalidRequestError("'chat' must be {tools, prefix, special}")
        tools, prefix, special = raw["tools"], raw["prefix"], raw["special"]
        if tools is not None and (not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)):
            raise InvalidRequestError("'chat' tools must be a list of objects")
        if not isinstance(prefix, str) or len(prefix) > MAX_PREFIX:
            raise InvalidRequestError(f"'chat' prefix must be a string of at most {MAX_PREFIX} characters")
        if not isinstance(special, bool):
            raise InvalidRequestError("'chat' special must be true or false")
        return cls(tools, prefix, special)
