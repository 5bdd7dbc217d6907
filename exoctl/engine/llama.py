"""Llama (and Mistral-style) decoder layers, with Hugging Face parameter names.

Llama 3.1's `rope_scaling` of type llama3 lives in `layers.rope_inv_freq`; everything a layer
needs is read here from `model.layers.{i}.*`. Under tensor sharding a rank reads whole heads of
q/k/v and its part of gate/up by output row, and the matching input columns of o_proj and
down_proj, so each rank's o_proj/down output is a partial sum that the layer all-reduces.
"""

from __future__ import annotations

import torch

from exoctl.engine.config import ModelConfig
from exoctl.engine.layers import Attention, DecoderLayer, GatedMLP, RMSNorm
from exoctl.engine.linear import make_linear
from exoctl.engine.quant import stack_rows
from exoctl.engine.shard import WHOLE, TensorShard
from exoctl.engine.weights import WeightSource


def head_rows(heads: range, head_dim: int) -> range:
    return range(heads.start * head_dim, heads.stop * head_dim)


def load_attention(
    reader: WeightSource, config: ModelConfig, layer: int, shard: TensorShard = WHOLE
) -> Attention:
    prefix = f"model.layers.{layer}.self_attn"
    d, hd = config.hidden_size, config.head_dim
    q_out, kv_out = config.num_attention_heads * hd, config.num_key_value_heads * hd
    # query heads h of rank r use KV heads h // groups, which are rank r's KV heads too
    q_rows = head_rows(shard.whole_units(config.num_attention_heads, "attention heads"), hd)
    kv_rows = head_rows(shard.whole_units(config.num_key_value_heads, "KV heads"), hd)
    # q, k and v fused into one [q + 2 kv, D] matmul: one call instead of three.
    weights = [
        reader.matrix(f"{prefix}.q_proj.weight", (q_out, d), 0, q_rows),
        reader.matrix(f"{prefix}.k_proj.weight", (kv_out, d), 0, kv_rows),
        reader.matrix(f"{prefix}.v_proj.weight", (kv_out, d), 0, kv_rows),
    ]
    bias = None
    if config.attention_bias:
        bias = torch.cat(
            [
                reader.get_part(f"{prefix}.q_proj.bias", (q_out,), 0, q_rows),
                reader.get_part(f"{prefix}.k_proj.bias", (kv_out,), 0, kv_rows),
                reader.get_part(f"{prefix}.v_proj.bias", (kv_out,), 0, kv_rows),
            ]
        )
    qkv = make_linear(stack_rows(weights), bias)
    # a rank's o_proj output is a partial sum (its heads' columns): handed on in float32
    o_proj = make_linear(
        reader.matrix(f"{prefix}.o_proj.weight", (d, q_out), 1, q_rows), partial=shard.world > 1
    )
    return Attention(layer, qkv, o_proj, len(q_rows) // hd, len(kv_rows) // hd, hd)


def load_norms(reader: WeightSource, config: ModelConfig, layer: int) -> tuple[RMSNorm, RMSNorm]:
    prefix = f"model.layers.{layer}"
    shape = (config.hidden_size,)
    return (
        RMSNorm(reader.get(f"{prefix}.input_layernorm.weight", shape), config.rms_norm_eps),
        RMSNorm(reader.get(f"{prefix}.post_attention_layernorm.weight", shape), config.rms_norm_eps),
    )


def load_gated_mlp(
    reader: WeightSource, names: tuple[str, str, str], d: int, i: int, part: range
) -> GatedMLP:
    """gate [I, D], up [I, D], down [D, I]: rows `part` of gate and up, the same columns of down."""
    gate, up, down = names
    gate_up = stack_rows([reader.matrix(gate, (i, d), 0, part), reader.matrix(up, (i, d), 0, part)])
    partial = part != range(i)  # a rank's columns of down: its output is a partial sum
    return GatedMLP(make_linear(gate_up), make_linear(reader.matrix(down, (d, i), 1, part), partial=partial))


def load_mlp(reader: WeightSource, config: ModelConfig, layer: int, shard: TensorShard = WHOLE) -> GatedMLP:
    prefix = f"model.layers.{layer}.mlp"
    names = (f"{prefix}.gate_proj.weight", f"{prefix}.up_proj.weight", f"{prefix}.down_proj.weight")
    i = config.intermediate_size
    return load_gated_mlp(reader, names, config.hidden_size, i, shard.part(i))


def load_layer(
    reader: WeightSource, config: ModelConfig, layer: int, shard: TensorShard = WHOLE
) -> DecoderLayer:
    input_norm, post_norm = load_norms(reader, config, layer)
    return DecoderLayer(
        input_norm,
        load_attention(reader, config, layer, shard),
        post_norm,
        load_mlp(reader, config, layer, shard),
    )
