"""Cached prefixes end to end: a request that reuses the KV of what an instance already read gives
exactly the tokens it gives without (float32, greedy), through one process's head and through real
workers (1 worker, 2- and 4-worker pipelines, a 2-rank tensor split, Mixtral expert-parallel); a
history re-tokenized differently reuses up to its first differing token; concurrent requests
sharing a prefix; eviction under a tiny budget within the runners' own accounting; budget 0; memory
pressure; and what `place`, `run --json` and `state` show."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import instances_of
from exoctl.engine.tokenizer import Tokenizer
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import GB, PlacementRequest
from exoctl.wire.answer import Completion
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import Prefill, SeqError, Tokens
from exoctl.wire.messages import Done, ErrorReply
from exoctl.wire.runner_report import RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.instance import InstanceRunner, build_instance
from exoctl.worker.node_memory import MIN_FREE_BYTES, Room
from exoctl.worker.outbox import ToClient, ToSelf
from exoctl.worker.prefix_index import common_prefix
from tests.cluster_helpers import WorkerCluster, header, raw_socket, tiny_cluster, wait_for

FIRST = "The capital of France is"
# shares FIRST's tokens, then goes on: what the next turn of a conversation looks like
LONGER = FIRST + " Paris, and the capital of Italy is"
GREEDY = SamplingParams(max_tokens=10)
PENALIZED = SamplingParams(max_tokens=10, repetition_penalty=1.3)  # reads the reused prompt ids too


# --- one process: a head and its single stage, driven as a lane drives them -----------------------


def instance(folder: Path, positions: int = 4096, memory: Any = None) -> InstanceRunner:
    """A whole model on one stage whose head keeps `positions` positions of cached prefixes."""
    config = json.loads((folder / "config.json").read_text())
    layers = config["num_hidden_layers"]
    position_bytes = (
        layers
        * 2
        * config["num_key_value_heads"]
        * (config["hidden_size"] // config["num_attention_heads"])
        * 4
    )
    spec = RunnerSpec(
        "i",
        "r",
        str(folder),
        "m",
        "pipeline",
        "float32",
        0,
        layers,
        layers,
        0,
        1,
        (("n1", "127.0.0.1:1"),),
        prefix_positions=positions,
        prefix_bytes=positions * position_bytes,
        position_bytes=(position_bytes,),
    )
    runner = build_instance(spec, 32, meeting=None, memory=memory)  # type: ignore[arg-type]  # a pipeline meets no ranks
    runner.load(folder)
    return runner


def drive(runner: InstanceRunner, *requests: GenerateRequest) -> dict[str, Completion]:
    """Start the requests together and run them to their ends; the token messages queued at once
    become one batched step, as the lane makes them."""
    head = runner.role
    queue = [out for r in requests for out in head.start(r, r.request_id.encode())]
    done: dict[str, Completion] = {}
    while queue:
        batch, queue = queue, []
        tokens = []
        for out in batch:
            match out:
                case ToSelf(message=Tokens() as message):
                    tokens.append(message)
                case ToSelf(message=Prefill(seq=seq)):
                    queue += head.prefill(seq)
                case ToSelf(message=SeqError(message=text)):
                    raise AssertionError(text)
                case ToClient(message=Done(request_id=request_id, result=result)):
                    done[request_id] = result
                case ToClient(message=ErrorReply(message=text)):
                    raise AssertionError(text)
        if tokens:
            queue += head.tokens(tokens)
    return done


def ask(
    runner: InstanceRunner, request_id: str, prompt: str, cache: bool = True, params: SamplingParams = GREEDY
) -> Completion:
    return drive(runner, GenerateRequest("i", request_id, params, prompt=prompt, cache_prompt=cache))[
        request_id
    ]


@pytest.mark.parametrize("kind", ["llama", "llama-tied", "qwen2", "mixtral"])
@pytest.mark.parametrize("params", [GREEDY, PENALIZED], ids=["greedy", "repetition-penalty"])
def test_a_reused_prefix_gives_exactly_the_tokens_of_reading_it_again(
    tiny_models: dict[str, Path], kind: str, params: SamplingParams
) -> None:
    runner = instance(tiny_models[kind])
    ask(runner, "first", FIRST, params=params)
    reused = ask(runner, "reused", LONGER, params=params)
    again = ask(runner, "again", LONGER, cache=False, params=params)
    assert again.cached_tokens == 0
    assert reused.cached_tokens == len(runner.role.tokenizer.encode(FIRST))  # type: ignore[union-attr]
    assert reused.token_ids == again.token_ids and reused.prompt_tokens == again.prompt_tokens


def test_a_history_re_tokenized_differently_reuses_up_to_the_first_differing_token(
    tiny_models: dict[str, Path],
) -> None:
    runner = instance(tiny_models["llama"])
    tokenizer = Tokenizer(tiny_models["llama"])
    first = ask(runner, "first", FIRST)
    held = tokenizer.encode(FIRST) + first.token_ids[:-1]  # what the instance keeps of it
    # the client sends back the answer's text: its ids need not be the ones that were generated
    for follow in (FIRST + first.text + " and", FIRST + "n't"):
        ids = tokenizer.encode(follow)
        expected = min(common_prefix(tuple(ids), tuple(held)), len(ids) - 1)
        result = ask(runner, f"next{len(follow)}", follow)
        assert result.cached_tokens == expected
        assert result.token_ids == ask(runner, f"plain{len(follow)}", follow, cache=False).token_ids
    # the second one re-tokenizes FIRST's last word itself: only what comes before it is reused
    assert expected < len(tokenizer.encode(FIRST))


def test_concurrent_requests_sharing_a_prefix_leave_it_and_each_other_intact(
    tiny_models: dict[str, Path],
) -> None:
    runner = instance(tiny_models["qwen2"])
    ask(runner, "first", FIRST)
    prompts = {"paris": FIRST + " Paris, and Rome is", "rome": FIRST + " not Rome but"}
    together = drive(
        runner, *(GenerateRequest("i", name, GREEDY, prompt=text) for name, text in prompts.items())
    )
    shared = len(Tokenizer(tiny_models["qwen2"]).encode(FIRST))
    for name, text in prompts.items():
        assert together[name].cached_tokens == shared
        assert together[name].token_ids == ask(runner, f"alone-{name}", text, cache=False).token_ids


def test_a_tiny_budget_evicts_and_the_runner_never_holds_more_than_its_bytes(
    tiny_models: dict[str, Path],
) -> None:
    runner = instance(tiny_models["llama"], positions=40)
    stage, index = runner.stage, runner.role.prefixes  # type: ignore[union-attr]
    budget = runner.spec.prefix_bytes
    prompts = [f"{word} is a word that people say when" for word in ("apple", "river", "stone", "cloud")]
    for i, prompt in enumerate(prompts):
        ask(runner, f"r{i}", prompt)
        held = stage.prefixes.report()
        assert held.bytes <= budget and index.held <= index.budget
        assert held.positions == index.held and set(stage.prefixes.entries) == set(index.entries)
    # each was kept (none covers another); the budget holds two, the older ones were evicted
    assert len(index.entries) == 2 and index.stats.evictions == len(prompts) - 2
    # a sequence longer than the whole budget is not kept at all, and nothing is evicted for it
    kept = set(index.entries)
    ask(runner, "long", " ".join(["word"] * 45))
    assert set(index.entries) == kept


def test_budget_zero_keeps_and_reuses_nothing(tiny_models: dict[str, Path]) -> None:
    runner = instance(tiny_models["llama"], positions=0)
    ask(runner, "first", FIRST)
    result = ask(runner, "second", LONGER)
    assert result.cached_tokens == 0 and runner.stage.prefixes.entries == {}
    assert runner.role.prefixes.stats.lookups == 0  # type: ignore[union-attr]
    assert result.token_ids == ask(runner, "plain", LONGER, cache=False).token_ids


def test_memory_pressure_evicts_cached_prefixes_before_a_new_request(tiny_models: dict[str, Path]) -> None:
    room = {"n1": Room(available=20 * GB, total=24 * GB)}
    runner = instance(tiny_models["llama"], memory=lambda address: room["n1"])
    ask(runner, "first", FIRST)
    assert len(runner.stage.prefixes.entries) == 1
    room["n1"] = Room(available=MIN_FREE_BYTES, total=4 * GB)  # the node runs short
    result = ask(runner, "second", LONGER)
    index = runner.role.prefixes  # type: ignore[union-attr]
    assert result.cached_tokens == 0 and index.stats.evictions == 1  # evicted before it could match
    assert set(runner.stage.prefixes.entries) == set(index.entries) == {"second"}  # its own is kept
    ask(runner, "third", "Something else entirely", cache=False)  # still short: it goes too
    assert runner.stage.prefixes.entries == {} and index.stats.evictions == 2
    room["n1"] = Room(available=20 * GB, total=24 * GB)
    assert result.token_ids == ask(runner, "plain", LONGER, cache=False).token_ids  # served all the same


# --- real workers: every sharding -------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "prefix", 4, tiny_models) as running:
        yield running


def place(client: Cluster, folder: Path, sharding: str, nodes: int, prefix_gb: float | None = None) -> str:
    card, ref = resolve_card(str(folder))
    prefix = None if prefix_gb is None else int(prefix_gb * GB)
    request = PlacementRequest(dtype="float32", nodes=nodes, prefix_cache_bytes=prefix)
    placement = client.plan(card, request, client.statuses(), sharding)
    assert placement.sharding == sharding and len(placement.shards) == nodes
    return client.load(card, ref, placement).instance_id


def generate(
    client: Cluster, instance_id: str, prompt: str, params: SamplingParams, cache: bool = True
) -> Completion:
    view = instances_of(client.statuses())[instance_id]
    generation = client.generate(view, params, prompt=prompt, cache_prompt=cache)
    list(generation)
    assert generation.result is not None
    return generation.result


def runners(client: Cluster, instance_id: str) -> list[RunnerReport]:
    view = instances_of(client.statuses())[instance_id]
    return [view.runners[node] for node in view.nodes]


@pytest.mark.parametrize(
    ("kind", "sharding", "nodes"),
    [
        ("llama", "pipeline", 1),
        ("llama", "pipeline", 2),
        ("qwen2", "pipeline", 4),
        ("llama", "tensor", 2),
        ("mixtral", "tensor", 2),  # expert-parallel: each rank holds 2 of the 4 experts
    ],
)
def test_every_sharding_reuses_a_prefix_with_exactly_the_tokens_of_reading_it_again(
    cluster: WorkerCluster, tiny_models: dict[str, Path], kind: str, sharding: str, nodes: int
) -> None:
    tokenizer = Tokenizer(tiny_models[kind])
    shared = 0
    with cluster.client() as client:
        instance_id = place(client, tiny_models[kind], sharding, nodes)
        try:
            # each round its own text, so that it reuses its own first request only
            for params, first in ((GREEDY, FIRST), (PENALIZED, "Rivers run down to the sea")):
                generate(client, instance_id, first, params)
                reused = generate(client, instance_id, first + " a city, and the capital of Italy is", params)
                again = generate(
                    client, instance_id, first + " a city, and the capital of Italy is", params, cache=False
                )
                assert reused.cached_tokens == len(tokenizer.encode(first)) and again.cached_tokens == 0
                assert reused.token_ids == again.token_ids
                shared += reused.cached_tokens
            reports = runners(client, instance_id)
            # every runner copied the same prefixes and holds the same entries, within its budget
            assert len({(r.prefix.entries, r.prefix.positions, r.prefix.hits) for r in reports}) == 1
            assert all(r.prefix.hits == 2 and 0 < r.prefix.bytes <= r.prefix.budget_bytes for r in reports), (
                reports
            )
            head = reports[0].head_prefix
            assert head is not None and head.hits == 2 and head.reused_tokens == shared
        finally:
            client.unload(instance_id)


def test_a_tiny_budget_from_place_keeps_every_runner_within_its_bytes(
    cluster: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    """`place --prefix-cache-gb` on a 2-worker pipeline, read back from `state`, `run --json`, `place`."""
    model = str(tiny_models["llama"])
    placed = cluster.cli_json(
        "place", model, "--nodes", "2", "--sharding", "pipeline", "--prefix-cache-gb", "0.00002"
    )
    try:
        assert [s["prefix_cache_bytes"] for s in placed["shards"]] == [20000, 20000]
        assert 0 < placed["prefix_cache_positions"] < 20000 // 256
        for word in ("apple", "river", "stone", "cloud", "apple"):
            answer = cluster.cli_json(
                "run", "--raw", "-n", "6", "-m", model, f"{word} is a word that people say"
            )
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] in (
                0,
                answer["usage"]["prompt_tokens"] - 1,
            )
            state = cluster.cli_json("state")
            docs = [next(iter(r.values())) for r in state["runners"].values()]
            assert all(d["prefixCache"]["bytes"] <= d["prefixCache"]["budgetBytes"] == 20000 for d in docs)
        (instance,) = [next(iter(i.values())) for i in state["instances"].values()]
        assert instance["prefixCache"]["evictions"] >= 1
        assert instance["prefixCache"]["budgetPositions"] == placed["prefix_cache_positions"]
        table = cluster.cli("state").stdout
        assert "cached prefixes" in table
        # the head's row: how many of the 5 requests reused a prefix (the last repeats the first's
        # text, so it reused what the budget kept of it or nothing), and what was evicted
        head = instance["prefixCache"]
        assert f"{head['hits']} of 5 requests, {head['evictions']} evicted" in table
    finally:
        cluster.cli("delete", placed["instance_id"])


def test_budget_zero_from_place_keeps_nothing_anywhere(
    cluster: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    model = str(tiny_models["qwen2"])
    placed = cluster.cli_json("place", model, "--nodes", "2", "--prefix-cache-gb", "0")
    try:
        assert placed["prefix_cache_positions"] == 0
        for _ in range(2):
            answer = cluster.cli_json("run", "--raw", "-n", "4", "-m", model, FIRST)
            assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        state = cluster.cli_json("state")
        for doc in (next(iter(r.values())) for r in state["runners"].values()):
            assert doc["prefixCache"] == {
                "entries": 0,
                "positions": 0,
                "bytes": 0,
                "budgetBytes": 0,
                "hits": 0,
                "reusedTokens": 0,
            }
    finally:
        cluster.cli("delete", placed["instance_id"])


def test_run_tells_how_many_prompt_tokens_were_cached(
    cluster: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    model = str(tiny_models["llama"])
    placed = cluster.cli_json("place", model, "--nodes", "1")
    try:
        cluster.cli("run", "--raw", "-n", "3", "-m", model, FIRST)
        second = cluster.cli("run", "--raw", "-n", "3", "-m", model, FIRST)
        assert second.returncode == 0, second.stderr
        prompt = len(Tokenizer(tiny_models["llama"]).encode(FIRST))
        assert f"({prompt - 1} of {prompt} prompt tokens cached)" in second.stderr
        assert RunnerStatus.READY.value in json.dumps(cluster.cli_json("state")["runners"])
    finally:
        cluster.cli("delete", placed["instance_id"])


def test_a_follower_that_lost_an_entry_costs_the_request_nothing(
    cluster: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    """node2 forgets its cached prefixes behind its head's back (a lease naming none, as a lost
    word would leave it): the request that reuses one there runs again without it, to the same
    tokens, and the head forgets the entry everywhere."""
    with cluster.client() as client:
        instance_id = place(client, tiny_models["llama"], "pipeline", 2)
        try:
            generate(client, instance_id, FIRST, GREEDY)
            assert wait_for(lambda: [r.prefix.entries for r in runners(client, instance_id)] == [1, 1], 5)
            ctx, node2 = raw_socket(cluster, "node2")
            try:
                node2.send_multipart([header("lease", instance_id=instance_id, seqs=[], kept=[])])
                assert wait_for(lambda: [r.prefix.entries for r in runners(client, instance_id)] == [1, 0], 5)
            finally:
                ctx.destroy(linger=0)
            result = generate(client, instance_id, LONGER, GREEDY)
            assert result.cached_tokens == 0  # run again from the start, on every stage
            assert result.token_ids == generate(client, instance_id, LONGER, GREEDY, cache=False).token_ids
            head = runners(client, instance_id)[0].head_prefix
            assert head is not None and head.hits == 1  # it matched, then went without
            assert "running it again without the cached prefix" in cluster.log("node1")
        finally:
            client.unload(instance_id)
