"""`exoctl serve` on loopback over two real workers: the test plan's curl commands, the official
OpenAI client, eight concurrent streams, the EXO endpoints, bad requests and the API key."""

from __future__ import annotations

import json
import re
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from exoctl.models.catalog import DEFAULT_MODEL_ID
from tests.cluster_helpers import (
    Server,
    WorkerCluster,
    exoctl,
    http,
    tiny_cluster,
    wait_for,
)

SMOLLM2_REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def cluster2(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "api", 2, tiny_models) as cluster:
        yield cluster


@pytest.fixture(scope="module")
def server(cluster2: WorkerCluster) -> Iterator[Server]:
    server = Server(cluster2)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def placed(server: Server) -> str:
    """SmolLM2 over both workers in float32 (greedy answers are compared with each other)."""
    status, body = http(
        server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "min_nodes": 2, "dtype": "float32"}
    )
    assert status == 200, body
    return str(body["instance_id"])


@pytest.fixture
def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=300)


def shell(command: str) -> str:
    done = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_the_test_plans_curl_commands(server: Server, cluster2: WorkerCluster) -> None:
    base = f"http://localhost:{server.port}"
    models = shell(
        f"curl -s {base}/v1/models | "
        "jq '.data[] | select(.tags[] | contains(\"cpu\")) | {id, name, storage_size_megabytes}'"
    )
    assert '"id": "smollm2-135m-cpu"' in models and '"id": "llama-3.1-70b-cpu"' in models
    assert "cuda" not in models
    placed = json.loads(
        shell(
            f"curl -s -X POST {base}/place_instance -H 'Content-Type: application/json' -d '{{"
            '"model_id": "smollm2-135m-cpu", "sharding": "Pipeline", '
            '"instance_meta": "CpuRing", "min_nodes": 2}\''
        )
    )
    try:
        assert placed["status"] == "ready" and [s["node"] for s in placed["shards"]] == ["node1", "node2"]
        node_to_runner = shell(
            f"curl -s {base}/state | jq '.instances | .[] | .CpuRingInstance.shardAssignments.nodeToRunner'"
        )
        assert sorted(json.loads(node_to_runner)) == ["node1", "node2"]
        answer = json.loads(
            shell(
                f"curl -s -X POST {base}/v1/chat/completions -H 'Content-Type: application/json' -d '{{"
                f'"model": "{SMOLLM2_REPO}", '
                '"messages": [{"role": "user", "content": "Explain distributed inference"}], '
                '"stream": false}\''
            )
        )
        # the model named as the request named it (OpenAI echoes it)
        assert answer["object"] == "chat.completion" and answer["model"] == SMOLLM2_REPO
        assert len(answer["choices"][0]["message"]["content"]) > 20
        assert answer["usage"]["completion_tokens"] > 5
        assert answer["choices"][0]["finish_reason"] in ("stop", "length")
        # no temperature and no max_tokens: the model declares no sampling, so it is answered
        # greedily (the same text twice) within the default budget, not 1,024 tokens at temperature 1.
        # The repeat reads its prompt whole: reusing the first's cached prefix would run its last
        # position alone, through int4's one-row kernel, and a long answer can part at a near-tie.
        from exoctl.wire.sampling_params import DEFAULT_MAX_TOKENS

        assert answer["usage"]["completion_tokens"] <= DEFAULT_MAX_TOKENS
        again = http(
            server,
            "POST",
            "/v1/chat/completions",
            {
                "model": SMOLLM2_REPO,
                "messages": [{"role": "user", "content": "Explain distributed inference"}],
                "cache_prompt": False,
            },
        )[1]
        assert again["choices"][0]["message"]["content"] == answer["choices"][0]["message"]["content"]
    finally:
        status, _ = http(server, "DELETE", f"/instance/{placed['instance_id']}")
        assert status == 200


def test_a_request_that_leaves_sampling_out_gets_the_models_own_defaults(
    server: Server, cluster2: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    """A model folder whose generation_config.json declares sampling and a 5-token budget: the API
    and the CLI apply them where the request is silent, and what a request sets wins."""
    import shutil

    folder = next(iter(tiny_models.values())).parent / "llama-with-defaults"
    if not folder.exists():
        shutil.copytree(tiny_models["llama"], folder)
        config = {"do_sample": True, "temperature": 0.7, "top_k": 5, "max_new_tokens": 5}
        (folder / "generation_config.json").write_text(json.dumps(config))
    status, body = http(server, "POST", "/place_instance", {"model_id": str(folder), "dtype": "float32"})
    assert status == 200, body
    try:
        chat = {"model": str(folder), "messages": [{"role": "user", "content": "hi"}], "seed": 1}
        for asked, expected in (({}, 5), ({"max_tokens": 3}, 3), ({"max_completion_tokens": 8}, 8)):
            status, answer = http(server, "POST", "/v1/chat/completions", {**chat, **asked})
            assert status == 200, answer
            if answer["choices"][0]["finish_reason"] == "length":  # a random model may end sooner
                assert answer["usage"]["completion_tokens"] == expected, asked
            else:
                assert answer["usage"]["completion_tokens"] < expected
        run = cluster2.cli("run", "--json", "-m", str(folder), "--seed", "1", "hi")
        assert run.returncode == 0, run.stderr
        done = json.loads(run.stdout)
        used = done["usage"]["completion_tokens"]
        assert used == 5 if done["finish_reason"] == "length" else used < 5
    finally:
        http(server, "DELETE", f"/instance/{body['instance_id']}")


def test_openai_client_chat_and_stream(client: openai.OpenAI, placed: str) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=messages, temperature=0, max_tokens=24
    )
    assert "Paris" in (whole.choices[0].message.content or "")
    assert whole.choices[0].finish_reason == "stop" and whole.usage is not None
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
    stream = client.chat.completions.create(
        model=SMOLLM2_REPO,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, finish, usage = [], None, None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert "".join(parts) == whole.choices[0].message.content
    assert finish == "stop" and usage is not None and usage.completion_tokens == whole.usage.completion_tokens
    short = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=messages, temperature=0, max_completion_tokens=2
    )
    assert short.choices[0].finish_reason == "length" and short.usage and short.usage.completion_tokens == 2
    stopped = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=messages, temperature=0, stop=["Paris"], max_tokens=24
    )
    assert "Paris" not in (stopped.choices[0].message.content or "x Paris")


