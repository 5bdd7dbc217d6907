"""Real worker processes on 127.0.0.11-14: pipelines of 1-4 stages against the single process,
the state document, delete, the CLI against a running cluster, and malformed input."""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import zmq

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import instances_of
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.messages import Ping, StatusRequest
from exoctl.wire.sampling_params import SamplingParams
from tests.cluster_helpers import (
    WorkerCluster,
    exoctl,
    header,
    load_header,
    raw_socket,
    sigint_default,
    tiny_cluster,
    wait_for,
)
from tests.tiny_models import corrupt_copy

PROMPT = "The capital of France is"
MAX_TOKENS = 12
KINDS = ["llama", "llama-tied", "qwen2", "mixtral", "smollm2"]


@pytest.fixture(scope="module")
def cluster4(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "cluster4", 4, tiny_models) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def references(tiny_models: dict[str, Path], smollm2_folder: Path) -> dict[str, list[int]]:
    """Greedy tokens of each model in this process: the engine, whole, float32."""
    from exoctl.engine.generate import generate_in_process
    from exoctl.engine.model import load_model
    from exoctl.engine.tokenizer import Tokenizer

    folders = {**tiny_models, "smollm2": smollm2_folder}
    out = {}
    for kind, folder in folders.items():
        tokenizer = Tokenizer(folder)
        ids = tokenizer.encode(PROMPT)
        params = SamplingParams(max_tokens=MAX_TOKENS)
        out[kind] = generate_in_process(load_model(folder), tokenizer, ids, params).token_ids
    return out


def model_ref(kind: str, tiny_models: dict[str, Path]) -> str:
    return DEFAULT_MODEL_ID if kind == "smollm2" else str(tiny_models[kind])


def place(client: Cluster, model: str, nodes: int, dtype: str = "float32", sharding: str = "pipeline") -> str:
    card, ref = resolve_card(model)
    placement = client.plan(card, PlacementRequest(dtype=dtype, nodes=nodes), client.statuses(), sharding)
    assert placement.sharding == sharding
    return client.load(card, ref, placement).instance_id


def generate(client: Cluster, instance_id: str, prompt: str = PROMPT, **params: Any) -> dict[str, Any]:
    view = instances_of(client.statuses())[instance_id]
    generation = client.generate(view, SamplingParams(**{"max_tokens": MAX_TOKENS, **params}), prompt=prompt)
    text = "".join(generation)
    assert generation.result is not None
    assert generation.result.text == text
    return generation.result.to_wire()  # the shape `exoctl run --json` prints


@pytest.mark.parametrize("nodes", [1, 2, 3, 4])
@pytest.mark.parametrize("kind", KINDS)
def test_pipeline_gives_the_single_process_tokens(
    cluster4: WorkerCluster,
    tiny_models: dict[str, Path],
    references: dict[str, list[int]],
    kind: str,
    nodes: int,
) -> None:
    with cluster4.client() as client:
        instance_id = place(client, model_ref(kind, tiny_models), nodes)
        try:
            result = generate(client, instance_id)
            assert result["token_ids"] == references[kind]
            assert result["usage"]["completion_tokens"] == len(references[kind])
            # the state document shows the split: `nodes` runners covering [0, n) in order
            from exoctl.cluster.state import state_document

            doc = state_document(client.statuses(), "test")
            assignments = doc["instances"][instance_id]["CpuRingInstance"]["shardAssignments"]
            assert len(assignments["nodeToRunner"]) == nodes
            shards = sorted(
                (s["PipelineShardMetadata"] for s in assignments["runnerToShard"].values()),
                key=lambda s: s["deviceRank"],
            )
            assert shards[0]["startLayer"] == 0 and shards[-1]["endLayer"] == shards[0]["nLayers"]
            assert all(a["endLayer"] == b["startLayer"] for a, b in itertools.pairwise(shards))
            assert [s["worldSize"] for s in shards] == [nodes] * nodes
        finally:
            client.unload(instance_id)


