"""Speculative decoding in one process: a head with a drafter (prompt lookup, or a draft model)
and its single stage, driven as a lane drives them. Greedy tokens are exactly those without
speculation for every tiny architecture, whatever the draft (the target itself accepts every
guess, another random model few); stop strings and max_tokens inside an accepted run; penalties
and logprobs; a draft model of another tokenizer refused; the adaptive rule."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from exoctl.engine.tokenizer import Tokenizer
from exoctl.errors import ExoctlError
from exoctl.models.store import resolve_card
from exoctl.wire.answer import Completion
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import Tokens
from exoctl.wire.messages import Delta
from exoctl.wire.runner_spec import NGRAM_DRAFT, RunnerSpec
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.head import Head
from exoctl.worker.instance import InstanceRunner, build_instance
from exoctl.worker.outbox import ToClient, ToSelf
from exoctl.worker.speculation import Speculator
from tests.test_prefix_cache import drive

# a prompt whose answer copies what it read: prompt lookup's home ground
COPY = (
    "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, melons, "
    "apples, pears, plums, cherries, grapes, lemons, limes, melons, apples, pears, plums"
)
GREEDY = SamplingParams(max_tokens=40, ignore_eos=True)
PENALIZED = SamplingParams(
    max_tokens=40,
    ignore_eos=True,
    repetition_penalty=1.3,
    frequency_penalty=0.5,
    presence_penalty=0.2,
    logprobs=3,
)


def speculating(folder: Path, draft: str = NGRAM_DRAFT, draft_folder: Path | None = None) -> InstanceRunner:
    """A whole model on one stage whose head drafts with `draft` (a draft model: `draft_folder`)."""
    layers = resolve_card(str(folder))[0].n_layers
    draft_layers = 0 if draft_folder is None else resolve_card(str(draft_folder))[0].n_layers
    spec = RunnerSpec(
        "i",
        "r",
        str(folder),
        "m",
        "pipeline",
        "float32",
        0,
        layers,
        layers,
        0,
        1,
        (("n1", "127.0.0.1:1"),),
        draft=draft,
        draft_model_id=draft if draft_folder is None else "draft",
        draft_dtype="float32" if draft_folder is not None else "",
        draft_layers=draft_layers,
    )
    runner = build_instance(spec, 32, meeting=None)  # type: ignore[arg-type]  # a pipeline meets no ranks
    runner.load(folder, draft_folder)
    return runner


def ask(
    runner: InstanceRunner,
    request_id: str,
    prompt: str,
    params: SamplingParams = GREEDY,
    speculate: bool = True,
) -> Completion:
    request = GenerateRequest(
        "i", request_id, params, prompt=prompt, cache_prompt=False, speculative=speculate
    )
    return drive(runner, request)[request_id]


def head_of(runner: InstanceRunner) -> Head:
    assert isinstance(runner.role, Head)
    return runner.role


class Scripted:
    """A drafter that knows the answer and spoils some of its guesses: every kind of verification
    outcome (all accepted, a correction in the middle, the first guess wrong) on any model, where
    a random tiny model's own text gives prompt lookup nothing to find."""

    name = "scripted"

    def __init__(self, prompt_tokens: int, answer: list[int], vocab: int) -> None:
        self.prompt_tokens = prompt_tokens
        self.answer = answer
        self.vocab = vocab
        self.calls = 0

    def propose(self, seq: str, ids: Sequence[int], k: int) -> list[int]:
        self.calls += 1
        done = len(ids) - self.prompt_tokens
        guess = list(self.answer[done : done + k])
        if guess and self.calls % 3:  # two steps in three: one guess wrong, at a varying place
            at = self.calls % len(guess)
            guess[at] = (guess[at] + 1) % self.vocab
        return guess

    def forget(self, seq: str) -> None:
        pass


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "mixtral"])
@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "penalties-logprobs"])
def test_any_run_of_guesses_gives_exactly_the_greedy_tokens(
    tiny_models: dict[str, Path], kind: str, params: SamplingParams
) -> None:
    runner = speculating(tiny_models[kind])
    plain = ask(runner, "plain", COPY, params, speculate=False)
    head = head_of(runner)
    prompt = len(head.tokenizer.encode(COPY))  # type: ignore[union-attr]
    head.speculator = Speculator(Scripted(prompt, plain.token_ids, head.stage.vocab_size))
    fast = ask(runner, "fast", COPY, params)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    stats = head.speculator.stats
    assert 0 < stats.accepted < stats.drafted and stats.tokens == stats.passes + stats.accepted


