"""Streaming detokenisation and stop strings."""

from __future__ import annotations

from pathlib import Path

import pytest

from exoctl.engine.tokenizer import IncrementalDecoder, StopMatcher, Tokenizer

TEXTS = [
    "Hello, world! The capital of France is Paris.",
    "Emoji 🤖🚀 and accents: café, naïve, Zürich; 日本語のテキスト; Ελληνικά.",
    "  leading spaces,\ttabs\nand new lines\n\n",
]


@pytest.fixture(scope="module")
def tokenizer(smollm2_folder: Path) -> Tokenizer:
    return Tokenizer(smollm2_folder)


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_join_to_the_full_text_and_never_split_a_character(tokenizer: Tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.push(i) for i in ids]
    deltas.append(decoder.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_are_split_across_tokens_and_held_back(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("🤖")
    assert len(ids) > 1  # the byte-level tokenizer splits this character
    decoder = IncrementalDecoder(tokenizer)
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.push(ids[-1]) == "🤖"


def test_eos_ids_come_from_the_tokenizer_and_generation_config(tokenizer: Tokenizer) -> None:
    assert 2 in tokenizer.eos_token_ids  # <|im_end|> in SmolLM2


def test_chat_template_wraps_the_user_turn(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode_chat([{"role": "user", "content": "Hi there"}])
    text = tokenizer.hf.decode(ids)
    assert "<|im_start|>user\nHi there<|im_end|>" in text
    assert text.endswith("<|im_start|>assistant\n")


def feed_all(matcher: StopMatcher, chunks: list[str]) -> str:
    return "".join(matcher.feed(c) for c in chunks) + matcher.flush()


def test_stop_string_cuts_the_text_before_it() -> None:
    matcher = StopMatcher(["\n\n"])
    assert feed_all(matcher, ["Paris", ".\n", "\nMore"]) == "Paris."
    assert matcher.stopped


def test_text_that_only_looks_like_a_stop_prefix_is_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.feed("the E") == "the "  # "E" might start "END": held back
    assert matcher.feed("ND") == ""
    assert matcher.stopped
    other = StopMatcher(["END"])
    assert feed_all(other, ["the E", "ast"]) == "the East"
    assert not other.stopped


def test_earliest_of_several_stops_wins() -> None:
    assert feed_all(StopMatcher(["bb", "a"]), ["xxbba"]) == "xx"


def test_without_stops_everything_passes_at_once() -> None:
    matcher = StopMatcher([])
    assert matcher.feed("abc") == "abc"
