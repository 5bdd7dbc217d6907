"""`exoctl up`, `down`, `logs`, `keys` and `worker`: starting, stopping and watching workers."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from exoctl import __version__
from exoctl.cli.common import InventoryOption, suggest_nodes
from exoctl.cli.options import JsonOption, PrefixCacheOption
from exoctl.cli.output import console, err_console, out
from exoctl.cluster.launcher import START_WAIT_S
from exoctl.errors import ExoctlError
from exoctl.inventory import DEFAULT_PORT, Inventory, Node

if TYPE_CHECKING:
    from exoctl.keys import ClusterKeys

UP_HELP = "Start a worker on every inventory node (ssh, or a local process for loopback nodes)."
UP_EXAMPLES = (
    "Examples:\n\n  exoctl up --local 2              # two workers on 127.0.0.1, the embedded default\n\n"
    "  exoctl up -i cluster.yaml         # one worker per node over ssh"
)
ActivationsOption = typer.Option(
    help="What auto, int8 and int4 models compute in: bfloat16 or float32 on any CPU, or auto "
    "(bfloat16 where the CPU has native bf16, else float32). Also EXOCTL_ACTIVATIONS.",
)


def local_threads(nodes: Iterable[Node]) -> int:
    """Torch threads for each worker started on this machine: its cores shared among them.

    Stages of a pipeline compute at the same time once several requests run; with every worker
    using every core, OpenMP teams oversubscribe the cores and 8 concurrent chats over 2 local
    workers took 45 s instead of 4 s (2 cores)."""
    count = sum(1 for n in nodes if not n.uses_ssh)
    return max(1, (os.cpu_count() or 1) // max(count, 1))


@dataclass
class NodeStart:
    """What `up` did for one node (its --json shape: node, address, result, reason)."""

    node: str
    address: str
    result: str = ""  # started, running, failed
    reason: str = ""
    pending: bool = False  # failed to answer in time but still alive: kept in the local inventory

    def to_json(self) -> dict[str, str]:
        return {"node": self.node, "address": self.address, "result": self.result, "reason": self.reason}


def _start_node(node: Node, keys: ClusterKeys, threads: int, wait_s: float) -> NodeStart:
    """Start one node's worker: with the node's own `threads` when the inventory sets them, else
    `threads` (this machine's cores shared) for a local one, else all of its cores."""
    from exoctl.cluster.launcher import run_script, start_failure, start_script

    local = not node.uses_ssh
    chosen = node.threads if node.threads is not None else threads if local else None
    script = start_script(node, keys, local_keys=local, threads=chosen, wait_s=wait_s)
    result = run_script(node, script, timeout=wait_s + 30)
    if result.code != 0:
        # exit 5: the worker is alive but not listening yet; it stays in the inventory (never orphaned)
        reason = start_failure(node, result, wait_s)
        return NodeStart(node.name, node.address, "failed", reason, pending=result.code == 5)
    return NodeStart(node.name, node.address, "started")


def _check_local_replacement(inv: Inventory, keys: ClusterKeys | None) -> None:
    """Refuse to write over the local inventory while workers it names are running elsewhere:
    later commands would point at the new ports and `down` could no longer stop the old workers."""
    from exoctl.cluster.client import Cluster
    from exoctl.inventory import load_inventory_file, local_inventory_path
    from exoctl.transport import NodeError
    from exoctl.wire.messages import Ping

    path = local_inventory_path()
    if not path.is_file():
        return
    try:
        old = load_inventory_file(path)
    except ExoctlError:
        return  # unreadable: nothing it names can be reached through it anyway
    wanted = {(n.host, n.port) for n in inv.nodes}
    moved = [n for n in old.nodes if (n.host, n.port) not in wanted]
    if not moved:
        return
    with Cluster(old, keys) as cluster:
        answers = cluster.ask_all(Ping(), moved, timeout=1.5)
    alive = [n for n in moved if not isinstance(answers.get(n.name), NodeError)]
    if alive:
        names = ", ".join(f"{n.name} ({n.address})" for n in alive)
        raise ExoctlError(
            f"the local cluster in {path} is still running on other ports: {names}",
            hint="stop it with `exoctl down` first "
            "(or start the same count on the same --base-port to reuse it)",
        )


def _inventory_to_start(
    inventory: str | None,
    local: int | None,
    base_port: int,
    model_dir: str | None,
    threads: int | None,
    activations: str | None,
    prefix_cache_gb: float | None = None,
) -> tuple[Inventory, bool]:
    """The nodes `up` starts, and whether it writes them as the local inventory (--local, or the
    embedded default when no inventory file is found)."""
    from exoctl.cpu_policy import check_activations
    from exoctl.inventory import find_inventory_path, load_inventory, local_inventory
    from exoctl.keys import find_keys

    if local is not None:
        if activations is not None:
            check_activations(activations)
        inv = local_inventory(
            local,
            base_port,
            model_dir=model_dir,
            threads=threads,
            activations=activations,
            prefix_cache_gb=prefix_cache_gb,
        )
        _check_local_replacement(inv, find_keys())
        return inv, True
    for flag, value, field in (
        ("--model-dir", model_dir, "model_dir"),
        ("--threads", threads, "threads"),
        ("--activations", activations, "activations"),
        ("--prefix-cache-gb", prefix_cache_gb, "prefix_cache_gb"),
    ):
        if value is not None:
            raise ExoctlError(
                f"{flag} applies to --local workers", hint=f"set '{field}' on the inventory's nodes"
            )
    inv = load_inventory(inventory)
    return inv, inv.source == "embedded default" and find_inventory_path(inventory) is None


def _already_there(node: Node, answer: object) -> NodeStart | None:
    """What a node's answer to a ping says before anything is started: a worker to reuse, one
    `up` must not touch (another version, another key, another name), or None: start one."""
    from exoctl.transport import KeyRefusedError, NodeError
    from exoctl.wire.messages import Pong
    from exoctl.wire.protocol import VersionMismatchError

    entry = NodeStart(node.name, node.address)
    if isinstance(answer, NodeError):
        if issubclass(answer.kind, VersionMismatchError):
            entry.result = "failed"
            fix = "`exoctl down`, install the same exoctl on the node, `exoctl up`"
            entry.reason = f"version mismatch: {answer.message} ({fix})"
        elif isinstance(answer, KeyRefusedError):
            entry.result, entry.reason = "failed", answer.message + " (run `exoctl down` first)"
        else:
            return None  # nothing answers there: start it
        return entry
    if not isinstance(answer, Pong):
        return None  # never: a ping is answered with a pong or an error
    profile = answer.profile
    if profile.version != __version__:
        entry.result = "failed"
        entry.reason = (
            f"version mismatch: the node runs exoctl {profile.version}, "
            f"this is {__version__} (`exoctl down`, upgrade the node, `exoctl up`)"
        )
    elif profile.name != node.name:
        entry.result, entry.reason = "failed", f"{node.address} is held by worker {profile.name!r}"
    else:
        entry.result, entry.reason = "running", "already running (reused)"
    return entry


def up(
    inventory: InventoryOption = None,
    local: Annotated[
        int | None, typer.Option("--local", help="Start N workers on 127.0.0.1 instead.")
    ] = None,
    base_port: Annotated[int, typer.Option(help="First port of the --local workers.")] = DEFAULT_PORT,
    model_dir: Annotated[
        str | None, typer.Option(help="Folder the --local workers may load model folders from.")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads of each --local worker (default: this machine's cores shared among them); "
            "for an inventory's nodes, set the field 'threads'."
        ),
    ] = None,
    activations: Annotated[str | None, ActivationsOption] = None,
    prefix_cache_gb: Annotated[float | None, PrefixCacheOption] = None,
    start_timeout: Annotated[
        float,
        typer.Option(
            min=1, help="Seconds to wait for each worker to listen and answer (more for loaded machines)."
        ),
    ] = START_WAIT_S,
    json_output: JsonOption = False,
) -> None:
    out.mode(json_output)
    from exoctl.cluster.client import Cluster
    from exoctl.inventory import write_local_inventory
    from exoctl.keys import init_keys
    from exoctl.transport import NodeError
    from exoctl.wire.messages import Ping

    inv, writes_local = _inventory_to_start(
        inventory, local, base_port, model_dir, threads, activations, prefix_cache_gb
    )
    keys, made = init_keys()
    if made:
        err_console.print(f"[dim]made the cluster key in {keys.folder}[/]")
    results: list[NodeStart] = []
    with Cluster(inv, keys) as cluster:
        answers = cluster.ask_all(Ping())
        to_start = []
        for node in inv.nodes:
            entry = _already_there(node, answers[node.name])
            if entry is None:
                to_start.append(node)
            else:
                results.append(entry)
        with err_console.status(f"starting {len(to_start)} worker(s)…"), ThreadPoolExecutor(8) as pool:
            threads_each = local_threads(inv.nodes)
            started = list(pool.map(lambda n: _start_node(n, keys, threads_each, start_timeout), to_start))
        ready = [inv.node(e.node) for e in started if e.result == "started"]
        if ready:
            answers = cluster.ask_all(Ping(), ready, timeout=start_timeout)
            for entry in started:
                reply = answers.get(entry.node)
                if isinstance(reply, NodeError):
                    entry.result, entry.pending = "failed", True
                    entry.reason = f"started but does not answer: {reply.message}"
        results += started
    order = {n.name: i for i, n in enumerate(inv.nodes)}
    results.sort(key=lambda e: order[e.node])
    failed = [e for e in results if e.result == "failed"]
    if writes_local:
        # only the workers that run (or may still be coming up): a failed start leaves the file as it
        # was, so later commands and `down` still reach the workers it named
        kept = {e.node for e in results if e.result != "failed" or e.pending}
        if kept:
            write_local_inventory(
                Inventory(inv.name, tuple(n for n in inv.nodes if n.name in kept), inv.source)
            )

    def show() -> None:
        marks = {"started": "[green]started[/]", "running": "[green]running[/]", "failed": "[red]failed[/]"}
        for entry in results:
            reason = f" — {entry.reason}" if entry.reason else ""
            console.print(f"{entry.node:<12} {entry.address:<22} {marks[entry.result]}{reason}")

    out.result({"cluster": inv.name, "inventory": inv.source, "nodes": [e.to_json() for e in results]}, show)
    if failed:
        raise typer.Exit(1)


def down(inventory: InventoryOption = None, json_output: JsonOption = False) -> None:
    """Stop the workers of every inventory node and say what was stopped."""
    out.mode(json_output)
    from exoctl.cluster.launcher import run_script, stop_script
    from exoctl.inventory import load_inventory
    from exoctl.keys import find_keys
    from exoctl.wire.messages import Shutdown

    inv = load_inventory(inventory)
    from exoctl.cluster.client import Cluster

    with Cluster(inv, find_keys()) as cluster:
        answers = cluster.ask_all(Shutdown(), timeout=2.0)

    def stop(node: Any) -> dict[str, Any]:
        answered = not isinstance(answers[node.name], Exception)
        result = run_script(node, stop_script(node))
        words = result.out.split()
        if result.code != 0:
            return {
                "node": node.name,
                "result": "failed",
                "reason": (result.err or result.out).strip()[-200:],
            }
        if words[:1] == ["STOPPED"] or answered:
            how = "stopped" if answered else "killed (it did not answer)"
            return {"node": node.name, "result": "stopped", "reason": how}
        return {"node": node.name, "result": "not running", "reason": ""}

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(stop, inv.nodes))

    def show() -> None:
        for entry in results:
            reason = f" — {entry['reason']}" if entry["reason"] else ""
            console.print(f"{entry['node']:<12} {entry['result']}{reason}")

    out.result({"cluster": inv.name, "nodes": results}, show)
    if any(e["result"] == "failed" for e in results):
        raise typer.Exit(1)