def test_cached_tokens_in_usage_through_the_openai_client(
    client: openai.OpenAI, server: Server, placed: str
) -> None:
    """A conversation's second turn reads its first from the instance's cached prefix: OpenAI's
    usage.prompt_tokens_details.cached_tokens says how much, streamed and not; `cache_prompt: false`
    (llama.cpp's name) reads it all again, to the same answer."""
    history = [{"role": "user", "content": "Name a large animal that lives in the sea."}]
    first = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=history, temperature=0, max_tokens=16
    )
    assert first.usage is not None and first.usage.prompt_tokens_details is not None
    history += [
        {"role": "assistant", "content": first.choices[0].message.content or ""},
        {"role": "user", "content": "And a small one?"},
    ]
    whole = client.chat.completions.create(
        model=DEFAULT_MODEL_ID, messages=history, temperature=0, max_tokens=16
    )
    usage = whole.usage
    assert usage is not None and usage.prompt_tokens_details is not None
    cached = usage.prompt_tokens_details.cached_tokens or 0
    assert first.usage.prompt_tokens <= cached < usage.prompt_tokens  # the whole first turn, at least
    stream = client.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=history,
        temperature=0,
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, streamed = [], None
    for chunk in stream:
        if chunk.choices:
            parts.append(chunk.choices[0].delta.content or "")
        streamed = chunk.usage or streamed
    assert streamed is not None and streamed.prompt_tokens_details is not None
    assert streamed.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1  # all but the last
    plain = client.chat.completions.create(
        model=DEFAULT_MODEL_ID,
        messages=history,
        temperature=0,
        max_tokens=16,
        extra_body={"cache_prompt": False},
    )
    assert plain.usage is not None and plain.usage.prompt_tokens_details is not None
    assert plain.usage.prompt_tokens_details.cached_tokens == 0
    assert plain.choices[0].message.content == whole.choices[0].message.content == "".join(parts)
    status, text = http(server, "GET", "/metrics")
    assert status == 200
    counted = re.search(rf'exoctl_cached_prompt_tokens_total{{model="{DEFAULT_MODEL_ID}"}} (\d+)', text)
    assert counted is not None and int(counted.group(1)) >= cached + usage.prompt_tokens - 1
    for line in (
        "exoctl_prefix_cache_hits_total{",
        "exoctl_prefix_cache_bytes{",
        "exoctl_prefix_cache_lookups_total{",
    ):
        assert line in text, line


def test_eight_concurrent_streams_get_their_own_answers(client: openai.OpenAI, placed: str) -> None:
    prompts = [
        "What is the capital of France?",
        "Name three colours.",
        "What is 2 + 2?",
        "Who wrote Hamlet?",
        "Write a haiku about the sea.",
        "What is the largest planet?",
        "List three fruits.",
        "Say hello in Spanish.",
    ]

    def ask(prompt: str, stream: bool) -> str:
        messages = [{"role": "user", "content": prompt}]
        if not stream:
            reply = client.chat.completions.create(
                model=DEFAULT_MODEL_ID, messages=messages, temperature=0, max_tokens=24
            )
            return reply.choices[0].message.content or ""
        chunks = client.chat.completions.create(
            model=DEFAULT_MODEL_ID, messages=messages, temperature=0, max_tokens=24, stream=True
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    alone = [ask(p, stream=False) for p in prompts]
    assert len(set(alone)) == len(prompts)  # all different, so a mixed-up answer would show
    together: list[str | None] = [None] * len(prompts)

    def run(index: int) -> None:
        together[index] = ask(prompts[index], stream=True)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert together == alone


def test_errors_come_as_the_clients_own_exceptions(client: openai.OpenAI, placed: str) -> None:
    ok = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with pytest.raises(openai.NotFoundError, match=r"\(llama-3.1-8b-cpu\) is not placed.*place_instance"):
        client.chat.completions.create(**{**ok, "model": "meta-llama/Llama-3.1-8B-Instruct"})
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": []}, "messages: List should have at least 1 item"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "  "}]}, "message 0 (user) has no content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"temperature": "hot"}, "temperature: Input should be a valid number"),
        ({"max_tokens": 0}, "max_tokens: Input should be greater than or equal to 1"),
        ({"messages": [{"role": "user", "content": "hi " * 9000}]}, "but the model's context holds 8192"),
    ]
    for change, message in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(**{**ok, **change})
        assert message in str(caught.value.body), (change, caught.value.body)
        assert caught.value.body is not None


def test_bad_requests_get_400_and_the_server_keeps_serving(server: Server, placed: str) -> None:
    status, body = http(server, "POST", "/v1/chat/completions", raw=b"{not json")
    assert status == 400 and body["error"]["message"] == "the request body is not valid JSON"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    status, body = http(server, "POST", "/v1/chat/completions", raw=b"[1, 2]")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"
    status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "min_nodes": "2"})
    assert status == 400 and body["error"]["param"] == "min_nodes"
    status, body = http(server, "GET", "/nowhere")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    status, body = http(server, "GET", "/healthz")
    assert status == 200 and body["nodes_up"] == 2


def test_placement_errors_answer_at_once_with_the_numbers(server: Server) -> None:
    status, body = http(
        server, "POST", "/place_instance", {"model_id": "llama-3.1-70b-cpu", "dtype": "float32"}
    )
    assert status == 409 and "needs 282.2 GB in float32" in body["error"]["message"]
    status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "min_nodes": 3})
    assert status == 409 and "asked for 3 nodes but only 2 of 2 are live" in body["error"]["message"]
    status, body = http(server, "POST", "/place_instance", {"model_id": "gpt-5"})
    assert status == 404 and "unknown model 'gpt-5'" in body["error"]["message"]
    status, body = http(
        server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "sharding": "Tensor", "nodes": 2}
    )
    assert status == 409 and body["error"]["message"].startswith(
        "smollm2-135m-cpu cannot be tensor-split over 2 nodes: its 9 heads, 3 KV heads must each divide "
        "by the node count (use 1 node, or --sharding pipeline)"
    )
    status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "sharding": "Ring"})
    assert status == 400 and body["error"]["message"].startswith("unknown sharding 'Ring' (use one of auto,")


