"""A finished answer — text, token ids, why it stopped, token counts and timings — in one shape.

Torch-free: the head worker makes it, the `done` message carries its wire form, and the CLI and
the API read it by attribute. `to_wire` is also what `exoctl run --json` prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from exoctl.errors import ExoctlError

FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class Timings:
    time_to_first_token_s: float = 0.0
    total_s: float = 0.0
    decode_tokens_per_s: float = 0.0


@dataclass(frozen=True)
class Completion:
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # one of FINISH_REASONS
    prompt_tokens: int = 0
    timings: Timings = field(default_factory=Timings)
    cached_tokens: int = 0  # of the prompt's tokens, those read from a cached prefix (not run again)
    # OpenAI's logprob entry of each prompt token (the first's logprob null), where asked
    prompt_logprobs: list[dict[str, Any]] | None = None
    stop_string: str | None = None  # the stop string that ended the answer (None: another reason)

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_wire(self) -> dict[str, Any]:
        t = self.timings
        extra: dict[str, Any] = (
            {} if self.prompt_logprobs is None else {"prompt_logprobs": self.prompt_logprobs}
        )
        if self.stop_string is not None:
            extra["stop_string"] = self.stop_string
        return {
            **extra,
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                # OpenAI's shape for the prompt tokens a cache served
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
            },
            "timings": {
                "time_to_first_token_s": round(t.time_to_first_token_s, 4),
                "total_s": round(t.total_s, 4),
                "decode_tokens_per_s": round(t.decode_tokens_per_s, 2),
            },
        }

    @classmethod
    def from_wire(cls, raw: Any) -> Completion:
        """A head's `done` result; a malformed one (another exoctl version) is an error, not a crash."""
        try:
            timings = raw["timings"]
            return cls(
                text=str(raw["text"]),
                token_ids=[int(t) for t in raw["token_ids"]],
                finish_reason=str(raw["finish_reason"]),
                prompt_tokens=int(raw["usage"]["prompt_tokens"]),
                cached_tokens=int(raw["usage"]["prompt_tokens_details"]["cached_tokens"]),
                prompt_logprobs=_entries(raw.get("prompt_logprobs")),
                stop_string=None if raw.get("stop_string") is None else str(raw["stop_string"]),
                timings=Timings(
                    float(timings["time_to_first_token_s"]),
                    float(timings["total_s"]),
                    float(timings["decode_tokens_per_s"]),
                ),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExoctlError(
                f"the head's answer is malformed ({type(exc).__name__}: {exc})",
                hint="run the same exoctl version everywhere",
            ) from None


def _entries(raw: Any) -> list[dict[str, Any]] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not all(isinstance(e, dict) for e in raw):
        raise TypeError("prompt_logprobs must be a list of entries")
    return raw
