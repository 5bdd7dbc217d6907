"""Tiny random models of each architecture, made with transformers and saved as a Hub folder would be.

Each is split into several safetensors files with an index, and gets a real tokenizer (the
embedded SmolLM2's), so the whole load path is exercised as on a real checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

VOCAB = 49152  # the SmolLM2 tokenizer's vocabulary
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

COMMON: dict[str, Any] = {
    "vocab_size": VOCAB,
    # Multiples of 32 in every rank's part under 2 and 4 ranks (o_proj's columns are 16 per head):
    # an int4 block of 32 never straddles two ranks.
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 4,
    # 8 heads over 4 KV heads: grouped-query attention that tensor-splits over 2 and 4 ranks
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
    # Larger than the default 0.02 so logits are far apart and greedy choices are not near-ties.
    "initializer_range": 0.15,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": (
        "Llama",
        {
            "rope_theta": 500000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "llama-tied": ("Llama", {"tie_word_embeddings": True, "num_key_value_heads": 8}),
    "qwen2": ("Qwen2", {"num_hidden_layers": 5}),
    "mixtral": ("Mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
}


def make_tiny_model(
    kind: str, folder: Path, tokenizer_folder: Path, extra: dict[str, Any] | None = None
) -> Path:
    """`extra`: config values over the kind's (an MLP width that is no multiple of 32, say)."""
    import transformers

    family, overrides = SPECS[kind]
    overrides = {**overrides, **(extra or {})}
    config_class = getattr(transformers, f"{family}Config")
    model_class = getattr(transformers, f"{family}ForCausalLM")
    torch.manual_seed(1234)
    config = config_class(**{**COMMON, **overrides})
    model = model_class(config).eval()
    # Norm weights start at exactly 1; perturb them so a missed norm weight cannot go unnoticed.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(str(folder), max_shard_size="1MB")
    for name in TOKENIZER_FILES:
        source = tokenizer_folder / name
        if source.exists():
            shutil.copy(source, folder / name)
    return folder


def corrupt_copy(folder: Path, name: str, tensor: str) -> tuple[Path, dict[str, str]]:
    """A copy of `folder` beside it, called `name`, in which the file holding `tensor` is no longer
    safetensors (a header length, then junk); the copy and its weight map (tensor -> file)."""
    import json

    broken = folder.parent / name
    shutil.copytree(folder, broken, dirs_exist_ok=True)
    weight_map: dict[str, str] = json.loads((broken / "model.safetensors.index.json").read_text())[
        "weight_map"
    ]
    (broken / weight_map[tensor]).write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00not json")
    return broken, weight_map


def load_reference(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()
