"""A causal LM built for a half-open layer range [start, end) with absolute layer indices.

The first range owns the token embedding, the last owns the final norm and lm_head; a range
that is both is the whole model. Each range reads only its own tensors from safetensors.

Under tensor sharding (`shard`) a rank holds every layer but only its part of each (see
`engine.shard`), the whole embedding, and the rows of lm_head for its part of the vocabulary:
its logits are [B, 1, V / k], and `reduce` sums the layers' partial outputs over the ranks.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from exoctl.dtypes import (
    FLOAT_DTYPES,
    QUANTIZED_BITS,
    UnsupportedDtypeError,
    activation_dtype,
    check_dtype,
    embedding_dtype,
    head_dtype,
)
from exoctl.engine import llama, mixtral, qwen2
from exoctl.engine.config import ModelConfig, gguf_config, load_config
from exoctl.engine.gguf_weights import GGUFWeightReader
from exoctl.engine.kernel_calls import bf16_activations
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.layers import DecoderLayer, Reduce, RMSNorm, Rotary, stacked_causal_mask
from exoctl.engine.linear import AnyLinear, make_linear
from exoctl.engine.shard import WHOLE, TensorShard
from exoctl.engine.weights import WeightReader, WeightSource
from exoctl.errors import UnsupportedModelError
from exoctl.models.gguf.file import is_gguf_source, open_model

DTYPES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in FLOAT_DTYPES}
PREFILL_CHUNK = 512  # prompt positions a forward runs at a time

LayerLoader = Callable[[WeightSource, ModelConfig, int, TensorShard], DecoderLayer]
LAYER_LOADERS: dict[str, LayerLoader] = {
    "llama": llama.load_layer,
    "qwen2": qwen2.load_layer,
    "mixtral": mixtral.load_layer,
}


def resolve_dtype(name: str) -> torch.dtype:
    """The torch dtype of activations, norms and the KV cache (`dtypes.activation_dtype`: this
    CPU's choice for `auto`, int8 and int4; EXOCTL_ACTIVATIONS forces it on any CPU)."""
    try:
        return DTYPES[activation_dtype(check_dtype(name), bf16_activations())]
    except UnsupportedDtypeError as exc:
        raise UnsupportedModelError(exc.message, hint=exc.hint) from None


class CausalLM:
    def __init__(
        self,
        config: ModelConfig,
        layers: range,
        dtype: torch.dtype,
        embed: torch.Tensor | None,
        blocks: list[DecoderLayer],
        norm: RMSNorm | None,
        lm_head: AnyLinear | None,
        shard: TensorShard = WHOLE,
    ) -> None:
        self.config = config
        self.shard = shard
        self.held_in_float: tuple[str, ...] = ()  # quantized loads: matrices kept in float (load_model)
        self.kv_heads = config.num_key_value_heads // shard.world
        self.vocab = shard.part(config.vocab_size)  # the logits' columns, as vocabulary ids
        self.layers = layers
        self.dtype = dtype
        self.embed = embed
        self.blocks = blocks
        self.norm = norm
        self.lm_head = lm_head
        self.rotary = Rotary(config.head_dim, config.rope_theta, config.rope_scaling, dtype)

    @property
    def is_first(self) -> bool:
        return self.layers.start == 0

    @property
    def is_last(self) -> bool:
        return self.layers.stop == self.config.num_hidden_layers

    def new_cache(self) -> KVCache:
        return KVCache(self.layers, self.kv_heads, self.config.head_dim, self.dtype)

    @torch.inference_mode()
    def forward(
        self, inputs: torch.Tensor, positions: torch.Tensor, caches: list[KVCache], all_logits: bool = False
    ) -> torch.Tensor:
        """Run this range on B sequences of T new positions each.

        inputs: token ids [B, T] on the first range, hidden states [B, T, D] elsewhere.
        positions: absolute positions [B, T]; caches: one per sequence, in batch order.
        Returns hidden states [B, T, D], or on the last range float32 logits [B, T, V]
        (only the last position, [B, 1, V], unless `all_logits`); a tensor-parallel rank's
        logits cover `self.vocab` only.
        """
        if len(caches) != inputs.shape[0]:
            raise ValueError(f"{inputs.shape[0]} sequences but {len(caches)} caches")
        steps = inputs.shape[1]
        if steps > PREFILL_CHUNK:
            # A long prompt in chunks: activations stay those of PREFILL_CHUNK positions (the MLP's
            # [T, 2I] alone is 49 MB at 4,000 tokens of SmolLM2), and the cache is sized once.
            for cache in caches:
                cache.reserve(cache.length + steps)
            outs = []
            for first in range(0, steps, PREFILL_CHUNK):
                part = slice(first, first + PREFILL_CHUNK)
                # an earlier chunk's logits are wanted only when all are
                final = first + PREFILL_CHUNK >= steps
                head = "all" if all_logits else "last" if final else "none"
                outs.append(self._forward(inputs[:, part], positions[:, part], caches, head))
            if self.lm_head is not None and not all_logits:
                return outs[-1]
            return torch.cat(outs, dim=1)
        return self._forward(inputs, positions, caches, "all" if all_logits else "last")

    def _forward(
        self, inputs: torch.Tensor, positions: torch.Tensor, caches: list[KVCache], head: str
    ) -> torch.Tensor:
        """`head` on the last range: logits of "all" positions, of the "last", or "none" (hidden)."""
        h = (
            F.embedding(inputs, self.embed).to(self.dtype)
            if self.embed is not None
            else inputs.to(self.dtype)
        )
        cos, sin = self.rotary(positions)
        mask = None
        steps = inputs.shape[1]
        if steps > 1 and caches[0].length:  # one sequence's new positions after cached ones
            groups = self.config.num_attention_heads // self.config.num_key_value_heads
            mask = stacked_causal_mask(caches[0].length, steps, groups, self.dtype)  # every layer's
        for block in self.blocks:
            h = block(h, cos, sin, caches, mask)
        if self.lm_head is None or self.norm is None or head == "none":
            return h
        if head == "last":
            h = h[:, -1:]
        return self.lm_head(self.norm(h)).float()

    def weight_bytes(self) -> int:
        """Bytes of the matmul weights and the embedding this range holds (norms are negligible)."""
        total = 0 if self.embed is None else self.embed.numel() * self.embed.element_size()
        if self.lm_head is not None:
            total += self.lm_head.nbytes
        for block in self.blocks:
            for value in _linears(block):
                total += value.nbytes
        return total


def _linears(block: DecoderLayer) -> list[AnyLinear]:
    found: list[AnyLinear] = [block.attention.qkv, block.attention.o_proj]
    mlp = block.mlp
    if isinstance(mlp, mixtral.SparseMoE):
        found.append(mlp.router)
        for expert in mlp.experts.values():
            found += [expert.gate_up, expert.down]
    else:
        found += [mlp.gate_up, mlp.down]
    return found


def check_range(config: ModelConfig, layers: tuple[int, int] | None) -> range:
    n = config.num_hidden_layers
    if layers is None:
        return range(n)
    start, end = layers
    if not 0 <= start < end <= n:
        raise UnsupportedModelError(
            f"layer range [{start}, {end}) is not within the model's {n} layers",
            hint=f"give 0 <= start < end <= {n}",
        )
    return range(start, end)


def load_model(
    folder: Path,
    layers: tuple[int, int] | None = None,
    dtype: str = "float32",
    reader: WeightSource | None = None,
    on_layer: Callable[[int], None] | None = None,
    shard: TensorShard = WHOLE,
    reduce: Reduce | None = None,
) -> CausalLM:
    """Build the model (or the layer range [start, end) of it) from a Hugging Face folder or a
    GGUF model (a .gguf file, or a folder of split GGUF files).

    `on_layer(count)` is called after each layer with the number loaded so far (progress).
    `shard` and `reduce`: this rank's part of a tensor-parallel instance, and the all-reduce
    its layers sum their partial outputs with (see the module doc).
    """
    # a GGUF's header is read once, for the config and the reader
    gguf = open_model(Path(folder)) if is_gguf_source(Path(folder)) else None
    config = gguf_config(gguf) if gguf is not None else load_config(folder)
    span = check_range(config, layers)
    torch_dtype = resolve_dtype(dtype)
    bits = QUANTIZED_BITS.get(dtype)
    if reader is None:
        reader = (
            GGUFWeightReader(gguf, torch_dtype, bits)
            if gguf is not None
            else WeightReader(folder, torch_dtype, bits)
        )
    load_layer = LAYER_LOADERS[config.architecture]
    d, v = config.hidden_size, config.vocab_size
    try:
        embed = None
        if span.start == 0:
            # in `dtypes.embedding_dtype`: bfloat16 for a quantized model (None: the runtime dtype)
            embed = reader.get("model.embed_tokens.weight", (v, d), DTYPES.get(embedding_dtype(dtype)))
        blocks = []
        for i in span:
            block = load_layer(reader, config, i, shard)
            block.reduce = reduce
            blocks.append(block)
            if on_layer is not None:
                on_layer(len(blocks))
        norm = lm_head = None
        if span.stop == config.num_hidden_layers:
            norm = RMSNorm(reader.get("model.norm.weight", (d,)), config.rms_norm_eps)
            head_name = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
            # in `dtypes.head_dtype`: int8 under int4 too, the logits decide every token
            head = reader.matrix(
                head_name, (v, d), 0, shard.part(v), bits=QUANTIZED_BITS.get(head_dtype(dtype))
            )
            lm_head = make_linear(head)
    finally:
        reader.close()
    model = CausalLM(config, span, torch_dtype, embed, blocks, norm, lm_head, shard)
    model.held_in_float = tuple(getattr(reader, "held_in_float", ()))
    return model


def held_in_float_note(names: tuple[str, ...]) -> str | None:
    """What a quantized load kept in float, in a line (None when it kept nothing): matrices whose
    input width takes no blocks of 32, grouped by their name with the layer index elided."""
    if not names:
        return None
    kinds = sorted({re.sub(r"\.layers\.\d+\.", ".layers.*.", n).removesuffix(".weight") for n in names})
    return (
        f"{len(names)} matri{'x' if len(names) == 1 else 'ces'} held in float32, "
        f"not quantized (their input width is not a multiple of 32): {', '.join(kinds)}"
    )