def test_the_onednn_float32_path_gives_the_same_tokens_too(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """EXOCTL_F32_MATMUL=torch: steps of few rows through oneDNN instead of the kernel."""
    monkeypatch.setenv("EXOCTL_F32_MATMUL", "torch")
    runner = speculating(tiny_models["qwen2"])
    plain = ask(runner, "plain", COPY, speculate=False)
    head = head_of(runner)
    prompt = len(head.tokenizer.encode(COPY))  # type: ignore[union-attr]
    head.speculator = Speculator(Scripted(prompt, plain.token_ids, head.stage.vocab_size))
    assert ask(runner, "fast", COPY).token_ids == plain.token_ids
    assert head.speculator.stats.accepted > 0


def test_prompt_lookup_on_a_real_model_copying_its_prompt(smollm2_gguf: Path) -> None:
    """SmolLM2 asked to repeat a list: prompt lookup guesses most of it, with the same tokens."""
    runner = speculating(smollm2_gguf)
    plain = ask(runner, "plain", COPY, speculate=False)
    fast = ask(runner, "fast", COPY)
    assert fast.token_ids == plain.token_ids
    stats = head_of(runner).speculator.stats
    assert stats.accepted > stats.drafted / 2 and stats.report("").tokens_per_pass > 1.5


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mixtral"])
def test_a_draft_that_is_the_target_accepts_every_guess(tiny_models: dict[str, Path], kind: str) -> None:
    folder = tiny_models[kind]
    runner = speculating(folder, str(folder), folder)
    plain = ask(runner, "plain", "The capital of France is", speculate=False)
    fast = ask(runner, "fast", "The capital of France is")
    assert fast.token_ids == plain.token_ids
    stats = head_of(runner).speculator.stats
    assert stats.drafted > 0 and stats.accepted == stats.drafted
    # guesses of 4 and more, all accepted: 5 and more tokens a verification pass (the timing rule
    # then pauses it: this draft costs what the target costs)
    assert stats.accepted / stats.verify_passes >= 4


def test_a_draft_of_another_model_accepts_little_and_is_still_exact(tiny_models: dict[str, Path]) -> None:
    runner = speculating(tiny_models["llama"], "other", tiny_models["llama-tied"])
    plain = ask(runner, "plain", "The capital of France is", speculate=False)
    fast = ask(runner, "fast", "The capital of France is")
    assert fast.token_ids == plain.token_ids
    stats = head_of(runner).speculator.stats
    assert stats.drafted > 0 and stats.accepted < stats.drafted


def test_a_draft_model_of_another_tokenizer_is_refused(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    other = tmp_path / "other-tokens"
    Tokenizer(tiny_models["qwen2"]).hf.save_pretrained(other)
    tokenizer = Tokenizer(other)
    tokenizer.hf.add_tokens(["<exoctl-extra-token>"])
    tokenizer.hf.save_pretrained(other)
    for name in ("config.json", "model.safetensors", "generation_config.json"):
        if (tiny_models["qwen2"] / name).exists():
            (other / name).write_bytes((tiny_models["qwen2"] / name).read_bytes())
    with pytest.raises(
        ExoctlError,
        match=r"draft model draft has another tokenizer: 49153 tokens against the target.s 49152.*<exoctl",
    ):
        speculating(tiny_models["llama"], "other", other)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 13])
def test_max_tokens_inside_an_accepted_run(tiny_models: dict[str, Path], max_tokens: int) -> None:
    folder = tiny_models["llama"]
    runner = speculating(folder, str(folder), folder)  # accepts everything: runs of 5 and more
    params = replace(GREEDY, max_tokens=max_tokens)
    plain = ask(runner, "plain", COPY, params, speculate=False)
    fast = ask(runner, "fast", COPY, params)
    assert len(fast.token_ids) == max_tokens and fast.token_ids == plain.token_ids
    assert fast.finish_reason == plain.finish_reason == "length"