def test_smollm2_answers_paris_across_four_workers(cluster4: WorkerCluster) -> None:
    with cluster4.client() as client:
        instance_id = place(client, DEFAULT_MODEL_ID, 4)
        try:
            view = instances_of(client.statuses())[instance_id]
            messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
            generation = client.generate(view, SamplingParams(max_tokens=20), messages=messages)
            assert "Paris" in "".join(generation)
            assert generation.result is not None and generation.result.finish_reason == "stop"
        finally:
            client.unload(instance_id)


def test_delete_frees_the_runners_memory(cluster4: WorkerCluster) -> None:
    with cluster4.client() as client:

        def rss() -> dict[str, int]:
            return {s.node.name: s.profile.rss for s in client.statuses() if s.profile}

        before = rss()
        instance_id = place(client, DEFAULT_MODEL_ID, 2)
        loaded = rss()
        runners = instances_of(client.statuses())[instance_id].runners
        held = {node: r.memory_bytes for node, r in runners.items()}
        assert all(held[n] > 100e6 for n in held)  # about 326 MB of float32 weights each
        for node in held:
            assert loaded[node] - before[node] > 0.6 * held[node]
        result = cluster4.cli_json("delete", instance_id[:8])
        assert set(result["deleted"][0]["freed_bytes"]) == set(held)
        # the memory goes back to the OS: RSS falls by most of what the runner held
        assert wait_for(lambda: all(loaded[n] - rss()[n] > 0.6 * held[n] for n in held), timeout=10)
        assert instance_id not in instances_of(client.statuses())


def test_cli_place_run_state_delete(cluster4: WorkerCluster) -> None:
    # no --dtype: the embedded default is a Q4_1 GGUF, which `auto` runs in int4
    placed = cluster4.cli_json("place", DEFAULT_MODEL_ID, "--nodes", "2")
    try:
        # the four workers share this machine: equal parts of its memory, taken in inventory order
        assert placed["model_id"] == DEFAULT_MODEL_ID and placed["dtype"] == "int4"
        assert [s["node"] for s in placed["shards"]] == ["node1", "node2"]
        answer = cluster4.cli_json(
            "run", "What is the capital of France? Answer in one sentence.", "--max-tokens", "16"
        )
        assert "Paris" in answer["text"] and answer["usage"]["prompt_tokens"] > 5
        state = cluster4.cli_json("state")
        # the test plan's jq line: .instances | .[] | .CpuRingInstance.shardAssignments.nodeToRunner
        node_to_runner = [
            i["CpuRingInstance"]["shardAssignments"]["nodeToRunner"] for i in state["instances"].values()
        ]
        assert [sorted(n) for n in node_to_runner] == [["node1", "node2"]]
        assert set(state["nodeMemory"]) == {"node1", "node2", "node3", "node4"}
        assert all(m["ramTotal"]["inBytes"] > 0 for m in state["nodeMemory"].values())
        runner_states = {next(iter(r)) for r in state["runners"].values()}
        assert runner_states == {"RunnerReady"}
        nodes = cluster4.cli_json("nodes")
        assert [n["status"] for n in nodes] == ["up"] * 4
        table = cluster4.cli("state")
        assert table.returncode == 0 and "smollm2-135m-cpu" in table.stdout and "[0, 15)" in table.stdout
    finally:
        deleted = cluster4.cli_json("delete", DEFAULT_MODEL_ID)
    assert deleted["deleted"][0]["model_id"] == DEFAULT_MODEL_ID


