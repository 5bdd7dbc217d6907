"""Which drafter an instance's head uses for speculative decoding, from `place --draft`.

`none` (the default), `ngram` (prompt lookup: no model), `auto` (the catalog's natural draft of the
model, else prompt lookup), or a draft model as `place` takes a model: a catalog id (`:gguf` or
`:QUANT` for its GGUF file), a Hugging Face repo id, a folder or GGUF file. A draft model is sized
here for the head's node; whether its tokenizer is the target's is checked where both are read,
on the head's worker, before its weights load. Torch-free.
"""

from __future__ import annotations

from exoctl.dtypes import RUNTIME_DTYPES, check_dtype
from exoctl.errors import ExoctlError
from exoctl.models.catalog import ModelCard, find_card
from exoctl.placement.pipeline import KV_RESERVE_TOKENS, DraftChoice, kv_position_bytes
from exoctl.wire.runner_spec import NGRAM_DRAFT

NO_DRAFT = "none"
AUTO_DRAFT = "auto"
DRAFT_HELP = (
    "Speculative decoding's drafter: none, ngram (prompt lookup), auto (the catalog's draft model of "
    "this model, else ngram), or a draft model of the same tokenizer (catalog id, :gguf, repo, folder)."
)


def natural_draft(card: ModelCard) -> str:
    """The catalog's draft model of `card` (its `-cpu` card), or prompt lookup where it has none."""
    if card.draft:
        found = find_card(f"{card.draft}-cpu")
        if found is not None:
            return found.id
    return NGRAM_DRAFT


def draft_dtype(card: ModelCard, dtype: str) -> str:
    """`auto`: a GGUF draft's own dtype, else int4 (a draft is read once per guess: the fewer bytes
    the better, and its guesses need only be right often)."""
    if dtype == "auto":
        return card.native_dtype or "int4"
    return check_dtype(dtype, RUNTIME_DTYPES)


def draft_bytes(card: ModelCard, dtype: str) -> int:
    """What a draft model takes on the head's node: its weights and a KV reserve for one sequence."""
    kv = card.n_layers * kv_position_bytes(card, dtype) * KV_RESERVE_TOKENS
    return card.weight_bytes(dtype) + kv


def choose_draft(target: ModelCard, draft: str | None, dtype: str = "auto") -> DraftChoice | None:
    """The drafter `draft` names for `target` (None: none)."""
    if draft is None or draft.lower() == NO_DRAFT:
        return None
    name = natural_draft(target) if draft.lower() == AUTO_DRAFT else draft
    if name.lower() == NGRAM_DRAFT:
        return DraftChoice(NGRAM_DRAFT)
    from exoctl.models.store import resolve_card

    card, reference = resolve_card(name)
    if card.architecture not in ("llama", "qwen2", "mixtral"):
        raise ExoctlError(
            f"draft model {card.id} has architecture {card.architecture!r}, which exoctl cannot run"
        )
    runtime = draft_dtype(card, dtype)
    return DraftChoice(reference, card.id, runtime, card.n_layers, draft_bytes(card, runtime))