def test_previews_instances_state_and_metrics(server: Server, placed: str) -> None:
    status, body = http(server, "GET", f"/instance/previews?model_id={SMOLLM2_REPO}")
    assert status == 200 and body["model_id"] == DEFAULT_MODEL_ID and body["live_nodes"] == 2
    # each plan once per runtime kind: exoctl's CpuRing, and EXO's MLX kinds its dashboard offers
    assert {p["instance_meta"] for p in body["previews"]} == {"CpuRing", "MlxRing", "MlxJaccl"}
    pipeline = [
        p for p in body["previews"] if p["sharding"] == "Pipeline" and p["instance_meta"] == "CpuRing"
    ]
    assert [p["nodes"] for p in pipeline] == [1, 2] and all(p["ok"] for p in pipeline)
    assert [len(p["shards"]) for p in pipeline] == [1, 2]
    # 9 heads and 3 KV heads: a tensor split over 2 nodes is not possible, one "split" over 1 is
    tensor = {p["nodes"]: p for p in body["previews"] if p["sharding"] == "Tensor"}
    assert tensor[1]["ok"] and tensor[1]["shards"][0]["start_layer"] == 0
    assert not tensor[2]["ok"] and "must each divide by the node count" in tensor[2]["error"]
    # the embedded default is a Q4_1 GGUF: `auto` previews int4, float32 counts 4 bytes a weight;
    # an unknown dtype is the caller's error
    assert {p["dtype"] for p in body["previews"] if p["ok"]} == {"int4"}
    status, large = http(server, "GET", f"/instance/previews?model_id={SMOLLM2_REPO}&dtype=float32")
    assert status == 200 and {p["dtype"] for p in large["previews"] if p["ok"]} == {"float32"}
    one_node = [p["shards"][0]["memory_bytes"] for p in (pipeline[0], large["previews"][0])]
    # EXO's node filter
    status, mine = http(
        server, "GET", f"/instance/previews?model_id={SMOLLM2_REPO}&node_ids=node2&instance_meta=MlxRing"
    )
    assert status == 200 and mine["live_nodes"] == 1 and len(mine["previews"]) == 2
    assert mine["previews"][0]["shards"][0]["node"] == "node2"
    assert one_node[0] < one_node[1]
    status, wrong = http(server, "GET", f"/instance/previews?model_id={SMOLLM2_REPO}&dtype=int3")
    assert status == 400 and "use one of auto, float32, bfloat16, int8, int4" in wrong["error"]["message"]
    status, body = http(server, "GET", f"/instance/{placed}")
    assert (
        status == 200
        and body["CpuRingInstance"]["instanceId"] == placed
        and body["CpuRingInstance"]["shardAssignments"]["modelId"] == DEFAULT_MODEL_ID
    )
    status, body = http(
        server, "GET", f"/state/instances/{placed}/CpuRingInstance/shardAssignments/nodeToRunner"
    )
    assert status == 200 and sorted(body) == ["node1", "node2"]
    status, body = http(server, "GET", "/state/instances/nope")
    assert status == 404
    status, body = http(server, "GET", "/v1/models")
    smollm2 = next(m for m in body["data"] if m["id"] == DEFAULT_MODEL_ID)
    assert (
        smollm2["placed"] and smollm2["downloaded"] and smollm2["n_layers"] == 30 and "cpu" in smollm2["tags"]
    )
    assert smollm2["hugging_face_id"] == SMOLLM2_REPO and smollm2["object"] == "model"
    status, text = http(server, "GET", "/metrics")
    assert status == 200
    for line in (
        'exoctl_node_up{node="node1"} 1.0',
        "exoctl_node_ram_total_bytes{node=",
        f'exoctl_completion_tokens_total{{model="{DEFAULT_MODEL_ID}"}}',
        "exoctl_http_requests_total{",
        "exoctl_decode_tokens_per_second{",
        f'exoctl_runner_memory_bytes{{instance="{placed}"',
    ):
        assert line in text, line


