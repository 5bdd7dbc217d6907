"""Failures during generation and at rest: a killed (SIGKILL) or frozen (SIGSTOP) worker fails
the request within a bounded time with an error naming the node, shows as down, and the other
workers keep serving."""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exoctl.cluster.client import GENERATION_SILENCE_S, Cluster
from exoctl.cluster.views import instances_of
from exoctl.errors import ExoctlError
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.runner_report import RunnerStatus
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.peers import DOWN_AFTER_S, SILENT_AFTER_S
from tests.cluster_helpers import WorkerCluster, make_cluster, running, wait_for

COUNTING = "1, 2, 3, 4, 5, 6, 7, 8,"  # SmolLM2 keeps counting: a generation that outlives the test
FAIL_WITHIN_S = DOWN_AFTER_S + 4.0  # heartbeat timeout plus a margin for a loaded 2-core machine
FROZEN_WITHIN_S = SILENT_AFTER_S + 4.0  # a frozen node keeps its connections: it may only be slow


@pytest.fixture
def cluster3(tmp_path: Path, tiny_models: dict[str, Path]) -> Iterator[WorkerCluster]:
    with running(make_cluster(tmp_path, 3, next(iter(tiny_models.values())).parent)) as cluster:
        yield cluster


def place(client: Cluster, model: str, nodes: int) -> str:
    card, ref = resolve_card(model)
    placement = client.plan(card, PlacementRequest(dtype="float32", nodes=nodes), client.statuses())
    return client.load(card, ref, placement).instance_id


def fail_during_generation(
    cluster: WorkerCluster, client: Cluster, victim: str, sig: int, cached: bool = False
) -> tuple[str, float]:
    """Start a long generation, hit `victim` with `sig` after a few tokens; the error and how long it
    took. `cached`: a short request first, whose KV every runner keeps as a cached prefix."""
    instance_id = place(client, DEFAULT_MODEL_ID, len(cluster.names))
    view = instances_of(client.statuses())[instance_id]
    if cached:
        list(client.generate(view, SamplingParams(max_tokens=4), prompt=COUNTING))

        def kept() -> bool:  # the head's `release` reaches the other runners just after the answer
            runners = instances_of(client.statuses())[instance_id].runners.values()
            return all(r.prefix.entries == 1 and r.prefix.bytes > 0 for r in runners)

        assert wait_for(kept, timeout=5)
    generation = client.generate(view, SamplingParams(max_tokens=500), prompt=COUNTING)
    hit_at = 0.0
    with pytest.raises(ExoctlError) as caught:
        for count, _ in enumerate(generation):
            if count == 10:
                os.kill(cluster.pid(victim), sig)
                hit_at = time.monotonic()
    assert hit_at, "the generation ended before the worker was hit"
    return caught.value.message, time.monotonic() - hit_at


def live_nodes(client: Cluster) -> list[str]:
    return [s.node.name for s in client.statuses() if s.up]


def serves(client: Cluster, tiny_models: dict[str, Path], nodes: int) -> bool:
    """The live workers still place a model and answer."""
    instance_id = place(client, str(tiny_models["llama"]), nodes)
    view = instances_of(client.statuses())[instance_id]
    generation = client.generate(view, SamplingParams(max_tokens=5), prompt=COUNTING)
    list(generation)
    client.unload(instance_id)
    return generation.result is not None and generation.result.completion_tokens >= 1


def test_killed_middle_stage(cluster3: WorkerCluster, tiny_models: dict[str, Path]) -> None:
    with cluster3.client() as client:
        message, took = fail_during_generation(cluster3, client, "node2", signal.SIGKILL, cached=True)
        assert "node2" in message and "stopped answering" in message
        assert took < FAIL_WITHIN_S
        assert wait_for(lambda: live_nodes(client) == ["node1", "node3"], timeout=5)
        # the instance is failed, and its surviving runners freed their memory, cached prefixes too
        view = next(iter(instances_of(client.statuses()).values()))
        assert view.status == "failed" and view.missing == ["node2"]
        assert all(r.status is RunnerStatus.FAILED and r.memory_bytes == 0 for r in view.runners.values())
        assert all(r.prefix.entries == 0 and r.prefix.bytes == 0 for r in view.runners.values())
        failure = view.runners["node1"].failure
        assert failure is not None and "node2" in failure.message and failure.lost_node == "node2"
        assert serves(client, tiny_models, 2)


def test_frozen_last_stage(cluster3: WorkerCluster, tiny_models: dict[str, Path]) -> None:
    with cluster3.client() as client:
        message, took = fail_during_generation(cluster3, client, "node3", signal.SIGSTOP)
        assert "node3" in message and "stopped answering" in message
        assert took < FROZEN_WITHIN_S
        assert wait_for(lambda: live_nodes(client) == ["node1", "node2"], timeout=5)
        nodes = {n["node"]: n["status"] for n in cluster3.cli_json("nodes")}
        assert nodes == {"node1": "up", "node2": "up", "node3": "down"}
        assert serves(client, tiny_models, 2)


