"""Hostile messages to running workers, from a client that holds the cluster key: the schema is
valid, the values are not. Each gets an error reply that names the problem, the worker lives on,
and no other request is harmed."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgpack
import psutil
import pytest
import zmq

from exoctl.cluster.client import Generation
from exoctl.cluster.views import instances_of
from exoctl.engine.generate import generate_in_process
from exoctl.engine.model import load_model
from exoctl.engine.tokenizer import Tokenizer
from exoctl.inventory import load_inventory_file
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.held_instances import MAX_FAILURES
from exoctl.worker.peers import DOWN_AFTER_S
from tests.cluster_helpers import (
    WorkerCluster,
    header,
    load_header,
    raw_socket,
    tiny_cluster,
    wait_for,
)
from tests.tiny_models import COMMON, corrupt_copy

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def cluster2(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "hardening", 2, tiny_models) as cluster:
        yield cluster


@contextmanager
def keyed_socket(cluster: WorkerCluster, node: str) -> Iterator[zmq.Socket[Any]]:
    """A raw DEALER to `node`, holding the cluster key; closed on the way out."""
    ctx, sock = raw_socket(cluster, node)
    try:
        yield sock
    finally:
        ctx.destroy(linger=0)


@pytest.fixture
def node1(cluster2: WorkerCluster) -> Iterator[zmq.Socket[Any]]:
    with keyed_socket(cluster2, "node1") as sock:
        yield sock


@pytest.fixture
def node2(cluster2: WorkerCluster) -> Iterator[zmq.Socket[Any]]:
    with keyed_socket(cluster2, "node2") as sock:
        yield sock


def ask(sock: zmq.Socket[Any], *frames: bytes, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send one message; its reply's header (replies of other requests are skipped)."""
    sock.send_multipart(list(frames))
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            break
        reply: dict[str, Any] = msgpack.unpackb(sock.recv_multipart()[0])
        if reply.get("id") == 7:
            return reply
    raise AssertionError(f"no reply within {timeout_s} s")


def alive(sock: zmq.Socket[Any]) -> bool:
    return ask(sock, header("ping"))["type"] == "pong"


def address(cluster: WorkerCluster, node: str) -> str:
    return load_inventory_file(cluster.inventory).node(node).address


@contextmanager
def placed(cluster: WorkerCluster, folder: Path, nodes: int) -> Iterator[str]:
    """A model placed over `nodes` workers in float32, unloaded on the way out."""
    with cluster.client() as client:
        card, ref = resolve_card(str(folder))
        placement = client.plan(card, PlacementRequest(dtype="float32", nodes=nodes), client.statuses())
        instance_id = client.load(card, ref, placement).instance_id
    try:
        yield instance_id
    finally:
        with cluster.client() as client:
            client.unload(instance_id)


@contextmanager
def in_background(
    cluster: WorkerCluster, instance_id: str, max_tokens: int
) -> Iterator[tuple[Generation, threading.Event]]:
    """A greedy generation of PROMPT running on a thread of its own (with its own sockets)."""
    with cluster.client() as client:
        view = instances_of(client.statuses())[instance_id]
        generation = client.generate(view, SamplingParams(max_tokens=max_tokens), prompt=PROMPT)
        done = threading.Event()
        threading.Thread(target=lambda: (list(generation), done.set()), daemon=True).start()
        yield generation, done
        done.wait(30)  # its sockets close with the client


def engine_tokens(folder: Path, max_tokens: int) -> list[int]:
    """The greedy tokens of PROMPT from the engine in this process."""
    tokenizer = Tokenizer(folder)
    params = SamplingParams(max_tokens=max_tokens)
    return generate_in_process(load_model(folder), tokenizer, tokenizer.encode(PROMPT), params).token_ids


