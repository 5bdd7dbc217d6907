"""The `/state` document (`exoctl state --json`): EXO's shape, built from the nodes' answers.

camelCase keys and tagged unions as one-key objects, so the cluster test plan's `jq` lines work
as written; plus what EXO lacks: per-node process RSS and CPU %, per-runner tokens/s, and the
cached prefixes (per runner what it holds and what it saved, per instance the head's hits).
"""

from __future__ import annotations

import ipaddress
import uuid
from collections.abc import Sequence
from typing import Any

from exoctl.cluster.downloads import downloads_document
from exoctl.cluster.views import NodeStatus, fresh_links, instances_of
from exoctl.inventory import Node
from exoctl.placement.pipeline import Placement
from exoctl.wire.node_speed import WEIGHT_FORMATS
from exoctl.wire.runner_report import (
    HeadPrefixStats,
    PrefixReport,
    RunnerReport,
    RunnerStatus,
    SpeculationReport,
)
from exoctl.wire.supervisor_event import SupervisorEvent

SHARDING_TAG = {"pipeline": "PipelineShardMetadata", "tensor": "TensorShardMetadata"}


def instance_kind(statuses: list[NodeStatus], nodes: Sequence[str]) -> str:
    devices = {s.node.device for s in statuses if s.node.name in nodes}
    return "CudaRingInstance" if devices == {"cuda"} else "CpuRingInstance"


def planned_instance(
    statuses: list[NodeStatus], placement: Placement, n_layers: int, instance_id: str
) -> dict[str, Any]:
    """A placement not loaded yet, tagged as /state tags an instance (EXO's preview `instance`):
    what `POST /instance` takes back to load it."""
    world = len(placement.shards)
    runner_to_shard: dict[str, Any] = {}
    node_to_runner: dict[str, str] = {}
    for rank, shard in enumerate(placement.shards):
        runner_id = str(uuid.uuid5(uuid.UUID(instance_id), shard.node))
        node_to_runner[shard.node] = runner_id
        runner_to_shard[runner_id] = shard_doc(
            placement.sharding, shard.start_layer, shard.end_layer, n_layers, rank, world
        )
    return {
        instance_kind(statuses, placement.nodes): {
            "instanceId": instance_id,
            "sharding": placement.sharding.capitalize(),
            "dtype": placement.dtype,
            "status": "planned",
            "shardAssignments": {
                "modelId": placement.model_id,
                "runnerToShard": runner_to_shard,
                "nodeToRunner": node_to_runner,
            },
        }
    }


def _runner_doc(runner: RunnerReport) -> dict[str, Any]:
    body: dict[str, Any] = {
        "runnerId": runner.runner_id,
        "instanceId": runner.instance_id,
        "memoryBytes": runner.memory_bytes,
        "tokensPerSecond": runner.tokens_per_s,
        "activeSequences": runner.active_sequences,
    }
    if runner.status is RunnerStatus.READY:
        body["prefixCache"] = prefix_doc(runner.prefix)
    if runner.collective_ms_per_token is not None:  # a tensor-parallel rank
        body["collectiveMsPerToken"] = runner.collective_ms_per_token
        body["collectiveTransport"] = runner.collective_transport
    if runner.status is RunnerStatus.LOADING:
        # EXO's RunnerLoading says totalLayers; layersTotal is exoctl's older name, kept for scripts
        total = runner.layers_total
        body.update(layersLoaded=runner.layers_loaded, totalLayers=total, layersTotal=total)
    if runner.status is RunnerStatus.FAILED:
        body["errorMessage"] = runner.message
    return {runner.status.value: body}


def prefix_doc(prefix: PrefixReport) -> dict[str, Any]:
    """A runner's cached prefixes: what it holds against its budget, and what they saved."""
    return {
        "entries": prefix.entries,
        "positions": prefix.positions,
        "bytes": prefix.bytes,
        "budgetBytes": prefix.budget_bytes,
        "hits": prefix.hits,
        "reusedTokens": prefix.reused_tokens,
    }