def test_exos_endpoints_and_shapes(server: Server, placed: str, tiny_models: dict[str, Path]) -> None:
    """What EXO's dashboard and scripts read and send, against the same cluster."""
    status, models = http(server, "GET", "/models")
    assert status == 200 and models == http(server, "GET", "/v1/models")[1]
    cards = {m["id"]: m for m in models["data"]}
    smollm2 = cards[DEFAULT_MODEL_ID]
    # EXO's storage_size_megabytes is Memory.in_mb: bytes / 1024², rounded (98 362 432 B -> 94)
    assert smollm2["storage_size_bytes"] == 98362432 and smollm2["storage_size_megabytes"] == 94
    assert smollm2["context_length"] == 8192 and smollm2["family"] == "smollm"
    assert smollm2["quantization"] == "Q4_1" and smollm2["tasks"] == ["TextGeneration"]
    assert smollm2["capabilities"] == ["text"] and smollm2["base_model"].startswith("SmolLM2 135M")
    assert (
        cards["llama-3.1-8b-cpu"]["quantization"] == "bf16" and cards["llama-3.1-8b-cpu"]["family"] == "llama"
    )
    # the nodes' model directory's own models, by the name a place request takes
    local = cards[tiny_models["llama"].name]
    assert "local" in local["tags"] and local["local"] == ["folder"] and local["n_layers"] > 0

    status, state = http(server, "GET", "/state")
    assert state["topology"]["nodes"] == ["node1", "node2"]
    # EXO's TopologySnapshot: source -> sink -> edges, what its dashboard draws links from
    links = state["topology"]["connections"]
    assert {a: sorted(sinks) for a, sinks in links.items()} == {"node1": ["node2"], "node2": ["node1"]}
    assert links["node1"]["node2"][0]["sinkMultiaddr"]["address"].startswith("/ip4/127.0.0.12/tcp/")
    assert state["nodeIdentities"]["node2"]["friendlyName"] == "node2"
    assert http(server, "GET", "/node_id") == (200, "node1")

    # previews in EXO's shape, exoctl's fields kept
    status, body = http(
        server, "GET", f"/instance/previews?model_id={DEFAULT_MODEL_ID}&instance_meta=MlxRing"
    )
    for preview in body["previews"]:
        assert {"model_id", "sharding", "instance_meta", "instance", "memory_delta_by_node", "error"} <= set(
            preview
        )
        assert preview["instance_meta"] == "MlxRing" and preview["model_id"] == DEFAULT_MODEL_ID
    two = next(p for p in body["previews"] if p["sharding"] == "Pipeline" and p["nodes"] == 2)
    assert two["error"] is None and two["ok"]
    assert two["memory_delta_by_node"] == {s["node"]: s["memory_bytes"] for s in two["shards"]}
    planned = two["instance"]["CpuRingInstance"]
    assert planned["status"] == "planned" and sorted(planned["shardAssignments"]["nodeToRunner"]) == [
        "node1",
        "node2",
    ]
    split = next(p for p in body["previews"] if p["sharding"] == "Tensor" and p["nodes"] == 2)
    assert split["instance"] is None and split["memory_delta_by_node"] is None
    assert "must each divide by the node count" in split["error"]
    status, wrong = http(server, "GET", f"/instance/previews?model_id={DEFAULT_MODEL_ID}&instance_meta=Metal")
    assert status == 400 and "unknown instance_meta 'Metal'" in wrong["error"]["message"]

    # GET /instance/placement: what would be placed, nothing loaded
    status, doc = http(
        server, "GET", f"/instance/placement?model_id={DEFAULT_MODEL_ID}&sharding=Pipeline&min_nodes=2"
    )
    assert status == 200 and len(doc["CpuRingInstance"]["shardAssignments"]["nodeToRunner"]) == 2
    assert doc["CpuRingInstance"]["instanceId"] not in http(server, "GET", "/state")[1]["instances"]

    # POST /instance loads a preview's instance as it is
    status, made = http(server, "POST", "/instance", {"instance": two["instance"], "unheard_of": 1})
    assert status == 200, made
    try:
        assert [(s["node"], s["start_layer"], s["end_layer"]) for s in made["shards"]] == [
            (s["node"], s["start_layer"], s["end_layer"]) for s in two["shards"]
        ]
        # the memory each node gives it, as the preview counted it
        assert {s["node"]: s["memory_bytes"] for s in made["shards"]} == two["memory_delta_by_node"]
        status, loaded = http(server, "GET", f"/instance/{made['instance_id']}")
        assert loaded["CpuRingInstance"]["status"] == "ready"
        assert loaded["CpuRingInstance"]["shardAssignments"]["nodeToRunner"].keys() == {"node1", "node2"}
    finally:
        assert http(server, "DELETE", f"/instance/{made['instance_id']}")[0] == 200
    broken = json.loads(json.dumps(two["instance"]))
    broken["CpuRingInstance"]["shardAssignments"]["nodeToRunner"] = {"node9": "r"}
    status, refused = http(server, "POST", "/instance", {"instance": broken})
    assert status == 400 and "node 'node9' is not in the inventory" in refused["error"]["message"]

    # EXO's own place request: MlxRing (run as the CPU ring, and said so) and keys exoctl ignores
    exo_request = {
        "model_id": DEFAULT_MODEL_ID,
        "sharding": "Pipeline",
        "instance_meta": "MlxRing",
        "min_nodes": 1,
        "colour": "red",
        "draft_model": None,
    }
    status, body = http(server, "POST", "/place_instance", exo_request)
    assert status == 200, body
    try:
        assert body["instance_meta"] == "CpuRing" and body["instance_meta_requested"] == "MlxRing"
        assert "runs it as the cluster's own CPU ring" in body["note"]
        assert "/place_instance: ignored 2 unknown request keys: colour, draft_model" in server.log_text()
        status, doc = http(server, "GET", f"/instance/{body['instance_id']}")
        assert status == 200 and doc["CpuRingInstance"]["status"] == "ready"
    finally:
        assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200


WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_a_tool_round_trip_through_the_openai_client(
    client: openai.OpenAI, server: Server, tool_model: Path
) -> None:
    """Request with tools -> tool_calls -> the tool's answer -> the final answer, streamed and not,
    with tests/tool_model.py's model (which calls get_weather(Paris), then says it is sunny)."""
    from tests.tool_model import ANSWER

    status, body = http(server, "POST", "/place_instance", {"model_id": tool_model.name})
    assert status == 200, body
    try:
        user = {"role": "user", "content": "What is the weather in Paris?"}
        first = client.chat.completions.create(model=tool_model.name, messages=[user], tools=[WEATHER_TOOL])
        choice = first.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert first.model == tool_model.name
        (call,) = choice.message.tool_calls or []
        assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
        assert json.loads(call.function.arguments) == {"city": "Paris"}
        result = {"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 °C"}
        turn = [user, choice.message.model_dump(exclude_none=True), result]
        second = client.chat.completions.create(model=tool_model.name, messages=turn, tools=[WEATHER_TOOL])
        assert second.choices[0].message.content == ANSWER and second.choices[0].finish_reason == "stop"
        assert not second.choices[0].message.tool_calls

        # streamed: the call as tool-call deltas, usage null on every chunk but the last
        stream = client.chat.completions.create(
            model=tool_model.name,
            messages=[user],
            tools=[WEATHER_TOOL],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].usage is not None
        deltas = [tc for c in chunks if c.choices for tc in c.choices[0].delta.tool_calls or []]
        assert [(d.index, d.function.name) for d in deltas] == [(0, "get_weather")]
        assert json.loads(deltas[0].function.arguments or "") == {"city": "Paris"}
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""

        # tool_choice: a named function or "required" is forced (the call's start is written for the
        # model, which completes it); "none" passes no tools, and the text is not read for calls
        for choice_value in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
            forced = client.chat.completions.create(
                model=tool_model.name, messages=[user], tools=[WEATHER_TOOL], tool_choice=choice_value
            )
            (call,) = forced.choices[0].message.tool_calls or []
            assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
                "city": "Paris"
            }
        plain = client.chat.completions.create(
            model=tool_model.name, messages=[user], tools=[WEATHER_TOOL], tool_choice="none"
        )
        assert not plain.choices[0].message.tool_calls and "<tool_call>" in (
            plain.choices[0].message.content or ""
        )
        with pytest.raises(
            openai.BadRequestError, match="names function 'launch', which is not among the tools"
        ):
            client.chat.completions.create(
                model=tool_model.name,
                messages=[user],
                tools=[WEATHER_TOOL],
                tool_choice={"type": "function", "function": {"name": "launch"}},
            )
        with pytest.raises(openai.BadRequestError, match="this model reads text only"):
            client.chat.completions.create(
                model=tool_model.name,
                messages=[
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ],
            )
    finally:
        assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200


