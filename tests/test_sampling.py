from __future__ import annotations

import pytest
import torch

from exoctl.engine.sampling import (
    SamplingParams,
    apply_temperature,
    greedy,
    make_generator,
    sample,
    top_k_filter,
    top_p_filter,
)
from exoctl.errors import InvalidRequestError

NEG = float("-inf")


def test_greedy_picks_the_largest_logit_per_row() -> None:
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 4.99]])
    assert greedy(logits).tolist() == [1, 0]


def test_temperature_divides_logits() -> None:
    assert apply_temperature(torch.tensor([[2.0, -4.0]]), 0.5).tolist() == [[4.0, -8.0]]


def test_top_k_keeps_the_k_largest() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0]])
    assert top_k_filter(logits, 2).tolist() == [[NEG, 4.0, 3.0, NEG]]
    assert top_k_filter(logits, 0).tolist() == logits.tolist()
    assert top_k_filter(logits, 10).tolist() == logits.tolist()


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    # probabilities 0.5, 0.25, 0.125, 0.125
    logits = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert torch.isinf(top_p_filter(logits, 0.5)[0, 1:]).all()
    kept = top_p_filter(logits, 0.6)[0]
    assert not torch.isinf(kept[:2]).any() and torch.isinf(kept[2:]).all()
    # the top token survives even when p is tiny
    assert not torch.isinf(top_p_filter(logits, 0.01)[0, 0])
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_top_p_works_on_unsorted_rows() -> None:
    logits = torch.tensor([[0.125, 0.5, 0.125, 0.25]]).log()
    filtered = top_p_filter(logits, 0.7)[0]
    assert [bool(torch.isinf(v)) for v in filtered] == [True, False, True, False]


def test_sampling_with_a_seed_is_reproducible_and_follows_the_distribution() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(2000, 1)
    params = SamplingParams(temperature=1.0, seed=7)
    first = sample(logits, params, make_generator(7))
    again = sample(logits, params, make_generator(7))
    assert torch.equal(first, again)
    freq = torch.bincount(first, minlength=4).float() / 2000
    expected = torch.tensor([0.0, 1.0, 2.0, 3.0]).softmax(-1)
    assert (freq - expected).abs().max() < 0.05


def test_sampling_never_picks_a_filtered_token() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).repeat(500, 1)
    picked = sample(logits, SamplingParams(temperature=2.0, top_k=2), make_generator(1))
    assert set(picked.tolist()) == {2, 3}


def test_temperature_zero_is_greedy() -> None:
    logits = torch.tensor([[0.0, 9.0, 1.0]])
    assert sample(logits, SamplingParams(temperature=0.0)).tolist() == [1]


@pytest.mark.parametrize(
    ("kwargs", "text"),
    [
        ({"temperature": -1}, "temperature must be >= 0"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_k": -2}, "top_k must be >= 0"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"stop": ("",)}, "stop strings must not be empty"),
    ],
)
def test_bad_parameters_are_refused_with_the_value(kwargs: dict[str, object], text: str) -> None:
    with pytest.raises(
        InvalidRequestError, match=text.replace("(", r"\(").replace(")", r"\)").replace("]", r"\]")
    ):
        SamplingParams(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("temperature", [1e-40, 8e-38, 1e-7])
def test_a_temperature_too_small_to_divide_by_is_greedy(temperature: float) -> None:
    logits = torch.tensor([[3.0e4, 2.9e4, -1.0e4]])
    params = SamplingParams(temperature=temperature)
    assert params.greedy and sample(logits, params).tolist() == [0]


def test_a_small_temperature_samples_without_overflow() -> None:
    logits = torch.tensor([[3.0e4, 2.9e4, -1.0e4]])
    picks = {int(sample(logits, SamplingParams(temperature=1e-6), make_generator(s))) for s in range(20)}
    assert picks == {0}
