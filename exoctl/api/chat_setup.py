"""What a chat asks of the head, whichever API it came by: the conversation as the template gets it,
the tools it renders, the forced start of the answer, and the grammar the answer must follow.

OpenAI chat, Anthropic messages, OpenAI responses and Ollama's chat each turn their request into
the same pieces (messages, tools in the chat templates' form, the tool choice, the JSON schema asked
for) and call `chat_setup`, so a tool call or a structured answer behaves the same on all of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from exoctl.api.structured import generic_grammar, generic_messages, native_call_grammar
from exoctl.api.tool_calls import forced_prefix
from exoctl.errors import InvalidRequestError
from exoctl.wire.chat_options import ChatOptions

ToolChoice = Literal["auto", "required", "none"]


@dataclass(frozen=True)
class ChatSetup:
    messages: list[dict[str, Any]]
    options: ChatOptions
    grammar: str | None  # llguidance's; None: the answer is free
    tool_format: str | None  # how the answer's calls are read (`tool_calls.parse`); None: no tools
    prefix: str = ""  # the forced start of the answer (the start of the text the calls are read from)


def chat_setup(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    choice: ToolChoice,
    named: str | None,
    answer_grammar: str | None,
    template_format: str | None,
) -> ChatSetup:
    """`tools` as chat templates take them ({"type": "function", "function": {...}}); `named` a
    function the answer must call; `answer_grammar` the grammar of a structured answer
    (`structured.response_format_grammar`); `template_format` the model's own tool format (None:
    its template takes no tools, and the generic format is used)."""
    if not tools or choice == "none":
        return ChatSetup(messages, ChatOptions(), answer_grammar, None)
    names = {t["function"]["name"] for t in tools}
    if named is not None and named not in names:
        raise InvalidRequestError(
            f"tool_choice names function {named!r}, which is not among the tools",
            hint=f"tools: {', '.join(sorted(names))}",
        )
    forced = choice == "required" or named is not None
    if template_format is None:
        if answer_grammar is not None and not forced:
            raise InvalidRequestError(
                "a structured response_format and optional tools cannot both shape the answer of a model "
                "whose chat template takes no tools",
                hint="send tool_choice 'required' (a call), or leave out the tools or the response_format",
            )
        return ChatSetup(
            generic_messages(messages, tools, named, forced),
            ChatOptions(),
            generic_grammar(tools, named, forced),
            "generic",
        )
    if not forced:
        # the model decides whether to call; a structured format shapes a plain answer
        return ChatSetup(messages, ChatOptions(tools=tools, special=True), answer_grammar, template_format)
    prefix = forced_prefix(template_format)
    grammar = native_call_grammar(template_format, tools, named)
    return ChatSetup(messages, ChatOptions(tools, prefix, True), grammar, template_format, prefix)
