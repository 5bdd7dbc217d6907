"""Torch-free pieces of the cluster on hand-built inputs: the state document, shard file
selection for downloads, model cards from folders, ssh decisions and shell quoting."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from exoctl.cluster.launcher import sh_path, ssh_command
from exoctl.cluster.state import state_document
from exoctl.cluster.views import NodeStatus, instances_of, node_profiles, runtime_dtype
from exoctl.inventory import Node
from exoctl.models.catalog import card_from_folder, get_card
from exoctl.models.store import files_for_layers
from exoctl.wire.node_speed import LinkMeasure
from exoctl.wire.runner_report import Failure, RunnerReport, RunnerStatus
from exoctl.wire.worker_profile import WorkerProfile


def runner(
    rid: str,
    node_names: list[str],
    rank: int,
    start: int,
    end: int,
    status: RunnerStatus = RunnerStatus.READY,
    failure: Failure | None = None,
) -> RunnerReport:
    return RunnerReport(
        runner_id=rid,
        instance_id="inst",
        model_id="llama-3.1-8b-cpu",
        sharding="pipeline",
        dtype="float32",
        start_layer=start,
        end_layer=end,
        n_layers=32,
        rank=rank,
        world=len(node_names),
        nodes=tuple(node_names),
        status=status,
        failure=failure,
        layers_loaded=end - start,
        memory_bytes=1000,
        tokens_per_s=5.0,
        decode_tokens_per_s=4.0,
    )


def profile(bf16: bool = False, **changes: Any) -> WorkerProfile:
    planned = WorkerProfile.planned("n", "cpu", 100, "m", "bfloat16" if bf16 else "float32")
    return replace(
        planned,
        **{
            "ram_available": 60,
            "version": "0.1.0",
            "cpu_count": 4,
            "cpu_percent": 12.5,
            "load_avg": (0.1, 0.2, 0.3),
            "rss": 50,
            "bf16_native": bf16,
            **changes,
        },
    )


def test_state_document_has_exos_shape() -> None:
    a, b, c = Node("a", "127.0.0.1"), Node("b", "127.0.0.2"), Node("c", "127.0.0.3")
    statuses = [
        NodeStatus(a, profile(), [runner("r1", ["a", "b"], 0, 0, 20)]),
        NodeStatus(b, profile(), [runner("r2", ["a", "b"], 1, 20, 32)]),
        NodeStatus(c, error="node c did not answer"),
    ]
    doc = state_document(statuses, "lab")
    instance = doc["instances"]["inst"]["CpuRingInstance"]
    assert instance["shardAssignments"]["nodeToRunner"] == {"a": "r1", "b": "r2"}
    assert instance["shardAssignments"]["runnerToShard"]["r2"] == {
        "PipelineShardMetadata": {
            "startLayer": 20,
            "endLayer": 32,
            "nLayers": 32,
            "deviceRank": 1,
            "worldSize": 2,
        }
    }
    assert instance["sharding"] == "Pipeline" and instance["status"] == "ready"
    assert set(doc["runners"]["r1"]) == {"RunnerReady"}
    assert doc["nodeMemory"]["a"] == {"ramTotal": {"inBytes": 100}, "ramAvailable": {"inBytes": 60}}
    assert "c" not in doc["nodeMemory"] and doc["nodeProfiles"]["c"]["status"] == "down"
    assert doc["nodeProfiles"]["a"]["processRss"] == {"inBytes": 50}
    # EXO's topology (a link from each live node to each other) and node identities
    assert doc["topology"]["nodes"] == ["a", "b", "c"]
    # with what the source measured of each link: nothing yet
    assert doc["topology"]["connections"] == {
        "a": {
            "b": [
                {
                    "sinkMultiaddr": {"address": "/ip4/127.0.0.2/tcp/52416", "ip_address": "127.0.0.2"},
                    "latencyMs": None,
                    "bandwidthMbps": None,
                }
            ]
        },
        "b": {
            "a": [
                {
                    "sinkMultiaddr": {"address": "/ip4/127.0.0.1/tcp/52416", "ip_address": "127.0.0.1"},
                    "latencyMs": None,
                    "bandwidthMbps": None,
                }
            ]
        },
    }
    # a's measure of its link to b (b still runs as it did then), and one of a b that restarted since
    boot = statuses[1].profile.boot_id  # type: ignore[union-attr]
    measured = LinkMeasure("b", "127.0.0.2:52416", boot, 0.00042, 1.25e8, 1.0)
    stale = replace(measured, sink_boot="an earlier run")
    for link, latency, mbps in ((measured, 0.42, 1000.0), (stale, None, None)):
        statuses[0] = NodeStatus(a, profile(links=(link,)), statuses[0].runners)
        edge = state_document(statuses, "lab")["topology"]["connections"]["a"]["b"][0]
        assert (edge["latencyMs"], edge["bandwidthMbps"]) == (latency, mbps)
    assert doc["nodeIdentities"]["c"]["friendlyName"] == "c"
    json.dumps(doc)


def test_a_loading_runner_says_totallayers_as_exo_does() -> None:
    loading = runner("r1", ["a"], 0, 0, 32, RunnerStatus.LOADING)
    doc = state_document([NodeStatus(Node("a", "127.0.0.1"), profile(), [loading])], "lab")
    body = doc["runners"]["r1"]["RunnerLoading"]
    assert body["totalLayers"] == 32 and body["layersLoaded"] == 32 and body["layersTotal"] == 32


def test_an_instance_document_is_read_back_or_refused_naming_the_fault() -> None:
    """`POST /instance`: a preview's instance gives back its placement; a doctored one is refused."""
    from exoctl.api.instance_doc import planned_placement
    from exoctl.cluster.state import planned_instance
    from exoctl.errors import InvalidRequestError
    from exoctl.placement.pipeline import Placement, PlacementError, Shard

    card = get_card("llama-3.1-8b-cpu")
    statuses = [NodeStatus(Node(n, f"127.0.0.{i + 1}"), profile()) for i, n in enumerate("abc")]
    placement = Placement(card.id, "pipeline", "bfloat16", (Shard("a", 0, 20, 0), Shard("b", 20, 32, 0)))
    uid = "6f1c0a0e-0000-4000-8000-000000000001"
    doc = planned_instance(statuses, placement, card.n_layers, uid)

    def read(instance: dict[str, Any], nodes: list[NodeStatus] = statuses) -> Placement:
        return planned_placement(instance, nodes, lambda m: (get_card(m), m))[2]

    from dataclasses import replace

    from exoctl.placement.pipeline import (
        PREFIX_CACHE_TOKENS,
        PlacementRequest,
        kv_position_bytes,
        place,
        stage_bytes,
    )

    def budgeted(shard: Shard, index: int) -> Shard:  # what `place` reserves, cached prefixes included
        position = shard.n_layers * kv_position_bytes(card, "bfloat16")
        prefix = position * PREFIX_CACHE_TOKENS
        need = stage_bytes(
            card, PlacementRequest(dtype="bfloat16"), index, 2, shard.start_layer, shard.end_layer
        )
        return replace(shard, memory_bytes=need + prefix, prefix_bytes=prefix, position_bytes=position)

    assert read(doc) == replace(
        placement, shards=tuple(budgeted(s, i) for i, s in enumerate(placement.shards))
    )
    # a plan `place` made reads back with the memory it counted (what a preview shows per node)
    roomy = [replace(s, profile=profile(ram_available=64 * 2**30)) for s in statuses]
    planned = place(card, node_profiles(roomy)[:2], PlacementRequest(dtype="bfloat16", nodes=2))
    again = read(planned_instance(roomy, planned, card.n_layers, uid), roomy)
    assert [s.memory_bytes for s in again.shards] == [s.memory_bytes for s in planned.shards]
    assert read(doc).prefix_positions == PREFIX_CACHE_TOKENS
    assert planned_placement(doc, statuses, lambda m: (get_card(m), m))[3] == uid
    body = doc["CpuRingInstance"]
    shards = body["shardAssignments"]["runnerToShard"]
    second = next(r for r, s in shards.items() if s["PipelineShardMetadata"]["deviceRank"] == 1)
    gap = json.loads(json.dumps(doc))
    gap["CpuRingInstance"]["shardAssignments"]["runnerToShard"][second]["PipelineShardMetadata"][
        "startLayer"
    ] = 21
    with pytest.raises(InvalidRequestError, match=r"a \[0, 20\), b \[21, 32\).*without gaps"):
        read(gap)
    stranger = json.loads(json.dumps(doc))
    runners = stranger["CpuRingInstance"]["shardAssignments"]["nodeToRunner"]
    runners["z"] = runners.pop("b")
    with pytest.raises(InvalidRequestError, match="node 'z' is not in the inventory"):
        read(stranger)
    down = [statuses[0], NodeStatus(Node("b", "127.0.0.2"), error="down"), statuses[2]]
    with pytest.raises(PlacementError, match="node b is down"):
        read(doc, down)
    with pytest.raises(InvalidRequestError, match="one tagged instance"):
        read({})


