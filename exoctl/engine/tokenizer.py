"""Tokenizer and chat template through transformers, and streaming detokenisation."""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from exoctl.errors import ExoctlError, InvalidRequestError, ModelFormatError


class Tokenizer:
    """The model folder's tokenizer, its chat template and its end-of-sequence ids."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoTokenizer

        from exoctl.models.gguf.file import is_gguf_source, model_files

        self._byte_level: bool | None = None
        if is_gguf_source(Path(folder)):
            self.hf = _gguf_tokenizer(model_files(Path(folder))[0])
            self.eos_token_ids = frozenset(
                {int(self.hf.eos_token_id)} if self.hf.eos_token_id is not None else ()
            )
            return
        try:
            self.hf = AutoTokenizer.from_pretrained(str(folder))
        except (OSError, ValueError) as exc:
            raise ModelFormatError(
                f"{folder}: no usable tokenizer ({exc})", hint="the folder needs tokenizer.json or equivalent"
            ) from None
        self.eos_token_ids = self._eos_ids(Path(folder))

    def _eos_ids(self, folder: Path) -> frozenset[int]:
        ids: set[int] = set()
        if self.hf.eos_token_id is not None:
            ids.add(int(self.hf.eos_token_id))
        for name in ("generation_config.json", "config.json"):
            path = folder / name
            if path.is_file():
                eos = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
                ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
        return frozenset(ids)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.hf.chat_template)

    @property
    def tool_format(self) -> str | None:
        """How the chat template has the model call tools, read from the template (not the model's
        name): "llama3" (JSON after <|python_tag|>, or alone), "mistral" ([TOOL_CALLS] [...]),
        "hermes" (<tool_call>{...}</tool_call>: Qwen2.5, and the fallback for any template that
        takes a `tools` list); None when it takes no tools."""
        return tool_format_of(str(self.hf.chat_template or ""))

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text))

    def encode_chat(
        self, messages: Sequence[dict[str, Any]], tools: list[dict[str, Any]] | None = None, prefix: str = ""
    ) -> list[int]:
        """Token ids of a conversation with the generation prompt for the assistant's turn, the
        tools rendered by the template, and `prefix` as the start of the assistant's answer (a
        tool call the request requires)."""
        if not messages:
            raise InvalidRequestError("a chat needs at least one message")
        if not self.has_chat_template:
            raise InvalidRequestError("this model has no chat template; send a raw prompt instead")
        if tools and self.tool_format is None:
            raise InvalidRequestError(
                "this model's chat template takes no tools: send the request without them"
            )
        try:
            text: Any = self.hf.apply_chat_template(
                list(messages), tools=tools or None, add_generation_prompt=True, tokenize=False
            )
        except Exception as exc:  # jinja's own errors: a template that refuses these messages
            raise InvalidRequestError(f"the model's chat template refused the messages: {exc}") from None
        # the template writes the special tokens (BOS) itself, as apply_chat_template(tokenize=True) has it
        return [int(i) for i in self.hf.encode(str(text) + prefix, add_special_tokens=False)]

    def token_text(self, token: int) -> dict[str, Any]:
        """OpenAI's {token, bytes} of one token: its own bytes (a byte-level piece, or a byte
        fallback <0xNN>), which may be part of a UTF-8 character; the text of those bytes."""
        piece = str(self.hf.convert_ids_to_tokens(int(token)))
        raw = piece_bytes(piece, self.byte_level)
        return {"token": raw.decode("utf-8", errors="replace"), "bytes": list(raw)}

    @property
    def byte_level(self) -> bool:
        """Whether pieces are GPT-2's byte-level alphabet (Llama 3, Qwen2, SmolLM2), not sentencepiece."""
        if self._byte_level is None:
            try:
                backend = json.loads(self.hf.backend_tokenizer.to_str())
                self._byte_level = "ByteLevel" in json.dumps(backend.get("decoder"))
            except (AttributeError, ValueError):
                self._byte_level = False
        return self._byte_level

    def decode(self, ids: Sequence[int], special: bool = False) -> str:
        """Text of `ids`; `special` keeps special tokens (a tool call's <|python_tag|>, [TOOL_CALLS])."""
        return str(self.hf.decode(list(ids), skip_special_tokens=not special))