def test_a_stop_string_inside_an_accepted_run(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["llama"]
    runner = speculating(folder, str(folder), folder)
    plain = ask(runner, "plain", COPY, speculate=False)
    # stop on a piece of the text the model writes, somewhere in the middle of a run
    stop = plain.text[len(plain.text) // 2 : len(plain.text) // 2 + 4]
    assert stop.strip()
    params = replace(GREEDY, stop=(stop,))
    want = ask(runner, "plain-stop", COPY, params, speculate=False)
    got = ask(runner, "fast-stop", COPY, params)
    assert got.text == want.text and got.finish_reason == want.finish_reason == "stop"
    assert stop not in got.text


def test_logprobs_of_accepted_tokens_are_those_without_speculation(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["llama"]
    runner = speculating(folder, str(folder), folder)
    head = head_of(runner)
    streamed: dict[str, list[Any]] = {"p": [], "f": []}
    for request_id, speculate in (("p", False), ("f", True)):
        request = GenerateRequest(
            "i", request_id, PENALIZED, prompt=COPY, speculative=speculate, cache_prompt=False
        )
        outs = head.start(request, b"c")
        while outs:
            tokens = [o.message for o in outs if isinstance(o, ToSelf) and isinstance(o.message, Tokens)]
            streamed[request_id] += [
                entry
                for o in outs
                if isinstance(o, ToClient) and isinstance(o.message, Delta)
                for entry in o.message.logprobs
            ]
            outs = head.tokens(tokens) if tokens else []
    assert head.speculator.stats.accepted > 0 and len(streamed["f"]) == PENALIZED.max_tokens
    assert [e["token"] for e in streamed["f"]] == [e["token"] for e in streamed["p"]]
    for got, want in zip(streamed["f"], streamed["p"], strict=True):
        assert got["logprob"] == pytest.approx(want["logprob"], abs=1e-4)
        assert [t["token"] for t in got["top_logprobs"]] == [t["token"] for t in want["top_logprobs"]]


def test_concurrent_requests_on_one_instance(tiny_models: dict[str, Path]) -> None:
    folder = tiny_models["qwen2"]
    runner = speculating(folder, str(folder), folder)
    alone = {p: ask(runner, f"alone-{i}", p, speculate=False) for i, p in enumerate((COPY, "Say hello"))}
    requests = [
        GenerateRequest("i", "a", GREEDY, prompt=COPY, cache_prompt=False),
        GenerateRequest("i", "b", replace(GREEDY, max_tokens=8), prompt="Say hello", cache_prompt=False),
        GenerateRequest("i", "c", GREEDY, prompt=COPY, cache_prompt=False, speculative=False),
    ]
    done = drive(runner, *requests)
    assert done["a"].token_ids == alone[COPY].token_ids == done["c"].token_ids
    assert done["b"].token_ids == alone["Say hello"].token_ids[:8]


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_a_constrained_answer_through_verification_steps(
    tiny_models: dict[str, Path], temperature: float
) -> None:
    """A grammar's mask at each verified position: guesses the grammar forbids are rejected (the
    scripted drafter spoils some), the accepted run moves the matcher on, and the answer is the one
    decoded a token a step (greedy), valid by its schema (sampled too)."""
    from exoctl.api.structured import schema_grammar

    schema = {
        "type": "object",
        "properties": {"word": {"type": "string", "maxLength": 12}, "n": {"type": "integer", "maximum": 99}},
        "required": ["word", "n"],
        "additionalProperties": False,
    }
    params = SamplingParams(max_tokens=60, temperature=temperature, seed=4, grammar=schema_grammar(schema))
    runner = speculating(tiny_models["llama"])
    plain = ask(runner, "plain", COPY, params, speculate=False)
    assert set(json.loads(plain.text)) == {"word", "n"}
    head = head_of(runner)
    prompt = len(head.tokenizer.encode(COPY))  # type: ignore[union-attr]
    head.speculator = Speculator(Scripted(prompt, plain.token_ids, head.stage.vocab_size))
    fast = ask(runner, "fast", COPY, params)
    assert set(json.loads(fast.text)) == {"word", "n"}
    stats = head.speculator.stats
    assert stats.drafted > 0 and 0 < stats.accepted < stats.drafted
    if temperature == 0:
        assert fast.token_ids == plain.token_ids
