"""Llama (and Mistral-style) decoder layers, with Hugging Face parameter names.

Llama 3.1's `rope_scaling` of type llama3 lives in `layers.rope_inv_freq`; everything a layer
needs is read here from `model.layers.{i}.*`.
"""

from __future__ import annotations

import torch

from exoctl.engine.config import ModelConfig
from exoctl.engine.layers import Attention, DecoderLayer, GatedMLP, Linear, RMSNorm
from exoctl.engine.weights import WeightReader


def load_attention(reader: WeightReader, config: ModelConfig, layer: int) -> Attention:
    prefix = f"model.layers.{layer}.self_attn"
    d, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    # q, k and v fused into one [q_out + 2 kv_out, D] matmul: one call instead of three.
    weights = [
        reader.get(f"{prefix}.q_proj.weight", (q_out, d)),
        reader.get(f"{prefix}.k_proj.weight", (kv_out, d)),
        reader.get(f"{prefix}.v_proj.weight", (kv_out, d)),
    ]
    bias = None
    if config.attention_bias:
        bias = torch.cat(
            [
                reader.get(f"{prefix}.q_proj.bias", (q_out,)),
                reader.get(f"{prefix}.k_proj.bias", (kv_out,)),
                reader.get(f"{prefix}.v_proj.bias", (kv_out,)),
            ]
        )
    qkv = Linear(torch.cat(weights), bias)
    o_proj = Linear(reader.get(f"{prefix}.o_proj.weight", (d, q_out)))
    return Attention(layer, qkv, o_proj, config.num_attention_heads, config.num_key_value_heads, hd)


def load_norms(reader: WeightReader, config: ModelConfig, layer: int) -> tuple[RMSNorm, RMSNorm]:
    prefix = f"model.layers.{layer}"
    shape = (config.hidden_size,)
    return (
        RMSNorm(reader.get(f"{prefix}.input_layernorm.weight", shape), config.rms_norm_eps),
        RMSNorm(reader.get(f"{prefix}.post_attention_layernorm.weight", shape), config.rms_norm_eps),
    )


def load_mlp(reader: WeightReader, config: ModelConfig, layer: int) -> GatedMLP:
    prefix = f"model.layers.{layer}.mlp"
    d, i = config.hidden_size, config.intermediate_size
    gate_up = torch.cat(
        [reader.get(f"{prefix}.gate_proj.weight", (i, d)), reader.get(f"{prefix}.up_proj.weight", (i, d))]
    )
    return GatedMLP(Linear(gate_up), Linear(reader.get(f"{prefix}.down_proj.weight", (d, i))))


def load_layer(reader: WeightReader, config: ModelConfig, layer: int) -> DecoderLayer:
    input_norm, post_norm = load_norms(reader, config, layer)
    return DecoderLayer(
        input_norm, load_attention(reader, config, layer), post_norm, load_mlp(reader, config, layer)
    )
