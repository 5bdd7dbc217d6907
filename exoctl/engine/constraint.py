"""Constrained decoding: the tokens a grammar allows next, as a mask on a sequence's logits.

llguidance does the grammar work (chosen over xgrammar and outlines-core: see
benchmarks/constraint_masks.py and RESULTS.md): a grammar (llguidance's JSON form, made by the API
from a JSON schema or a tool list) is compiled once per sequence against the model's tokenizer, and
each step it computes the bitmask of the allowed next tokens. The runner that samples applies the mask
where it chooses: the last pipeline stage on the whole vocabulary, every tensor rank on its part
(each rank runs its own matcher over the same chosen tokens, so the logits are never gathered).

The mask is applied after the penalties and before temperature and the cuts, as vLLM and llama.cpp
apply theirs; the reported logprobs stay the model's own (vLLM's raw logprobs).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from llguidance import LLMatcher, LLTokenizer

from exoctl.errors import ExoctlError, InvalidRequestError


class ConstraintError(ExoctlError):
    """The matcher failed mid-sequence (a token the grammar does not allow, or its limits)."""


class Grammars:
    """A loaded model's tokenizer as llguidance sees it, built on the first constrained request (about
    a second for a 128k vocabulary) and shared by every sequence after."""

    def __init__(self, folder: Path, vocab_size: int) -> None:
        self.folder = folder
        self.vocab_size = vocab_size  # the logits' width (may exceed the tokenizer's)
        self._tokenizer: LLTokenizer | None = None
        self._lock = threading.Lock()

    def _lltokenizer(self) -> LLTokenizer:
        with self._lock:
            if self._tokenizer is None:
                import llguidance.hf

                from exoctl.engine.tokenizer import Tokenizer

                tokenizer = Tokenizer(self.folder)
                # every id the model ends a turn with ends a constrained answer too
                eos = sorted(tokenizer.eos_token_ids) or None
                self._tokenizer = llguidance.hf.from_tokenizer(tokenizer.hf, self.vocab_size, eos)
            return self._tokenizer

    def constraint(self, grammar: str) -> Constraint:
        """A fresh matcher of `grammar` (InvalidRequestError when it does not compile)."""
        import llguidance

        matcher = llguidance.LLMatcher(self._lltokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise InvalidRequestError(f"the grammar does not compile: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)


class Constraint:
    """One sequence's matcher: `allowed` before each choice, `accept` after it."""

    def __init__(self, matcher: LLMatcher, vocab_size: int) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self._allowed: torch.Tensor | None = None  # the mask of the current position, once computed

    def allowed(self) -> torch.Tensor:
        """bool [V]: the tokens the grammar takes next (only the end-of-sequence ids once it is done)."""
        if self._allowed is None:
            bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
            self._check()
            # a little-endian u32 bitmask: bit j of byte i is token 8i + j
            unpacked = np.unpackbits(bits, bitorder="little")[: self.vocab_size]
            self._allowed = torch.from_numpy(unpacked.astype(np.bool_))
        return self._allowed

    def mask(self, logits: torch.Tensor, start: int = 0) -> torch.Tensor:
        """logits [..., n] of ids start..start+n -> the same with the disallowed ones at -inf."""
        allowed = self.allowed()[start : start + logits.shape[-1]]
        return logits.masked_fill(~allowed, float("-inf"))

    def accept(self, token: int) -> None:
        """The chosen token moves the matcher on."""
        self._allowed = None
        self.matcher.consume_token(int(token))
        self._check()

    def _check(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"constrained decoding failed: {self.matcher.get_error()}")
