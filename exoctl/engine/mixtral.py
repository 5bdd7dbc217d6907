"""Mixtral decoder layers: Llama attention and a sparse mixture of experts (top-k of E).

Checkpoint names: `model.layers.{i}.block_sparse_moe.gate.weight` (the router, [E, D]) and
`...block_sparse_moe.experts.{e}.w1|w2|w3.weight` (gate, down, up of expert e).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from exoctl.engine.config import ModelConfig
from exoctl.engine.layers import DecoderLayer, GatedMLP, Linear
from exoctl.engine.llama import load_attention, load_norms
from exoctl.engine.weights import WeightReader


class SparseMoE:
    """Routes each token to its top-k experts and sums their outputs weighted by the router.

    `experts` maps expert index -> MLP for the experts this process holds (all of them under
    pipeline sharding); `tokens_per_expert` counts the tokens routed to each expert.
    """

    def __init__(self, router: Linear, experts: dict[int, GatedMLP], num_experts: int, top_k: int) -> None:
        self.router = router
        self.experts = experts
        self.num_experts = num_experts
        self.top_k = top_k
        self.tokens_per_expert = torch.zeros(num_experts, dtype=torch.int64)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, D]
        logits = self.router(x)  # [N, E]
        # As transformers: softmax in float32 over all experts, keep the top k, renormalise.
        weights = F.softmax(logits, dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(weights, self.top_k, dim=-1)  # [N, k]
        weights = (weights / weights.sum(dim=-1, keepdim=True)).to(x.dtype)
        self.tokens_per_expert += torch.bincount(chosen.flatten(), minlength=self.num_experts)
        out = torch.zeros_like(x)
        for expert, mlp in self.experts.items():
            token, slot = torch.where(chosen == expert)
            if token.numel() == 0:
                continue
            out.index_add_(0, token, mlp(x[token]) * weights[token, slot, None])
        return out.view(shape)


def load_moe(reader: WeightReader, config: ModelConfig, layer: int) -> SparseMoE:
    prefix = f"model.layers.{layer}.block_sparse_moe"
    d, i, e = config.hidden_size, config.intermediate_size, config.num_local_experts
    router = Linear(reader.get(f"{prefix}.gate.weight", (e, d)))
    experts = {}
    for expert in range(e):
        name = f"{prefix}.experts.{expert}"
        gate_up = torch.cat(
            [reader.get(f"{name}.w1.weight", (i, d)), reader.get(f"{name}.w3.weight", (i, d))]
        )
        experts[expert] = GatedMLP(Linear(gate_up), Linear(reader.get(f"{name}.w2.weight", (d, i))))
    return SparseMoE(router, experts, e, config.num_experts_per_tok)


def load_layer(reader: WeightReader, config: ModelConfig, layer: int) -> DecoderLayer:
    input_norm, post_norm = load_norms(reader, config, layer)
    return DecoderLayer(
        input_norm, load_attention(reader, config, layer), post_norm, load_moe(reader, config, layer)
    )
