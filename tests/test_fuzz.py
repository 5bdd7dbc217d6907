"""Bounded fuzzing, from a client holding the cluster key: hostile ZeroMQ messages to a worker that
serves an instance, and hostile HTTP requests to `exoctl serve`. Each runs about 40 s: no crash,
no HTTP 500, no hang, memory flat, and the instance still answers as before at the end."""

from __future__ import annotations

import json
import math
import random
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest

from exoctl.cluster.views import instances_of
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.protocol import PROTOCOL_VERSION
from exoctl.wire.sampling_params import SamplingParams
from tests.cluster_helpers import Server, WorkerCluster, http, raw_socket, tiny_cluster

FUZZ_S = 40.0

HOSTILE: list[Any] = [
    None,
    True,
    -1,
    0,
    1,
    2**63,
    2**64 - 1,  # the widest msgpack carries
    -(2**63),
    1.5,
    math.nan,
    math.inf,
    -math.inf,
    "",
    "x" * 5000,
    "\u202e\U0001f600",
    "../../etc/passwd",
    "/etc",
    "127.0.0.1:1",
    [],
    [1, "a", None],
    {"a": 1},
    b"\x00\xff",
]


def hostile(rng: random.Random) -> Any:
    if rng.random() < 0.15:
        return [rng.choice(HOSTILE[:12]) for _ in range(rng.randrange(0, 300))]
    return rng.choice(HOSTILE)


@pytest.fixture(scope="module")
def cluster2(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "fuzz", 2, tiny_models) as c:
        yield c


def tokens_of(cluster: WorkerCluster, instance_id: str) -> list[int]:
    with cluster.client() as client:
        view = instances_of(client.statuses())[instance_id]
        generation = client.generate(view, SamplingParams(max_tokens=12), prompt="The capital of France is")
        list(generation)
        assert generation.result is not None
        return generation.result.token_ids


def test_zeromq_fuzz_keeps_the_worker_serving(cluster2: WorkerCluster, tiny_models: dict[str, Path]) -> None:
    with cluster2.client() as client:
        card, ref = resolve_card(str(tiny_models["llama"]))
        placement = client.plan(card, PlacementRequest(dtype="float32", nodes=2), client.statuses())
        instance_id = client.load(card, ref, placement).instance_id
    before = tokens_of(cluster2, instance_id)
    workers = [psutil.Process(cluster2.pid(n)) for n in ("node1", "node2")]
    rss = [w.memory_info().rss for w in workers]
    rng = random.Random(11)
    sockets = [raw_socket(cluster2, n) for n in ("node1", "node2")]
    kinds = {
        "ping": {},
        "status": {},
        "load": [
            "instance_id",
            "runner_id",
            "model",
            "model_id",
            "sharding",
            "dtype",
            "start_layer",
            "end_layer",
            "n_layers",
            "rank",
            "world",
            "peers",
            "prefix_positions",
            "prefix_bytes",
            "position_bytes",
            "draft",
            "draft_model_id",
            "draft_dtype",
            "draft_layers",
            "partials",
        ],
        "probe_links": ["targets"],
        "echo": ["pad"],
        "unload": ["instance_id"],
        "generate": [
            "instance_id",
            "request_id",
            "messages",
            "prompt",
            "params",
            "chat",
            "cache_prompt",
            "speculative",
        ],
        "cancel": ["request_id"],
        "forward": ["instance_id", "seqs", "positions", "params", "drafts"],
        "token": ["instance_id", "seqs", "tokens", "logprobs"],
        "release": ["instance_id", "seq", "keep"],
        "forget": ["instance_id", "entries"],
        "seq_error": ["instance_id", "seqs", "message"],
        "tp_hello": ["instance_id", "rank", "address"],
        "lease": ["instance_id", "seqs", "kept"],
        "pong": ["profile"],
        "nonsense": ["x"],
    }
    sent = 0
    try:
        deadline = time.monotonic() + FUZZ_S
        while time.monotonic() < deadline:
            ctx, sock = rng.choice(sockets)
            kind = rng.choice(list(kinds))
            fields: dict[str, Any] = {}
            for name in kinds[kind]:
                fields[name] = hostile(rng) if rng.random() < 0.5 else None
            if "instance_id" in fields and rng.random() < 0.6:
                fields["instance_id"] = instance_id  # aim at the live instance, except to unload it
                if kind == "unload":
                    fields["instance_id"] = "other"
            if kind == "load" and rng.random() < 0.5:
                fields.update(
                    model="/etc",
                    sharding="pipeline",
                    dtype="float32",
                    start_layer=0,
                    end_layer=4,
                    n_layers=4,
                    rank=0,
                    world=2,
                    peers=[["node1", "127.0.0.11:1"], [hostile(rng), hostile(rng)]],
                    prefix_positions=rng.choice([0, 8, hostile(rng)]),
                    prefix_bytes=rng.choice([0, 4096, hostile(rng)]),
                    position_bytes=rng.choice([[], [512, 512], hostile(rng)]),
                    draft=rng.choice(["", "ngram", "/etc", hostile(rng)]),
                    draft_model_id=rng.choice(["", hostile(rng)]),
                    draft_dtype=rng.choice(["", "int4", hostile(rng)]),
                    draft_layers=rng.choice([0, 2, hostile(rng)]),
                    partials=rng.choice(["exact", "q8", hostile(rng)]),
                )
            if kind == "generate" and rng.random() < 0.5:
                fields.update(
                    cache_prompt=rng.choice([True, False, hostile(rng)]),
                    speculative=rng.choice([True, False, hostile(rng)]),
                    messages=None,
                    prompt="hi",
                    params={"max_tokens": hostile(rng), "temperature": hostile(rng)},
                    chat=rng.choice(
                        [None, {"tools": hostile(rng), "prefix": hostile(rng), "special": hostile(rng)}]
                    ),
                )
            header: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": kind, "id": sent, **fields}
            frames = [msgpack.packb(header, use_bin_type=True)]
            if kind == "forward" and rng.random() < 0.7:
                shape = [rng.choice([0, 1, 2, 3, 64, 300]) for _ in range(rng.choice([1, 2, 3, 4]))]
                dtype = rng.choice(["float32", "bfloat16", "int64", "complex64"])
                header["tensors"] = [{"dtype": dtype, "shape": shape}]
                size = math.prod(shape) * (8 if dtype == "int64" else 4 if dtype == "float32" else 2)
                if size > 2**21 or rng.random() < 0.2:  # a frame that does not match its shape
                    size = 3
                frames = [
                    msgpack.packb(header, use_bin_type=True),
                    b"\0" * size,
                ]
            sock.send_multipart(frames)
            sent += 1
            while sock.poll(0):
                sock.recv_multipart()
            if sent % 200 == 0:
                for _, s in sockets:
                    s.send_multipart([msgpack.packb({"v": PROTOCOL_VERSION, "type": "ping", "id": -1})])
                    assert s.poll(5000), f"a worker stopped answering after {sent} messages"
                    while s.poll(100):
                        s.recv_multipart()
    finally:
        for ctx, _ in sockets:
            ctx.destroy(linger=0)
    print(f"zeromq fuzz: {sent} messages in {FUZZ_S:.0f} s")  # shown with pytest -s
    assert sent > 500
    assert all(w.is_running() for w in workers)
    time.sleep(5)  # the lease frees the sequences the fuzzer made up
    assert tokens_of(cluster2, instance_id) == before
    grown = [w.memory_info().rss - r for w, r in zip(workers, rss, strict=True)]
    assert max(grown) < 150e6, grown


