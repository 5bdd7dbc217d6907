"""A model's tool calls read out of its text, as OpenAI's `tool_calls`, for each format the chat
templates of the test plan's families use (`Tokenizer.tool_format` picks one from the template):

- "hermes": `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call
  (Qwen2.5's templates, and the fallback for any template that takes tools);
- "llama3": the whole answer one JSON object `{"name": ..., "parameters": {...}}` (or
  "arguments"), after `<|python_tag|>` or alone; several joined by ";";
- "mistral": `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`;
- "generic" (llama.cpp's, for a template that takes no tools; `structured.generic_messages`): the
  whole answer one JSON object, `{"tool_call": {"name": ..., "arguments": {...}}}` or
  `{"response": "..."}`, constrained to that shape while it is decoded.

Text that is not a valid call (bad JSON, no name, a name the request offered no tool for) stays
text. `ToolStream` does the same on a stream of text deltas, split anywhere: it passes text on
until a call may be starting, then holds the rest until the end.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

OPENERS = {"hermes": "<tool_call>", "llama3": "<|python_tag|>", "mistral": "[TOOL_CALLS]"}
HERMES_BLOCK = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text of an object
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


def _call(doc: Any, names: frozenset[str] | None, arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    name = doc["name"]
    if names is not None and name not in names:
        return None
    arguments = doc.get(arguments_key, doc.get("arguments", doc.get("parameters", {})))
    if isinstance(arguments, str):  # some models write the arguments as JSON text
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    if not isinstance(arguments, dict):
        return None
    return ToolCall(name, json.dumps(arguments, ensure_ascii=False))


def _json(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def parse(text: str, fmt: str | None, names: frozenset[str] | None = None) -> tuple[str, list[ToolCall]]:
    """(the text that is not a call, the calls) of a finished answer."""
    if fmt == "hermes":
        return _parse_hermes(text, names)
    if fmt == "llama3":
        return _parse_llama3(text, names)
    if fmt == "mistral":
        return _parse_mistral(text, names)
    if fmt == "generic":
        return _parse_generic(text, names)
    return text, []


def _parse_generic(text: str, names: frozenset[str] | None) -> tuple[str, list[ToolCall]]:
    doc = _json(text.strip())
    if isinstance(doc, dict) and isinstance(doc.get("response"), str):
        return doc["response"], []
    if isinstance(doc, dict) and "tool_call" in doc:
        call = _call(doc["tool_call"], names)
        if call is not None:
            return "", [call]
    return text, []


def _parse_hermes(text: str, names: frozenset[str] | None) -> tuple[str, list[ToolCall]]:
    calls: list[ToolCall] = []
    kept: list[str] = []
    last = 0
    for match in HERMES_BLOCK.finditer(text):
        call = _call(_json(match.group(1).strip()), names)
        if call is None:
            continue  # not a call: stays in the text
        kept.append(text[last : match.start()])
        last = match.end()
        calls.append(call)
    kept.append(text[last:])
    return ("".join(kept).strip() if calls else text), calls


def _parse_llama3(text: str, names: frozenset[str] | None) -> tuple[str, list[ToolCall]]:
    body = text.strip()
    if body.startswith(OPENERS["llama3"]):
        body = body[len(OPENERS["llama3"]) :].strip()
    if not body.startswith("{"):
        return text, []
    whole = _json(body)
    docs = [whole] if whole is not None else [_json(part) for part in body.split(";")]
    calls = [_call(doc, names, "parameters") for doc in docs]
    if not calls or any(c is None for c in calls):
        return text, []
    return "", [c for c in calls if c is not None]


def _parse_mistral(text: str, names: frozenset[str] | None) -> tuple[str, list[ToolCall]]:
    at = text.find(OPENERS["mistral"])
    if at < 0:
        return text, []
    docs = _json(text[at + len(OPENERS["mistral"]) :].strip())
    if isinstance(docs, dict):
        docs = [docs]
    if not isinstance(docs, list) or not docs:
        return text, []
    calls = [_call(doc, names) for doc in docs]
    if any(c is None for c in calls):
        return text, []
    return text[:at].strip(), [c for c in calls if c is not None]


def forced_prefix(fmt: str) -> str:
    """The opener of an answer that must be a tool call (`tool_choice` "required" or a named
    function) in a template's own format: the head writes it after the generation prompt (where a
    tokenizer has it as one special token, as it is), and the grammar of the call
    (`structured.native_call_grammar`) constrains what the model writes after it."""
    if fmt == "llama3":
        return ""  # the call is the whole answer
    if fmt == "mistral":
        return "[TOOL_CALLS] "
    return "<tool_call>\n"


class ToolStream:
    """Text deltas in; the text to show now out, and at the end the calls and what is left.

    `start` is a forced prefix: the answer is a call from its first character."""

    def __init__(self, fmt: str | None, names: frozenset[str] | None, start: str = "") -> None:
        self.fmt = fmt
        self.names = names
        self.held = start  # text not shown yet
        # a call may be under way: hold everything to the end (a generic answer is JSON throughout)
        self.capturing = bool(start) or fmt == "generic"
        self.shown = ""

    def feed(self, delta: str) -> str:
        if self.fmt is None:
            return delta
        self.held += delta
        if self.capturing:
            return ""
        if self.fmt == "llama3":
            stripped = self.held.lstrip()
            if not self.shown and (not stripped or _may_start(stripped, ("{", OPENERS["llama3"]))):
                # the answer may be a call: it is one from its first character or not at all
                self.capturing = bool(stripped)
                return ""
            return self._show(len(self.held))
        opener = OPENERS[self.fmt]
        at = self.held.find(opener)
        if at >= 0:
            self.capturing = True
            return self._show(at)
        # hold back a tail that may be the opener's start
        keep = next(
            (n for n in range(min(len(opener) - 1, len(self.held)), 0, -1) if self.held.endswith(opener[:n])),
            0,
        )
        return self._show(len(self.held) - keep)

    def _show(self, upto: int) -> str:
        out, self.held = self.held[:upto], self.held[upto:]
        self.shown += out
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the rest of the text to show, the calls)."""
        if self.fmt is None or not self.held:
            return self.held, []
        text, calls = parse(self.held, self.fmt, self.names)
        # a generic answer's reply is the text of its {"response": ...}
        return (text if calls or self.fmt == "generic" else self.held), calls


def _may_start(text: str, openers: tuple[str, ...]) -> bool:
    return any(text.startswith(o) or o.startswith(text) for o in openers)