def test_a_gguf_file_runs_across_a_two_worker_pipeline(
    cluster4: WorkerCluster,
    references: dict[str, list[int]],
    tiny_models: dict[str, Path],
    smollm2_gguf: Path,
) -> None:
    """The tiny Llama written as an F32 GGUF (with SmolLM2's tokenizer) into the nodes' model_dir:
    the same weights, so the same greedy tokens as the safetensors folder in one process."""
    from tests.gguf_models import all_as, write_gguf

    gguf = write_gguf(
        tiny_models["llama"],
        tiny_models["llama"].parent / "llama-F32.gguf",
        all_as("F32"),
        tokenizer_from=smollm2_gguf,
    )
    placed = cluster4.cli_json(
        "place", str(gguf), "--nodes", "2", "--dtype", "float32", "--sharding", "pipeline"
    )
    try:
        assert placed["model_id"] == "llama-F32" and [s["end_layer"] for s in placed["shards"]] == [2, 4]
        with cluster4.client() as client:
            result = generate(client, placed["instance_id"])
        assert result["token_ids"] == references["llama"]
    finally:
        cluster4.cli("delete", "llama-F32")


def test_run_places_the_model_first_and_says_so(cluster4: WorkerCluster) -> None:
    result = cluster4.cli("run", "--raw", "--max-tokens", "4", "--dtype", "float32", PROMPT)
    try:
        assert result.returncode == 0, result.stderr
        assert "is not placed: placing it with the defaults" in result.stderr
        assert "Paris" in result.stdout
    finally:
        cluster4.cli("delete", DEFAULT_MODEL_ID)


def test_two_requests_at_once_get_their_own_answers(
    cluster4: WorkerCluster, references: dict[str, list[int]], tiny_models: dict[str, Path]
) -> None:
    with cluster4.client() as client:
        instance_id = place(client, model_ref("llama", tiny_models), 2)
        try:
            view = instances_of(client.statuses())[instance_id]
            other = Cluster(client.inventory, client.keys)
            try:
                first = client.generate(view, SamplingParams(max_tokens=MAX_TOKENS), prompt=PROMPT)
                second = other.generate(view, SamplingParams(max_tokens=MAX_TOKENS), prompt=PROMPT)
                list(first), list(second)
            finally:
                other.close()
            assert first.result and second.result
            assert first.result.token_ids == second.result.token_ids == references["llama"]
        finally:
            client.unload(instance_id)


# --- bad input -------------------------------------------------------------------------------


ONE_HIDDEN = {"dtype": "float32", "shape": [1, 1, 4]}  # one position of a 4-wide hidden state
BAD_MESSAGES = [
    ([b"\xc1\xff not msgpack"], "not valid msgpack"),
    ([msgpack.packb([1, 2, 3])], "must be a msgpack map"),
    ([msgpack.packb({"v": 99, "type": "ping", "id": 7})], "protocol version 99"),
    ([header("launch_missiles")], "unknown message type 'launch_missiles'"),
    ([header("unload")], "missing field 'instance_id'"),
    ([header("unload", instance_id=5)], "'instance_id' must be str"),
    (
        [
            header(
                "forward",
                instance_id="x",
                seqs=["s"],
                positions=[0],
                tensors=[{"dtype": "float32", "shape": [1, 1, 64]}],
            ),
            b"\0" * 10,
        ],
        "needs 256 bytes but the frame has 10",
    ),
    (
        [
            header(
                "forward",
                instance_id="x",
                seqs=["s"],
                positions=[0],
                tensors=[{"dtype": "complex64", "shape": [1]}],
            ),
            b"\0" * 8,
        ],
        "dtype 'complex64' is not one of",
    ),
    (
        [header("forward", instance_id="x", seqs=["s"], positions=[0]), b"extra"],
        "describes 0 tensors but 1 frames",
    ),
    (
        [
            header("forward", instance_id="nope", seqs=["s"], positions=[0], tensors=[ONE_HIDDEN]),
            b"\0" * 16,
        ],
        "holds no runner of instance nope",
    ),
    ([header("pong", profile={})], "does not accept 'pong'"),
    ([load_header()], "loads models only from"),
    ([header("tp_hello", instance_id="i", rank="0", address="127.0.0.11:1")], "'rank' must be int"),
    ([load_header(sharding="tensor", n_layers=2)], "a tensor-parallel rank holds every layer"),
]


