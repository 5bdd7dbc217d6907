"""A model card from a GGUF model's header: dimensions from its metadata, sizes from its tensor
table (layer by layer, in the types the file holds). Torch-free."""

from __future__ import annotations

import math

from exoctl.models.catalog import GGUFLayer, MatrixGroup, ModelCard
from exoctl.models.gguf.file import GGUFModel, TensorInfo, native_dtype
from exoctl.models.gguf.hf_names import hf_config, layer_of

# Matrices the engine holds as one (engine.llama): q/k/v, and gate/up (an expert's too).
FUSED = (("attn_q", "attn_k", "attn_v"), ("ffn_gate", "ffn_up"), ("ffn_gate_exps", "ffn_up_exps"))


def card_from_gguf(model: GGUFModel, card_id: str, name: str = "", hf_repo: str = "") -> ModelCard:
    config = hf_config(model, rope_factors=False)
    n_layers = int(config["num_hidden_layers"])
    by_layer: dict[int, dict[str, TensorInfo]] = {i: {} for i in range(n_layers)}
    for info in model.tensors.values():
        layer = layer_of(info.name)
        if layer is not None and layer in by_layer:
            # blk.N.attn_q.weight -> attn_q; blk.N.attn_q.bias -> attn_q.bias
            by_layer[layer][info.name.split(".", 2)[2].removesuffix(".weight")] = info
    layers = [_layer(by_layer[i]) for i in range(n_layers)]
    # rope_freqs is a table of constants, not a parameter
    parameters = sum(math.prod(i.shape) for i in model.tensors.values() if i.name != "rope_freqs.weight")
    return ModelCard(
        id=card_id,
        name=name or str(model.metadata.get("general.name") or card_id),
        hf_repo=hf_repo,
        architecture=config["model_type"],
        device="cpu",
        n_layers=n_layers,
        hidden_size=int(config["hidden_size"]),
        num_attention_heads=int(config["num_attention_heads"]),
        num_key_value_heads=int(config["num_key_value_heads"]),
        intermediate_size=int(config["intermediate_size"]),
        num_experts=int(config.get("num_local_experts", 0)),
        experts_per_token=int(config.get("num_experts_per_tok", 0)),
        vocab_size=int(config["vocab_size"]),
        tie_word_embeddings=bool(config["tie_word_embeddings"]),
        attention_bias=bool(config["attention_bias"]),
        parameters=parameters,
        storage_bytes=sum(info.nbytes for info in model.tensors.values()),
        storage_dtype=model.main_type(),
        context_length=int(config["max_position_embeddings"]),
        tags=("cpu", "gguf", config["model_type"]),
        native_dtype=native_dtype(model.main_type()),
        gguf_layers=tuple(layers),
    )


def _layer(tensors: dict[str, TensorInfo]) -> GGUFLayer:
    """One layer's sizes from its tensors, keyed by their names within the layer."""
    groups: list[MatrixGroup] = []
    floats = split = 0
    used: set[str] = set()
    for fused in FUSED:
        members = [tensors[k] for k in fused if k in tensors]
        if len(members) != len(fused):
            continue
        used.update(fused)
        experts = members[0].shape[0] if len(members[0].shape) == 3 else 1
        rows = sum(m.shape[-2] for m in members)
        group = MatrixGroup(rows, members[0].shape[-1], tuple(m.type_name for m in members))
        groups += [group] * experts
    for key, info in tensors.items():
        if key in used:
            continue
        if key.endswith(".bias") or len(info.shape) == 1:
            floats += math.prod(info.shape)
            split += math.prod(info.shape) if key.startswith("attn_") and key.endswith(".bias") else 0
        elif key == "ffn_gate_inp":  # the router stays in float
            floats += math.prod(info.shape)
        else:
            experts = info.shape[0] if len(info.shape) == 3 else 1
            groups += [MatrixGroup(info.shape[-2], info.shape[-1], (info.type_name,))] * experts
    return GGUFLayer(tuple(groups), floats, split)
