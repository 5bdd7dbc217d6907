"""Qwen2 decoder layers: Llama's, with biases on q, k and v (`attention_bias`, on by default).

The config reader turns `attention_bias` on for model_type qwen2; the rest is Llama's layout.
"""

from __future__ import annotations

from exoctl.engine.config import ModelConfig
from exoctl.engine.layers import DecoderLayer
from exoctl.engine.llama import load_layer as load_llama_layer
from exoctl.engine.shard import WHOLE, TensorShard
from exoctl.engine.weights import WeightSource


def load_layer(
    reader: WeightSource, config: ModelConfig, layer: int, shard: TensorShard = WHOLE
) -> DecoderLayer:
    if config.extra.get("use_sliding_window"):
        # Qwen2.5 checkpoints ship use_sliding_window=false; a windowed one would need masking.
        from exoctl.errors import UnsupportedModelError

        raise UnsupportedModelError("Qwen2 with use_sliding_window=true is not supported")
    return load_llama_layer(reader, config, layer, shard)
