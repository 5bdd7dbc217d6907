"""A draft model: a small model of the target's tokenizer, whole on the head's node, guessing a
sequence's next tokens greedily for the target to verify (speculative decoding).

Each sequence it drafts for keeps a KV cache of its own here. A step's guesses that the target
rejected are cut from it before the next (`KVCache.truncate`), so each step runs only the tokens
it has not seen: the accepted ones, then one position per guess.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from exoctl.engine.kv_cache import KVCache
from exoctl.engine.model import CausalLM


@dataclass
class _Drafting:
    cache: KVCache
    ids: list[int] = field(default_factory=list)  # the token ids its cache holds, in order


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class DraftModel:
    """The drafter: `propose` for each step of a sequence, `forget` when it ends."""

    name = "model"

    def __init__(self, model: CausalLM) -> None:
        self.model = model
        self.drafting: dict[str, _Drafting] = {}

    @property
    def nbytes(self) -> int:
        """Its weights and the caches of the sequences it drafts for."""
        return self.model.weight_bytes() + sum(d.cache.nbytes for d in list(self.drafting.values()))

    @torch.inference_mode()
    def propose(self, seq: str, ids: Sequence[int], k: int) -> list[int]:
        """The draft model's k greedy tokens after `ids` (the sequence's prompt and answer so far)."""
        context = self.model.config.max_position_embeddings
        k = min(k, context - len(ids))
        if k <= 0 or not ids:
            return []
        state = self.drafting.get(seq)
        if state is None:
            state = self.drafting[seq] = _Drafting(self.model.new_cache())
        # what its cache holds that is still the sequence's text; at least the last token runs again
        keep = min(common_length(state.ids, ids), len(ids) - 1)
        state.cache.truncate(keep)
        del state.ids[keep:]
        new = list(ids[keep:])
        drafts: list[int] = []
        for _ in range(k):
            inputs = torch.tensor([new])  # [1, T]
            positions = torch.arange(keep, keep + len(new))[None, :]
            logits = self.model.forward(inputs, positions, [state.cache])  # [1, 1, V]
            state.ids += new
            keep += len(new)
            token = int(logits[0, -1].argmax())
            drafts.append(token)
            new = [token]
        return drafts

    def forget(self, seq: str) -> None:
        self.drafting.pop(seq, None)