def test_langchain_and_litellm_run_a_tool_calling_agent_turn(server: Server, tool_model: Path) -> None:
    """Two OpenAI clients nobody here wrote: each asks with a tool, gets the call, runs the tool,
    sends its answer back and gets the final answer."""
    import os

    from tests.tool_model import ANSWER

    # litellm would fetch its model price list from the internet at import; the tests reach only 127.0.0.1
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    import litellm
    from langchain_core.messages import HumanMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    status, body = http(server, "POST", "/place_instance", {"model_id": tool_model.name})
    assert status == 200, body
    try:

        @tool
        def get_weather(city: str) -> str:
            """The weather in a city."""
            return f"sunny, 24 °C in {city}"

        llm = ChatOpenAI(
            model=tool_model.name, base_url=f"{server.base}/v1", api_key="unused", max_retries=0, timeout=120
        ).bind_tools([get_weather])
        question = HumanMessage("What is the weather in Paris?")
        asked = llm.invoke([question])
        assert [(c["name"], c["args"]) for c in asked.tool_calls] == [("get_weather", {"city": "Paris"})]
        result = get_weather.invoke(asked.tool_calls[0])
        assert llm.invoke([question, asked, result]).content == ANSWER

        litellm.telemetry = False
        messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
        where = {"api_base": f"{server.base}/v1", "api_key": "unused", "tools": [WEATHER_TOOL]}
        first = litellm.completion(model=f"openai/{tool_model.name}", messages=messages, **where)
        (call,) = first.choices[0].message.tool_calls
        assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {
            "city": "Paris"
        }
        messages.append(first.choices[0].message.model_dump())
        messages.append({"role": "tool", "tool_call_id": call.id, "content": "sunny, 24 °C"})
        final = litellm.completion(model=f"openai/{tool_model.name}", messages=messages, **where)
        assert final.choices[0].message.content == ANSWER
    finally:
        assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200