def logs(
    node: Annotated[str, typer.Argument(help="Node name from the inventory.", autocompletion=suggest_nodes)],
    lines: Annotated[int, typer.Option("--lines", "-n", help="How many lines from the end.")] = 100,
    inventory: InventoryOption = None,
) -> None:
    """Show the end of a node's worker log."""
    from exoctl.cluster.launcher import logs_script, run_script
    from exoctl.inventory import load_inventory

    target = load_inventory(inventory).node(node)
    result = run_script(target, logs_script(target, lines))
    if result.code != 0:
        raise ExoctlError(
            f"no log for node {node}: {(result.err or result.out).strip()}",
            hint="the log is written once `exoctl up` has started the worker",
        )
    sys.stdout.write(result.out)


keys_app = typer.Typer(help="The cluster's CurveZMQ key pair.", no_args_is_help=True)


@keys_app.command("init")
def keys_init(force: Annotated[bool, typer.Option(help="Replace an existing key pair.")] = False) -> None:
    """Make the cluster key pair in $EXOCTL_HOME/keys (`exoctl up` pushes it to the nodes)."""
    from exoctl.keys import init_keys

    keys, made = init_keys(force=force)
    console.print(
        ("made the" if made else "kept the existing") + f" cluster key in {keys.folder}", markup=False
    )
    console.print(f"public key: {keys.public.decode()}", markup=False)


