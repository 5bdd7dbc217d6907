"""The model catalog: cards of the models exoctl knows by id (data in `catalog.json`).

Torch-free: the control side reads it for `models`, placement and `--dry-run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

from exoctl.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL_ID = "smollm2-135m-cpu"

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "int8": 1}


@dataclass(frozen=True)
class ModelCard:
    id: str
    name: str
    hf_repo: str
    architecture: str
    device: str
    n_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    num_experts: int
    experts_per_token: int
    vocab_size: int
    tie_word_embeddings: bool
    attention_bias: bool
    parameters: int
    storage_bytes: int
    storage_dtype: str
    context_length: int
    tags: tuple[str, ...]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def embedding_parameters(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def layer_parameters(self) -> int:
        """Parameters of one decoder layer (attention, MLP or experts, router, two norms)."""
        d, hd = self.hidden_size, self.head_dim
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        attention = d * q_out + 2 * d * kv_out + q_out * d
        if self.attention_bias:
            attention += q_out + 2 * kv_out
        mlp = 3 * d * self.intermediate_size
        if self.num_experts:
            mlp = self.num_experts * mlp + self.num_experts * d
        return attention + mlp + 2 * d

    def counted_parameters(self) -> int:
        """The parameter count implied by the dimensions; equals `parameters` for a consistent card."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.embedding_parameters + self.n_layers * self.layer_parameters + self.hidden_size

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of all weights held in `dtype` at run time."""
        return self.counted_parameters() * dtype_bytes(dtype)


def dtype_bytes(dtype: str) -> int:
    try:
        return _DTYPE_BYTES[dtype]
    except KeyError:
        raise UnsupportedModelError(
            f"unknown dtype {dtype!r}", hint=f"use one of {', '.join(_DTYPE_BYTES)}"
        ) from None


def _cards_from(data: dict[str, Any]) -> tuple[ModelCard, ...]:
    cards = []
    for entry in data["models"]:
        fields = {k: v for k, v in entry.items() if k not in ("base", "variants", "tags")}
        for variant in entry["variants"]:
            cards.append(
                ModelCard(
                    id=f"{entry['base']}-{variant}",
                    device=variant,
                    tags=(variant, *entry["tags"]),
                    **fields,
                )
            )
    return tuple(cards)


@cache
def load_catalog() -> tuple[ModelCard, ...]:
    text = resources.files("exoctl").joinpath("catalog.json").read_text(encoding="utf-8")
    return _cards_from(json.loads(text))


def find_card(model: str) -> ModelCard | None:
    """The card named by catalog id or Hugging Face repo id (the `-cpu` card for a repo id)."""
    cards = load_catalog()
    for card in cards:
        if card.id == model:
            return card
    lowered = model.lower()
    matches = [c for c in cards if c.hf_repo.lower() == lowered]
    matches.sort(key=lambda c: c.device != "cpu")
    return matches[0] if matches else None


def get_card(model: str) -> ModelCard:
    card = find_card(model)
    if card is None:
        known = ", ".join(c.id for c in load_catalog())
        raise ModelNotFoundError(
            f"unknown model {model!r}",
            hint=f"use a catalog id ({known}), its Hugging Face repo id, or a local model folder",
        )
    return card