def test_malformed_messages_get_an_error_and_the_worker_keeps_serving(cluster4: WorkerCluster) -> None:
    ctx, sock = raw_socket(cluster4)
    try:
        for frames, expected in BAD_MESSAGES:
            sock.send_multipart(frames)
            assert sock.poll(5000), f"no reply to a message expecting {expected!r}"
            reply = msgpack.unpackb(sock.recv_multipart()[0])
            assert reply["type"] == "error", reply
            assert expected in reply["message"], (expected, reply["message"])
        sock.send_multipart([header("ping")])
        assert sock.poll(5000)
        assert msgpack.unpackb(sock.recv_multipart()[0])["type"] == "pong"
    finally:
        ctx.destroy(linger=0)


def test_a_client_without_the_cluster_key_is_refused(cluster4: WorkerCluster) -> None:
    from exoctl.inventory import load_inventory_file
    from exoctl.keys import ClusterKeys
    from exoctl.transport import NodeError

    inventory = load_inventory_file(cluster4.inventory)
    stranger = ClusterKeys(*zmq.curve_keypair(), folder=Path("/nonexistent"))
    with Cluster(inventory, stranger, timeout=2.0) as client:
        with pytest.raises(NodeError, match=r"node node2 .* refused this client"):
            client.client("node2").request(Ping())
    with Cluster(inventory, None, timeout=2.0) as client:  # no CurveZMQ at all
        with pytest.raises(NodeError, match="node node1 "):
            client.client("node1").request(StatusRequest())
    result = cluster4.cli("nodes", env={"EXOCTL_HOME": str(cluster4.work_dir / "home-without-keys")})
    assert result.returncode == 1 and "down" in result.stdout
    # with another key, `run` says what is wrong: the key, not workers to start
    other = {"EXOCTL_HOME": str(cluster4.work_dir / "home-with-another-key")}
    assert exoctl("keys", "init", env=other).returncode == 0
    result = cluster4.cli("run", "hi", env=other)
    assert result.returncode == 1 and "refused this machine's cluster key" in result.stderr, result.stderr
    assert "exoctl up`" not in result.stderr.splitlines()[0]
    # the workers kept serving the cluster's own clients
    assert [n["status"] for n in cluster4.cli_json("nodes")] == ["up"] * 4


def test_up_twice_reuses_the_running_workers(cluster4: WorkerCluster) -> None:
    result = cluster4.cli("up", "--json")
    assert result.returncode == 0, result.stderr
    entries = json.loads(result.stdout)["nodes"]
    assert [e["result"] for e in entries] == ["running"] * 4
    assert all(e["reason"] == "already running (reused)" for e in entries)


def test_run_cli_variants(cluster4: WorkerCluster, tiny_models: dict[str, Path]) -> None:
    placed = cluster4.cli_json("place", DEFAULT_MODEL_ID, "--nodes", "3", "--dtype", "float32")
    try:
        raw = cluster4.cli("run", "--raw", "--max-tokens", "6", "--json", stdin=PROMPT)
        assert raw.returncode == 0, raw.stderr
        doc = json.loads(raw.stdout)
        assert doc["text"].strip().startswith("Paris")
        assert doc["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 6,
            "prompt_tokens_details": {
                "cached_tokens": doc["usage"]["prompt_tokens_details"]["cached_tokens"]
            },
        }
        assert len(doc["token_ids"]) == 6 and doc["finish_reason"] == "length"
        assert set(doc["timings"]) == {"time_to_first_token_s", "total_s", "decode_tokens_per_s"}
        streamed = cluster4.cli("run", "What is the capital of France?")
        assert streamed.returncode == 0 and "Paris" in streamed.stdout
        assert "tok/s" in streamed.stderr and "node1, node2, node3" in streamed.stderr
        stopped = cluster4.cli("run", "--raw", "--stop", " Paris", "--json", PROMPT)
        assert (
            json.loads(stopped.stdout)["text"] == "" and json.loads(stopped.stdout)["finish_reason"] == "stop"
        )
        folder = cluster4.cli("run", "--raw", "-n", "3", "--json", "-m", str(tiny_models["mixtral"]), "hello")
        assert folder.returncode == 0, folder.stderr
        assert json.loads(folder.stdout)["usage"]["completion_tokens"] == 3
        assert "placing it with the defaults" in folder.stderr
    finally:
        cluster4.cli("delete", placed["instance_id"])
        cluster4.cli("delete", "mixtral")
    assert cluster4.cli_json("state")["instances"] == {}


