"""`exoctl state` and `exoctl nodes`: what the workers report, as tables or EXO-shaped JSON."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Annotated

import typer
from rich.live import Live

from exoctl.cli.common import InventoryOption, open_cluster
from exoctl.cli.options import JsonOption
from exoctl.cli.output import console, err_console, out
from exoctl.cli.render import links_table, nodes_table, state_view

if TYPE_CHECKING:
    from exoctl.cluster.views import NodeStatus

STATE_EXAMPLES = (
    "Examples:\n\n  exoctl state\n\n  exoctl state --watch\n\n"
    "  exoctl state --json | jq '.instances | .[] | .CpuRingInstance.shardAssignments.nodeToRunner'"
)


def state(
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
    watch: Annotated[bool, typer.Option("--watch", "-w", help="Refresh every second until Ctrl-C.")] = False,
) -> None:
    """Nodes, instances and shards of the cluster."""
    out.mode(json_output)
    from exoctl.cluster.state import state_document
    from exoctl.cluster.views import instances_of, no_node_up

    with open_cluster(inventory) as cluster:
        statuses = cluster.statuses()
        if out.json or not watch:
            # the state is shown either way; with no node up it is an error, as for `nodes`
            out.result(
                state_document(statuses, cluster.inventory.name),
                lambda: console.print(state_view(statuses, list(instances_of(statuses).values()))),
            )
            down = no_node_up(statuses)
            if down is not None:
                raise down
            return
        views = list(instances_of(statuses).values())
        try:
            with Live(state_view(statuses, views), console=console, refresh_per_second=4) as live:
                while True:
                    time.sleep(1.0)
                    statuses = cluster.statuses()
                    live.update(state_view(statuses, list(instances_of(statuses).values())))
        except KeyboardInterrupt:
            pass


def show_nodes(statuses: list[NodeStatus]) -> None:
    console.print(nodes_table(statuses))
    links = links_table(statuses)
    if links is not None:
        console.print(links)


def nodes(
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
    probe: Annotated[
        bool,
        typer.Option(
            "--probe",
            help="Measure every link between the up workers again (round trip, throughput) first.",
        ),
    ] = False,
) -> None:
    """Who is up: RAM, CPU, measured speed, device, version and runners of every node, and the
    links between them as measured (when a model is placed, or with --probe)."""
    out.mode(json_output)
    failures: dict[str, str] = {}
    with open_cluster(inventory) as cluster:
        statuses = cluster.statuses()
        if probe:
            statuses = cluster.measure_links(statuses, force=True, failures=failures)
    for node, why in failures.items():
        err_console.print(f"[yellow]warning:[/] node {node} could not measure its links: {why}")
    document = [
        {
            "node": s.node.name,
            "address": s.node.address,
            "status": "up" if s.up else "down",
            "error": s.error,
            "profile": s.profile.to_wire() if s.profile else None,
            "runners": [r.runner_id for r in s.runners],
        }
        for s in statuses
    ]
    out.result(document, lambda: show_nodes(statuses))
    from exoctl.cluster.views import no_node_up

    down = no_node_up(statuses)
    if down is not None:
        raise down
