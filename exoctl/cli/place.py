"""`exoctl place` and `exoctl delete`: load a model across nodes, and unload it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer

from exoctl.cli.common import (
    InventoryOption,
    check_request,
    live_statuses,
    open_cluster,
    plan_for,
    suggest_models,
)
from exoctl.cli.options import DtypeOption, JsonOption, PrefixCacheOption, ShardingOption
from exoctl.cli.output import console, out
from exoctl.cli.progress import LoadProgress
from exoctl.cli.render import (
    candidates_json,
    candidates_table,
    placement_json,
    placement_table,
    prediction_json,
)
from exoctl.cluster.drafts import DRAFT_HELP
from exoctl.errors import ExoctlError
from exoctl.placement.sharding import check_sharding

if TYPE_CHECKING:
    from exoctl.placement.pipeline import Placement

PLACE_HELP = (
    "Plan where a model goes and load it: on one node, split by layers (pipeline) or by weights "
    "(tensor); --dry-run only plans."
)
PLACE_EXAMPLES = (
    "Examples:\n\n  exoctl place llama-3.1-70b-cpu --nodes 4\n\n"
    "  exoctl place qwen2.5-32b-cpu --dry-run --json\n\n  exoctl place ./my-model-folder --min-nodes 2\n\n"
    "  exoctl place llama-3.1-70b-cpu --nodes 4 --draft llama-3.2-1b-cpu:gguf"
)


def place(
    model: Annotated[
        str,
        typer.Argument(
            help="Catalog id, Hugging Face repo id, or a local model folder.", autocompletion=suggest_models
        ),
    ],
    nodes: Annotated[int | None, typer.Option("--nodes", "-n", help="Use exactly this many nodes.")] = None,
    min_nodes: Annotated[
        int, typer.Option(help="Use at least this many nodes (default: fewest that fit).")
    ] = 1,
    sharding: ShardingOption = "auto",
    dtype: DtypeOption = "auto",
    prefix_cache_gb: Annotated[float | None, PrefixCacheOption] = None,
    draft: Annotated[str, typer.Option("--draft", help=DRAFT_HELP)] = "none",
    draft_dtype: Annotated[
        str, typer.Option("--draft-dtype", help="The draft model's dtype (auto: its GGUF's, else int4).")
    ] = "auto",
    partials: Annotated[
        str,
        typer.Option(
            "--partials",
            help="How a tensor split's partial sums cross links: auto (8-bit blocks where the measured "
            "links make float32 the bottleneck), exact, or q8.",
        ),
    ] = "auto",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan and every candidate's predicted speed; load nothing."),
    ] = False,
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
) -> None:
    out.mode(json_output)
    from exoctl.models.store import resolve_card

    sharding = check_sharding(sharding)
    check_request(None, dtype)
    card, ref = resolve_card(model)
    with open_cluster(inventory) as cluster:
        # loading needs a node up (the one "no node is up" error); a plan can be made without one
        statuses = cluster.statuses() if dry_run else live_statuses(cluster)
        planned_offline = dry_run and not any(s.up for s in statuses)
        if planned_offline:
            from exoctl.cluster.views import offline_statuses

            statuses = offline_statuses(statuses)
        chosen = plan_for(
            cluster,
            statuses,
            card,
            dtype,
            sharding,
            nodes,
            min_nodes,
            prefix_cache_gb,
            draft,
            draft_dtype,
            partials,
        )
        placement = chosen.placement
        if dry_run:
            source = "inventory" if planned_offline else "nodes"

            def show_plan() -> None:
                show_placement(placement, chosen.reason)
                table = candidates_table(chosen)
                if table is not None:
                    console.print(table)
                if planned_offline:
                    console.print(
                        "[dim]planned from the inventory: no node is up (loopback nodes share this "
                        "machine's free memory; others count their memory_gb)[/]"
                    )

            out.result(
                {
                    **placement_json(placement),
                    "reason": chosen.reason,
                    "planned_from": source,
                    "prediction": prediction_json(chosen.prediction),
                    "candidates": candidates_json(chosen),
                },
                show_plan,
            )
            return
        if not out.json:  # before the load: what is about to be loaded where
            show_placement(placement, chosen.reason)
        progress = LoadProgress(enabled=not out.json)
        try:
            view = cluster.load(card, ref, placement, progress.update)
        finally:
            progress.stop()
    instance_id = view.instance_id
    # what a load kept other than asked (int8/int4 matrices whose width takes no blocks of 32)
    notes = {node: r.note for node, r in view.runners.items() if r.note}

    def show_ready() -> None:
        console.print(f"instance {instance_id} of {card.id} is ready on {', '.join(placement.nodes)}")
        for node, note in notes.items():
            console.print(f"[yellow]{node}[/]: {note}")

    document = {
        "instance_id": instance_id,
        **placement_json(placement),
        "reason": chosen.reason,
        "notes": notes,
    }
    out.result(document, show_ready)


def show_placement(placement: Placement, reason: str) -> None:
    console.print(placement_table(placement))
    console.print(f"sharding: {reason}")


def delete(
    target: Annotated[str, typer.Argument(help="Instance id (or its first characters), or a model id.")],
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
) -> None:
    """Unload an instance from its nodes and free their memory."""
    out.mode(json_output)
    from exoctl.cluster.views import instances_of, model_matches

    with open_cluster(inventory) as cluster:
        views = list(instances_of(cluster.statuses()).values())
        chosen = [v for v in views if v.instance_id.startswith(target)] or [
            v for v in views if model_matches(v.model_id, target)
        ]
        if not chosen:
            known = ", ".join(f"{v.instance_id[:8]} ({v.model_id})" for v in views) or "none"
            raise ExoctlError(f"no instance matches {target!r}", hint=f"instances: {known}")
        report: list[dict[str, Any]] = []
        for view in chosen:
            nodes = [cluster.inventory.node(n) for n in view.nodes if n in view.runners]
            freed = cluster.unload(view.instance_id, nodes)
            report.append({"instance_id": view.instance_id, "model_id": view.model_id, "freed_bytes": freed})

    def show() -> None:
        for entry in report:
            total = sum(entry["freed_bytes"].values())
            console.print(
                f"deleted {entry['instance_id']} ({entry['model_id']}), freed {total / 1e6:.0f} MB on "
                f"{', '.join(entry['freed_bytes']) or 'no node'}"
            )

    out.result({"deleted": report}, show)