def test_chat_repl(cluster4: WorkerCluster) -> None:
    script = "What is the capital of France?\n/stats\nAnd of Italy?\n/stats\n/reset\n/help\n/quit\n"
    result = cluster4.cli("chat", "--dtype", "float32", "-n", "24", stdin=script)
    try:
        assert result.returncode == 0, result.stderr
        assert "Paris" in result.stdout and "Rome" in result.stdout  # history kept across turns
        assert "tok/s, first token after" in result.stderr
        # the second turn reads the first from the instance's cached prefix
        first, second = re.findall(r"prompt (\d+) tokens \((\d+) cached\)", result.stderr)
        assert int(first[1]) == 0 and int(first[0]) < int(second[1]) < int(second[0])
        assert "conversation forgotten" in result.stderr and "/reset" in result.stderr
    finally:
        cluster4.cli("delete", DEFAULT_MODEL_ID)


def test_chat_ctrl_c_stops_the_answer_not_the_repl(cluster4: WorkerCluster) -> None:
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time

    cluster4.cli_json("place", DEFAULT_MODEL_ID, "--nodes", "2", "--dtype", "float32")
    proc = subprocess.Popen(
        [sys.executable, "-m", "exoctl", "chat", "-n", "400", "-i", str(cluster4.inventory)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=sigint_default,
    )
    out: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        while char := proc.stdout.read(1):
            out.append(char)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.stdin is not None
        proc.stdin.write("Count from 1 to 500, separated by commas.\n")
        proc.stdin.flush()
        assert wait_for(lambda: "".join(out).count("\n") >= 5, timeout=60)
        proc.send_signal(signal.SIGINT)
        time.sleep(1.0)
        proc.stdin.write("/stats\n/quit\n")
        proc.stdin.flush()
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "(stopped)" in err and "last answer:" in err
        assert "".join(out).count("\n") < 100
    finally:
        proc.kill()
        cluster4.cli("delete", DEFAULT_MODEL_ID)


def streaming_run(cluster: WorkerCluster, max_tokens: int) -> subprocess.Popen[str]:
    """`exoctl run` of a long answer (SmolLM2 goes on counting), already streaming."""
    command = [sys.executable, "-m", "exoctl", "run", "--raw", "-n", str(max_tokens)]
    proc = subprocess.Popen(
        [*command, "-i", str(cluster.inventory), "1, 2, 3, 4, 5, 6, 7, 8,"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=sigint_default,
    )
    assert proc.stdout is not None and proc.stdout.read(20)  # it is streaming
    return proc


def generating(cluster: WorkerCluster) -> int:
    """Sequences the cluster's runners hold."""
    with cluster.client() as client:
        return sum(r.active_sequences for s in client.statuses() for r in s.runners)


def test_ctrl_c_in_run_stops_the_workers_too(cluster4: WorkerCluster) -> None:
    instance_id = cluster4.cli_json("place", DEFAULT_MODEL_ID, "--nodes", "2", "--dtype", "float32")[
        "instance_id"
    ]
    proc = streaming_run(cluster4, 1000)
    try:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert proc.returncode != 0
        assert wait_for(lambda: generating(cluster4) == 0, timeout=3)  # not 1000 tokens later
    finally:
        proc.kill()
        cluster4.cli("delete", instance_id)


def test_a_client_killed_without_a_word_stops_its_generation(cluster4: WorkerCluster) -> None:
    """`exoctl run` SIGKILLed mid-answer says nothing to the head: its silence cancels the request
    (within CLIENT_SILENT_S), not 5,000 tokens later."""
    from exoctl.worker.running_requests import CLIENT_SILENT_S

    instance_id = cluster4.cli_json("place", DEFAULT_MODEL_ID, "--nodes", "2", "--dtype", "float32")[
        "instance_id"
    ]
    proc = streaming_run(cluster4, 5000)
    try:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
        killed = time.monotonic()
        assert generating(cluster4) > 0  # the head does not know yet
        assert wait_for(lambda: generating(cluster4) == 0, timeout=CLIENT_SILENT_S + 6)
        assert time.monotonic() - killed >= CLIENT_SILENT_S - 2  # ended by the silence, not by itself
        assert "its client said nothing" in cluster4.log("node1")
    finally:
        proc.kill()
        cluster4.cli("delete", instance_id)


def test_a_worker_busy_decoding_answers_status_at_once(cluster4: WorkerCluster) -> None:
    import time

    with cluster4.client() as client:
        instance_id = place(client, DEFAULT_MODEL_ID, 1)
        try:
            view = instances_of(client.statuses())[instance_id]
            generation = client.generate(
                view, SamplingParams(max_tokens=60), prompt="1, 2, 3, 4, 5, 6, 7, 8,"
            )
            waits = []
            with Cluster(client.inventory, client.keys) as other:
                for count, _ in enumerate(generation):
                    if count % 5 == 2:
                        began = time.monotonic()
                        other.client("node1").request(StatusRequest())
                        waits.append(time.monotonic() - began)
            assert len(waits) >= 5
            # one decode step of SmolLM2 here is 40-60 ms; a status queued behind compute would wait
            # for the whole generation (seconds)
            assert max(waits) < 0.5, waits
        finally:
            client.unload(instance_id)


def test_a_failed_load_says_why_and_frees_what_was_loaded(
    cluster4: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    broken, index = corrupt_copy(tiny_models["llama"], "llama-broken-head", "lm_head.weight")
    # only the last stage reads the broken file
    head_file = index["lm_head.weight"]
    assert not any(name.startswith("model.layers.0.") for name, f in index.items() if f == head_file)
    result = cluster4.cli(
        "place", str(broken), "--nodes", "2", "--sharding", "pipeline", "--dtype", "float32"
    )
    assert result.returncode == 1
    assert "error: loading failed: node node2:" in result.stderr and "Traceback" not in result.stderr
    assert cluster4.cli_json("state")["instances"] == {}  # node1's finished stage was unloaded too


def test_a_folder_outside_the_model_directories_is_refused(
    cluster4: WorkerCluster, tmp_path: Path, tiny_models: dict[str, Path]
) -> None:
    import shutil

    outside = tmp_path / "elsewhere" / "llama"
    shutil.copytree(tiny_models["llama"], outside)
    result = cluster4.cli("place", str(outside), "--nodes", "1")
    assert result.returncode == 1
    assert result.stderr.startswith("error: node node1 loads models only from")
    assert "is outside them" in result.stderr and "model_dir" in result.stderr


def test_state_watch_refreshes_until_ctrl_c(cluster4: WorkerCluster) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "exoctl", "state", "--watch", "-i", str(cluster4.inventory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=sigint_default,
    )
    try:
        time.sleep(4)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "node4" in out and "Traceback" not in err


def test_bench_measures_prefill_decode_and_concurrency_with_their_spread(cluster4: WorkerCluster) -> None:
    cluster4.cli("delete", DEFAULT_MODEL_ID)  # so bench places it itself, on the nodes asked
    args = ("-p", "16,64", "-n", "16", "-c", "1,4", "-r", "2", "-t", "3", "--turn-tokens", "40")
    args += ("--nodes", "2", "--sharding", "pipeline", "--draft", "ngram")
    result = cluster4.cli_json("bench", DEFAULT_MODEL_ID, *args)
    assert (
        result["placed_by_bench"]
        and result["sharding"] == "pipeline"
        and len(result["nodes_in_instance"]) == 2
    )
    short, long = result["prefill"]
    assert 16 <= short["prompt_tokens"] < long["prompt_tokens"] <= 66
    for run in (short, long):
        assert len(run["tokens_per_s"]["values"]) == 2 and run["tokens_per_s"]["mean"] > 0
        assert run["tokens_per_s"]["sd"] >= 0
    assert long["ttft_ms"]["mean"] > short["ttft_ms"]["mean"]  # four times the prompt takes longer
    decode = result["decode"]
    assert decode["tokens_per_s"]["mean"] > 0 and 0 < decode["ttft_ms"]["mean"] < decode["total_ms"]["mean"]
    one, four = result["concurrency"]
    assert (one["streams"], four["streams"]) == (1, 4)
    # batched decoding: four streams at once make more tokens per second than one
    assert four["aggregate_tokens_per_s"]["mean"] >= one["aggregate_tokens_per_s"]["mean"] > 0
    assert 0 < four["latency_ms"]["p50"] <= four["latency_ms"]["p95"]
    # a conversation of 3 turns, each about 40 tokens more: with cached prefixes each turn after the
    # first reads only what is new (the history re-read in full is the other column)
    conversation = result["multi_turn"]
    turns = conversation["turns"]
    assert [t["turn"] for t in turns] == [1, 2, 3] and conversation["turn_tokens"] == 40
    assert turns[0]["prompt_tokens"] < turns[1]["prompt_tokens"] < turns[2]["prompt_tokens"]
    for earlier, turn in itertools.pairwise(turns):
        # all of the previous turn's prompt at least, less what the answer re-tokenizes differently
        assert turn["cached_tokens"] >= earlier["prompt_tokens"] - 2
    for turn in turns:
        for column in ("ttft_ms_cached", "ttft_ms_uncached"):
            assert len(turn[column]["values"]) == 2 and turn[column]["mean"] > 0
    assert set(conversation["last_over_first"]) == {"cached", "uncached"}
    # placed with prompt lookup: decode with and without it, on a prompt that copies and one that does not
    speculation = result["speculation"]
    assert speculation["drafter"] == "ngram"
    copy, free = speculation["prompts"]
    assert (copy["prompt"], free["prompt"]) == ("copy", "free")
    for row in (copy, free):
        assert len(row["tokens_per_s_speculative"]["values"]) == 2 and row["tokens_per_s_plain"]["mean"] > 0
    assert copy["acceptance"] > 0 and copy["tokens_per_pass"] > 1
    assert sorted(result["nodes"]) == sorted(result["nodes_in_instance"])
    for entry in result["nodes"].values():
        assert entry["compute_ms_per_token"] > 0 and entry["transport_ms_per_token"] >= 0
        assert entry["memory_bytes"] > 0 and entry["worker_rss_bytes"] > entry["memory_bytes"]
    # what bench placed, it unloaded
    assert result["instance_id"] not in cluster4.cli_json("state")["instances"]
    table = cluster4.cli("bench", DEFAULT_MODEL_ID, "-p", "16", "-n", "8", "-c", "2", "-r", "1", "-t", "2")
    assert table.returncode == 0, table.stderr
    assert "prefill pp" in table.stdout and "aggregate" in table.stdout and "compute ms/token" in table.stdout
    assert "time to first token by turn" in table.stdout and "with cached prefixes" in table.stdout
