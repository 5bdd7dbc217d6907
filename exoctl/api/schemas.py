"""Request bodies of the HTTP API, validated by pydantic (strict: no silent type coercion)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from exoctl.dtypes import DTYPE_CHOICES


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(default=1, ge=1, le=1)

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        for index, message in enumerate(messages):
            if not message.text().strip():
                raise ValueError(f"message {index} ({message.role}) has no content")
        if messages[-1].role == "assistant":
            raise ValueError("the last message must not be the assistant's: there is nothing to answer")
        return messages

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop or []
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stop

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def chat_messages(self) -> list[dict[str, str]]:
        # the chat templates know system, user and assistant; OpenAI's "developer" is a system turn
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


# EXO's instance kinds for Apple's MLX: exoctl has no MLX, and runs them as its own ring
MLX_INSTANCE_META = ("MlxRing", "MlxJaccl", "MlxIbv")
InstanceMeta = Literal["CpuRing", "CudaRing", "MlxRing", "MlxJaccl", "MlxIbv"]


class PlaceRequest(BaseModel):
    # keys EXO's tools send that exoctl does not know are kept aside (and logged), not refused
    model_config = ConfigDict(extra="allow", strict=True)
    model_id: str = Field(min_length=1)
    sharding: str = "auto"  # Pipeline, Tensor, or auto (EXO's names; any case)
    instance_meta: InstanceMeta = "CpuRing"
    min_nodes: int = Field(default=1, ge=1)
    nodes: int | None = Field(default=None, ge=1)
    dtype: str = "auto"  # one of DTYPE_CHOICES
    wait: bool = True

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, dtype: str) -> str:
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"Input should be {' or '.join(repr(d) for d in DTYPE_CHOICES)}")
        return dtype

    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})


class CreateInstanceRequest(BaseModel):
    """EXO's `POST /instance`: place the instance a preview (or `/instance/placement`) returned."""

    model_config = ConfigDict(extra="allow", strict=True)
    instance: dict[str, dict[str, Any]]
    wait: bool = True

    def unknown_keys(self) -> list[str]:
        return sorted(self.model_extra or {})