_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@functools.cache
def _unicode_to_bytes() -> dict[str, int]:
    """GPT-2's byte-level alphabet read back: piece character -> byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def piece_bytes(piece: str, byte_level: bool) -> bytes:
    match = _BYTE_FALLBACK.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    if byte_level:
        table = _unicode_to_bytes()
        if all(c in table for c in piece):
            return bytes(table[c] for c in piece)
    return piece.replace("\u2581", " ").encode("utf-8")


def tool_format_of(template: str) -> str | None:
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<|python_tag|>" in template or "ipython" in template:
        return "llama3"
    if "<tool_call>" in template or "tools" in template:
        return "hermes"
    return None


def _gguf_tokenizer(path: Path) -> Any:
    """The tokenizer (and chat template) a GGUF file's metadata describes, built by transformers.

    `AutoTokenizer.from_pretrained(gguf_file=...)` would do the same but first parses the whole
    header with gguf.GGUFReader for the config (10 s for SmolLM2); transformers' GGUF tokenizer
    builder reads only the vocabulary and merges (0.5 s).
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.integrations.gguf.gguf_tokenizer_mapping import (
        convert_gguf_tokenizer,
        get_gguf_tokenizer,
    )

    try:
        architecture, vocabulary, settings = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(architecture, vocabulary)
    except (KeyError, ValueError, NotImplementedError) as exc:
        raise ModelFormatError(
            f"{path}: no usable tokenizer in the GGUF metadata ({type(exc).__name__}: {exc})",
            hint="the file needs tokenizer.ggml.* metadata, as llama.cpp's converter writes",
        ) from None
    return PreTrainedTokenizerFast(tokenizer_object=backend, **{**settings, **extra})


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas that never split a UTF-8 character.

    Byte-level tokenizers split multi-byte characters across tokens; decoding a partial
    character yields U+FFFD. Text is emitted only once the tail decodes cleanly, and each
    step decodes a short window (a few tokens of context), not the whole sequence.
    """

    def __init__(self, tokenizer: Tokenizer, special: bool = False) -> None:
        self.tokenizer = tokenizer
        self.special = special
        self.ids: list[int] = []
        self.prefix_offset = 0  # window start: tokens before it are never decoded again
        self.read_offset = 0  # tokens before it have been emitted as text

    def _window(self) -> tuple[str, str]:
        """Text of the window's emitted part, and of the whole window."""
        return (
            self.tokenizer.decode(self.ids[self.prefix_offset : self.read_offset], self.special),
            self.tokenizer.decode(self.ids[self.prefix_offset :], self.special),
        )

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix, full = self._window()
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            delta = full[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of the sequence."""
        prefix, full = self._window()
        self.prefix_offset = self.read_offset = len(self.ids)
        return full[len(prefix) :]


class StopMatcher:
    """Holds back text that could be the start of a stop string; reports when one is complete."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, text: str) -> str:
        """Text safe to emit now (everything before a completed stop string, or not a stop prefix)."""
        if self.stopped:
            return ""
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut, self.matched = min(hits)
            self.stopped = True
            out, self.pending = self.pending[:cut], ""
            return out
        hold = 0
        for stop in self.stops:
            for size in range(min(len(stop) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(stop[:size]):
                    hold = max(hold, size)
                    break
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold :]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def same_tokens(target: Tokenizer, draft: Tokenizer, draft_name: str) -> None:
    """Refuse a draft model whose tokens are not the target's: its guesses would be other words.
    Same vocabulary (every token and its id) and the same special tokens (EOS ids, BOS)."""
    ours, theirs = target.hf.get_vocab(), draft.hf.get_vocab()
    if ours != theirs:
        differ = sorted(set(ours.items()) ^ set(theirs.items()), key=lambda item: item[1])[:3]
        shown = ", ".join(f"{token!r}" for token, _ in differ)
        # the advice is in the message: a load failure reaches `place` as its message only
        raise ExoctlError(
            f"draft model {draft_name} has another tokenizer: {len(theirs)} tokens against the target's "
            f"{len(ours)}, and they differ (first: {shown}); draft with a model of the target's family "
            "(the same tokenizer), or with --draft ngram"
        )
    if target.eos_token_ids != draft.eos_token_ids or target.hf.bos_token_id != draft.hf.bos_token_id:
        raise ExoctlError(
            f"draft model {draft_name} has other special tokens: end of sequence "
            f"{sorted(draft.eos_token_ids)} and start {draft.hf.bos_token_id} against the target's "
            f"{sorted(target.eos_token_ids)} and {target.hf.bos_token_id}; draft with a model of the "
            "target's family, or with --draft ngram"
        )
