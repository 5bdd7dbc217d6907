"""What a GGUF model means in Hugging Face's terms: the config.json its metadata implies, and which
GGUF tensor holds each Hugging Face tensor (llama.cpp's names, see its convert_hf_to_gguf).
Torch-free."""

from __future__ import annotations

import re
import struct
from collections.abc import Container
from dataclasses import dataclass
from typing import Any

from exoctl.errors import ModelFormatError, UnsupportedModelError
from exoctl.models.gguf.file import ARCHITECTURES, GGUFModel, TensorInfo

# --- the Hugging Face config a GGUF implies ---------------------------------------------------


def hf_config(model: GGUFModel, rope_factors: bool = True) -> dict[str, Any]:
    """The model's config.json fields, from llama.cpp's metadata keys (see its convert_hf_to_gguf).
    `rope_factors` False leaves Llama 3.1's rope factors unread (a card from a header fetched
    over the network has no tensor data)."""
    arch = model.architecture
    if arch not in ARCHITECTURES:
        raise UnsupportedModelError(
            f"{model.path}: GGUF architecture {arch!r} is not supported",
            hint="exoctl runs llama (Llama, Mistral, Mixtral) and qwen2 GGUF files",
        )
    experts = int(model.get("expert_count", 0) or 0)
    try:
        hidden = int(model.get("embedding_length"))
        heads = int(model.get("attention.head_count"))
        config: dict[str, Any] = {
            "model_type": "mixtral" if experts else arch,
            "num_hidden_layers": int(model.get("block_count")),
            "hidden_size": hidden,
            "intermediate_size": int(model.get("feed_forward_length")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(model.get("attention.head_count_kv", heads)),
            "head_dim": int(model.get("attention.key_length", hidden // heads)),
            "rms_norm_eps": float(model.get("attention.layer_norm_rms_epsilon")),
        }
    except (TypeError, ValueError):
        missing = [
            k
            for k in ("embedding_length", "attention.head_count", "block_count", "feed_forward_length")
            if model.get(k) is None
        ]
        raise ModelFormatError(
            f"{model.path}: the GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing) or 'a field'}"
        ) from None
    config["rope_theta"] = float(model.get("rope.freq_base", 10000.0))
    config["max_position_embeddings"] = int(model.get("context_length", 4096))
    tokens = model.metadata.get("tokenizer.ggml.tokens")
    vocab = model.get("vocab_size") or (tokens if isinstance(tokens, int) else len(tokens or []))
    embed = model.tensors.get("token_embd.weight")
    config["vocab_size"] = int(vocab or (embed.shape[0] if embed else 0))
    config["tie_word_embeddings"] = "output.weight" not in model.tensors
    config["attention_bias"] = "blk.0.attn_q.bias" in model.tensors
    if experts:
        config["num_local_experts"] = experts
        config["num_experts_per_tok"] = int(model.get("expert_used_count", 2))
    for key, name in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id")):
        value = model.metadata.get(f"tokenizer.ggml.{name}")
        if value is not None:
            config[key] = int(value)
    factors = model.tensors.get("rope_freqs.weight")
    if factors is not None and rope_factors:
        # Llama 3.1's llama3 rope scaling, as llama.cpp stores it: a divisor per frequency
        config["rope_scaling"] = {"rope_type": "freq_factors", "factors": read_f32(factors)}
    config["torch_dtype"] = model.main_type()
    return config


def read_f32(info: TensorInfo) -> list[float]:
    if info.type_name != "F32":
        raise ModelFormatError(f"{info.file}: tensor {info.name!r} should be F32, not {info.type_name}")
    with open(info.file, "rb") as handle:
        handle.seek(info.offset)
        data = handle.read(info.nbytes)
    return list(struct.unpack(f"<{info.nbytes // 4}f", data))


# --- which GGUF name holds a Hugging Face tensor -----------------------------------------------

_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
}
_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_EXPERT = re.compile(r"block_sparse_moe\.experts\.(\d+)\.(w1|w2|w3)\.weight")
_EXPERT_NAMES = {"w1": "ffn_gate", "w2": "ffn_down", "w3": "ffn_up"}


@dataclass(frozen=True)
class Location:
    """Where a Hugging Face tensor is in a GGUF: a tensor, or expert `expert` of a merged one."""

    name: str
    expert: int | None = None


def locate(hf_name: str, tensors: Container[str]) -> Location | None:
    if hf_name in _GLOBAL_NAMES:
        return Location(_GLOBAL_NAMES[hf_name])
    parts = hf_name.split(".", 3)
    if len(parts) < 4 or parts[:2] != ["model", "layers"]:
        return None
    layer, rest = parts[2], parts[3]
    if rest in _LAYER_NAMES:
        return Location(f"blk.{layer}.{_LAYER_NAMES[rest]}")
    match = _EXPERT.fullmatch(rest)
    if match:
        base = _EXPERT_NAMES[match[2]]
        merged = f"blk.{layer}.{base}_exps.weight"  # [E, rows, cols], what llama.cpp writes today
        if merged in tensors:
            return Location(merged, int(match[1]))
        return Location(f"blk.{layer}.{base}.{match[1]}.weight")  # older files: one per expert
    return None


def layer_of(gguf_name: str) -> int | None:
    if gguf_name.startswith("blk."):
        return int(gguf_name.split(".")[1])
    return None


def permutes_qk(model: GGUFModel) -> bool:
    """llama.cpp reorders the rows of q and k of llama-architecture files for its rope layout
    (interleaved pairs instead of halves); qwen2 files keep Hugging Face's order."""
    return model.architecture == "llama"