def head_prefix_doc(stats: HeadPrefixStats) -> dict[str, Any]:
    """An instance's cached prefixes as its head decides them: its budget in positions, the
    requests that could reuse one, those that did, the positions not run again, the evictions."""
    return {
        "budgetPositions": stats.budget_positions,
        "lookups": stats.lookups,
        "hits": stats.hits,
        "reusedTokens": stats.reused_tokens,
        "evictions": stats.evictions,
    }


def speculation_doc(report: SpeculationReport) -> dict[str, Any]:
    """An instance's speculative decoding as its head counts it: the drafter, decode passes and the
    tokens they gave (tokens per pass), the guesses and how many were accepted."""
    return {
        "drafter": report.drafter,
        "passes": report.passes,
        "tokens": report.tokens,
        "tokensPerPass": round(report.tokens_per_pass, 3),
        "verifyPasses": report.verify_passes,
        "drafted": report.drafted,
        "accepted": report.accepted,
        "acceptance": round(report.acceptance, 3),
    }


def shard_doc(sharding: str, start: int, end: int, n_layers: int, rank: int, world: int) -> dict[str, Any]:
    """One runner's part, tagged by sharding as EXO tags it."""
    return {
        SHARDING_TAG.get(sharding, "PipelineShardMetadata"): {
            "startLayer": start,
            "endLayer": end,
            "nLayers": n_layers,
            "deviceRank": rank,
            "worldSize": world,
        }
    }


def multiaddr(node: Node) -> str:
    try:
        family = "ip6" if ipaddress.ip_address(node.host).version == 6 else "ip4"
    except ValueError:
        family = "dns"
    return f"/{family}/{node.host}/tcp/{node.port}"


def topology(statuses: list[NodeStatus]) -> dict[str, Any]:
    """EXO's topology snapshot (`TopologySnapshot`: `connections` maps source -> sink -> its edges,
    as EXO's dashboard reads them to draw links): the nodes, and a socket connection from each
    live node to each other live node (an inventory's nodes reach each other over TCP), with what
    the source measured of it where it did: `latencyMs` (round trip of a small frame) and
    `bandwidthMbps` (megabits a second), null until measured."""
    live = [s.node for s in statuses if s.up]
    measured = fresh_links(statuses)

    def edge(a: Node, b: Node) -> dict[str, Any]:
        link = measured.get((a.name, b.name))
        return {
            "sinkMultiaddr": {"address": multiaddr(b), "ip_address": b.host},
            "latencyMs": None if link is None else round(link.rtt_s * 1e3, 3),
            "bandwidthMbps": None if link is None else round(link.bytes_per_s * 8 / 1e6, 1),
        }

    connections = {a.name: {b.name: [edge(a, b)] for b in live if b is not a} for a in live}
    return {"nodes": [s.node.name for s in statuses], "connections": connections}


def node_identities(statuses: list[NodeStatus]) -> dict[str, Any]:
    """EXO's nodeIdentities: what the dashboard names a node by."""
    identities: dict[str, Any] = {}
    for status in statuses:
        profile = status.profile
        identities[status.node.name] = {
            "friendlyName": status.node.name,
            "hostname": profile.hostname if profile else None,
            "modelId": status.node.device.upper(),
            "chipId": (profile.cpu_model if profile else None) or status.node.device,
        }
    return identities


