"""`exoctl download`: fetch a model onto the nodes before placing it, each node the files its part
of the plan needs (or all of them), with a progress bar per node."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from exoctl.cli.common import (
    InventoryOption,
    check_request,
    live_statuses,
    open_cluster,
    plan_for,
    suggest_models,
)
from exoctl.cli.options import DtypeOption, JsonOption, ShardingOption
from exoctl.cli.output import console, out
from exoctl.cli.progress import DownloadProgress, size_text
from exoctl.errors import ExoctlError
from exoctl.placement.sharding import check_sharding
from exoctl.wire.download_report import DownloadReport

HELP = (
    "Download a model onto the nodes from the Hugging Face Hub: each node the files of the layers "
    "a placement would give it (the plan `place` would make), or the whole model with --all. "
    "Interrupted downloads resume."
)
EXAMPLES = (
    "Examples:\n\n  exoctl download llama-3.1-70b-cpu --nodes 4\n\n"
    "  exoctl download Qwen/Qwen2.5-32B-Instruct --all\n\n"
    "  exoctl download bartowski/Meta-Llama-3.1-8B-Instruct-GGUF:Q4_K_M --json"
)


def download(
    model: Annotated[
        str,
        typer.Argument(
            help="Catalog id, Hugging Face repo id (owner/name), or a GGUF repo with its quantisation "
            "(owner/name:Q4_K_M).",
            autocompletion=suggest_models,
        ),
    ],
    nodes: Annotated[
        int | None,
        typer.Option("--nodes", "-n", help="Plan for exactly this many nodes (as `place --nodes`)."),
    ] = None,
    all_files: Annotated[
        bool,
        typer.Option(
            "--all", help="The whole model on each node (every live node, or the plan's with --nodes)."
        ),
    ] = False,
    sharding: ShardingOption = "auto",
    dtype: DtypeOption = "auto",
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
) -> None:
    out.mode(json_output)
    from exoctl.models.store import resolve_card

    sharding = check_sharding(sharding)
    check_request(None, dtype)
    card, ref = resolve_card(model)
    whole = (0, card.n_layers)
    with open_cluster(inventory) as cluster:
        statuses = live_statuses(cluster)
        if all_files and nodes is None:
            targets = [(s.node, whole) for s in statuses if s.up]
        else:
            placement = plan_for(cluster, statuses, card, dtype, sharding, nodes).placement
            targets = [
                (
                    cluster.inventory.node(s.node),
                    whole if all_files or placement.sharding == "tensor" else (s.start_layer, s.end_layer),
                )
                for s in placement.shards
            ]
        bars = DownloadProgress(enabled=not out.json)
        try:
            reports = cluster.download(ref, card.n_layers, targets, bars.update)
        finally:
            bars.stop()
    failed = {node: r for node, r in reports.items() if r.state == "failed"}

    def show() -> None:
        for node, report in reports.items():
            if report.state == "completed":
                fetched = report.downloaded_this_session
                console.print(
                    f"{node}: {ref} layers [{report.start_layer}, {report.end_layer}) "
                    f"{size_text(report.total)} in {report.total_files} files"
                    + (f", {size_text(fetched)} fetched" if fetched else ", already here")
                    + (f" ({report.path})" if report.path else "")
                )

    out.result({"model": ref, "ok": not failed, "nodes": {n: _summary(r) for n, r in reports.items()}}, show)
    if failed and out.json:  # the document says which failed
        raise typer.Exit(1)
    if failed:
        first = next(iter(failed.values()))
        others = "; ".join(r.error or "failed" for r in list(failed.values())[1:])
        raise ExoctlError(
            (first.error or "failed") + (f"; {others}" if others else ""),
            hint=first.hint or "run it again to resume",
        )


def _summary(report: DownloadReport) -> dict[str, Any]:
    keys = ("state", "error", "hint", "path", "start_layer", "end_layer", "n_layers", "total", "downloaded")
    wire = report.to_wire()
    return {
        **{k: wire[k] for k in keys},
        "downloaded_this_session": report.downloaded_this_session,
        "files": sorted(report.files),
    }
