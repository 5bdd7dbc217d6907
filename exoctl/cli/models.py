"""`exoctl models`: the catalog."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from rich.table import Table

from exoctl.cli.options import JsonOption
from exoctl.cli.output import console, out
from exoctl.models.catalog import ModelCard, load_catalog, storage_megabytes

HELP = "List the models exoctl knows: id, size, layers, tags."
EXAMPLES = (
    "Examples:\n\n  exoctl models\n\n  exoctl models --json | jq '.[] | select(.tags[] == \"cpu\") | .id'"
)


def card_json(card: ModelCard, local: list[str] | None = None) -> dict[str, Any]:
    return {
        "id": card.id,
        "name": card.name,
        "hugging_face_id": card.hf_repo,
        "architecture": card.architecture,
        "n_layers": card.n_layers,
        "hidden_size": card.hidden_size,
        "num_attention_heads": card.num_attention_heads,
        "num_key_value_heads": card.num_key_value_heads,
        "intermediate_size": card.intermediate_size,
        "num_experts": card.num_experts,
        "vocab_size": card.vocab_size,
        "parameters": card.parameters,
        "storage_size_megabytes": storage_megabytes(card.storage_bytes),
        "tags": list(card.tags),
        # the card's GGUF source (`ID:QUANT`, `ID:gguf`), and which sources are on this machine
        "gguf": f"{card.gguf_repo}:{card.gguf_quant}" if card.gguf_repo else None,
        "local": local if local is not None else [],
    }


WIDE_COLUMNS = 160  # the whole table fits from here on


def models(json_output: JsonOption = False) -> None:
    out.mode(json_output)
    cards = load_catalog()
    from exoctl.api.service import local_sources

    local = {card.id: local_sources(card) for card in cards}
    out.result([card_json(c, local[c.id]) for c in cards], lambda: console.print(models_table(cards, local)))


def models_table(cards: Sequence[ModelCard], local: dict[str, list[str]]) -> Table:
    # At 80 columns the ids a user types stay whole: a narrow terminal gets the columns that
    # decide a choice, and the repos, GGUF sources and tags are in --json or a wider terminal.
    wide = console.width >= WIDE_COLUMNS
    table = Table(title="Models")
    table.add_column("id", no_wrap=True, min_width=max(len(c.id) for c in cards))
    if wide:
        table.add_column("hugging face repo", no_wrap=True)
        table.add_column("gguf (ID:QUANT)")
    table.add_column("local")
    table.add_column("arch")
    for column in ("layers", "params", "size"):
        table.add_column(column, justify="right", no_wrap=True)
    if wide:
        table.add_column("tags")
    else:
        table.caption = "repos, GGUF sources and tags: `exoctl models --json`, or a wider terminal"
    for card in cards:
        gguf = f"{card.gguf_repo}:{card.gguf_quant}" if card.gguf_repo else ""
        sizes = (str(card.n_layers), f"{card.parameters / 1e9:.2f} B", f"{card.storage_bytes / 1e9:.1f} GB")
        local_text = ", ".join(local[card.id]) or "-"
        if wide:
            table.add_row(
                card.id, card.hf_repo, gguf, local_text, card.architecture, *sizes, ", ".join(card.tags)
            )
        else:
            table.add_row(card.id, local_text, card.architecture, *sizes)
    return table
