"""Answers in the shape a request asked for: the grammar its tokens must follow, for llguidance.

The API turns `response_format` (JSON object, JSON schema), a tool call the request requires, and the
generic tool format of a template without one into llguidance's grammar text; the runner that samples
masks what the grammar does not allow (`engine.constraint`). Compiled and checked here, before any
node is asked, so a schema the library cannot take is a 400 that names what it does not support.
Torch-free: llguidance alone.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from exoctl.errors import InvalidRequestError

# Compact JSON, as models write it: ", " and ": " between items, and no free whitespace anywhere
# (free whitespace lets a small model fill its budget with newlines before the first key).
JSON_OPTIONS: dict[str, Any] = {"item_separator": ", ", "key_separator": ": ", "whitespace_flexible": False}
ANY_OBJECT: dict[str, Any] = {"type": "object"}
MAX_SCHEMA_CHARS = 256 * 1024


def _with_options(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema with llguidance's JSON options (its `x-guidance` key), the caller's copy untouched."""
    doc = copy.deepcopy(schema)
    doc["x-guidance"] = {**JSON_OPTIONS, **(doc.get("x-guidance") or {})}
    return doc


def _checked(grammar: str, what: str) -> str:
    import llguidance

    failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if failed:
        raise InvalidRequestError(
            f"{what} cannot be used to constrain the answer: {'; '.join(messages)}",
            hint="remove or rewrite the unsupported part of the schema",
        )
    return grammar


def schema_grammar(schema: Any, what: str = "response_format's JSON schema") -> str:
    """The grammar of one JSON document valid by `schema`."""
    import llguidance

    if not isinstance(schema, dict):
        raise InvalidRequestError(f"{what} must be a JSON object, got {type(schema).__name__}")
    if len(json.dumps(schema)) > MAX_SCHEMA_CHARS:
        raise InvalidRequestError(f"{what} is over {MAX_SCHEMA_CHARS // 1024} KB")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(_with_options(schema))
    except ValueError as exc:
        raise InvalidRequestError(f"{what} is not a usable JSON schema: {exc}") from None
    return _checked(grammar, what)


def response_format_grammar(response_format: dict[str, Any] | None) -> str | None:
    """OpenAI's `response_format`: "text" (None: no constraint), "json_object" (any JSON object),
    or "json_schema" ({"json_schema": {"name", "schema", "strict"}})."""
    if response_format is None:
        return None
    kind = response_format.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return schema_grammar(ANY_OBJECT)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict):
            raise InvalidRequestError(
                "response_format json_schema needs a 'json_schema' object with the 'schema'",
                hint='{"type": "json_schema", "json_schema": {"name": "...", "schema": {...}}}',
            )
        schema = spec.get("schema", ANY_OBJECT)
        if spec.get("strict") is True and isinstance(schema, dict):
            schema = closed_objects(schema)
        return schema_grammar(schema)
    raise InvalidRequestError(
        f"unknown response_format type {kind!r}", hint="use 'text', 'json_object' or 'json_schema'"
    )


def closed_objects(schema: Any) -> Any:
    """OpenAI's strict mode: an object takes the properties its schema names and no others, where
    the schema does not say (JSON Schema's default would let a model add keys without end)."""
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed = {key: closed_objects(value) for key, value in schema.items()}
    if (closed.get("type") == "object" or "properties" in closed) and "additionalProperties" not in closed:
        closed["additionalProperties"] = False
    return closed


# --- tool calls -------------------------------------------------------------------------------


