from __future__ import annotations

import pytest

from exoctl.errors import ModelNotFoundError
from exoctl.models.catalog import find_card, get_card, load_catalog

TEST_PLAN_IDS = {
    f"{base}-{device}"
    for base in ("llama-3.1-8b", "qwen2.5-32b", "mixtral-8x7b", "llama-3.1-70b")
    for device in ("cpu", "cuda")
}


def test_the_catalog_has_the_test_plan_ids_and_the_default() -> None:
    # and the test plan's models' draft models (speculative decoding: the same tokenizer, far smaller)
    drafts = {"llama-3.2-1b-cpu", "qwen2.5-0.5b-cpu"}
    assert {c.id for c in load_catalog()} == TEST_PLAN_IDS | {"smollm2-135m-cpu"} | drafts


@pytest.mark.parametrize("card", load_catalog(), ids=lambda c: c.id)
def test_parameters_agree_with_the_dimensions(card) -> None:  # type: ignore[no-untyped-def]
    assert card.counted_parameters() == card.parameters
    assert card.device in card.tags
    assert card.num_attention_heads % card.num_key_value_heads == 0


@pytest.mark.parametrize(
    ("model", "test_plan_gb"),
    [("llama-3.1-8b-cpu", 16), ("qwen2.5-32b-cpu", 64), ("mixtral-8x7b-cpu", 90), ("llama-3.1-70b-cpu", 140)],
)
def test_storage_sizes_match_the_test_plan(model: str, test_plan_gb: int) -> None:
    card = get_card(model)
    assert abs(card.storage_bytes / 1e9 - test_plan_gb) / test_plan_gb < 0.05
    assert card.storage_bytes == card.weight_bytes("bfloat16")


def test_a_hugging_face_repo_id_names_the_cpu_card() -> None:
    card = find_card("meta-llama/Llama-3.1-70B-Instruct")
    assert card is not None and card.id == "llama-3.1-70b-cpu"
    assert get_card("mistralai/mixtral-8x7b-instruct-v0.1").id == "mixtral-8x7b-cpu"


def test_an_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        get_card("gpt-5")
    assert "unknown model 'gpt-5'" in str(info.value)
    assert "llama-3.1-70b-cpu" in (info.value.hint or "")


def test_mixtral_is_the_only_moe() -> None:
    moe = {c.id for c in load_catalog() if c.num_experts}
    assert moe == {"mixtral-8x7b-cpu", "mixtral-8x7b-cuda"}
    assert get_card("mixtral-8x7b-cpu").experts_per_token == 2