def test_frozen_head(cluster3: WorkerCluster) -> None:
    with cluster3.client() as client:
        message, took = fail_during_generation(cluster3, client, "node1", signal.SIGSTOP)
        assert "node1" in message and "stopped answering during generation" in message
        assert took < GENERATION_SILENCE_S + 4.0

        # the other stages noticed too and freed their runners
        def freed() -> bool:
            runners = [r for s in client.statuses() if s.up for r in s.runners]
            return bool(runners) and all(
                r.status is RunnerStatus.FAILED and r.memory_bytes == 0 for r in runners
            )

        assert wait_for(freed, timeout=FROZEN_WITHIN_S)


def test_a_node_slow_for_longer_than_the_kill_timeout_is_not_lost(cluster3: WorkerCluster) -> None:
    """Busy is not gone: a stage that does not answer for 5 s (past DOWN_AFTER_S, as on an
    overloaded machine) but keeps its connections makes the request slower, not failed."""
    with cluster3.client() as client:
        instance_id = place(client, DEFAULT_MODEL_ID, 3)
        view = instances_of(client.statuses())[instance_id]
        alone = client.generate(view, SamplingParams(max_tokens=40), prompt=COUNTING)
        list(alone)
        generation = client.generate(view, SamplingParams(max_tokens=40), prompt=COUNTING)
        for count, _ in enumerate(generation):
            if count == 5:
                os.kill(cluster3.pid("node2"), signal.SIGSTOP)
                time.sleep(DOWN_AFTER_S + 2)
                os.kill(cluster3.pid("node2"), signal.SIGCONT)
        assert generation.result is not None and alone.result is not None
        assert generation.result.token_ids == alone.result.token_ids
        # the other stages free the sequence as the head's release reaches them
        assert wait_for(lambda: instances_of(client.statuses())[instance_id].status == "ready", timeout=5)


def test_killed_at_rest_then_run_places_again_on_live_nodes(cluster3: WorkerCluster) -> None:
    with cluster3.client() as client:
        instance_id = place(client, DEFAULT_MODEL_ID, 3)
        os.kill(cluster3.pid("node3"), signal.SIGKILL)
        assert wait_for(
            lambda: instances_of(client.statuses())[instance_id].status == "failed", FAIL_WITHIN_S
        )
    result = cluster3.cli("run", "--raw", "-n", "4", "--dtype", "float32", "The capital of France is")
    assert result.returncode == 0, result.stderr
    assert "is not placed: placing it with the defaults" in result.stderr and "Paris" in result.stdout
    assert "node3" not in result.stderr.split("defaults")[1]


def test_a_node_lost_mid_stream_ends_the_stream_with_an_error(cluster3: WorkerCluster) -> None:
    import json
    import urllib.request

    from tests.cluster_helpers import Server, http

    server = Server(cluster3)
    try:
        status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "nodes": 3})
        assert status == 200, body
        request = urllib.request.Request(
            f"{server.base}/v1/chat/completions",
            data=json.dumps(
                {
                    "model": DEFAULT_MODEL_ID,
                    "stream": True,
                    "temperature": 0,
                    "max_tokens": 500,
                    "messages": [
                        {
                            "role": "user",
                            "content": "Write a very long story about a dragon who learns to count. "
                            "At least 1000 words.",
                        }
                    ],
                }
            ).encode(),
            headers={"Content-Type": "application/json"},
        )
        events: list[str] = []
        hit_at = 0.0
        with urllib.request.urlopen(request, timeout=60) as response:
            for raw in response:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                events.append(line[6:])
                if len(events) == 10:
                    os.kill(cluster3.pid("node2"), signal.SIGKILL)
                    hit_at = time.monotonic()
        took = time.monotonic() - hit_at
        assert hit_at and events[-1] == "[DONE]"
        assert "error" in json.loads(events[-2]), events[-4:]
        error = json.loads(events[-2])["error"]
        assert "node2" in error["message"] and "stopped answering" in error["message"]
        assert set(error) == {"message", "type", "param", "code"}
        assert error["code"] == "NodeError" and error["type"] == "server_error"  # as in a 503 answer
        assert took < FAIL_WITHIN_S
        assert http(server, "GET", "/healthz")[1]["nodes_up"] == 2  # and the server keeps serving
    finally:
        server.stop()