def test_an_instance_missing_a_node_is_failed() -> None:
    statuses = [
        NodeStatus(Node("a", "127.0.0.1"), profile(), [runner("r1", ["a", "b"], 0, 0, 20)]),
        NodeStatus(Node("b", "127.0.0.2"), error="down"),
    ]
    view = instances_of(statuses)["inst"]
    assert view.status == "failed" and view.missing == ["b"] and view.failure == "node b is down"


def test_only_a_failure_that_names_a_lost_node_makes_an_instance_lost() -> None:
    """The supervisor re-places an instance on its runners' word that a node was lost, read from
    the failure's cause, never from its text."""
    lost = Failure("node b (127.0.0.2:1) stopped answering (no heartbeat for 3.2 s)", lost_node="b")
    other = Failure("node a: RuntimeError: stopped answering questions")  # the words, not the cause
    for failure, expected in ((lost, "b"), (other, None)):
        failed = runner("r1", ["a", "b"], 0, 0, 20, RunnerStatus.FAILED, failure)
        statuses = [NodeStatus(Node("a", "127.0.0.1"), profile(), [failed])]
        view = instances_of(statuses)["inst"]
        assert view.status == "failed" and view.failure == failure.message
        assert view.lost_node == expected
        doc = state_document(statuses, "lab")
        assert doc["runners"]["r1"] == {
            "RunnerFailed": {
                "runnerId": "r1",
                "instanceId": "inst",
                "memoryBytes": 1000,
                "tokensPerSecond": 5.0,
                "activeSequences": 0,
                "errorMessage": failure.message,
            }
        }


