"""GGUF files written from the tiny Hugging Face models, as llama.cpp's converter lays them out.

`write_gguf` maps the names, permutes q and k rows of llama files into llama.cpp's rope order,
stores Llama 3.1's rope scaling as a `rope_freqs` tensor, merges Mixtral's experts into
`ffn_*_exps`, and stores each matrix in the type `type_of(gguf_name, shape)` returns: the simple
types through `gguf.quants.quantize`, K-quants as random codes with small finite scales. It also
writes the reference: the same model as a safetensors folder holding exactly the weights the
GGUF dequantizes to (in Hugging Face order), so the two must give the same logits.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize, quantize
from safetensors.torch import load_file, save_file

TypeRule = Callable[[str, tuple[int, ...]], str]
K_QUANTS = ("Q4_K", "Q5_K", "Q6_K")

LAYER_NAMES = {
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
# Mixtral's experts, merged into one [E, rows, cols] tensor each as llama.cpp writes them today
MERGED_EXPERTS = {"w1": "ffn_gate_exps.weight", "w2": "ffn_down_exps.weight", "w3": "ffn_up_exps.weight"}


def all_as(type_name: str) -> TypeRule:
    """Matrices in `type_name` (vectors in F32, as llama.cpp keeps them)."""
    return lambda name, shape: type_name if len(shape) >= 2 else "F32"


def q4_k_m(name: str, shape: tuple[int, ...]) -> str:
    """A Q4_K_M-like mix: Q6_K for attn_v, ffn_down, the embedding and the output; Q4_K elsewhere."""
    if len(shape) < 2:
        return "F32"
    if any(k in name for k in ("attn_v", "ffn_down", "token_embd", "output")):
        return "Q6_K"
    return "Q4_K"


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf `permute`: halves of each head's rows into interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_factors(config: dict[str, Any]) -> np.ndarray:
    """The rope_freqs tensor llama.cpp's converter writes for rope_type llama3."""
    scaling = config["rope_scaling"]
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    base = config["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def encode(values: np.ndarray, type_name: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes or values to store, the float32 values they dequantize to)."""
    kind = GGMLQuantizationType[type_name]
    if type_name == "F32":
        return values.astype(np.float32), values.astype(np.float32)
    if type_name == "F16":
        stored = values.astype(np.float16)
        return stored, stored.astype(np.float32)
    if type_name in K_QUANTS:
        block, size = GGML_QUANT_SIZES[kind]
        rows = int(np.prod(values.shape[:-1]))
        raw = rng.integers(0, 256, size=(rows, values.shape[-1] // block, size), dtype=np.uint8)
        d = (rng.random((rows, values.shape[-1] // block)) * 4e-4 + 1e-4).astype(np.float16)
        if type_name == "Q6_K":  # d is the last 2 bytes; its 16 scales are int8, up to 127
            raw[..., -2:] = (d * 0.15).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
        else:  # d, dmin first
            raw[..., 0:2] = d.view(np.uint8).reshape(rows, -1, 2)
            raw[..., 2:4] = (d * 2).astype(np.float16).view(np.uint8).reshape(rows, -1, 2)
        stored = raw.reshape(*values.shape[:-1], -1)
        return stored, dequantize(stored, kind).astype(np.float32)
    stored = quantize(values.astype(np.float32), kind)
    return stored, dequantize(stored, kind).astype(np.float32)


def write_gguf(
    hf_folder: Path,
    out: Path,
    type_of: TypeRule,
    reference: Path | None = None,
    split_max_tensors: int = 0,
    seed: int = 0,
    tokenizer_from: Path | None = None,
    merged_experts: bool = True,
) -> Path:
    """Write `hf_folder`'s model as GGUF at `out` (split into parts of at most `split_max_tensors`
    tensors if given) and, if `reference` is given, the same dequantized weights as a
    safetensors folder there. Returns the path of the (first) GGUF file."""
    config = json.loads((hf_folder / "config.json").read_text())
    rope = config.get("rope_parameters") or {}  # transformers 5 writes rope settings here
    config.setdefault("rope_theta", rope.get("rope_theta", 10000.0))
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = rope
    model_type = config["model_type"]
    arch = "qwen2" if model_type == "qwen2" else "llama"
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(out), arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_uint32("tokenizer.ggml.bos_token_id", config["bos_token_id"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", config["eos_token_id"])
    if tokenizer_from is not None:
        copy_tokenizer(tokenizer_from, writer)
    if model_type == "mixtral":
        writer.add_expert_count(config["num_local_experts"])
        writer.add_expert_used_count(config["num_experts_per_tok"])
    dequantized: dict[str, torch.Tensor] = {}
    tensors = hf_tensors(hf_folder)
    if (config.get("rope_scaling") or {}).get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_factors(config))

    def add(gguf_name: str, hf_names: list[str], values: np.ndarray) -> None:
        type_name = type_of(gguf_name, tuple(values.shape))
        kind = GGMLQuantizationType[type_name]
        row_heads = {"attn_q": heads, "attn_k": kv_heads}.get(
            gguf_name.split(".")[2] if "blk" in gguf_name else ""
        )
        if arch == "llama" and row_heads:
            values = permute(values, row_heads)
        stored, back = encode(values, type_name, rng)
        if type_name == "BF16":
            as_bf16 = torch.from_numpy(values.astype(np.float32)).to(torch.bfloat16)
            stored = as_bf16.view(torch.int16).numpy().view(np.uint8).reshape(*values.shape[:-1], -1)
            back = as_bf16.float().numpy()
        writer.add_tensor(gguf_name, stored, raw_dtype=kind if type_name not in ("F32", "F16") else None)
        if arch == "llama" and row_heads:
            back = unpermute(back, row_heads)
        if len(hf_names) == 1:
            dequantized[hf_names[0]] = torch.from_numpy(np.ascontiguousarray(back))
        else:  # Mixtral's merged experts: one Hugging Face tensor per expert
            for expert, name in enumerate(hf_names):
                dequantized[name] = torch.from_numpy(np.ascontiguousarray(back[expert]))

    experts: dict[tuple[str, str], dict[int, np.ndarray]] = {}  # (layer, w1|w2|w3) -> expert -> weight
    for name, tensor in tensors.items():
        values = tensor.float().numpy()
        if name == "model.embed_tokens.weight":
            add("token_embd.weight", [name], values)
        elif name == "model.norm.weight":
            add("output_norm.weight", [name], values)
        elif name == "lm_head.weight":
            add("output.weight", [name], values)
        else:
            layer, rest = name.split(".")[2], name.split(".", 3)[3]
            if rest in LAYER_NAMES:
                add(f"blk.{layer}.{LAYER_NAMES[rest]}", [name], values)
            elif rest.startswith("block_sparse_moe.experts."):
                expert, w = int(rest.split(".")[2]), rest.split(".")[3]
                experts.setdefault((layer, w), {})[expert] = values
            else:
                raise AssertionError(f"no GGUF name for {name}")
    for (layer, w), by_expert in sorted(experts.items()):
        order = sorted(by_expert)
        names = [f"model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight" for e in order]
        if merged_experts:
            add(f"blk.{layer}.{MERGED_EXPERTS[w]}", names, np.stack([by_expert[e] for e in order]))
        else:  # older files (TheBloke's Mixtral): one tensor per expert, blk.N.ffn_gate.E.weight
            base = MERGED_EXPERTS[w].removesuffix("_exps.weight")
            for e, name in zip(order, names, strict=True):
                add(f"blk.{layer}.{base}.{e}.weight", [name], by_expert[e])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if reference is not None:
        write_reference(hf_folder, reference, dequantized)
    parts = sorted(out.parent.glob(f"{out.stem}-*-of-*.gguf")) if split_max_tensors else []
    return parts[0] if parts else out


TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")


def copy_tokenizer(source: Path, writer: GGUFWriter) -> None:
    """The tokenizer metadata of GGUF `source` (the embedded SmolLM2's) into `writer`."""
    from exoctl.models.gguf.file import read_header

    meta, _ = read_header(source, TOKENIZER_ARRAYS)
    writer.add_tokenizer_model(meta["tokenizer.ggml.model"])
    writer.add_tokenizer_pre(meta["tokenizer.ggml.pre"])
    writer.add_token_list(meta["tokenizer.ggml.tokens"])
    writer.add_token_types(meta["tokenizer.ggml.token_type"])
    writer.add_token_merges(meta["tokenizer.ggml.merges"])
    writer.add_chat_template(meta["tokenizer.chat_template"])
    for key in ("unknown_token_id", "padding_token_id"):
        writer.add_uint32(f"tokenizer.ggml.{key}", meta[f"tokenizer.ggml.{key}"])


def write_reference(hf_folder: Path, reference: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors folder with `tensors` and the tiny model's config and tokenizer."""
    reference.mkdir(parents=True, exist_ok=True)
    config = json.loads((hf_folder / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(reference / "model.safetensors"))
    (reference / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (hf_folder / name).exists():
            shutil.copy(hf_folder / name, reference / name)
