"""A model's own sampling defaults, from its generation_config.json or its GGUF metadata.

transformers' rule decides what a generation_config means: without `do_sample: true` the model is
decoded greedily whatever temperature it lists (Mixtral-Instruct's file has none; Llama 3.1
Instruct's has do_sample, temperature 0.6, top_p 0.9; Qwen2.5 Instruct's adds top_k 20 and
repetition_penalty 1.05). Only the values a file declares are taken, as vLLM takes them; a budget
is taken from `max_new_tokens` alone (`max_length` counts the prompt too). GGUF files written by
llama.cpp's converter carry `general.sampling.*` (temp, top_k, top_p, min_p, penalty_repeat).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from exoctl.models.gguf.file import GGUFModel
from exoctl.wire.sampling_params import SamplingDefaults, SamplingParamError, SamplingRequest

log = logging.getLogger(__name__)

GGUF_KEYS = {
    "temperature": "general.sampling.temp",
    "top_k": "general.sampling.top_k",
    "top_p": "general.sampling.top_p",
    "min_p": "general.sampling.min_p",
    "repetition_penalty": "general.sampling.penalty_repeat",
}


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def _whole(value: Any) -> int | None:
    number = _number(value)
    return None if number is None else int(number)


def _checked(defaults: SamplingDefaults, where: str) -> SamplingDefaults:
    """Defaults that SamplingParams takes; out-of-range ones are dropped with a log line."""
    try:
        SamplingRequest().resolve(defaults)
    except SamplingParamError as exc:
        log.warning("%s: ignoring its sampling defaults (%s)", where, exc)
        return SamplingDefaults(source=defaults.source)
    return defaults


def from_generation_config(folder: Path) -> SamplingDefaults:
    path = folder / "generation_config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return SamplingDefaults()
    if not isinstance(raw, dict):
        return SamplingDefaults()
    budget = _whole(raw.get("max_new_tokens"))
    budget = budget if budget is not None and budget >= 1 else None
    if raw.get("do_sample") is not True:
        return _checked(SamplingDefaults(temperature=0.0, max_tokens=budget, source=path.name), str(path))
    top_k = _whole(raw.get("top_k"))
    defaults = SamplingDefaults(
        temperature=_number(raw.get("temperature", 1.0)),
        top_k=None if top_k is None else max(top_k, 0),
        top_p=_number(raw.get("top_p")),
        min_p=_number(raw.get("min_p")),
        repetition_penalty=_number(raw.get("repetition_penalty")),
        max_tokens=budget,
        source=path.name,
    )
    return _checked(defaults, str(path))


def from_gguf(model: GGUFModel) -> SamplingDefaults:
    found = {
        name: _whole(model.metadata[key]) if name == "top_k" else _number(model.metadata[key])
        for name, key in GGUF_KEYS.items()
        if model.metadata.get(key) is not None
    }
    if not found:
        return SamplingDefaults()
    return _checked(SamplingDefaults(**found, source="GGUF metadata"), str(model.path))  # type: ignore[arg-type]


def read_defaults(folder: Path) -> SamplingDefaults:
    """The sampling defaults of the model at `folder` (a Hugging Face folder or a GGUF model)."""
    from exoctl.models.gguf.file import is_gguf_source, open_model

    if is_gguf_source(folder):
        return from_gguf(open_model(folder))
    return from_generation_config(folder)
