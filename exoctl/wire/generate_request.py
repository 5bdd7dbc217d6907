"""A client's `generate`: one request for the head of an instance, built by the client and decoded
once by the worker that receives it. Torch-free."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exoctl.errors import InvalidRequestError
from exoctl.wire.chat_options import ChatOptions
from exoctl.wire.protocol import Message
from exoctl.wire.sampling_params import SamplingParams


@dataclass(frozen=True)
class GenerateRequest:
    instance_id: str
    request_id: str
    params: SamplingParams
    messages: list[dict[str, Any]] | None = None  # a chat, rendered with the model's template
    prompt: str | None = None  # or raw text
    prompt_ids: list[int] | None = None  # or token ids, as they are
    chat: ChatOptions = field(default_factory=ChatOptions)
    cache_prompt: bool = True  # reuse a cached prefix of the prompt, and keep this one's (llama.cpp's name)
    speculative: bool = True  # let the instance's drafter guess tokens for it (off: one per step)

    def to_fields(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "request_id": self.request_id,
            "messages": self.messages,
            "prompt": self.prompt,
            "prompt_ids": self.prompt_ids,
            "params": self.params.to_wire(),
            "chat": self.chat.to_wire(),
            "cache_prompt": self.cache_prompt,
            "speculative": self.speculative,
        }

    @classmethod
    def from_message(cls, message: Message) -> GenerateRequest:
        """The `generate` the protocol has checked the field types of; InvalidRequestError names
        what else is wrong."""
        messages, prompt, ids = message["messages"], message["prompt"], message["prompt_ids"]
        if messages is None and prompt is None and ids is None:
            raise InvalidRequestError("a request needs 'messages', 'prompt' or 'prompt_ids'")
        if ids is not None and (
            not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
        ):
            raise InvalidRequestError("'prompt_ids' must be a non-empty list of token ids")
        return cls(
            instance_id=message["instance_id"],
            request_id=message["request_id"],
            params=SamplingParams.from_wire(message["params"]),
            messages=messages,
            prompt=prompt,
            prompt_ids=ids,
            chat=ChatOptions.from_wire(message["chat"]),
            cache_prompt=message["cache_prompt"],
            speculative=message["speculative"],
        )
