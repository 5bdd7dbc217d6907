"""`exoctl bench`: measure a model on this cluster (placing it first if it is not placed)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from exoctl.cli.common import (
    InventoryOption,
    check_request,
    live_statuses,
    open_cluster,
    plan_for,
    suggest_models,
)
from exoctl.cli.options import DtypeOption, JsonOption, ShardingOption
from exoctl.cli.output import console, err_console, out
from exoctl.cli.progress import LoadProgress
from exoctl.cli.render import prediction_json
from exoctl.errors import ExoctlError
from exoctl.placement.sharding import check_sharding

if TYPE_CHECKING:
    from exoctl.cluster.views import InstanceView, NodeStatus
    from exoctl.models.catalog import ModelCard
    from exoctl.placement.cost import Prediction

HELP = (
    "Measure a model on this cluster, as llama-bench does (warm-up, repetitions, mean ± sd): prefill "
    "tokens/s and time to first token at several prompt lengths, decode tokens/s of one stream, "
    "aggregate tokens/s and latency at several concurrency levels, time to first token turn by turn "
    "of a conversation with and without cached prefixes, and per node compute vs transport time and "
    "memory. Places the model first if it is not placed (and unloads it after)."
)
EXAMPLES = (
    "Examples:\n\n  exoctl bench llama-3.1-8b-cpu --nodes 2\n\n"
    "  exoctl bench smollm2-135m-cpu -p 64,256 -c 1,4 -r 5 --json"
)


def int_list(text: str, name: str, low: int, high: int) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ExoctlError(f"{name} must be whole numbers separated by commas, got {text!r}") from None
    if not values or any(not low <= v <= high for v in values):
        raise ExoctlError(f"{name} must be from {low} to {high}, got {text!r}")
    return values


def bench(
    model: Annotated[
        str,
        typer.Argument(
            help="Catalog id, Hugging Face repo id, or a local model folder.", autocompletion=suggest_models
        ),
    ],
    prompt_lengths: Annotated[
        str,
        typer.Option("--prompt-lengths", "-p", help="Prompt lengths in tokens for prefill, comma-separated."),
    ] = "32,128,512",
    decode_tokens: Annotated[
        int, typer.Option("--decode-tokens", "-n", help="Tokens each decode run makes.")
    ] = 64,
    concurrency: Annotated[
        str, typer.Option("--concurrency", "-c", help="Concurrent streams to measure, comma-separated.")
    ] = "1,4,8",
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", help="Runs of each measurement.")] = 3,
    turns: Annotated[
        int,
        typer.Option(
            "--turns",
            "-t",
            help="Turns of the multi-turn conversation (each about --turn-tokens new tokens); 0 skips it.",
        ),
    ] = 4,
    turn_tokens: Annotated[int, typer.Option(help="Tokens of new text in each user turn.")] = 128,
    nodes: Annotated[
        int | None, typer.Option("--nodes", help="If it places the model: exactly this many nodes.")
    ] = None,
    sharding: ShardingOption = "auto",
    dtype: DtypeOption = "auto",
    draft: Annotated[
        str, typer.Option("--draft", help="If it places the model: its drafter (see `place --draft`).")
    ] = "none",
    draft_dtype: Annotated[str, typer.Option("--draft-dtype", help="The draft model's dtype.")] = "auto",
    keep: Annotated[bool, typer.Option("--keep", help="Leave a model it placed loaded.")] = False,
    inventory: InventoryOption = None,
    json_output: JsonOption = False,
) -> None:
    out.mode(json_output)
    from exoctl.cluster.measure import BenchConfig, run_bench
    from exoctl.cluster.views import find_instance
    from exoctl.models.store import resolve_card

    sharding = check_sharding(sharding)
    check_request(None, dtype)
    if not 1 <= decode_tokens <= 4096 or not 1 <= repetitions <= 100:
        raise ExoctlError(
            f"--decode-tokens must be from 1 to 4096 and --repetitions from 1 to 100, got {decode_tokens} "
            f"and {repetitions}"
        )
    if not 0 <= turns <= 64 or not 1 <= turn_tokens <= 4096:
        raise ExoctlError(
            f"--turns must be from 0 to 64 and --turn-tokens from 1 to 4096, got {turns} and {turn_tokens}"
        )
    card, ref = resolve_card(model)
    longest = max(card.context_length - decode_tokens - 8, 8) if card.context_length else 8192
    lengths = int_list(prompt_lengths, "--prompt-lengths", 2, longest)
    config = BenchConfig(
        lengths,
        decode_tokens,
        int_list(concurrency, "--concurrency", 1, 64),
        repetitions,
        turns=turns,
        turn_tokens=turn_tokens,
    )

    def say(text: str) -> None:
        if not out.json:
            err_console.print(f"[dim]{text}[/]")

    with open_cluster(inventory) as cluster:
        statuses = live_statuses(cluster)
        instance = find_instance(statuses, card.id)
        placed_here = instance is None
        if instance is None:
            chosen = plan_for(cluster, statuses, card, dtype, sharding, nodes, 1, None, draft, draft_dtype)
            say(f"placing {card.id}: {chosen.reason}")
            progress = LoadProgress(enabled=not out.json)
            try:
                instance = cluster.load(card, ref, chosen.placement, progress.update)
            finally:
                progress.stop()
        try:
            result = run_bench(cluster, instance, config, say)
        finally:
            if placed_here and not keep:
                cluster.unload(instance.instance_id, [cluster.inventory.node(n) for n in instance.nodes])
        result["placed_by_bench"] = placed_here
        # the cost model's prediction for this placement, beside what was measured
        predicted = predict_instance(card, instance, cluster.statuses())
        result["predicted"] = prediction_json(predicted)
        if predicted is not None and result["decode"]["tokens_per_s"]["mean"] > 0:
            measured = result["decode"]["tokens_per_s"]["mean"]
            result["predicted"]["measured_over_predicted"] = round(measured / predicted.decode_tps, 3)
        result["machines"] = {
            s.node.name: {
                "cpu": s.profile.cpu_model if s.profile else None,
                "threads": s.profile.threads if s.profile else None,
                "kernel": s.profile.kernel if s.profile else None,
            }
            for s in statuses
            if s.up and s.node.name in instance.nodes
        }

    def show() -> None:
        for table in tables(result):
            console.print(table)

    out.result(result, show)


def predict_instance(
    card: ModelCard, instance: InstanceView, statuses: list[NodeStatus]
) -> Prediction | None:
    """What the cost model predicts for a placed instance, from its runners' layer ranges and the
    nodes' measured speed and links (None where a node's speed is unknown)."""
    from exoctl.cluster.views import node_profiles, topology
    from exoctl.placement.cost import can_predict, predict
    from exoctl.placement.pipeline import Placement, Shard

    if any(n not in instance.runners for n in instance.nodes):
        return None
    runners = [instance.runners[n] for n in instance.nodes]
    shards = tuple(
        Shard(n, r.start_layer, r.end_layer, 0) for n, r in zip(instance.nodes, runners, strict=True)
    )
    q8 = any(r.collective_transport == "zmq+q8" for r in runners)
    placement = Placement(
        card.id, instance.sharding, instance.dtype, shards, partials="q8" if q8 else "exact"
    )
    nodes = node_profiles(statuses)
    if not can_predict([n for n in nodes if n.name in instance.nodes]):
        return None
    return predict(card, placement, nodes, topology(statuses))


def _pm(stat: dict[str, Any], digits: int = 2) -> str:
    return f"{stat['mean']:.{digits}f} ± {stat['sd']:.{digits}f}"


def tables(result: dict[str, Any]) -> list[Table]:
    title = (
        f"{result['model']} · {result['sharding']} · {result['dtype']} · "
        f"{', '.join(result['nodes_in_instance'])} · {result['repetitions']} runs each (mean ± sd)"
    )
    speed = Table(title=title, title_justify="left")
    for column in ("test", "tokens/s", "time to first token (ms)", "latency p50 / p95 (ms)"):
        speed.add_column(column)
    for run in result["prefill"]:
        speed.add_row(
            f"prefill pp{run['prompt_tokens']}", _pm(run["tokens_per_s"], 1), _pm(run["ttft_ms"], 1), ""
        )
    decode = result["decode"]
    speed.add_row(
        f"decode tg{decode['tokens']}, 1 stream", _pm(decode["tokens_per_s"]), _pm(decode["ttft_ms"], 1), ""
    )
    predicted = result.get("predicted")
    if predicted:
        ratio = predicted.get("measured_over_predicted", 0)
        compute, network = predicted["compute_ms_per_token"], predicted["network_ms_per_token"]
        speed.add_row(
            "decode, predicted (cost model)",
            f"{predicted['decode_tokens_per_s']:.2f} (measured {ratio:.2f}x)",
            "",
            f"compute {compute:.1f} + network {network:.1f} ms",
        )
    for run in result["concurrency"]:
        latency = run["latency_ms"]
        speed.add_row(
            f"tg{decode['tokens']} × {run['streams']} streams (aggregate)",
            _pm(run["aggregate_tokens_per_s"]),
            f"p50 {run['ttft_ms']['p50']:.1f}",
            f"{latency['p50']:.0f} / {latency['p95']:.0f}",
        )
    per_node = Table(title="per node, decoding one stream", title_justify="left")
    for column in ("node", "layers", "compute ms/token", "transport ms/token", "runner memory", "worker RSS"):
        per_node.add_column(column)
    for node, entry in result["nodes"].items():
        per_node.add_row(
            node,
            f"[{entry['layers'][0]}, {entry['layers'][1]})"
            + (" (1/k)" if result["sharding"] == "tensor" else ""),
            f"{entry['compute_ms_per_token']:.2f}",
            f"{entry['transport_ms_per_token']:.2f}" if "transport_ms_per_token" in entry else "–",
            f"{entry['memory_bytes'] / 2**20:.0f} MiB",
            f"{entry['worker_rss_bytes'] / 2**20:.0f} MiB",
        )
    tables_ = [speed, per_node]
    conversation = result.get("multi_turn")
    if conversation:
        growth = conversation["last_over_first"]
        turns = Table(
            title=f"a conversation, time to first token by turn (last turn / first: {growth['cached']:.2f}x "
            f"with cached prefixes, {growth['uncached']:.2f}x without)",
            title_justify="left",
        )
        for column in ("turn", "prompt tokens", "cached", "with cache (ms)", "without (ms)"):
            turns.add_column(column)
        for row in conversation["turns"]:
            turns.add_row(
                str(row["turn"]),
                str(row["prompt_tokens"]),
                str(row["cached_tokens"]),
                _pm(row["ttft_ms_cached"], 1),
                _pm(row["ttft_ms_uncached"], 1),
            )
        tables_.append(turns)
    speculation = result.get("speculation")
    if speculation:
        guessed = Table(
            title=f"decode, 1 stream, with speculative decoding ({speculation['drafter']}) and without",
            title_justify="left",
        )
        for column in (
            "prompt",
            "speculative tokens/s",
            "plain tokens/s",
            "speed-up",
            "accepted",
            "tokens/pass",
        ):
            guessed.add_column(column)
        for row in speculation["prompts"]:
            guessed.add_row(
                row["prompt"],
                _pm(row["tokens_per_s_speculative"]),
                _pm(row["tokens_per_s_plain"]),
                f"{row['speedup']:.2f}x",
                f"{row['acceptance']:.0%}",
                f"{row['tokens_per_pass']:.2f}",
            )
        tables_.append(guessed)
    return tables_