@keys_app.command("show")
def keys_show() -> None:
    """Print the cluster's public key."""
    from exoctl.keys import load_keys

    console.print(load_keys().public.decode(), markup=False)


def worker(
    name: Annotated[str, typer.Option(help="This node's name in the inventory.")],
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = DEFAULT_PORT,
    keys_dir: Annotated[str | None, typer.Option(help="Folder with the cluster key pair.")] = None,
    model_dir: Annotated[
        list[str] | None, typer.Option(help="Folder models may be loaded from (repeatable).")
    ] = None,
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    insecure: Annotated[bool, typer.Option(help="Allow a non-loopback address without keys.")] = False,
    threads: Annotated[int | None, typer.Option(help="Torch threads (default: all cores).")] = None,
    max_batch: Annotated[int, typer.Option(min=1, help="Most sequences decoded in one step.")] = 32,
    activations: Annotated[str | None, ActivationsOption] = None,
) -> None:
    """Run one worker in the foreground (`exoctl up` starts these for you)."""
    from exoctl.keys import load_keys
    from exoctl.worker.main import run_worker
    from exoctl.worker.options import WorkerOptions

    keys = load_keys(Path(keys_dir).expanduser()) if keys_dir else None
    options = WorkerOptions(
        name,
        host,
        port,
        keys,
        [Path(d) for d in model_dir or []],
        device,
        insecure,
        threads,
        max_batch,
        activations,
    )
    run_worker(options)