def test_a_load_that_cannot_work_is_refused_and_the_worker_lives(
    cluster2: WorkerCluster, node1: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    # a real model, so only the peers are wrong: such loads were accepted, and the heartbeat to
    # "bad" (or past the process's sockets) then took the worker down
    model = {"model": str(tiny_models["llama"]), "n_layers": 4, "end_layer": 4}
    me = ["node1", address(cluster2, "node1")]
    for peers, text in [
        ([me, ["x", "bad"]], "peer address 'bad' is not host:port"),
        ([me, ["x", "127.0.0.12:0"]], "peer address '127.0.0.12:0' is not host:port"),
        (
            [me, *[[f"n{i}", f"127.0.0.99:{i + 1}"] for i in range(1000)]],
            "an instance spans at most 64 nodes",
        ),
    ]:
        reply = ask(node1, load_header(**model, world=len(peers), peers=peers))
        assert reply["type"] == "error" and text in reply["message"], reply
    time.sleep(DOWN_AFTER_S + 1)  # a heartbeat round to a bad peer would have ended the worker by now
    assert alive(node1)
    assert ask(node1, header("status"))["runners"] == []


def test_steps_past_the_context_or_the_sequence_limit_are_refused_before_computing(
    cluster2: WorkerCluster, node2: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    context, width = COMMON["max_position_embeddings"], COMMON["hidden_size"]
    params = SamplingParams().to_wire()
    with placed(cluster2, tiny_models["llama"], 2) as instance_id:

        def forward(seqs: list[str], shape: list[int], positions: list[int]) -> dict[str, Any]:
            hidden = b"\0" * (math.prod(shape) * 4)
            fields = {"instance_id": instance_id, "seqs": seqs, "positions": positions}
            meta = [{"dtype": "float32", "shape": shape}]
            return ask(
                node2, header("forward", **fields, params={s: params for s in seqs}, tensors=meta), hidden
            )

        began = time.monotonic()
        past = forward(["s"], [1, context + 1, width], [0])
        assert past["type"] == "error" and f"go past the model's context of {context}" in past["message"]
        late = forward(["t"], [1, 2, width], [context - 1])
        assert late["type"] == "error" and "positions [255, 257) go past" in late["message"]
        wide = forward(["v"], [1, 1, width + 1], [0])
        assert wide["type"] == "error" and f"does not fit 1 sequence(s) of width {width}" in wide["message"]
        many = [f"s{i}" for i in range(300)]
        crowd = forward(many, [300, 1, width], [0] * 300)
        assert crowd["type"] == "error" and "would pass its limit of 256" in crowd["message"]
        twice = forward(["u", "u"], [2, 1, width], [0, 0])
        assert twice["type"] == "error" and "distinct sequence ids" in twice["message"]
        assert time.monotonic() - began < 5
        assert alive(node2)


def test_a_bad_token_message_or_value_fails_only_itself(
    cluster2: WorkerCluster, node1: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    expected = engine_tokens(tiny_models["llama"], 40)
    with placed(cluster2, tiny_models["llama"], 2) as instance_id:
        with in_background(cluster2, instance_id, 40) as (generation, done):
            for fields, text in [
                (
                    {"seqs": ["a", "b"], "tokens": [1], "logprobs": [None]},
                    "one token id (an int) per sequence id",
                ),
                (
                    {"seqs": ["a"], "tokens": [1.5], "logprobs": [None]},
                    "one token id (an int) per sequence id",
                ),
                ({"seqs": [7], "tokens": [1], "logprobs": [None]}, "needs a list of sequence ids"),
                ({"seqs": ["a"], "tokens": [1], "logprobs": [[0.5, [1], []]]}, "one logprob entry"),
                ({"seqs": ["a"], "tokens": [1], "prompt_logprobs": {}}, "missing field 'logprobs'"),
                (
                    {"seqs": ["a"], "tokens": [1], "logprobs": [None], "prompt_logprobs": {"z": []}},
                    "'prompt_logprobs' must map its sequence ids",
                ),
            ]:
                fields = {"prompt_logprobs": {}, **fields}
                reply = ask(node1, header("token", instance_id=instance_id, **fields))
                assert reply["type"] == "error" and text in reply["message"], reply
            assert done.wait(60)
            assert generation.result is not None and generation.result.token_ids == expected
        assert alive(node1)


def test_a_nan_budget_is_an_error_for_its_request(
    cluster2: WorkerCluster, node1: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    with placed(cluster2, tiny_models["llama"], 1) as instance_id:
        fields = {
            "instance_id": instance_id,
            "messages": None,
            "prompt": "hi",
            "prompt_ids": None,
            "chat": None,
            "cache_prompt": True,
            "speculative": True,
        }
        node1.send_multipart([header("generate", **fields, request_id="r1", params={"max_tokens": math.nan})])
        deadline = time.monotonic() + 10
        reply: dict[str, Any] = {}
        while time.monotonic() < deadline and node1.poll(int((deadline - time.monotonic()) * 1000)):
            reply = msgpack.unpackb(node1.recv_multipart()[0])
            if reply.get("request_id") == "r1" and reply["type"] in ("error", "done"):
                break
        assert reply.get("type") == "error", reply
        assert "max_tokens must be a whole number, got nan" in reply["message"]


def test_failed_loads_give_back_their_threads_and_sockets(
    cluster2: WorkerCluster, node1: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    broken, _ = corrupt_copy(tiny_models["llama"], "llama-broken-for-loads", "lm_head.weight")
    worker = psutil.Process(cluster2.pid("node1"))
    threads, fds = worker.num_threads(), worker.num_fds()
    me = [["node1", address(cluster2, "node1")]]
    ids = [f"broken-{i}" for i in range(40)]
    for instance_id in ids:
        load = load_header(instance_id=instance_id, model=str(broken), n_layers=4, end_layer=4, peers=me)
        assert ask(node1, load)["type"] == "ok"

    def failed_and_retired() -> bool:
        runners = ask(node1, header("status"))["runners"]
        return len(runners) == MAX_FAILURES and all(r["status"] == "RunnerFailed" for r in runners)

    assert wait_for(failed_and_retired, timeout=60)
    time.sleep(1)
    assert worker.num_threads() <= threads + 2 and worker.num_fds() <= fds + 4
    runners = ask(node1, header("status"))["runners"]
    assert {r["instance_id"] for r in runners} <= set(ids)  # the last to fail are kept
    assert "node node1:" in runners[0]["failure"]["message"]
    for instance_id in ids:
        assert ask(node1, header("unload", instance_id=instance_id))["type"] == "ok"
    assert ask(node1, header("status"))["runners"] == []


def test_peers_no_runner_names_any_more_have_their_sockets_closed(
    cluster2: WorkerCluster, node1: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    """Loads naming 60 peer addresses that never answer: once those instances are gone the
    worker holds no socket for them (it used to keep one and its monitor per address ever named,
    until ZeroMQ's limit made a live node 'stop answering')."""
    from exoctl.worker.peers import IDLE_CLOSE_S

    broken, _ = corrupt_copy(tiny_models["llama"], "llama-broken-for-peers", "lm_head.weight")
    worker = psutil.Process(cluster2.pid("node1"))
    fds = worker.num_fds()
    me = ["node1", address(cluster2, "node1")]
    ids = [f"peers-{i}" for i in range(60)]
    for i, instance_id in enumerate(ids):
        peers = [["ghost", f"127.0.0.{100 + i}:9"], me]  # a head that never answers
        load = load_header(
            instance_id=instance_id,
            model=str(broken),
            n_layers=4,
            start_layer=2,
            end_layer=4,  # the last stage: it reads the broken lm_head and fails
            rank=1,
            world=2,
            peers=peers,
        )
        assert ask(node1, load)["type"] == "ok"

    def all_failed() -> bool:
        runners = ask(node1, header("status"))["runners"]
        return all(r["status"] == "RunnerFailed" for r in runners)

    assert wait_for(all_failed, timeout=60)
    for instance_id in ids:
        assert ask(node1, header("unload", instance_id=instance_id))["type"] == "ok"
    assert wait_for(lambda: worker.num_fds() <= fds + 4, timeout=IDLE_CLOSE_S + 10), (worker.num_fds(), fds)
    assert alive(node1)


def test_the_log_keeps_a_bounded_summary_of_bad_values(
    cluster2: WorkerCluster, node1: zmq.Socket[Any]
) -> None:
    reply = ask(node1, header("x" * 100_000))
    assert reply["type"] == "error"
    reply = ask(node1, header("unload", instance_id="y" * 100_000))
    assert reply["type"] == "ok"
    time.sleep(0.5)
    longest = max(len(line) for line in cluster2.log("node1").splitlines())
    assert longest < 1000, longest


def test_sequences_the_head_does_not_know_are_freed_by_its_lease(
    cluster2: WorkerCluster, node2: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    expected = engine_tokens(tiny_models["llama"], 60)
    params, width = SamplingParams().to_wire(), COMMON["hidden_size"]

    def held_by_node2() -> int:
        with cluster2.client() as client:
            statuses = client.statuses()
        return next(r.active_sequences for s in statuses if s.node.name == "node2" for r in s.runners)

    with placed(cluster2, tiny_models["llama"], 2) as instance_id:
        with in_background(cluster2, instance_id, 60) as (generation, done):
            # 40 sequences the head never started, straight to the second stage
            for i in range(40):
                fields = {"instance_id": instance_id, "seqs": [f"stray{i}"], "positions": [0]}
                meta = [{"dtype": "float32", "shape": [1, 3, width]}]
                forward = header("forward", **fields, params={f"stray{i}": params}, tensors=meta)
                node2.send_multipart([forward, b"\0" * (12 * width)])
            assert wait_for(lambda: held_by_node2() >= 40, timeout=10)
            assert wait_for(lambda: held_by_node2() == 0 and done.is_set(), timeout=20)
            assert generation.result is not None and generation.result.token_ids == expected
        with cluster2.client() as client:
            assert instances_of(client.statuses())[instance_id].status == "ready"  # not "running" for good


def test_a_stage_whose_head_no_longer_holds_the_instance_frees_its_sequences(
    cluster2: WorkerCluster, node2: zmq.Socket[Any], tiny_models: dict[str, Path]
) -> None:
    """node2 holds the last stage of an instance whose head, node1, is alive but does not hold it
    (unloaded there, or failed there while node2 was cut off): no lease comes, and node2 frees
    the sequences it holds rather than keep their KV caches for good."""
    from exoctl.worker.lease_clock import LEASE_LOST_S

    width = COMMON["hidden_size"]
    peers = [["node1", address(cluster2, "node1")], ["node2", address(cluster2, "node2")]]
    load = load_header(
        instance_id="headless",
        model=str(tiny_models["llama"]),
        n_layers=4,
        start_layer=2,
        end_layer=4,
        rank=1,
        world=2,
        peers=peers,
    )
    assert ask(node2, load)["type"] == "ok"

    def runner() -> dict[str, Any] | None:
        runners = ask(node2, header("status"))["runners"]
        return next((r for r in runners if r["instance_id"] == "headless"), None)

    try:
        assert wait_for(lambda: (runner() or {}).get("status") == "RunnerReady", timeout=30)
        params = SamplingParams().to_wire()
        for i in range(5):
            fields = {"instance_id": "headless", "seqs": [f"orphan{i}"], "positions": [0]}
            meta = [{"dtype": "float32", "shape": [1, 3, width]}]
            forward = header("forward", **fields, params={f"orphan{i}": params}, tensors=meta)
            node2.send_multipart([forward, b"\0" * (12 * width)])
        assert wait_for(lambda: (runner() or {}).get("active_sequences") == 5, timeout=10)
        assert wait_for(lambda: (runner() or {}).get("active_sequences") == 0, timeout=LEASE_LOST_S + 10)
        assert runner()["status"] == "RunnerReady"  # the runner itself stays: its head is alive  # type: ignore[index]
        assert "no lease from its head" in cluster2.log("node2")
    finally:
        ask(node2, header("unload", instance_id="headless"))


def test_a_sequence_whose_draw_fails_ends_alone_and_its_batch_goes_on(
    tiny_models: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from exoctl.wire.generate_request import GenerateRequest
    from exoctl.wire.instance_messages import SeqError, Tokens
    from exoctl.wire.messages import ErrorReply
    from exoctl.wire.runner_spec import RunnerSpec
    from exoctl.worker.instance import build_instance
    from exoctl.worker.outbox import ToClient, ToSelf

    folder = tiny_models["llama"]
    spec = RunnerSpec(
        "i", "r", str(folder), "m", "pipeline", "float32", 0, 4, 4, 0, 1, (("n1", "127.0.0.1:1"),)
    )
    runner = build_instance(spec, 32, meeting=None)  # type: ignore[arg-type]  # a pipeline meets no ranks
    runner.load(folder)
    head = runner.role

    def start(request_id: str, params: SamplingParams) -> Tokens:
        (out,) = head.start(GenerateRequest("i", request_id, params, prompt=PROMPT), request_id.encode())
        assert isinstance(out, ToSelf) and isinstance(out.message, Tokens)
        return out.message

    first = [start("sampled", SamplingParams(temperature=0.8, seed=1)), start("greedy", SamplingParams())]
    import exoctl.engine.sampling as sampling_module

    draw = sampling_module.sample

    def failing(logits: Any, params: SamplingParams, generator: Any, history: Any = None) -> Any:
        if params.temperature == 0.8:
            raise RuntimeError("probability tensor contains either `inf`, `nan` or element < 0")
        return draw(logits, params, generator, history)

    monkeypatch.setattr(sampling_module, "sample", failing)
    outs = head.tokens(first)  # streams both first tokens, then decodes both as one batch
    to_self = [o.message for o in outs if isinstance(o, ToSelf)]
    (step,) = [m for m in to_self if isinstance(m, Tokens)]
    assert step.seqs == ("greedy",)  # the batch's other sequence goes on
    (failed,) = [m for m in to_self if isinstance(m, SeqError)]  # the stage reports it to the head
    assert failed.seqs == ("sampled",) and "sampling failed" in failed.message
    errors = [o for o in head.abort(failed.seqs, failed.message) if isinstance(o, ToClient)]
    assert [e.request_id for e in errors] == ["sampled"] and isinstance(errors[0].message, ErrorReply)
    assert set(head.sequences) == {"greedy"} and set(runner.stage.caches) == {"greedy"}


def test_downloads_and_records_that_cannot_work_are_refused_and_the_worker_lives(
    node1: zmq.Socket[Any],
) -> None:
    def download(**changes: Any) -> dict[str, Any]:
        fields = {"model": "owner/name", "start_layer": 0, "end_layer": 1, "n_layers": 1, **changes}
        return ask(node1, header("download", **fields))

    for changes, text in [
        ({"start_layer": 2, "end_layer": 1}, "layers [2, 1) of 1 are not a range of the model"),
        ({"end_layer": 5, "n_layers": 4}, "layers [0, 5) of 4 are not a range"),
        ({"n_layers": 10**9, "end_layer": 10**9}, "are not a range"),
        ({"model": "/etc"}, "loads models only from"),
        ({"model": "../../etc"}, "has no model '../../etc'"),
        ({"model": 7}, "'download' field 'model' must be str"),
    ]:
        reply = download(**changes)
        assert reply["type"] == "error" and text in reply["message"], (changes, reply)
    event = {"id": "e1", "time": 1.0, "instanceId": "i", "modelId": "m", "action": "replaced", "reason": None}
    for bad, text in [
        ({"action": "x"}, "field 'id' must be a string"),
        ({**event, "action": "dropped"}, "'dropped' is not one of replaced"),
        ({**event, "nodes": "n1"}, "field 'nodes' must be a list of node names"),
        ({**event, "reason": "y" * 5000}, "at most 4096"),
    ]:
        reply = ask(node1, header("record", event=bad))
        assert reply["type"] == "error" and text in reply["message"], reply
    for _ in range(2):  # the same event twice is kept once
        assert ask(node1, header("record", event=event))["type"] == "ok"
    status = ask(node1, header("status"))
    assert status["downloads"] == [] and [e["id"] for e in status["events"]] == ["e1"]
    assert alive(node1)
