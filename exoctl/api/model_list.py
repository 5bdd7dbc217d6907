"""One model list entry for `GET /models` (EXO's name) and `GET /v1/models` (OpenAI's): OpenAI's
fields, the card fields EXO's tools read, and exoctl's own."""

from __future__ import annotations

import re
from typing import Any

from exoctl.models.catalog import ModelCard, storage_megabytes
from exoctl.placement.tensor import valid_rank_counts

# EXO's short spellings of a checkpoint's precision
PRECISION = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}


def family(card: ModelCard) -> str:
    """The model family as EXO names it: the name's first word, lower case ("llama", "qwen")."""
    match = re.match(r"[A-Za-z]+", card.name)
    return match.group(0).lower() if match else card.architecture


def model_entry(card: ModelCard, local: list[str], placed: list[str]) -> dict[str, Any]:
    return {
        "id": card.id,
        "object": "model",
        "created": 0,
        "owned_by": "exoctl",
        "name": card.name,
        "hugging_face_id": card.hf_repo,
        "tags": list(card.tags),
        # MiB, as EXO counts its storage_size_megabytes (Memory.in_mb: bytes / 1024², rounded)
        "storage_size_megabytes": storage_megabytes(card.storage_bytes),
        "storage_size_bytes": card.storage_bytes,
        "n_layers": card.n_layers,
        "hidden_size": card.hidden_size,
        "supports_tensor": len(valid_rank_counts(card, 8)) > 1,
        "context_length": card.context_length,
        "family": family(card),
        "quantization": PRECISION.get(card.storage_dtype, card.storage_dtype),
        "gguf": f"{card.gguf_repo}:{card.gguf_quant}" if card.gguf_repo else None,
        "base_model": card.name,
        "capabilities": ["text"],
        "tasks": ["TextGeneration"],
        "downloaded": bool(local),
        "local": local,
        "placed": bool(placed),
        "instances": placed,
    }