def test_penalties_and_cuts_through_the_api_repeat_with_a_seed(client: openai.OpenAI, placed: str) -> None:
    messages = [{"role": "user", "content": "List the colours of the rainbow."}]
    extra = {"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.3}

    def answer(**more: Any) -> str:
        done = client.chat.completions.create(
            model=DEFAULT_MODEL_ID, messages=messages, max_tokens=24, extra_body=extra, **more
        )
        return done.choices[0].message.content or ""

    seeded = answer(temperature=0.9, seed=5, frequency_penalty=0.5, presence_penalty=0.4)
    assert seeded == answer(temperature=0.9, seed=5, frequency_penalty=0.5, presence_penalty=0.4)
    # greedy, a repetitive answer: the penalties make it another
    extra = {}
    messages = [{"role": "user", "content": "Count from 1 to 30, separated by commas."}]
    repeated = answer(temperature=0)
    assert repeated == answer(temperature=0) and repeated.count("\n") >= 3, repeated  # "1. 1\n2. 2\n..."
    penalized = answer(temperature=0, frequency_penalty=2.0, presence_penalty=1.0)
    assert penalized != repeated, penalized
    with pytest.raises(openai.BadRequestError, match="frequency_penalty"):
        answer(frequency_penalty=3.0)


def reference_logprobs(folder: Path, messages: list[dict[str, str]], steps: int, n: int) -> list[Any]:
    """The single process's greedy tokens' log-softmax (float32): (chosen logprob, top n logprobs)."""
    import torch

    from exoctl.engine.model import load_model
    from exoctl.engine.tokenizer import Tokenizer

    model, tokenizer = load_model(folder), Tokenizer(folder)
    ids = tokenizer.encode_chat(messages)
    cache = model.new_cache()
    tokens, positions = torch.tensor([ids]), torch.arange(len(ids))[None, :]
    out = []
    for _ in range(steps):
        logprobs = torch.log_softmax(model.forward(tokens, positions, [cache])[0, -1].float(), dim=-1)
        token = int(logprobs.argmax())
        out.append(
            (tokenizer.token_text(token)["token"], float(logprobs[token]), logprobs.topk(n).values.tolist())
        )
        tokens, positions = torch.tensor([[token]]), torch.tensor([[cache.length]])
    return out


def test_logprobs_equal_the_single_processs_through_a_pipeline_and_a_tensor_split(
    client: openai.OpenAI, server: Server, placed: str, tiny_models: dict[str, Path]
) -> None:
    folder = tiny_models["llama"]
    messages = [{"role": "user", "content": "Count with me: one, two,"}]
    expected = reference_logprobs(folder, messages, steps=6, n=4)
    for sharding in ("Pipeline", "Tensor"):
        status, body = http(
            server,
            "POST",
            "/place_instance",
            {"model_id": str(folder), "sharding": sharding, "nodes": 2, "dtype": "float32"},
        )
        assert status == 200 and len(body["shards"]) == 2, body
        try:
            ask: dict[str, Any] = {
                "model": body["instance_id"],
                "messages": messages,
                "temperature": 0,
                "max_tokens": 6,
                "logprobs": True,
                "top_logprobs": 4,
            }
            whole = client.chat.completions.create(**ask)
            entries = (whole.choices[0].logprobs and whole.choices[0].logprobs.content) or []
            assert len(entries) == 6 == whole.usage.completion_tokens  # type: ignore[union-attr]
            for entry, (token, logprob, top) in zip(entries, expected, strict=True):
                assert entry.token == token and abs(entry.logprob - logprob) < 1e-4, (sharding, entry, token)
                assert [t.logprob for t in entry.top_logprobs] == pytest.approx(top, abs=1e-4)
                assert entry.top_logprobs[0].token == entry.token  # greedy: the most likely
                assert bytes(entry.bytes or []).decode("utf-8", "replace") == entry.token
            # the same request again, its prompt read whole: the same numbers to the last bit (a
            # reused prefix gives the same tokens, its logprobs within float32's rounding)
            streamed = [
                e
                for chunk in client.chat.completions.create(
                    **ask, stream=True, extra_body={"cache_prompt": False}
                )
                for choice in chunk.choices
                for e in ((choice.logprobs and choice.logprobs.content) or [])
            ]
            assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in entries]
        finally:
            assert http(server, "DELETE", f"/instance/{body['instance_id']}")[0] == 200
    plain = client.chat.completions.create(model=DEFAULT_MODEL_ID, messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None
    status, refused = http(server, "POST", "/v1/chat/completions", {**ask, "logprobs": False})
    assert status == 400 and "top_logprobs needs logprobs: true" in refused["error"]["message"]


def test_tensor_placement_and_chat_through_the_api(server: Server, tiny_models: dict[str, Path]) -> None:
    model = str(tiny_models["llama"])
    status, body = http(server, "GET", f"/instance/previews?model_id={model}")
    tensor = {p["nodes"]: p for p in body["previews"] if p["sharding"] == "Tensor"}
    assert tensor[2]["ok"], tensor[2]["error"]
    assert [s["node"] for s in tensor[2]["shards"]] == ["node1", "node2"]
    status, body = http(
        server, "POST", "/place_instance", {"model_id": model, "sharding": "Tensor", "nodes": 2}
    )
    assert status == 200 and body["sharding"] == "Tensor", body
    assert body["reason"].startswith("tensor, as asked: 4 of 8 heads on each of 2 nodes")
    instance_id = body["instance_id"]
    try:
        status, state = http(server, "GET", f"/instance/{instance_id}")
        assert (
            state["CpuRingInstance"]["sharding"] == "Tensor" and state["CpuRingInstance"]["status"] == "ready"
        )
        request = {
            "model": body["model_id"],
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 5,
        }
        status, answer = http(server, "POST", "/v1/chat/completions", request)
        assert status == 200 and answer["usage"]["completion_tokens"] == 5, answer
    finally:
        assert http(server, "DELETE", f"/instance/{instance_id}")[0] == 200


def test_place_without_waiting_then_delete(server: Server, tiny_models: dict[str, Path]) -> None:
    status, body = http(
        server, "POST", "/place_instance", {"model_id": str(tiny_models["qwen2"]), "wait": False}
    )
    assert status == 202 and body["status"] == "loading"
    instance_id = body["instance_id"]
    assert wait_for(lambda: instance_status(server, instance_id) == "ready", 60)
    # where `auto` put it (the cost model's pick on these two workers): each of those nodes frees memory
    _, doc = http(server, "GET", f"/instance/{instance_id}")
    nodes = set(doc["CpuRingInstance"]["shardAssignments"]["nodeToRunner"])
    status, body = http(server, "DELETE", f"/instance/{instance_id}")
    assert status == 200 and set(body["freed_bytes"]) == nodes and nodes <= {"node1", "node2"}
    assert http(server, "GET", f"/instance/{instance_id}")[0] in (200, 404)
    assert http(server, "DELETE", f"/instance/{instance_id}")[0] == 404


def instance_status(server: Server, instance_id: str) -> str | None:
    status, body = http(server, "GET", f"/instance/{instance_id}")
    return body["CpuRingInstance"]["status"] if status == 200 else None


def test_an_api_key_is_required_when_set(cluster2: WorkerCluster) -> None:
    server = Server(cluster2, "--api-key", "s3cret")
    try:
        status, body = http(server, "GET", "/v1/models")
        assert status == 401 and body["error"]["type"] == "authentication_error"
        status, _ = http(server, "GET", "/state", headers={"Authorization": "Bearer wrong"})
        assert status == 401
        status, body = http(server, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and body["object"] == "list"
        # the scheme is case-insensitive (RFC 9110): "bearer" is Bearer, the key is not
        assert http(server, "GET", "/v1/models", headers={"Authorization": "bearer s3cret"})[0] == 200
        assert http(server, "GET", "/v1/models", headers={"Authorization": "BEARER s3cret"})[0] == 200
        assert http(server, "GET", "/v1/models", headers={"Authorization": "Bearer S3CRET"})[0] == 401
        assert http(server, "GET", "/v1/models", headers={"Authorization": "Basic s3cret"})[0] == 401
        wrong = openai.OpenAI(base_url=f"{server.base}/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=f"{server.base}/v1", api_key="s3cret", max_retries=0)
        assert any(m.id == DEFAULT_MODEL_ID for m in right.models.list())
        # the API's own description is behind the key too
        assert http(server, "GET", "/openapi.json")[0] == 401
        status, body = http(server, "GET", "/openapi.json", headers={"Authorization": "Bearer s3cret"})
        assert status == 200 and "/v1/chat/completions" in body["paths"]
        # every API behind the same key: Anthropic's clients send it as x-api-key
        for path in ("/v1/completions", "/v1/responses", "/v1/messages", "/api/chat", "/api/tags"):
            method = "GET" if path == "/api/tags" else "POST"
            assert http(server, method, path, {"model": "x"})[0] == 401, path
        assert http(server, "GET", "/api/tags", headers={"x-api-key": "s3cret"})[0] == 200
        assert http(server, "GET", "/api/tags", headers={"x-api-key": "wrong"})[0] == 401
    finally:
        server.stop()


def test_what_is_not_supported_or_too_big_is_refused_with_a_clear_error(server: Server, placed: str) -> None:
    chat = {"model": placed, "messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 2}
    # a response_format that cannot be obeyed: a 400 that says why, not free text that looks obeyed
    for shape, why in (
        ({"type": "xml"}, "unknown response_format type 'xml'"),
        ({"type": "json_schema"}, "needs a 'json_schema' object"),
        (
            {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "string", "format": "iri"}},
            },
            "Unknown format: iri",
        ),
    ):
        status, body = http(server, "POST", "/v1/chat/completions", {**chat, "response_format": shape})
        assert status == 400, body
        assert why in body["error"]["message"], body
    status, _ = http(server, "POST", "/v1/chat/completions", {**chat, "response_format": {"type": "text"}})
    assert status == 200
    # a body over the limit is refused before it is read: by its Content-Length, and when chunked
    from http.client import HTTPConnection

    from exoctl.api.app import MAX_BODY_BYTES

    huge = json.dumps({**chat, "padding": "x" * (MAX_BODY_BYTES + 10)}).encode()
    connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(len(huge)))
    connection.endheaders()  # the answer comes before any of the body is sent
    answer = connection.getresponse()
    body = json.loads(answer.read())
    assert (
        answer.status == 413 and f"is {len(huge)} bytes, over the limit of 16 MB" in body["error"]["message"]
    )
    assert body["error"]["code"] == "request_too_large"
    connection.close()

    def chunks() -> Iterator[bytes]:
        yield huge[: len(huge) // 2]
        yield huge[len(huge) // 2 :]

    connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request(
        "POST",
        "/v1/chat/completions",
        body=chunks(),
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    answer = connection.getresponse()
    assert answer.status == 413 and json.loads(answer.read())["error"]["code"] == "request_too_large"
    connection.close()
    # a huge model name is refused, not echoed back; a flood of unknown keys is one short log line
    status, body = http(server, "POST", "/v1/chat/completions", {**chat, "model": "m" * 5_000_000})
    assert status == 400 and len(json.dumps(body)) < 1000 and "model" in body["error"]["message"]
    status, body = http(server, "POST", "/place_instance", {"model_id": "m" * 5_000_000})
    assert status == 400 and len(json.dumps(body)) < 1000
    flood = {"model_id": "nope", **{f"key{i}": i for i in range(200_000)}}
    http(server, "POST", "/place_instance", flood)
    assert max(len(line) for line in server.log_text().splitlines()) < 1000
    assert "ignored 200000 unknown request keys: key0, key1" in server.log_text()
    # unknown routes: OpenAI's envelope, saying where the API is
    status, body = http(server, "GET", "/v1/nope")
    assert status == 404 and body["error"]["type"] == "not_found_error"
    assert (
        "no such route: GET /v1/nope" in body["error"]["message"]
        and "/v1/chat/completions" in body["error"]["message"]
    )
    status, body = http(server, "DELETE", "/v1/models")
    assert status == 405 and body["error"]["code"] == "method_not_allowed"
    # an unknown model is not hinted to be placed
    status, body = http(server, "POST", "/v1/chat/completions", {**chat, "model": "nope"})
    assert status == 404 and "unknown model 'nope'" in body["error"]["message"]
    assert "exoctl place nope" not in body["error"]["message"]
    assert http(server, "GET", "/healthz")[0] == 200


def test_with_no_node_up_health_chat_nodes_and_state_say_so_alike(tmp_path: Path) -> None:
    from tests.cluster_helpers import make_cluster

    cluster = make_cluster(tmp_path, 2, tmp_path)  # never started
    expected = "no node is up: none of the 2 nodes answered"
    for command in ("nodes", "state"):
        result = cluster.cli(command)
        assert result.returncode == 1 and expected in result.stderr and "exoctl up" in result.stderr, command
        assert "node1" in result.stdout  # the table is still shown
    assert cluster.cli("state", "--json").returncode == 1
    run = cluster.cli("run", "hi")
    assert run.returncode == 1 and expected in run.stderr
    server = Server(cluster)
    try:
        status, body = http(server, "GET", "/healthz")
        assert status == 503 and body["status"] == "unavailable" and body["nodes_up"] == 0
        assert expected in body["error"]
        chat = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}
        status, body = http(server, "POST", "/v1/chat/completions", chat)
        assert status == 503 and expected in body["error"]["message"]
        assert body["error"]["code"] == "NoNodeUpError"
    finally:
        server.stop()


def test_serve_refuses_a_network_address_without_a_key() -> None:
    result = exoctl("serve", "--host", "0.0.0.0", "--port", "1", env={"EXOCTL_API_KEY": ""})
    assert result.returncode == 1
    assert result.stderr.startswith("error: refusing to serve on 0.0.0.0 without an API key")


def test_a_client_that_trickles_its_request_head_is_cut_off(server: Server) -> None:
    """A slowloris (a header line a byte per second) and a silent connection are closed once
    HEAD_TIMEOUT_S has passed without a whole request head; others are served meanwhile."""
    import socket
    import time

    from exoctl.api.http_protocol import HEAD_TIMEOUT_S

    slow, silent = (
        socket.create_connection(("127.0.0.1", server.port)),
        socket.create_connection(("127.0.0.1", server.port)),
    )
    try:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        began = time.monotonic()
        closed = False
        while time.monotonic() - began < HEAD_TIMEOUT_S + 5:
            try:
                slow.sendall(b"X")
            except OSError:
                closed = True
                break
            slow.settimeout(1.0)
            try:
                if slow.recv(1024) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
            assert http(server, "GET", "/healthz")[0] == 200  # the server keeps serving
        assert closed and HEAD_TIMEOUT_S - 1 <= time.monotonic() - began <= HEAD_TIMEOUT_S + 5
        silent.settimeout(2.0)
        assert silent.recv(1024) == b""  # a connection that never sent a byte is gone too
    finally:
        slow.close()
        silent.close()


def test_serve_on_a_taken_port_is_one_clean_error(server: Server) -> None:
    result = exoctl("serve", "--port", str(server.port))
    assert result.returncode == 1
    assert result.stderr.startswith(
        f"error: cannot serve on 127.0.0.1:{server.port}: the port is taken by another process"
    )
    assert "exoctl serve: http" not in result.stderr  # no banner for a server that never ran
    assert "Errno" not in result.stderr and "Traceback" not in result.stderr


def test_hostile_values_get_a_4xx_naming_the_problem_never_a_500(server: Server, placed: str) -> None:
    chat = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for change, text in [
        ({"max_tokens": 2**64}, "max_tokens must be at most 2147483647"),
        ({"max_completion_tokens": 2**70}, "max_tokens must be at most 2147483647"),
        ({"seed": 2**70}, "seed must be a whole number from -2**63 to 2**64 - 1"),
        ({"seed": -(2**64)}, "seed must be a whole number from -2**63 to 2**64 - 1"),
        ({"messages": [{"role": "user", "content": "x" * (9 * 2**20)}]}, "bytes, over the limit of"),
        ({"stop": ["\ud800"]}, "the prompt is not valid Unicode text"),
    ]:
        status, body = http(server, "POST", "/v1/chat/completions", {**chat, **change})
        assert status == 400 and text in body["error"]["message"], (change, status, body)
    # a lone surrogate, as JSON escapes it
    raw = json.dumps(chat).replace('"hi"', '"\\ud800"').encode()
    status, body = http(server, "POST", "/v1/chat/completions", raw=raw)
    assert status == 400 and "not valid Unicode text" in body["error"]["message"], body
    # a temperature too small to divide by samples the most likely token, as 0 does
    answers = []
    for temperature in (0, 1e-40, 8e-38):
        status, body = http(
            server, "POST", "/v1/chat/completions", {**chat, "max_tokens": 8, "temperature": temperature}
        )
        assert status == 200, body
        answers.append(body["choices"][0]["message"]["content"])
    assert answers[0] == answers[1] == answers[2]
    # JSON bodies only: a browser page cannot post a form or text/plain here without CORS's say
    status, body = http(
        server,
        "POST",
        "/v1/chat/completions",
        raw=json.dumps(chat).encode(),
        headers={"Content-Type": "text/plain"},
    )
    assert status == 415 and "Content-Type: application/json" in body["error"]["message"]
    assert http(server, "GET", "/healthz")[0] == 200


def test_the_api_opens_no_folder_outside_the_model_directories(server: Server, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    answers = [
        http(server, "POST", "/place_instance", {"model_id": path})
        for path in (str(tmp_path), "/root/.ssh", "/no/such/folder", "~")
    ]
    for (status, body), path in zip(
        answers, (str(tmp_path), "/root/.ssh", "/no/such/folder", "~"), strict=True
    ):
        assert status == 403, body
        message = body["error"]["message"]
        assert message.startswith(f"model folder {path} is outside the cluster's model directories"), message
        assert "huggingface" not in message and ".cache" not in message  # no roots told to the caller
    status, body = http(server, "GET", f"/instance/previews?model_id={tmp_path}")
    assert status == 403 and "outside the cluster's model directories" in body["error"]["message"]


def test_a_client_that_goes_away_cancels_its_generation(server: Server, placed: str) -> None:
    import time
    from http.client import HTTPConnection

    def generating() -> int:
        runners = http(server, "GET", "/state")[1]["runners"]
        return sum(body["activeSequences"] for doc in runners.values() for body in doc.values())

    for stream in (False, True):
        body = {
            "model": DEFAULT_MODEL_ID,
            "messages": [{"role": "user", "content": "Count from 1 to 2000, separated by commas."}],
            "max_tokens": 2000,
            "temperature": 0,
            "stream": stream,
        }
        connection = HTTPConnection("127.0.0.1", server.port, timeout=60)
        connection.request(
            "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
        )
        assert wait_for(lambda: generating() > 0, timeout=30)
        time.sleep(0.5)
        connection.close()  # gone, without reading the answer
        assert wait_for(lambda: generating() == 0, timeout=5), f"stream={stream}: still generating"


SAMPLE_PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Count from 1 to 5.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "Name a planet.",
    "What do bees make?",
    "Spell the word cat.",
]


def answer(
    client: openai.OpenAI,
    prompt: str,
    model: str = DEFAULT_MODEL_ID,
    stream: bool = False,
    cache: bool = True,
) -> str:
    messages: Any = [{"role": "user", "content": prompt}]
    extra = {"cache_prompt": cache}
    if stream:
        chunks = client.chat.completions.create(
            model=model, messages=messages, temperature=0, max_tokens=16, stream=True, extra_body=extra
        )
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    done = client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=16, extra_body=extra
    )
    return done.choices[0].message.content or ""


def test_soak_sixteen_streams_answer_as_each_prompt_does_alone(
    client: openai.OpenAI, placed: str, cluster2: WorkerCluster
) -> None:
    import time

    import psutil

    solo = {prompt: answer(client, prompt) for prompt in SAMPLE_PROMPTS}
    # one burst of 16 at once first: the high-water mark of 16 sequences' caches and batch
    # buffers is the allocator's to keep; what the soak adds beyond it would be a leak
    burst = [
        threading.Thread(target=answer, args=(client, SAMPLE_PROMPTS[i % len(SAMPLE_PROMPTS)]))
        for i in range(16)
    ]
    for thread in burst:
        thread.start()
    for thread in burst:
        thread.join(timeout=120)
    workers = [psutil.Process(cluster2.pid(n)) for n in ("node1", "node2")]
    rss = [w.memory_info().rss for w in workers]
    errors: list[str] = []
    differ: list[tuple[str, str]] = []
    answered = [0]
    deadline = time.monotonic() + 45

    def session(index: int) -> None:
        turn = index
        while time.monotonic() < deadline:
            prompt = SAMPLE_PROMPTS[turn % len(SAMPLE_PROMPTS)]
            turn += 1
            try:
                text = answer(client, prompt, stream=turn % 2 == 0)
            except Exception as exc:  # counted, not raised: the soak goes on
                errors.append(repr(exc))
                continue
            answered[0] += 1
            if text != solo[prompt]:
                differ.append((prompt, text))

    threads = [threading.Thread(target=session, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not errors and not differ, (errors[:3], differ[:3])
    assert answered[0] >= 48, answered[0]
    grown = [w.memory_info().rss - before for w, before in zip(workers, rss, strict=True)]
    assert max(grown) < 100e6, grown


def test_bfloat16_answers_alone_are_the_same_every_time(
    server: Server, client: openai.OpenAI, placed: str
) -> None:
    status, body = http(
        server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "nodes": 2, "dtype": "bfloat16"}
    )
    assert status == 200, body
    bf16 = str(body["instance_id"])
    try:
        # each read whole: a reused prefix runs its last position in another batch shape, which
        # bfloat16's rounding can tell apart (float32 cannot: the soak above repeats with the cache)
        for prompt in SAMPLE_PROMPTS[:3]:
            first = answer(client, prompt, model=bf16, cache=False)
            assert first and answer(client, prompt, model=bf16, stream=True, cache=False) == first
    finally:
        assert http(server, "DELETE", f"/instance/{bf16}")[0] == 200


def test_exo_dashboards_start_up_endpoints(server: Server) -> None:
    """What EXO's dashboard (src/lib/stores/app.svelte.ts, routes/+page.svelte) asks at start:
    its feature flags, and its first-run wizard's state, which a POST completes."""
    assert http(server, "GET", "/v1/feature-flags") == (200, {"disaggregation": False})
    status, first = http(server, "GET", "/onboarding")
    assert status == 200 and isinstance(first["completed"], bool)
    assert http(server, "POST", "/onboarding") == (200, {"completed": True})
    assert http(server, "GET", "/onboarding") == (200, {"completed": True})
