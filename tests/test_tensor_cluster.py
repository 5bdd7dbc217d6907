"""Tensor sharding across real worker processes on 127.0.0.11-14: each tiny architecture split
over 2 and 4 workers gives the single process's greedy tokens, Mixtral's experts are spread
over the ranks and the state counts what each received, sampling agrees across ranks, and a
rank killed mid-generation fails the request fast, naming the node."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exoctl.cluster.client import Cluster
from exoctl.cluster.state import state_document
from exoctl.cluster.views import instances_of
from exoctl.errors import ExoctlError
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.runner_report import RunnerStatus
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.server import DOWN_AFTER_S
from tests.cluster_helpers import WorkerCluster, make_cluster, running, tiny_cluster, wait_for
from tests.test_cluster import MAX_TOKENS, PROMPT, generate, model_ref, references  # noqa: F401
from tests.test_cluster import place as place_instance
from tests.tiny_models import corrupt_copy

FAIL_WITHIN_S = DOWN_AFTER_S + 4.0


@pytest.fixture(scope="module")
def cluster4(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "tensor4", 4, tiny_models) as cluster:
        yield cluster


def place(client: Cluster, model: str, nodes: int, sharding: str = "tensor") -> str:
    return place_instance(client, model, nodes, "float32", sharding)


def routed_tokens(result: dict[str, Any], layers: int, top_k: int) -> int:
    """Tokens the routers sent to experts: every position the model ran, in every layer, top_k times."""
    positions = result["usage"]["prompt_tokens"] + result["usage"]["completion_tokens"] - 1
    return positions * layers * top_k


@pytest.mark.parametrize("nodes", [2, 4])
@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "mixtral"])
def test_tensor_split_gives_the_single_process_tokens(
    cluster4: WorkerCluster,
    tiny_models: dict[str, Path],
    references: dict[str, list[int]],  # noqa: F811
    kind: str,
    nodes: int,
) -> None:
    with cluster4.client() as client:
        instance_id = place(client, model_ref(kind, tiny_models), nodes)
        try:
            result = generate(client, instance_id)
            assert result["token_ids"] == references[kind]
            doc = state_document(client.statuses(), "test")["instances"][instance_id]["CpuRingInstance"]
            assert doc["sharding"] == "Tensor"
            shards = [s["TensorShardMetadata"] for s in doc["shardAssignments"]["runnerToShard"].values()]
            assert sorted(s["deviceRank"] for s in shards) == list(range(nodes))
            assert all((s["startLayer"], s["endLayer"]) == (0, s["nLayers"]) for s in shards)
            # the ranks share this host, so their partials go through shared memory
            runners = state_document(client.statuses(), "test")["runners"]
            ranks = [next(iter(r.values())) for r in runners.values()]
            ranks = [r for r in ranks if r["instanceId"] == instance_id]
            assert len(ranks) == nodes and all(r["collectiveTransport"] == "shm" for r in ranks)
            if kind == "mixtral":
                experts = doc["expertTokensByNode"]
                held = sorted(int(e) for node in experts.values() for e in node)
                assert held == [0, 1, 2, 3] and len(experts) == nodes  # each expert on one node
                total = sum(n for node in experts.values() for n in node.values())
                assert total == routed_tokens(result, layers=4, top_k=2)
        finally:
            client.unload(instance_id)


def test_pipeline_mixtral_holds_every_expert_on_each_stage(
    cluster4: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    with cluster4.client() as client:
        instance_id = place(client, str(tiny_models["mixtral"]), 2, sharding="pipeline")
        try:
            result = generate(client, instance_id)
            doc = state_document(client.statuses(), "test")["instances"][instance_id]["CpuRingInstance"]
            experts = doc["expertTokensByNode"]
            assert [sorted(node) for node in experts.values()] == [["0", "1", "2", "3"]] * 2
            total = sum(n for node in experts.values() for n in node.values())
            assert total == routed_tokens(result, layers=4, top_k=2)
            table = cluster4.cli("state")
            assert "experts" in table.stdout and "0, 1, 2, 3" in table.stdout
        finally:
            client.unload(instance_id)


def test_smollm2_over_three_ranks_gives_the_single_process_tokens(
    cluster4: WorkerCluster,
    references: dict[str, list[int]],  # noqa: F811
) -> None:
    # 9 heads and 3 KV heads: 3 is the only split; the vocabulary of 49152 splits 16384 each
    with cluster4.client() as client:
        instance_id = place(client, DEFAULT_MODEL_ID, 3)
        try:
            assert generate(client, instance_id)["token_ids"] == references["smollm2"]
            messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
            view = instances_of(client.statuses())[instance_id]
            generation = client.generate(view, SamplingParams(max_tokens=20), messages=messages)
            assert "Paris" in "".join(generation)
        finally:
            client.unload(instance_id)


def test_concurrent_and_sampled_requests_under_tensor_sharding(
    cluster4: WorkerCluster,
    tiny_models: dict[str, Path],
    references: dict[str, list[int]],  # noqa: F811
) -> None:
    with cluster4.client() as client:
        instance_id = place(client, str(tiny_models["qwen2"]), 2)
        try:
            view = instances_of(client.statuses())[instance_id]
            others = [Cluster(client.inventory, client.keys) for _ in range(3)]
            try:
                sampled = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, top_p=0.9, seed=5)
                runs = [
                    client.generate(view, SamplingParams(max_tokens=MAX_TOKENS), prompt=PROMPT),
                    others[0].generate(view, SamplingParams(max_tokens=MAX_TOKENS), prompt="Hello there, my"),
                    others[1].generate(view, sampled, prompt=PROMPT),
                    others[2].generate(view, sampled, prompt=PROMPT),
                ]
                for run in runs:
                    list(run)
            finally:
                for other in others:
                    other.close()
            results = [run.result.token_ids for run in runs if run.result is not None]
            assert len(results) == 4
            assert results[0] == references["qwen2"]  # batched with the others
            # the same seed gives the same tokens; they are not the greedy ones
            assert results[2] == results[3] != references["qwen2"]
            alone = generate(client, instance_id, prompt="Hello there, my")
            assert results[1] == alone["token_ids"]
        finally:
            client.unload(instance_id)


def test_a_rank_killed_during_generation_fails_the_request_fast(
    tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    with running(make_cluster(tmp_path, 3, next(iter(tiny_models.values())).parent)) as cluster:
        with cluster.client() as client:
            instance_id = place(client, DEFAULT_MODEL_ID, 3)
            view = instances_of(client.statuses())[instance_id]
            generation = client.generate(
                view, SamplingParams(max_tokens=500), prompt="1, 2, 3, 4, 5, 6, 7, 8,"
            )
            hit_at = 0.0
            with pytest.raises(ExoctlError) as caught:
                for count, _ in enumerate(generation):
                    if count == 5:
                        os.kill(cluster.pid("node2"), signal.SIGKILL)
                        hit_at = time.monotonic()
            took = time.monotonic() - hit_at
            assert hit_at, "the generation ended before the rank was killed"
            assert "node2" in caught.value.message and took < FAIL_WITHIN_S, (caught.value.message, took)

            # no rank hangs: both survivors fail their runners, free the memory and keep serving
            def freed() -> bool:
                runners = [r for s in client.statuses() if s.up for r in s.runners]
                return len(runners) == 2 and all(
                    r.status is RunnerStatus.FAILED and r.memory_bytes == 0 for r in runners
                )

            assert wait_for(freed, timeout=FAIL_WITHIN_S)
            client.unload(instance_id)
            llama = place(client, str(tiny_models["llama"]), 2)
            assert len(generate(client, llama)["token_ids"]) == MAX_TOKENS
            client.unload(llama)


def test_a_failed_tensor_load_unloads_every_rank(
    cluster4: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    broken, _ = corrupt_copy(
        tiny_models["qwen2"], "qwen2-broken-layer", "model.layers.3.mlp.down_proj.weight"
    )
    result = cluster4.cli("place", str(broken), "--nodes", "4", "--sharding", "tensor", "--dtype", "float32")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "error: loading failed: node node" in result.stderr
    assert cluster4.cli_json("state")["instances"] == {}  # the ranks that loaded were unloaded too


def test_bfloat16_under_tensor_sharding(cluster4: WorkerCluster, tiny_models: dict[str, Path]) -> None:
    with cluster4.client() as client:
        card, ref = resolve_card(str(tiny_models["mixtral"]))
        placement = client.plan(
            card, PlacementRequest(dtype="bfloat16", nodes=2), client.statuses(), "tensor"
        )
        instance_id = client.load(card, ref, placement).instance_id
        try:
            result = generate(client, instance_id, temperature=0.7, seed=3)
            assert result["usage"]["completion_tokens"] >= 1
            runners = instances_of(client.statuses())[instance_id].runners.values()
            assert {r.dtype for r in runners} == {"bfloat16"}
            assert all((r.collective_ms_per_token or 0) > 0 for r in runners)
        finally:
            client.unload(instance_id)


def test_two_tensor_instances_on_the_same_nodes_run_at_once(
    cluster4: WorkerCluster,
    tiny_models: dict[str, Path],
    references: dict[str, list[int]],  # noqa: F811
) -> None:
    # each instance has its own compute lane on a node: one instance's step, blocked in its
    # collective, never waits behind the other's
    with cluster4.client() as client:
        first = place(client, str(tiny_models["llama"]), 2)
        second = place(client, str(tiny_models["qwen2"]), 2)
        try:
            views = instances_of(client.statuses())
            assert views[first].nodes == views[second].nodes
            other = Cluster(client.inventory, client.keys)
            try:
                runs = [
                    client.generate(views[first], SamplingParams(max_tokens=MAX_TOKENS), prompt=PROMPT),
                    other.generate(views[second], SamplingParams(max_tokens=MAX_TOKENS), prompt=PROMPT),
                ]
                for run in runs:
                    list(run)
            finally:
                other.close()
            assert runs[0].result is not None and runs[0].result.token_ids == references["llama"]
            assert runs[1].result is not None and runs[1].result.token_ids == references["qwen2"]
        finally:
            client.unload(first)
            client.unload(second)


def test_ranks_told_not_to_share_memory_exchange_partials_over_zeromq(
    tmp_path_factory: pytest.TempPathFactory,
    tiny_models: dict[str, Path],
    references: dict[str, list[int]],  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The path ranks on different hosts take, between real workers: the same tokens; and with
    8-bit partials on one rank (EXOCTL_TP_PARTIALS=q8, each worker its own), an answer every rank
    agrees on."""
    monkeypatch.setenv("EXOCTL_TP_SHM", "0")  # the workers `exoctl up` starts inherit it
    with tiny_cluster(tmp_path_factory, "tensor-zmq", 2, tiny_models) as cluster, cluster.client() as client:
        instance_id = place(client, model_ref("qwen2", tiny_models), 2)
        try:
            assert generate(client, instance_id)["token_ids"] == references["qwen2"]
            runners = state_document(client.statuses(), "test")["runners"].values()
            ranks = [next(iter(r.values())) for r in runners]
            assert len(ranks) == 2 and all(r["collectiveTransport"] == "zmq" for r in ranks)
        finally:
            client.unload(instance_id)
    monkeypatch.setenv("EXOCTL_TP_PARTIALS", "q8")
    with tiny_cluster(tmp_path_factory, "tensor-q8", 2, tiny_models) as cluster, cluster.client() as client:
        instance_id = place(client, model_ref("llama", tiny_models), 2)
        try:
            answer = generate(client, instance_id)["token_ids"]
            # a rank that chose otherwise would have sent the head a token the others never ran
            assert len(answer) == MAX_TOKENS and answer == generate(client, instance_id)["token_ids"]
            assert answer[:4] == references["llama"][:4]  # logits far apart: the first choices hold
        finally:
            client.unload(instance_id)
