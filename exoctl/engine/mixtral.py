"""Mixtral decoder layers: Llama attention and a sparse mixture of experts (top-k of E).

Checkpoint names: `model.layers.{i}.block_sparse_moe.gate.weight` (the router, [E, D]) and
`...block_sparse_moe.experts.{e}.w1|w2|w3.weight` (gate, down, up of expert e).

Under tensor sharding the experts are parallel: rank r of k holds whole experts
[r E/k, (r+1) E/k), the router is replicated, and each rank adds only its own experts' share of
every token; the layer's all-reduce sums the shares.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exoctl.engine.config import ModelConfig
from exoctl.engine.layers import DecoderLayer, GatedMLP
from exoctl.engine.linear import Linear
from exoctl.engine.llama import load_attention, load_gated_mlp, load_norms
from exoctl.engine.shard import WHOLE, TensorShard
from exoctl.engine.weights import WeightSource


class SparseMoE:
    """Routes each token to its top-k experts and sums their outputs weighted by the router.

    `experts` maps expert index -> MLP for the experts this process holds (all of them under
    pipeline sharding); `tokens_per_expert` [E] counts the tokens routed to each held expert
    (zero for experts held elsewhere, so counts summed over ranks are the routed tokens).
    """

    def __init__(self, router: Linear, experts: dict[int, GatedMLP], num_experts: int, top_k: int) -> None:
        self.router = router
        self.experts = experts
        self.num_experts = num_experts
        self.top_k = top_k
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64)
        self.held = torch.zeros(num_experts, dtype=torch.int64)
        self.held[list(experts)] = 1

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(x)  # [N, E]
        # As transformers: softmax in float32 over all experts, keep the top k, renormalise.
        weights = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=self.num_experts) * self.held
        out = torch.zeros_like(x)
        for expert, mlp in self.experts.items():
            token, slot = torch.where(chosen == expert)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, mlp(x[token]) * weights[token, slot, None])
        return out.view(shape)


def load_moe(reader: WeightSource, config: ModelConfig, layer: int, shard: TensorShard = WHOLE) -> SparseMoE:
    prefix = f"model.layers.{layer}.block_sparse_moe"
    d, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    router = Linear(reader.get(f"{prefix}.gate.weight", (e, d)))
    experts = {}
    for expert in shard.whole_units(e, "experts"):
        name = f"{prefix}.experts.{expert}"
        names = (f"{name}.w1.weight", f"{name}.w3.weight", f"{name}.w2.weight")
        experts[expert] = load_gated_mlp(reader, names, d, i, range(i))
    return SparseMoE(router, experts, e, config.num_experts_per_tok)


def load_layer(
    reader: WeightSource, config: ModelConfig, layer: int, shard: TensorShard = WHOLE
) -> DecoderLayer:
    input_norm, post_norm = load_norms(reader, config, layer)
    return DecoderLayer(
        input_norm,
        load_attention(reader, config, layer, shard),
        post_norm,
        load_moe(reader, config, layer, shard),
    )
