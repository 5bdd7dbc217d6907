"""A decoder layer's decode step as one C call (engine/fused_decode.py, EXOCTL_DECODE_LAYER): the
same bits as the Python layer's dozen calls, for every dtype and architecture it takes, one
sequence and several at different lengths; and the layers it cannot take keep the Python path."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exoctl.engine.fused_decode import FusedDecode
from exoctl.engine.model import CausalLM, load_model

STEPS = 8


def decode(model: CausalLM, prompts: list[list[int]]) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Each prompt alone, then STEPS greedy decode steps of all of them as one batch: the logits
    of every step and the tokens."""
    caches = [model.new_cache() for _ in prompts]
    last = []
    for prompt, cache in zip(prompts, caches, strict=True):
        ids = torch.tensor([prompt])
        last.append(model.forward(ids, torch.arange(len(prompt))[None], [cache])[0, -1])
    logits_seen, tokens = [], [[] for _ in prompts]
    for _ in range(STEPS):
        chosen = [int(row.argmax()) for row in last]
        for seq, token in enumerate(chosen):
            tokens[seq].append(token)
        positions = torch.tensor([[cache.length] for cache in caches])
        logits = model.forward(torch.tensor(chosen)[:, None], positions, caches)
        logits_seen.append(logits)
        last = list(logits[:, -1])
    return logits_seen, tokens


@pytest.mark.parametrize(
    ("kind", "dtype", "activations"),
    [
        ("llama", "float32", "float32"),
        ("qwen2", "float32", "float32"),  # biases on q, k, v
        ("llama", "bfloat16", "bfloat16"),
        ("llama-tied", "int4", "float32"),
        ("qwen2", "int8", "bfloat16"),
        ("llama", "int4", "bfloat16"),
    ],
)
def test_the_one_call_layer_gives_the_python_layers_bits(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch, kind: str, dtype: str, activations: str
) -> None:
    monkeypatch.setenv("EXOCTL_ACTIVATIONS", activations)
    monkeypatch.setenv("EXOCTL_BF16_MATMUL", "kernel")
    prompts = [[5, 9, 14, 3], [7, 7, 2, 30, 31, 4, 9], [11]]  # three lengths: each its own past
    runs = {}
    calls = []
    run_layer = FusedDecode.__call__
    monkeypatch.setattr(FusedDecode, "__call__", lambda self, *a: calls.append(1) or run_layer(self, *a))
    for mode in ("steps", "fused"):
        monkeypatch.setenv("EXOCTL_DECODE_LAYER", mode)
        model = load_model(tiny_models[kind], dtype=dtype)
        runs[mode] = (decode(model, prompts), decode(model, prompts[:1]))
        fused = [block._decode_layer() for block in model.blocks]
        assert all(isinstance(f, FusedDecode) for f in fused) == (mode == "fused")
    # every decode step of every layer went through the one call (two runs of STEPS steps), and
    # so did the one-token prompt (a single new position, as a decode step is)
    assert len(calls) == (2 * STEPS + 1) * len(model.blocks)
    for (steps_logits, steps_tokens), (fused_logits, fused_tokens) in zip(
        runs["steps"], runs["fused"], strict=True
    ):
        assert fused_tokens == steps_tokens
        for a, b in zip(steps_logits, fused_logits, strict=True):
            assert torch.equal(a, b)


def test_layers_it_cannot_take_keep_the_python_path(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mixtral's experts, and bf16 weights on torch's GEMM, are not the C layer's: no fused step,
    and decoding goes on through the Python layer."""
    monkeypatch.setenv("EXOCTL_DECODE_LAYER", "fused")
    mixtral = load_model(tiny_models["mixtral"], dtype="int4")
    assert all(block._decode_layer() is None for block in mixtral.blocks)
    monkeypatch.setenv("EXOCTL_BF16_MATMUL", "torch")
    monkeypatch.setenv("EXOCTL_ACTIVATIONS", "bfloat16")
    on_torch = load_model(tiny_models["llama"], dtype="bfloat16")
    assert all(block._decode_layer() is None for block in on_torch.blocks)
    _, tokens = decode(on_torch, [[5, 9, 14, 3]])
    assert len(tokens[0]) == STEPS