def test_auto_dtype_needs_native_bf16_on_every_live_node() -> None:
    both = [NodeStatus(Node("a", "h1"), profile(True)), NodeStatus(Node("b", "h2"), profile(True))]
    mixed = [both[0], NodeStatus(Node("b", "h2"), profile(False))]
    assert runtime_dtype("auto", both) == "bfloat16"
    assert runtime_dtype("auto", mixed) == "float32"
    assert runtime_dtype("float32", both) == "float32"


def test_auto_dtype_follows_each_nodes_activations_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's reported `activations` (its CPU's choice, or the switch) decides, whatever its CPU."""
    from exoctl.worker.profile import NodeProfiler

    forced = profile(False, activations="bfloat16")
    held_back = profile(True, activations="float32")
    assert runtime_dtype("auto", [NodeStatus(Node("a", "h1"), forced)]) == "bfloat16"
    assert runtime_dtype("auto", [NodeStatus(Node("a", "h1"), held_back)]) == "float32"
    for policy in ("bfloat16", "float32"):
        monkeypatch.setenv("EXOCTL_ACTIVATIONS", policy)
        reported = NodeProfiler("n", "cpu", "boot").profile()
        assert reported.activations == policy
        assert runtime_dtype("auto", [NodeStatus(Node("a", "h1"), reported)]) == policy


def test_a_node_reports_its_kernel_path_on_the_wire(monkeypatch: pytest.MonkeyPatch) -> None:
    """The profile names the path the node's kernel library runs (EXOCTL_KERNEL_ISA's, else the
    CPU's own), and it crosses the wire into /state's `kernelPath`."""
    from exoctl import cpu_policy
    from exoctl.cluster.state import node_documents
    from exoctl.wire.worker_profile import WorkerProfile
    from exoctl.worker.profile import NodeProfiler

    monkeypatch.delenv("EXOCTL_KERNEL_ISA", raising=False)
    assert NodeProfiler("n", "cpu", "boot").profile().kernel == cpu_policy.kernel_path("native")
    monkeypatch.setenv("EXOCTL_KERNEL_ISA", "portable")
    reported = NodeProfiler("n", "cpu", "boot").profile()
    assert reported.kernel == "portable"
    back = WorkerProfile.from_wire(reported.to_wire())
    assert back == reported
    _, profiles = node_documents([NodeStatus(Node("n", "127.0.0.1"), back)])
    assert profiles["n"]["kernelPath"] == "portable"


def test_a_node_downloads_only_the_files_of_its_layers() -> None:
    weight_map = {
        "model.embed_tokens.weight": "m-1.safetensors",
        "model.layers.0.mlp.up_proj.weight": "m-1.safetensors",
        "model.layers.1.mlp.up_proj.weight": "m-2.safetensors",
        "model.layers.2.mlp.up_proj.weight": "m-3.safetensors",
        "model.layers.3.mlp.up_proj.weight": "m-3.safetensors",
        "model.norm.weight": "m-4.safetensors",
        "lm_head.weight": "m-4.safetensors",
    }
    assert files_for_layers(weight_map, (0, 1), 4) == ["m-1.safetensors"]
    assert files_for_layers(weight_map, (1, 2), 4) == ["m-2.safetensors"]
    assert files_for_layers(weight_map, (2, 4), 4) == ["m-3.safetensors", "m-4.safetensors"]
    tied = {k: v for k, v in weight_map.items() if k != "lm_head.weight"}
    assert files_for_layers(tied, (3, 4), 4) == ["m-1.safetensors", "m-3.safetensors", "m-4.safetensors"]


def test_a_card_from_a_folder_matches_the_catalogs_arithmetic(tmp_path: Path) -> None:
    card = get_card("llama-3.1-8b-cpu")
    config = {
        "model_type": "llama",
        "num_hidden_layers": 32,
        "hidden_size": 4096,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "intermediate_size": 14336,
        "vocab_size": 128256,
        "max_position_embeddings": 131072,
        "torch_dtype": "bfloat16",
    }
    folder = tmp_path / "my-llama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    local = card_from_folder(folder)
    assert local.id == "my-llama" and local.parameters == card.parameters == local.counted_parameters()
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(Exception, match="model_type 'gpt2' is not supported"):
        card_from_folder(folder)


def test_loopback_nodes_use_ssh_only_when_given_ssh_settings() -> None:
    assert not Node("a", "127.0.0.1").uses_ssh
    assert Node("a", "127.0.0.1", ssh_port=2222).uses_ssh
    assert Node("a", "localhost", ssh_identity="~/.ssh/k").uses_ssh
    assert Node("a", "10.0.0.11").uses_ssh
    command = ssh_command(Node("a", "10.0.0.11", ssh_user="exo", ssh_port=2200, ssh_config="/c"))
    assert command[:3] == ["ssh", "-o", "BatchMode=yes"] and command[-1] == "10.0.0.11"
    assert ["-p", "2200"] == command[command.index("-p") : command.index("-p") + 2]
    assert ["-l", "exo"] == command[command.index("-l") : command.index("-l") + 2] and "-F" in command


def test_remote_paths_expand_home_and_quote_the_rest() -> None:
    assert sh_path("~") == '"$HOME"'
    assert sh_path("~/.cache/exo ctl") == "\"$HOME\"/'.cache/exo ctl'"
    assert sh_path("/opt/x;rm -rf /") == "'/opt/x;rm -rf /'"


def test_workers_on_one_machine_share_its_memory() -> None:

    def on(machine: str, available: int) -> dict[str, Any]:
        return profile(machine_id=machine, ram_total=100, ram_available=available)

    statuses = [
        NodeStatus(Node("a", "127.0.0.11"), on("m1", 61)),
        NodeStatus(Node("b", "127.0.0.12"), on("m1", 60)),  # measured a moment later on the same machine
        NodeStatus(Node("c", "10.0.0.1"), on("m2", 60)),
        NodeStatus(Node("d", "10.0.0.2", memory_gb=96)),
    ]
    profiles = node_profiles(statuses)
    assert [(p.ram_total, p.ram_available, p.live) for p in profiles] == [
        (50, 30, True),
        (50, 30, True),
        (100, 60, True),
        (0, 0, False),
    ]
    assert profiles[3].capacity == 96 * 10**9


def test_the_state_tables_keep_ids_whole_at_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    from rich.console import Console

    from exoctl.cli import output
    from exoctl.cli.render import state_view

    narrow = Console(width=80, record=True, color_system=None)
    monkeypatch.setattr(output, "console", narrow)
    a, b = Node("node-alpha", "127.0.0.11", port=52415), Node("node-beta", "127.0.0.12", port=52416)
    statuses = [
        NodeStatus(a, profile(), [runner("r1", ["node-alpha", "node-beta"], 0, 0, 20)]),
        NodeStatus(b, profile(), [runner("r2", ["node-alpha", "node-beta"], 1, 20, 32)]),
    ]
    narrow.print(state_view(statuses, list(instances_of(statuses).values())))
    text = narrow.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    for whole in ("node-alpha", "node-beta", "127.0.0.11:52415", "llama-3.1-8b-cpu", "[20, 32)"):
        assert whole in text, whole