def call_schema(tool: dict[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    """One call of `tool` (a chat template's tool: {"type": "function", "function": {...}}) as
    JSON: {"name": its name, arguments_key: an object its parameters' schema takes}."""
    function = tool["function"]
    parameters = function.get("parameters") or {"type": "object", "properties": {}}
    if function.get("strict") is True:
        parameters = closed_objects(parameters)
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
    }


def calls_schema(
    tools: list[dict[str, Any]], named: str | None, arguments_key: str = "arguments"
) -> dict[str, Any]:
    """A call of any of the tools, or of the one named."""
    chosen = [t for t in tools if named is None or t["function"]["name"] == named]
    schemas = [call_schema(t, arguments_key) for t in chosen]
    return schemas[0] if len(schemas) == 1 else {"anyOf": schemas}


def native_call_grammar(fmt: str, tools: list[dict[str, Any]], named: str | None) -> str:
    """What follows the forced opener (`tool_calls.forced_prefix`) of a required call in a template's
    own format: hermes one `{"name", "arguments"}` object (the answer ends after it: the closing tag
    is optional to the parser, and a Lark rule around `%json` kept llguidance from taking a token
    that holds a whole call), llama3 one `{"name", "parameters"}` object, mistral a list of calls."""
    if fmt == "llama3":
        return schema_grammar(calls_schema(tools, named, "parameters"), "the tools' parameters")
    if fmt == "mistral":
        array = {"type": "array", "items": calls_schema(tools, named), "minItems": 1}
        return schema_grammar(array, "the tools' parameters")
    return schema_grammar(calls_schema(tools, named), "the tools' parameters")


# The generic format (llama.cpp's, for templates that take no tools): the tools are described in a
# system turn, and the whole answer is one JSON object, a call or a reply.
GENERIC_INSTRUCTIONS = (
    "You can call the tools below. Answer with one JSON object only: either "
    '{{"tool_call": {{"name": <tool name>, "arguments": <arguments object>}}}} to call a tool, '
    "{reply}"
    "Tools (JSON schema of each call):\n{tools}"
)


def generic_schema(tools: list[dict[str, Any]], named: str | None, required: bool) -> dict[str, Any]:
    call = {
        "type": "object",
        "properties": {"tool_call": calls_schema(tools, named)},
        "required": ["tool_call"],
        "additionalProperties": False,
    }
    if required or named is not None:
        return call
    reply = {
        "type": "object",
        "properties": {"response": {"type": "string"}},
        "required": ["response"],
        "additionalProperties": False,
    }
    return {"anyOf": [call, reply]}


def generic_system_text(tools: list[dict[str, Any]], named: str | None, required: bool) -> str:
    reply = (
        ""
        if required or named is not None
        else 'or {{"response": <your reply as text>}} to answer the user. '
    )
    described = "\n".join(
        json.dumps(
            {
                "name": t["function"]["name"],
                "description": t["function"].get("description", ""),
                "arguments": t["function"].get("parameters") or {"type": "object"},
            },
            ensure_ascii=False,
        )
        for t in tools
        if named is None or t["function"]["name"] == named
    )
    return GENERIC_INSTRUCTIONS.replace("{reply}", reply).format(tools=described)


def generic_messages(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]], named: str | None, required: bool
) -> list[dict[str, Any]]:
    """The conversation for a template that takes no tools: the tools in the system turn, earlier
    calls written as the JSON the model answers with, tool results as user turns."""
    system = generic_system_text(tools, named, required)
    out: list[dict[str, Any]] = []
    for message in messages:
        role = message["role"]
        if role == "assistant" and message.get("tool_calls"):
            calls = [
                {"tool_call": {"name": c["function"]["name"], "arguments": c["function"]["arguments"]}}
                for c in message["tool_calls"]
            ]
            text = "\n".join(json.dumps(c, ensure_ascii=False) for c in calls)
            out.append({"role": "assistant", "content": text})
        elif role == "tool":
            result = {
                "tool_result": {
                    "tool_call_id": message.get("tool_call_id", ""),
                    "content": message["content"],
                }
            }
            out.append({"role": "user", "content": json.dumps(result, ensure_ascii=False)})
        else:
            out.append({"role": role, "content": message["content"]})
    if out and out[0]["role"] == "system":
        out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{system}"}
    else:
        out.insert(0, {"role": "system", "content": system})
    return out


def generic_grammar(tools: list[dict[str, Any]], named: str | None, required: bool) -> str:
    return schema_grammar(generic_schema(tools, named, required), "the tools' parameters")
