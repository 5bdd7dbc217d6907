"""Request bodies of the HTTP API, validated by pydantic (strict: no silent type coercion)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exoctl.dtypes import UnsupportedDtypeError, check_dtype
from exoctl.placement.pipeline import GB
from exoctl.wire.sampling_params import SamplingRequest

MAX_MODEL_CHARS = 1024  # longer than any path a model directory holds (PATH_MAX is 4096; ids are short)


class ContentPart(BaseModel):
    """One part of a message's content: text; anything else (image_url, input_audio, file) is
    refused by the message with a clear error, not dropped."""

    model_config = ConfigDict(extra="ignore", strict=True)
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    id: str = ""
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool's answer to one of them

    def text(self) -> str:
        if self.content is None:
            return ""
        return self.content if isinstance(self.content, str) else "".join(p.text or "" for p in self.content)

    def non_text(self) -> str | None:
        """The type of the first content part that is not text, if any."""
        if isinstance(self.content, list):
            for part in self.content:
                if part.type != "text" or part.text is None:
                    return part.type
        return None

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it: OpenAI's "developer" is a system turn; a call's
        arguments are an object (the templates write them with `tojson`)."""
        doc: dict[str, Any] = {
            "role": "system" if self.role == "developer" else self.role,
            "content": self.text(),
        }
        if self.tool_calls:
            doc["tool_calls"] = [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,
                        "arguments": json_arguments(call.function.arguments),
                    },
                }
                for call in self.tool_calls
            ]
        if self.role == "tool":
            doc["tool_call_id"] = self.tool_call_id or ""
            if self.name:
                doc["name"] = self.name
        return doc


def json_arguments(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # the templates write a string as it is


def stop_list(stop: str | list[str] | None) -> list[str]:
    """OpenAI's `stop`: one string or up to 4 (ValueError, pydantic's field error, otherwise)."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ValueError("stop takes up to 4 non-empty strings")
    return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: FunctionSpec


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    name: str = Field(min_length=1)


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["function"]
    function: NamedFunction


class OpenAISampling(BaseModel):
    """The sampling fields OpenAI's chat and completion requests share (with vLLM's `top_k`, `min_p`
    and `repetition_penalty`); left out, they come from the model's own defaults."""

    model_config = ConfigDict(extra="ignore", strict=True)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's spelling: -1 (or 0) turns it off
    min_p: float | None = Field(default=None, ge=0, le=1)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    seed: int | None = None
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stop_list(stop)
        return stop

    def stops(self) -> list[str]:
        return stop_list(self.stop)

    def sampling(self, seed: int | None, max_tokens: int | None, logprobs: int | None) -> SamplingRequest:
        return SamplingRequest(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=None if self.top_k is None else max(self.top_k, 0),
            min_p=self.min_p,
            seed=seed,
            max_tokens=max_tokens,
            stop=tuple(self.stops()),
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            repetition_penalty=self.repetition_penalty,
            logprobs=logprobs,
        )


class ChatRequest(OpenAISampling):
    # a model reference is an id, a repo id or a path: a long one is refused, never echoed back
    model: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int = Field(default=1, ge=1, le=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # llama.cpp's name: false reads the whole prompt again (no cached prefix reused or kept)
    cache_prompt: bool = True
    # false decodes this request one token a step even where the instance drafts (speculative decoding)
    speculative: bool = True
    # text, json_object or json_schema: the answer constrained to it (`structured`)
    response_format: dict[str, Any] | None = None

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for index, message in enumerate(messages):
            other = message.non_text()
            if other is not None:
                raise ValueError(
                    f"message {index} ({message.role}) has a {other!r} part: this model reads text only"
                )
            if message.role == "assistant" and message.tool_calls:
                continue  # content may be null beside the calls
            if message.role != "tool" and not message.text().strip():
                raise ValueError(f"message {index} ({message.role}) has no content")
        if messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: there is nothing to answer")
        return messages

    @model_validator(mode="after")
    def _logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]

    def tool_names(self) -> frozenset[str]:
        return frozenset(tool.function.name for tool in self.tools or [])

    def tool_specs(self) -> list[dict[str, Any]] | None:
        """The tools as chat templates take them, or None (none given, or tool_choice "none")."""
        if not self.tools or self.tool_choice == "none":
            return None
        return [tool.model_dump(exclude_none=True) for tool in self.tools]


# EXO's instance kinds for Apple's MLX: exoctl has no MLX, and runs them as its own ring
MLX_INSTANCE_META = ("MlxRing", "MlxJaccl", "MlxIbv")
InstanceMeta = Literal["CpuRing", "CudaRing", "MlxRing", "MlxJaccl", "MlxIbv"]


class PlaceRequest(BaseModel):
    # keys EXO's tools send that exoctl does not know are kept aside (and logged), not refused
    model_config = ConfigDict(extra="allow", strict=True)
    model_id: str = Field(min_length=1, max_length=MAX_MODEL_CHARS)
    sharding: str = "auto"  # Pipeline, Tensor, or auto (EXO's names; any case)
    instance_meta: InstanceMeta = "CpuRing"
    min_nodes: int = Field(default=1, ge=1)
    nodes: int | None = Field(default=None, ge=1)
    dtype: str = "auto"  # one of DTYPE_CHOICES
    wait: bool = True
    # GB each node gives cached prefixes (0: none); left out, each node's own (inventory) or default
    prefix_cache_gb: float | int | None = Field(default=None, ge=0)
    # speculative decoding's drafter: none, ngram, auto, or a draft model (`exoctl place --draft`)
    draft: str | None = Field(default=None, max_length=MAX_MODEL_CHARS)
    draft_dtype: str = "auto"

    @field_validator("dtype", "draft_dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        try:
            return check_dtype(dtype)
        except UnsupportedDtypeError as exc:  # pydantic reports a ValueError as the field's error
            raise ValueError(f"{exc.message}: {exc.hint}") from None

    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})

    def prefix_cache_bytes(self) -> int | None:
        return None if self.prefix_cache_gb is None else int(self.prefix_cache_gb * GB)


class CreateInstanceRequest(BaseModel):
    """EXO's `POST /instance`: place the instance a preview (or `/instance/placement`) returned."""

    model_config = ConfigDict(extra="allow", strict=True)
    instance: dict[str, dict[str, Any]]
    wait: bool = True

    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})
