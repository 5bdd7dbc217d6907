"""The model catalog: cards of the models exoctl knows by id (data in `catalog.json`).

Torch-free: the control side reads it for `models`, placement and `--dry-run`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from exoctl.dtypes import QUANTIZED_BITS, embedding_bytes, float_bytes, head_dtype, matrix_bytes
from exoctl.errors import ModelNotFoundError, UnsupportedModelError

DEFAULT_MODEL_ID = "smollm2-135m-cpu"


@dataclass(frozen=True)
class MatrixGroup:
    """Matrices of one layer held as one (q/k/v fused, gate/up fused, or one matrix): `rows` in all,
    `cols` input features, and the GGUF type of each member (the group takes the highest bits)."""

    rows: int
    cols: int
    types: tuple[str, ...]

    def nbytes(self, dtype: str) -> int:
        from exoctl.models.gguf.file import runtime_bits

        bits = QUANTIZED_BITS.get(dtype)
        if bits is None:
            return matrix_bytes(dtype, self.rows, self.cols)
        held = max(runtime_bits(t, bits) or bits for t in self.types)
        return matrix_bytes("int4" if held == 4 else "int8", self.rows, self.cols)


@dataclass(frozen=True)
class GGUFLayer:
    """One layer of a GGUF model, for sizing: its matrices, and its float parameters (norms,
    biases, router) that stay in the runtime's float dtype."""

    groups: tuple[MatrixGroup, ...]
    floats: int
    split_floats: int  # of `floats`, those a tensor rank holds a part of (the q/k/v biases)

    def nbytes(self, dtype: str, ranks: int = 1) -> int:
        matrices = sum(g.nbytes(dtype) for g in self.groups) // ranks
        whole = self.floats - self.split_floats
        return matrices + (self.split_floats // ranks + whole) * float_bytes(dtype)


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
    # A catalog card's GGUF source on the Hub, as an alternative to hf_repo's safetensors, and its
    # default quantisation (`<id>:<QUANT>` picks another).
    gguf_repo: str = ""
    gguf_quant: str = ""
    # A GGUF model's own: what `auto` means for it, and each layer's tensors (layers may differ:
    # a Q4_K_M file keeps some layers' attn_v and ffn_down in Q6_K).
    native_dtype: str = ""
    draft: str = ""  # the catalog base of its natural draft model (same tokenizer, far smaller)
    gguf_layers: tuple[GGUFLayer, ...] = ()

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

    def layer_matrices(self) -> list[tuple[int, int]]:
        """The [rows, cols] weight matrices of one layer (each expert's three for Mixtral)."""
        d, hd, i = self.hidden_size, self.head_dim, self.intermediate_size
        q_out, kv_out = self.num_attention_heads * hd, self.num_key_value_heads * hd
        mlp = [(i, d), (i, d), (d, i)] * max(self.num_experts, 1)
        return [(q_out, d), (kv_out, d), (kv_out, d), (d, q_out), *mlp]

    def layer_bytes_each(self, dtype: str, ranks: int = 1) -> list[int]:
        """Each layer's weights in `dtype` (or a tensor rank's part): exact from a GGUF's tensor
        table, else the same for every layer."""
        if self.gguf_layers:
            return [layer.nbytes(dtype, ranks) for layer in self.gguf_layers]
        return [self.layer_bytes(dtype, ranks)] * self.n_layers

    def layer_bytes(self, dtype: str, ranks: int = 1) -> int:
        """One layer's weights in `dtype`, or one of `ranks` tensor ranks' part of them: the
        matrices and biases are split, the norms and the router are whole on every rank. For a
        GGUF model, its largest layer."""
        if self.gguf_layers:
            return max(self.layer_bytes_each(dtype, ranks))
        shapes = self.layer_matrices()
        matrices = sum(matrix_bytes(dtype, rows, cols) for rows, cols in shapes) // ranks
        vectors = self.layer_parameters - sum(rows * cols for rows, cols in shapes)
        router = self.num_experts * self.hidden_size
        norms = 2 * self.hidden_size
        split = vectors - router - norms  # the q/k/v biases
        return matrices + (split // ranks + router + norms) * float_bytes(dtype)

    def head_bytes(self, dtype: str, ranks: int = 1) -> int:
        """The final norm and lm_head (or a rank's rows of it); a tied lm_head is a second copy."""
        head = matrix_bytes(head_dtype(dtype), self.vocab_size, self.hidden_size) // ranks
        return head + self.hidden_size * float_bytes(dtype)

    def counted_parameters(self) -> int:
        """The parameter count implied by the dimensions; equals `parameters` for a consistent card."""
        heads = 1 if self.tie_word_embeddings else 2
        return heads * self.embedding_parameters + self.n_layers * self.layer_parameters + self.hidden_size

    def weight_bytes(self, dtype: str) -> int:
        """Bytes of all weights held in `dtype` at run time (quantized: scales included, the
        embedding in bfloat16 and lm_head in int8, see dtypes)."""
        embed = embedding_bytes(dtype, self.vocab_size, self.hidden_size)
        layers = sum(self.layer_bytes_each(dtype))
        if self.tie_word_embeddings and dtype not in QUANTIZED_BITS:
            # a float tied lm_head is counted once here (placement counts the last node's copy)
            return layers + embed + self.hidden_size * float_bytes(dtype)
        return layers + embed + self.head_bytes(dtype)


def storage_megabytes(size_bytes: int) -> int:
    """Megabytes as EXO counts them (its `Memory.in_mb`): bytes / 1024², rounded."""
    return round(size_bytes / 1024**2)


def _cards_from(data: dict[str, Any]) -> tuple[ModelCard, ...]:
    cards = []
    for entry in data["models"]:
        fields = {k: v for k, v in entry.items() if k not in ("base", "variants", "tags", "gguf")}
        gguf = entry.get("gguf") or {}
        for variant in entry["variants"]:
            cards.append(
                ModelCard(
                    id=f"{entry['base']}-{variant}",
                    device=variant,
                    tags=(variant, *entry["tags"]),
                    # GGUF files are a CPU format: the -cpu card names them
                    gguf_repo=gguf.get("repo", "") if variant == "cpu" else "",
                    gguf_quant=gguf.get("quant", "") if variant == "cpu" else "",
                    **fields,
                )
            )
    return tuple(cards)


@cache
def load_catalog() -> tuple[ModelCard, ...]:
    text = resources.files("exoctl.models").joinpath("catalog.json").read_text(encoding="utf-8")
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


ARCHITECTURE_OF = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "mixtral": "mixtral"}


def card_from_folder(folder: Path) -> ModelCard:
    """A card for a local Hugging Face folder, read from its config.json (no torch)."""
    path = folder / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelNotFoundError(
            f"cannot read {path}: {exc}", hint="a model folder holds config.json"
        ) from None
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURE_OF:
        raise UnsupportedModelError(
            f"{folder}: model_type {model_type!r} is not supported",
            hint=f"supported: {', '.join(sorted(ARCHITECTURE_OF))}",
        )
    try:
        heads = int(config["num_attention_heads"])
        card = ModelCard(
            id=folder.name,
            name=folder.name,
            hf_repo="",
            architecture=ARCHITECTURE_OF[model_type],
            device="cpu",
            n_layers=int(config["num_hidden_layers"]),
            hidden_size=int(config["hidden_size"]),
            num_attention_heads=heads,
            num_key_value_heads=int(config.get("num_key_value_heads") or heads),
            intermediate_size=int(config["intermediate_size"]),
            num_experts=int(config.get("num_local_experts") or 0),
            experts_per_token=int(config.get("num_experts_per_tok") or 0),
            vocab_size=int(config["vocab_size"]),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            parameters=0,
            storage_bytes=sum(f.stat().st_size for f in folder.glob("*.safetensors")),
            storage_dtype=str(config.get("torch_dtype") or config.get("dtype") or "float32"),
            context_length=int(config.get("max_position_embeddings") or 0),
            tags=("cpu", "local", ARCHITECTURE_OF[model_type]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelNotFoundError(f"{path}: missing or bad field {exc}") from None
    return replace(card, parameters=card.counted_parameters())
