"""Rich tables for nodes, instances, shards and placement plans."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Group
from rich.table import Table

if TYPE_CHECKING:
    from exoctl.cluster.views import InstanceView, NodeStatus
    from exoctl.placement.cost import Prediction
    from exoctl.placement.pipeline import Placement
    from exoctl.placement.sharding import Plan
    from exoctl.wire.node_speed import NodeSpeed
    from exoctl.wire.runner_report import RunnerReport
    from exoctl.wire.supervisor_event import SupervisorEvent

STATUS_STYLE = {
    "up": "green",
    "down": "red",
    "ready": "green",
    "running": "cyan",
    "loading": "yellow",
    "failed": "red",
}


DOWNLOAD_STYLE = {"completed": "green", "ongoing": "yellow", "failed": "red", "pending": "dim"}


def gb(value: float) -> str:
    return f"{value / 1e9:.1f} GB"


def mb(value: float) -> str:
    return f"{value / 1e6:.0f} MB" if value < 1e9 else gb(value)


def styled(text: str) -> str:
    style = STATUS_STYLE.get(text)
    return f"[{style}]{text}[/]" if style else text


NARROW_COLUMNS = 100  # below this terminal width the tables drop what `--json` has anyway


def narrow() -> bool:
    from exoctl.cli.output import console

    return console.width < NARROW_COLUMNS


def nodes_table(statuses: list[NodeStatus]) -> Table:
    # names and addresses are what a user types: never wrapped; a narrow terminal drops the
    # device and version columns (in `exoctl nodes --json`)
    wide = not narrow()
    table = Table(title="nodes", title_justify="left")
    table.add_column("node", no_wrap=True)
    table.add_column("address", no_wrap=True)
    table.add_column("status", no_wrap=True)
    table.add_column("RAM used / total" if wide else "RAM used/total")
    table.add_column("CPU %", justify="right")
    table.add_column("CPUs", justify="right")
    # what it decodes at: the rate its kernels read float32 and int4 weights (engine.node_speed)
    table.add_column("read GB/s f32/int4", justify="right")
    if wide:
        table.add_column("device")
        table.add_column("kernel")  # the vector path its matmuls run (engine.qkernel)
        table.add_column("version")
    table.add_column("runners")
    for status in statuses:
        node, profile = status.node, status.profile
        if profile is None:
            reason = "refused our key" if status.key_refused else "no answer"
            extra = (node.device, "-", "-") if wide else ()
            table.add_row(node.name, node.address, styled("down"), "-", "-", "-", "-", *extra, reason)
            continue
        used = profile.ram_total - profile.ram_available
        extra = (profile.device, profile.kernel, profile.version) if wide else ()
        table.add_row(
            node.name,
            node.address,
            styled("up"),
            f"{gb(used)} / {gb(profile.ram_total)}",
            f"{profile.cpu_percent:.0f}",
            str(profile.cpu_count),
            read_rates(profile.speed),
            *extra,
            str(len(status.runners)),
        )
    return table


def read_rates(speed: NodeSpeed | None) -> str:
    if speed is None:
        return "-"
    return f"{speed.read_rate('float32') / 1e9:.1f} / {speed.read_rate('int4') / 1e9:.1f}"


def links_table(statuses: list[NodeStatus]) -> Table | None:
    """The links the workers measured (`exoctl nodes --probe`): round trip and throughput."""
    from exoctl.cluster.views import fresh_links

    links = fresh_links(statuses)
    if not links:
        return None
    table = Table(title="links (measured by the sending node)", title_justify="left")
    for column in ("from", "to", "round trip", "throughput"):
        table.add_column(
            column, no_wrap=True, justify="right" if column in ("round trip", "throughput") else "left"
        )
    for (source, sink), link in sorted(links.items()):
        table.add_row(source, sink, f"{link.rtt_s * 1e3:.2f} ms", megabits(link.bytes_per_s))
    return table


def megabits(bytes_per_s: float) -> str:
    bits = bytes_per_s * 8
    return f"{bits / 1e9:.2f} Gbit/s" if bits >= 1e9 else f"{bits / 1e6:.0f} Mbit/s"


def instances_table(views: list[InstanceView]) -> Table:
    table = Table(title="instances", title_justify="left")
    for column in ("instance", "model", "sharding", "dtype", "nodes", "status", "decode tok/s"):
        # ids stay whole: a user types them
        table.add_column(column, no_wrap=column in ("instance", "model"))
    for view in views:
        head = view.runners.get(view.head)
        status = styled(view.status.value) + (f" ({view.failure})" if view.status == "failed" else "")
        table.add_row(
            view.instance_id[:8],
            view.model_id,
            view.sharding,
            view.dtype,
            ", ".join(view.nodes),
            status,
            f"{head.decode_tokens_per_s:.1f}" if head else "-",
        )
    return table


def shards_table(views: list[InstanceView]) -> Table:
    table = Table(title="shards", title_justify="left")
    for column in ("instance", "node", "rank", "layers", "memory", "status", "tokens/s"):
        table.add_column(column, no_wrap=column in ("instance", "node", "layers"))
    for view in views:
        for node in view.nodes:
            runner = view.runners.get(node)
            if runner is None:
                table.add_row(view.instance_id[:8], node, "-", "-", "-", styled("down"), "-")
                continue
            status = runner.status.value.removeprefix("Runner")
            if status == "Loading":
                status += f" {runner.layers_loaded}/{runner.layers_total}"
            table.add_row(
                view.instance_id[:8],
                node,
                f"{runner.rank}/{runner.world}",
                layers_cell(runner),
                mb(runner.memory_bytes),
                status,
                f"{runner.tokens_per_s:.1f}",
            )
    return table


def layers_cell(runner: RunnerReport) -> str:
    span = f"[{runner.start_layer}, {runner.end_layer})"
    return f"1/{runner.world} of {span}" if runner.sharding == "tensor" else span


def experts_table(views: list[InstanceView]) -> Table | None:
    """Mixtral: the experts each node holds and the tokens routed to each (summed over layers)."""
    rows = [
        (view.instance_id[:8], node, runner.experts)
        for view in views
        for node, runner in view.runners.items()
        if runner.experts
    ]
    if not rows:
        return None
    table = Table(title="experts", title_justify="left")
    for column in ("instance", "node", "experts", "tokens routed to each"):
        table.add_column(column)
    for instance, node, experts in rows:
        held = ", ".join(str(e.expert) for e in experts)
        tokens = ", ".join(f"{e.expert}: {e.tokens}" for e in experts)
        table.add_row(instance, node, held, tokens)
    return table


def prefix_table(views: list[InstanceView]) -> Table | None:
    """Cached prefixes: per runner what it holds against its budget and the prompt positions it
    did not run again; per instance (on its head's row) the requests that reused one."""
    rows = [
        (view, node, runner)
        for view in views
        for node, runner in view.runners.items()
        if runner.prefix.budget_bytes or runner.prefix.entries
    ]
    if not rows:
        return None
    table = Table(title="cached prefixes", title_justify="left")
    for column in ("instance", "node", "entries", "held / budget", "reused tokens", "hits"):
        table.add_column(column, no_wrap=column in ("instance", "node"))
    for view, node, runner in rows:
        prefix, head = runner.prefix, runner.head_prefix
        hits = f"{prefix.hits}"
        if head is not None:  # the head's row: of how many requests that could reuse one
            hits += f" of {head.lookups} requests" + (f", {head.evictions} evicted" if head.evictions else "")
        table.add_row(
            view.instance_id[:8],
            node,
            str(prefix.entries),
            f"{mb(prefix.bytes)} / {mb(prefix.budget_bytes)}",
            str(prefix.reused_tokens),
            hits,
        )
    return table


def speculation_table(views: list[InstanceView]) -> Table | None:
    """Speculative decoding per instance with a drafter: its decode passes, tokens per pass, and
    the guesses its drafter made and the target accepted."""
    rows = [
        (view, runner.speculation)
        for view in views
        for runner in view.runners.values()
        if runner.speculation is not None
    ]
    if not rows:
        return None
    table = Table(title="speculative decoding", title_justify="left")
    for column in ("instance", "drafter", "passes", "tokens / pass", "guessed", "accepted"):
        table.add_column(column, no_wrap=column in ("instance", "drafter"))
    for view, report in rows:
        table.add_row(
            view.instance_id[:8],
            report.drafter,
            str(report.passes),
            f"{report.tokens_per_pass:.2f}",
            str(report.drafted),
            f"{report.accepted} ({report.acceptance:.0%})",
        )
    return table


def downloads_table(statuses: list[NodeStatus]) -> Table | None:
    from exoctl.cli.progress import download_detail

    rows = [(s.node.name, d) for s in statuses for d in s.downloads]
    if not rows:
        return None
    table = Table(title="Downloads", title_justify="left")
    for column in ("node", "model", "layers", "state", "progress", "files"):
        table.add_column(column)
    for node, report in rows[-12:]:
        share = report.downloaded / report.total if report.total else 1.0
        table.add_row(
            node,
            report.model,
            f"[{report.start_layer}, {report.end_layer})",
            f"[{DOWNLOAD_STYLE.get(report.state, 'white')}]{report.state}[/]",
            f"{share:.0%}  {download_detail(report)}",
            f"{report.completed_files}/{report.total_files}",
        )
    return table


def history_table(events: list[SupervisorEvent]) -> Table | None:
    """What the supervisor of `exoctl serve` did when nodes were lost and came back."""
    import time

    if not events:
        return None
    table = Table(title="Reformations (exoctl serve)", title_justify="left")
    for column in ("time", "instance", "model", "what", "now on", "why"):
        table.add_column(column)
    for event in events[-20:]:
        action, nodes, after = event.action, event.nodes, event.restore_after_s
        table.add_row(
            time.strftime("%H:%M:%S", time.localtime(event.time)),
            event.instance_id[:8],
            event.model_id,
            f"[green]{action}[/]" if action in ("replaced", "restored") else f"[red]{action}[/]",
            (f"{(event.new_instance_id or '')[:8]} on {', '.join(nodes)}" if nodes is not None else "")
            + (f" (restore in {after:.0f} s)" if after is not None else ""),
            event.error or event.reason or "",
        )
    return table


def state_view(statuses: list[NodeStatus], views: list[InstanceView]) -> Group:
    from exoctl.cluster.state import history

    extra = [
        experts_table(views),
        prefix_table(views),
        speculation_table(views),
        downloads_table(statuses),
        history_table(history(statuses)),
    ]
    tables = [nodes_table(statuses), instances_table(views), shards_table(views)]
    return Group(*tables, *(t for t in extra if t is not None))


def placement_table(placement: Placement) -> Table:
    from exoctl.placement.pipeline import KV_RESERVE_TOKENS

    table = Table(
        title=f"{placement.model_id}: {placement.sharding} in {placement.dtype}", title_justify="left"
    )
    # what the memory a node needs holds: the weights it loads, the KV reserve of one long
    # sequence, the budget for cached prefixes, and the runtime's allowance (a small model's plan
    # is mostly the last three)
    for column in ("node", "layers", "count"):
        table.add_column(column, no_wrap=True)
    draft = placement.draft
    with_model = draft is not None and draft.bytes > 0
    columns = (
        "weights",
        "KV reserve",
        "prefix cache",
        *(("draft",) if with_model else ()),
        "runtime",
        "needs",
    )
    for column in columns:
        table.add_column(column, justify="right", no_wrap=True)
    count = len(placement.shards)
    for shard in placement.shards:
        span = f"[{shard.start_layer}, {shard.end_layer})"
        drafted = (mb(shard.draft_bytes),) if with_model else ()
        table.add_row(
            shard.node,
            f"1/{count} of {span}" if placement.sharding == "tensor" else span,
            str(shard.n_layers),
            mb(shard.weight_bytes),
            mb(shard.kv_bytes),
            mb(shard.prefix_bytes),
            *drafted,
            mb(shard.runtime_bytes),
            mb(shard.memory_bytes),
        )
    positions = placement.prefix_positions
    cached = f"{positions} positions of cached prefixes" if positions else "no cached prefixes"
    drafting = ""
    if draft is not None:
        drafting = (
            f" + draft (speculative decoding: {draft.model_id} in {draft.dtype} beside the first node's part)"
            if with_model
            else "; speculative decoding drafts by prompt lookup (ngram)"
        )
    table.caption = (
        f"needs = weights + KV reserve (one {KV_RESERVE_TOKENS}-token sequence) + prefix cache "
        f"({cached}; --prefix-cache-gb) + runtime allowance{drafting}"
    )
    table.caption_justify = "left"
    return table


def placement_json(placement: Placement) -> dict[str, object]:
    return {
        "model_id": placement.model_id,
        "sharding": placement.sharding,
        "dtype": placement.dtype,
        "shards": [
            {
                "node": s.node,
                "start_layer": s.start_layer,
                "end_layer": s.end_layer,
                "memory_bytes": s.memory_bytes,
                "weight_bytes": s.weight_bytes,
                "kv_bytes": s.kv_bytes,
                "prefix_cache_bytes": s.prefix_bytes,
                "runtime_bytes": s.runtime_bytes,
                "draft_bytes": s.draft_bytes,
            }
            for s in placement.shards
        ],
        # the positions the instance's cached prefixes may hold (the tightest node's budget)
        "prefix_cache_positions": placement.prefix_positions,
        "draft": draft_json(placement),
        "partials": placement.partials,  # a tensor split's partials across links: exact or q8
    }


def prediction_json(prediction: Prediction | None) -> dict[str, object] | None:
    """The cost model's prediction (placement.cost), None where a node's speed is not measured."""
    return None if prediction is None else prediction.to_json()


def candidates_json(chosen: Plan) -> list[dict[str, object]]:
    return [
        {
            "candidate": c.label,
            "nodes": list(c.placement.nodes) if c.placement is not None else [],
            "prediction": prediction_json(c.prediction),
            "error": c.error,
            "chosen": c.placement == chosen.placement,
        }
        for c in chosen.candidates
    ]


def candidates_table(chosen: Plan) -> Table | None:
    """Every placement `auto` weighed, with its predicted speed or why it does not fit."""
    if not chosen.candidates:
        return None
    table = Table(title="candidates (predicted from measured nodes and links)", title_justify="left")
    for column in ("candidate", "nodes", "decode tok/s", "compute ms", "network ms", "prefill tok/s"):
        table.add_column(column, justify="left" if column in ("candidate", "nodes") else "right")
    for c in chosen.candidates:
        mark = "* " if c.placement == chosen.placement else "  "
        if c.prediction is None or c.placement is None:
            table.add_row(mark + c.label, "-", "[dim]does not fit[/]", "-", "-", "-")
            continue
        p = c.prediction
        partials = " (q8)" if p.partials == "q8" else ""
        table.add_row(
            mark + c.label,
            ",".join(c.placement.nodes),
            f"{p.decode_tps:.1f}",
            f"{p.compute_s * 1e3:.1f}",
            f"{p.network_s * 1e3:.1f}{partials}",
            f"{p.prefill_tps:.0f}",
        )
    return table


def draft_json(placement: Placement) -> dict[str, object] | None:
    """The head's drafter for speculative decoding (None: none)."""
    draft = placement.draft
    if draft is None:
        return None
    return {"drafter": draft.model_id or draft.reference, "dtype": draft.dtype or None, "bytes": draft.bytes}
