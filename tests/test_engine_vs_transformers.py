"""Every architecture, logit for logit against transformers on tiny random models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from exoctl.engine.model import CausalLM, load_model
from exoctl.engine.weights import WeightReader
from tests.tiny_models import SPECS, load_reference

KINDS = sorted(SPECS)
STEPS = 20


def prompt(seed: int, length: int = 11) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 49152, (1, length), generator=generator)


def greedy_run(stages: list[CausalLM], ids: torch.Tensor, steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Prefill then greedy decode through a chain of layer ranges; logits [V] of every step."""
    caches = [stage.new_cache() for stage in stages]
    tokens, positions = ids, torch.arange(ids.shape[1])[None]
    chosen: list[int] = []
    logits: list[torch.Tensor] = []
    for _ in range(steps):
        x = tokens
        for stage, cache in zip(stages, caches, strict=False):
            x = stage.forward(x, positions, [cache])
        logits.append(x[0, -1])
        chosen.append(int(x[0, -1].argmax()))
        tokens = torch.tensor([[chosen[-1]]])
        positions = torch.tensor([[caches[0].length]])
    return chosen, logits


@pytest.mark.parametrize("kind", KINDS)
def test_prefill_logits_equal_transformers(kind: str, tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[kind]
    reference = load_reference(folder)
    ids = prompt(0, 17)
    with torch.no_grad():
        expected = reference(ids).logits
    model = load_model(folder)
    got = model.forward(ids, torch.arange(17)[None], [model.new_cache()], all_logits=True)
    assert got.shape == expected.shape
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero tensors
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_decode_equals_transformers(kind: str, tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[kind]
    reference = load_reference(folder)
    ids = prompt(1)
    with torch.no_grad():
        out = reference.generate(
            ids,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
    expected_tokens = out.sequences[0, ids.shape[1] :].tolist()
    tokens, logits = greedy_run([load_model(folder)], ids, STEPS)
    assert tokens == expected_tokens
    assert len(set(tokens)) > 3  # a decode that loops on one token would prove little
    for step, (got, want) in enumerate(zip(logits, out.logits, strict=False)):
        torch.testing.assert_close(got, want[0], atol=1e-4, rtol=0, msg=lambda m, s=step: f"step {s}: {m}")


@pytest.mark.parametrize("kind", KINDS)
def test_two_layer_ranges_chained_equal_the_whole(kind: str, tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[kind]
    whole = load_model(folder)
    n = whole.config.num_hidden_layers
    ids = prompt(2)
    expected_tokens, expected_logits = greedy_run([whole], ids, STEPS)
    for k in range(1, n):
        first, second = load_model(folder, (0, k)), load_model(folder, (k, n))
        assert first.is_first and not first.is_last and second.is_last and not second.is_first
        tokens, logits = greedy_run([first, second], ids, STEPS)
        assert tokens == expected_tokens
        for got, want in zip(logits, expected_logits, strict=False):
            assert torch.equal(got, want)


@pytest.mark.parametrize("kind", KINDS)
def test_a_range_reads_only_its_tensors(kind: str, tiny_models: dict[str, Path]) -> None:
    folder = tiny_models[kind]
    all_names = set(WeightReader(folder, torch.float32).weight_map)
    n = load_model(folder).config.num_hidden_layers
    tied = SPECS[kind][1].get("tie_word_embeddings", False)

    def layer_of(name: str) -> int | None:
        parts = name.split(".")
        return int(parts[2]) if parts[:2] == ["model", "layers"] else None

    for start, end in [(0, 1), (1, n - 1), (n - 1, n)]:
        reader = WeightReader(folder, torch.float32)
        load_model(folder, (start, end), reader=reader)
        read = set(reader.read_names)
        expected = {
            name for name in all_names if (layer := layer_of(name)) is not None and start <= layer < end
        }
        if start == 0 or (end == n and tied):
            expected.add("model.embed_tokens.weight")
        if end == n:
            expected.add("model.norm.weight")
            if not tied:
                expected.add("lm_head.weight")
        assert read == expected
        # Nothing is read twice except the tied embedding, which is both input and output matrix.
        repeats = [name for name in read if reader.read_names.count(name) > 1]
        assert repeats == (["model.embed_tokens.weight"] if tied and start == 0 and end == n else [])


@pytest.mark.parametrize("kind", ["llama", "mixtral"])
def test_batched_decode_equals_one_sequence_at_a_time(kind: str, tiny_models: dict[str, Path]) -> None:
    """Two sequences of different lengths in one forward give each its own single-sequence logits."""
    model = load_model(tiny_models[kind])
    prompts = [prompt(3, 7), prompt(4, 13)]
    alone = [greedy_run([model], p, 6) for p in prompts]
    caches = [model.new_cache() for _ in prompts]
    next_tokens = []
    for p, cache in zip(prompts, caches, strict=False):
        logits = model.forward(p, torch.arange(p.shape[1])[None], [cache])
        next_tokens.append(int(logits[0, -1].argmax()))
    batched: list[list[int]] = [[t] for t in next_tokens]
    for _ in range(5):
        tokens = torch.tensor([[seq[-1]] for seq in batched])  # [2, 1]
        positions = torch.tensor([[cache.length] for cache in caches])
        logits = model.forward(tokens, positions, caches)  # [2, 1, V]
        for b, seq in enumerate(batched):
            seq.append(int(logits[b, -1].argmax()))
    assert batched == [tokens for tokens, _ in alone]


@pytest.mark.parametrize("kind", KINDS)
def test_bfloat16_is_as_accurate_as_transformers_bfloat16(kind: str, tiny_models: dict[str, Path]) -> None:
    """In bfloat16 both implementations round differently; ours must stay as close to the float32
    truth as transformers' own bfloat16 run is."""
    folder = tiny_models[kind]
    ids = prompt(5, 9)
    with torch.no_grad():
        truth = load_reference(folder)(ids).logits
        theirs = load_reference(folder, torch.bfloat16)(ids).logits.float()
    model = load_model(folder, dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    ours = model.forward(ids, torch.arange(9)[None], [model.new_cache()], all_logits=True)
    their_error = (theirs - truth).abs().mean()
    our_error = (ours - truth).abs().mean()
    # A mean, not a max: under MoE one rounding can flip an expert choice at one position.
    assert our_error < 1.5 * their_error
