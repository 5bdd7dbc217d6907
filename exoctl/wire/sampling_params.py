"""How to pick tokens and when to stop: checked once where a request is made, then carried as is.

Torch-free, so the CLI and the API build the same object the engine samples with; `to_wire` and
`from_wire` are its one form on the network (the head passes it to the stage that samples).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from exoctl.errors import InvalidRequestError

GREEDY_BELOW = 1e-6  # temperatures this small sample the most likely token, as 0 does
SEEDS = (-(2**63), 2**64)  # what a seed may be: torch.Generator takes any 64-bit value
MAX_TOKENS = 2**31 - 1  # more than any context; the budget is cut to the context anyway


class SamplingParamError(InvalidRequestError):
    """One parameter out of range: `name` is the field, `problem` what is wrong with its value."""

    def __init__(self, name: str, problem: str) -> None:
        super().__init__(f"{name} {problem}")
        self.name = name
        self.problem = problem


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below GREEDY_BELOW) is greedy; top_k 0, top_p 1 and min_p 0 cut nothing;
    penalties 0 (repetition 1) change nothing.

    The penalties change the logits before temperature and the cuts, greedy or not:
    - repetition_penalty (Hugging Face's, also on the prompt's tokens): a seen token's logit is
      divided by it when positive, multiplied by it when negative;
    - frequency_penalty and presence_penalty (OpenAI's, on the generated tokens): a token's logit
      loses frequency_penalty x its count, and presence_penalty once it has appeared.
    min_p keeps the tokens whose probability is at least min_p x the most likely one's.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 256
    stop: tuple[str, ...] = field(default_factory=tuple)
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None  # report the chosen tokens' logprobs, with this many alternatives
    ignore_eos: bool = False  # generate max_tokens whatever the model says (benchmarks: a fixed length)
    # llguidance's grammar (its JSON form) the answer must follow: a JSON schema, a tool call; the
    # runner that samples masks the tokens it does not allow (engine.constraint)
    grammar: str | None = None
    # the logprob of each prompt token given those before it, with this many alternatives (vLLM's
    # name; what `/v1/completions` echoes for an evaluation harness's loglikelihood)
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "temperature",
            "top_p",
            "min_p",
            "frequency_penalty",
            "presence_penalty",
            "repetition_penalty",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise SamplingParamError(name, f"must be a finite number, got {value!r}")
        for name in ("top_k", "max_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise SamplingParamError(name, f"must be a whole number, got {value!r}")
        seed = self.seed
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not SEEDS[0] <= seed < SEEDS[1]
        ):
            raise SamplingParamError("seed", f"must be a whole number from -2**63 to 2**64 - 1, got {seed!r}")
        if self.max_tokens > MAX_TOKENS:
            raise SamplingParamError("max_tokens", f"must be at most {MAX_TOKENS}, got {self.max_tokens}")
        if self.temperature < 0:
            raise SamplingParamError("temperature", f"must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise SamplingParamError("top_k", f"must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise SamplingParamError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise SamplingParamError("min_p", f"must be in [0, 1], got {self.min_p}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise SamplingParamError(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if not 0 < self.repetition_penalty <= 10:
            raise SamplingParamError(
                "repetition_penalty", f"must be in (0, 10] (1 turns it off), got {self.repetition_penalty}"
            )
        if self.logprobs is not None and (
            isinstance(self.logprobs, bool)
            or not isinstance(self.logprobs, int)
            or not 0 <= self.logprobs <= 20
        ):
            raise SamplingParamError(
                "top_logprobs", f"must be a whole number from 0 to 20, got {self.logprobs!r}"
            )
        if self.prompt_logprobs is not None and (
            isinstance(self.prompt_logprobs, bool)
            or not isinstance(self.prompt_logprobs, int)
            or not 0 <= self.prompt_logprobs <= 20
        ):
            raise SamplingParamError(
                "logprobs", f"must be a whole number from 0 to 20, got {self.prompt_logprobs!r}"
            )
        if self.max_tokens < 1:
            raise SamplingParamError("max_tokens", f"must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise SamplingParamError("stop", "strings must not be empty")
        if self.grammar is not None and not isinstance(self.grammar, str):
            raise SamplingParamError("grammar", f"must be a string, got {type(self.grammar).__name__}")
        if not isinstance(self.ignore_eos, bool):
            raise SamplingParamError("ignore_eos", f"must be true or false, got {self.ignore_eos!r}")

    @property
    def greedy(self) -> bool:
        # below GREEDY_BELOW, logits / temperature overflows float32: such a draw is the argmax anyway
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    @property
    def truncates(self) -> bool:
        """Whether top_k, top_p or min_p cut the distribution."""
        return self.top_k > 0 or self.top_p < 1 or self.min_p > 0

    @property
    def penalizes(self) -> bool:
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1)

    def to_wire(self) -> dict[str, Any]:
        return {**asdict(self), "stop": list(self.stop)}  # msgpack has lists, not tuples

    @classmethod
    def from_wire(cls, raw: dict[str, Any]) -> SamplingParams:
        unknown = set(raw) - WIRE_FIELDS
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        stop = raw.get("stop") or ()
        if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
            raise InvalidRequestError("bad sampling parameters: stop must be a list of strings")
        try:
            return cls(**{**raw, "stop": tuple(stop)})
        except TypeError as exc:
            raise InvalidRequestError(f"bad sampling parameters: {exc}") from None


WIRE_FIELDS = frozenset(f.name for f in fields(SamplingParams))


# The answer's budget when neither the request nor the model says: a chat answer, not a ramble
# (the API's earlier 1,024 at temperature 1 gave the test plan's curl 55 s of nonsense).
DEFAULT_MAX_TOKENS = 512
# What a model may declare (generation_config.json, GGUF `general.sampling.*`) and a request
# leave out; the rest of SamplingParams has no model default.
DEFAULTABLE = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty", "max_tokens")


@dataclass(frozen=True)
class Defaultable:
    """The values of DEFAULTABLE; None where they are left to someone else."""

    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None


@dataclass(frozen=True)
class SamplingDefaults(Defaultable):
    """A model's own sampling defaults; None where it declares none. Read by the head runner
    at load (engine.generation_defaults) and reported with it, so the API and the CLI apply the
    defaults of the model they talk to, as vLLM and llama.cpp do. A model that declares no
    sampling (no `do_sample`) is answered greedily, as transformers' `generate` answers it."""

    source: str = ""  # where they were read: "generation_config.json", "GGUF metadata", or ""

    def to_wire(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_wire(cls, raw: Any) -> SamplingDefaults | None:
        """Defaults from a runner report; None for a malformed or missing entry (no defaults)."""
        if not isinstance(raw, dict):
            return None
        try:
            values = {name: raw.get(name) for name in DEFAULTABLE}
            for value in values.values():
                if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                    return None
            return cls(**values, source=str(raw.get("source", "")))
        except TypeError:
            return None


@dataclass(frozen=True)
class SamplingRequest(Defaultable):
    """What a request asked for; None where it left a value to the model's defaults."""

    seed: int | None = None
    stop: tuple[str, ...] = ()
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None

    def resolve(self, defaults: SamplingDefaults | None) -> SamplingParams:
        """The request's values, else the model's, else greedy with no cuts and DEFAULT_MAX_TOKENS
        (SamplingParamError names a bad value)."""
        model = defaults or SamplingDefaults()

        def pick(name: str, fallback: Any) -> Any:
            asked = getattr(self, name)
            if asked is not None:
                return asked
            declared = getattr(model, name)
            return fallback if declared is None else declared

        return SamplingParams(
            temperature=pick("temperature", 0.0),
            top_k=pick("top_k", 0),
            top_p=pick("top_p", 1.0),
            seed=self.seed,
            max_tokens=pick("max_tokens", DEFAULT_MAX_TOKENS),
            stop=self.stop,
            min_p=pick("min_p", 0.0),
            frequency_penalty=self.frequency_penalty,
            presence_penalty=self.presence_penalty,
            repetition_penalty=pick("repetition_penalty", 1.0),
            logprobs=self.logprobs,
        )