def state_document(statuses: list[NodeStatus], cluster: str) -> dict[str, Any]:
    views = instances_of(statuses)
    instances: dict[str, Any] = {}
    runners: dict[str, Any] = {}
    for view in views.values():
        runner_to_shard: dict[str, Any] = {}
        node_to_runner: dict[str, str] = {}
        for name in view.nodes:
            runner = view.runners.get(name)
            if runner is None:
                continue
            node_to_runner[name] = runner.runner_id
            runner_to_shard[runner.runner_id] = shard_doc(
                view.sharding,
                runner.start_layer,
                runner.end_layer,
                runner.n_layers,
                runner.rank,
                runner.world,
            )
            runners[runner.runner_id] = _runner_doc(runner)
        head = view.runners.get(view.head)
        # Mixtral: which experts each node holds and the tokens routed to each, so routing
        # across nodes can be seen (under pipeline sharding every stage holds all of its layers')
        experts = {
            name: {str(e.expert): e.tokens for e in runner.experts}
            for name, runner in view.runners.items()
            if runner.experts
        }
        instances[view.instance_id] = {
            instance_kind(statuses, view.nodes): {
                "instanceId": view.instance_id,
                "sharding": view.sharding.capitalize(),
                "dtype": view.dtype,
                "status": view.status.value,
                "error": view.failure or None,
                "missingNodes": view.missing,
                "decodeTokensPerSecond": head.decode_tokens_per_s if head else 0.0,
                "shardAssignments": {
                    "modelId": view.model_id,
                    "runnerToShard": runner_to_shard,
                    "nodeToRunner": node_to_runner,
                },
                **({"expertTokensByNode": experts} if experts else {}),
                **(
                    {"prefixCache": head_prefix_doc(head.head_prefix)}
                    if head is not None and head.head_prefix is not None
                    else {}
                ),
                **(
                    {"speculation": speculation_doc(head.speculation)}
                    if head is not None and head.speculation is not None
                    else {}
                ),
            }
        }
    node_memory, node_profiles = node_documents(statuses)
    return {
        "cluster": cluster,
        "instances": instances,
        "runners": runners,
        "nodeMemory": node_memory,
        "nodeProfiles": node_profiles,
        "topology": topology(statuses),
        "nodeIdentities": node_identities(statuses),
        "downloads": downloads_document(statuses),
        "reformations": [e.to_wire() for e in history(statuses)],
    }


def node_documents(statuses: list[NodeStatus]) -> tuple[dict[str, Any], dict[str, Any]]:
    """EXO's nodeMemory and nodeProfiles: each node's memory, and what it is and holds."""
    node_memory: dict[str, Any] = {}
    node_profiles: dict[str, Any] = {}
    for status in statuses:
        node = status.node
        profile = status.profile
        entry: dict[str, Any] = {
            "address": node.address,
            "status": "up" if profile else "down",
            "device": node.device,
        }
        if profile is None:
            entry["error"] = status.error
        else:
            node_memory[node.name] = {
                "ramTotal": {"inBytes": profile.ram_total},
                "ramAvailable": {"inBytes": profile.ram_available},
            }
            entry.update(
                version=profile.version,
                cpuCount=profile.cpu_count,
                cpuModel=profile.cpu_model,
                threads=profile.threads,
                cpuPercent=profile.cpu_percent,
                loadAverage=list(profile.load_avg),
                processRss={"inBytes": profile.rss},
                bf16Native=profile.bf16_native,
                kernelPath=profile.kernel,
                # measured at the worker's start (engine.node_speed): bytes/s of weights a decode
                # step reads in each format, GEMM FLOP/s; null when not measured
                readRates=None
                if profile.speed is None
                else dict(zip(WEIGHT_FORMATS, profile.speed.read_rates, strict=True)),
                gemmFlops=None if profile.speed is None else profile.speed.gemm_flops,
                runners=[r.runner_id for r in status.runners],
            )
        node_profiles[node.name] = entry
    return node_memory, node_profiles


def history(statuses: list[NodeStatus], more: Sequence[SupervisorEvent] = ()) -> list[SupervisorEvent]:
    """The supervisor's events as the nodes keep them (each on every node live at the time), one
    of each, oldest first; `more` adds events known elsewhere (serve's own)."""
    merged: dict[str, SupervisorEvent] = {}
    for event in [*(e for s in statuses for e in s.events), *more]:
        merged.setdefault(event.id, event)
    return sorted(merged.values(), key=lambda e: e.time)