def test_serve_places_an_instance_again_when_it_loses_a_node_and_restores_it_when_the_node_is_back(
    cluster3: WorkerCluster,
) -> None:
    from tests.cluster_helpers import Server, http

    server = Server(cluster3)
    try:
        status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "nodes": 3})
        assert status == 200, body
        lost = body["instance_id"]
        os.kill(cluster3.pid("node3"), signal.SIGKILL)

        def events() -> list[dict[str, Any]]:
            return http(server, "GET", "/state")[1]["reformations"]  # type: ignore[no-any-return]

        assert wait_for(lambda: any(e["action"] == "replaced" for e in events()), timeout=60)
        state = http(server, "GET", "/state")[1]
        (event,) = state["reformations"]
        assert event["instanceId"] == lost and "node3" in event["reason"] and event["nodes"] == ["node1"]
        assert event["restoreAfterSeconds"] > 0  # smaller than asked: to be restored
        assert lost not in state["instances"]  # the survivors' remnants were unloaded
        (instance,) = state["instances"].values()
        assert instance["CpuRingInstance"]["status"] == "ready"
        question = {
            "model": DEFAULT_MODEL_ID,
            "temperature": 0,
            "messages": [
                {"role": "user", "content": "What is the capital of France? Answer in one sentence."}
            ],
        }
        status, answer = http(server, "POST", "/v1/chat/completions", {**question, "max_tokens": 12})
        assert status == 200 and "Paris" in answer["choices"][0]["message"]["content"]

        # the node comes back while a request runs: the request is untouched, and once the
        # instance is idle the supervisor restores the 3 nodes asked for
        running: dict[str, Any] = {}

        def ask() -> None:
            running["reply"] = http(server, "POST", "/v1/chat/completions", {**question, "max_tokens": 200})
            running["ended"] = time.time()

        asking = threading.Thread(target=ask)
        asking.start()
        assert cluster3.cli("up").returncode == 0  # node3's worker again, same name
        asking.join(timeout=300)
        status, reply = running["reply"]
        assert status == 200 and "Paris" in reply["choices"][0]["message"]["content"], reply
        assert wait_for(lambda: any(e["action"] == "restored" for e in events()), timeout=90), events()
        restored = next(e for e in events() if e["action"] == "restored")
        assert restored["nodes"] == ["node1", "node2", "node3"] and restored["time"] >= running["ended"] - 1

        def shape() -> list[list[str]]:
            instances = http(server, "GET", "/state")[1]["instances"].values()
            return [sorted(i["CpuRingInstance"]["shardAssignments"]["nodeToRunner"]) for i in instances]

        assert wait_for(lambda: shape() == [["node1", "node2", "node3"]], timeout=30), (
            shape()
        )  # the smaller one gone
        status, answer = http(server, "POST", "/v1/chat/completions", {**question, "max_tokens": 12})
        assert status == 200 and "Paris" in answer["choices"][0]["message"]["content"]
        served = [(e["id"], e["action"]) for e in events()]
    finally:
        server.stop()
    # the history stays with the nodes: `exoctl state` reads it from the workers, serve gone
    kept = cluster3.cli_json("state")["reformations"]
    assert [(e["id"], e["action"]) for e in kept] == served
    # a restore tried while node3 was still coming back may say "not restored" before it lands
    assert served[0][1] == "replaced" and served[-1][1] == "restored"
    table = cluster3.cli("state").stdout
    assert "Reformations" in table and "replaced" in table and "restored" in table


def test_a_frozen_node_that_comes_back_gets_no_second_copy_of_the_model(cluster3: WorkerCluster) -> None:
    from tests.cluster_helpers import Server, http

    server = Server(cluster3)
    try:
        status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "nodes": 3})
        assert status == 200, body
        os.kill(cluster3.pid("node2"), signal.SIGSTOP)

        def state() -> dict[str, object]:
            return http(server, "GET", "/state")[1]  # type: ignore[no-any-return]

        assert wait_for(lambda: bool(state()["reformations"]), timeout=60)
        os.kill(cluster3.pid("node2"), signal.SIGCONT)
        # the thawed node's stale runner sees silence everywhere; it must not blame its peers, and
        # what is left of the old instance must not be placed again: the one change is the
        # supervisor's restore of the 3 nodes asked for, once node2 answers again
        time.sleep(3 * DOWN_AFTER_S + 4)

        def settled() -> bool:
            doc = state()
            actions = [e["action"] for e in doc["reformations"]]  # type: ignore[attr-defined]
            serving = [
                i
                for i in doc["instances"].values()  # type: ignore[attr-defined]
                if i["CpuRingInstance"]["status"] in ("ready", "running")
            ]
            return actions == ["replaced", "restored"] and len(serving) == 1 and len(doc["instances"]) == 1  # type: ignore[arg-type]

        assert wait_for(settled, timeout=60), state()
    finally:
        os.kill(cluster3.pid("node2"), signal.SIGCONT)
        server.stop()
