"""The `/state` document (`exoctl state --json`): EXO's shape, built from the nodes' answers.

camelCase keys and tagged unions as one-key objects, so the cluster test plan's `jq` lines work
as written; plus what EXO lacks: per-node process RSS and CPU %, per-runner tokens/s.
"""

from __future__ import annotations

from typing import Any

from exoctl.cluster.views import InstanceView, NodeStatus, instances_of
from exoctl.runner_report import RunnerReport, RunnerStatus

SHARDING_TAG = {"pipeline": "PipelineShardMetadata", "tensor": "TensorShardMetadata"}


def instance_kind(statuses: list[NodeStatus], view: InstanceView) -> str:
    devices = {s.node.device for s in statuses if s.node.name in view.nodes}
    return "CudaRingInstance" if devices == {"cuda"} else "CpuRingInstance"


def _runner_doc(runner: RunnerReport) -> dict[str, Any]:
    body: dict[str, Any] = {
        "runnerId": runner.runner_id,
        "instanceId": runner.instance_id,
        "memoryBytes": runner.memory_bytes,
        "tokensPerSecond": runner.tokens_per_s,
        "activeSequences": runner.active_sequences,
    }
    if runner.collective_ms_per_token is not None:  # a tensor-parallel rank
        body["collectiveMsPerToken"] = runner.collective_ms_per_token
        body["collectiveTransport"] = runner.collective_transport
    if runner.status is RunnerStatus.LOADING:
        body.update(layersLoaded=runner.layers_loaded, layersTotal=runner.layers_total)
    if runner.status is RunnerStatus.FAILED:
        body["errorMessage"] = runner.message
    return {runner.status.value: body}


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
            runner_to_shard[runner.runner_id] = {
                SHARDING_TAG.get(view.sharding, "PipelineShardMetadata"): {
                    "startLayer": runner.start_layer,
                    "endLayer": runner.end_layer,
                    "nLayers": runner.n_layers,
                    "deviceRank": runner.rank,
                    "worldSize": runner.world,
                }
            }
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
            instance_kind(statuses, view): {
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
            }
        }
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
                "ramTotal": {"inBytes": profile["ram_total"]},
                "ramAvailable": {"inBytes": profile["ram_available"]},
            }
            entry.update(
                version=profile["version"],
                cpuCount=profile["cpu_count"],
                cpuPercent=profile["cpu_percent"],
                loadAverage=profile["load_avg"],
                processRss={"inBytes": profile["rss"]},
                bf16Native=profile["bf16_native"],
                runners=[r.runner_id for r in status.runners],
            )
        node_profiles[node.name] = entry
    return {
        "cluster": cluster,
        "instances": instances,
        "runners": runners,
        "nodeMemory": node_memory,
        "nodeProfiles": node_profiles,
    }