def test_http_fuzz_never_answers_500(cluster2: WorkerCluster) -> None:
    server = Server(cluster2)
    try:
        status, body = http(server, "POST", "/place_instance", {"model_id": DEFAULT_MODEL_ID, "nodes": 1})
        assert status == 200, body
        rng = random.Random(7)
        chat = {"model": DEFAULT_MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        place = {"model_id": "gpt-5", "sharding": "Pipeline", "min_nodes": 1}
        # budgets: hostile, or small; null would mean the default 1,024 tokens, a long but fair request
        small = {"max_tokens": [0, -1, 2**64, 2**70, "5", 1.5, math.nan, True, 1, 2]}
        statuses: dict[int, int] = {}
        deadline = time.monotonic() + FUZZ_S
        while time.monotonic() < deadline:
            choice = rng.random()
            method, path, body_bytes = "GET", "/v1/models", None
            content_type = "application/json"
            if choice < 0.45:
                body = dict(chat)
                for _ in range(rng.randrange(1, 4)):
                    key = rng.choice(
                        [
                            "model",
                            "messages",
                            "max_tokens",
                            "temperature",
                            "top_p",
                            "seed",
                            "stop",
                            "stream",
                            "n",
                            "max_completion_tokens",
                            "stream_options",
                            "extra",
                        ]
                    )
                    body[key] = rng.choice(small["max_tokens"]) if key.startswith("max") else hostile(rng)
                    if key == "messages" and rng.random() < 0.5:
                        body[key] = [{"role": rng.choice(["user", "tool", 5]), "content": hostile(rng)}]
                method, path = "POST", "/v1/chat/completions"
                body_bytes = json.dumps(body, default=repr).encode()
            elif choice < 0.65:
                body = dict(place)
                body[
                    rng.choice(
                        ["model_id", "sharding", "min_nodes", "nodes", "dtype", "wait", "instance_meta"]
                    )
                ] = hostile(rng)
                method, path = "POST", "/place_instance"
                body_bytes = json.dumps(body, default=repr).encode()
            elif choice < 0.75:
                path = "/instance/previews?model_id=" + urllib.request.quote(str(hostile(rng)))
            elif choice < 0.85:
                path = "/state/" + urllib.request.quote(str(hostile(rng)))
            elif choice < 0.9:
                method, path = "DELETE", "/instance/" + urllib.request.quote(str(hostile(rng)) or "x")
            else:
                method, path = "POST", rng.choice(["/v1/chat/completions", "/place_instance"])
                body_bytes = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 200)))
                content_type = rng.choice(
                    ["application/json", "text/plain", "application/x-www-form-urlencoded"]
                )
            request = urllib.request.Request(
                server.base + path, data=body_bytes, method=method, headers={"Content-Type": content_type}
            )
            try:
                with urllib.request.urlopen(request, timeout=120) as response:
                    response.read()
                    code = response.status
            except urllib.error.HTTPError as error:
                error.read()
                code = error.code
            statuses[code] = statuses.get(code, 0) + 1
            assert code < 500, (method, path, body_bytes[:300] if body_bytes else None, code)
        print(f"http fuzz: {sum(statuses.values())} requests, by status {dict(sorted(statuses.items()))}")
        assert sum(statuses.values()) > 200, statuses
        status, body = http(server, "GET", "/healthz")
        assert status == 200 and body["nodes_up"] == 2
    finally:
        server.stop()
