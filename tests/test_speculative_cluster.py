"""Speculative decoding through real workers: greedy tokens identical with and without it through
one worker, 2- and 4-worker pipelines and a 2-rank tensor split (Mixtral expert-parallel too), with
prompt lookup and with draft models (the target itself, and another random model of the same
tokenizer); what `place`, `state` and the metrics show; a draft of another tokenizer refused by
`place` with the reason; a node lost mid-verification fails the request as without speculation."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from exoctl.cluster.client import Cluster
from exoctl.cluster.drafts import choose_draft
from exoctl.cluster.views import instances_of
from exoctl.engine.tokenizer import Tokenizer
from exoctl.errors import ExoctlError
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.answer import Completion
from exoctl.wire.runner_report import SpeculationReport
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.peers import DOWN_AFTER_S
from tests.cluster_helpers import WorkerCluster, make_cluster, running, tiny_cluster, wait_for

COPY = (
    "Repeat this list exactly: apples, pears, plums, cherries, grapes, lemons, limes, melons, "
    "apples, pears, plums, cherries, grapes, lemons, limes, melons, apples, pears, plums"
)
GREEDY = SamplingParams(max_tokens=32, ignore_eos=True)
PENALIZED = SamplingParams(max_tokens=24, ignore_eos=True, repetition_penalty=1.2, logprobs=2)


@pytest.fixture(scope="module")
def cluster(
    tmp_path_factory: pytest.TempPathFactory, tiny_models: dict[str, Path]
) -> Iterator[WorkerCluster]:
    with tiny_cluster(tmp_path_factory, "speculative", 4, tiny_models) as started:
        yield started


def place(client: Cluster, target: Path, sharding: str, nodes: int, draft: str) -> str:
    card, ref = resolve_card(str(target))  # a folder, or the embedded default's catalog id
    request = PlacementRequest(dtype="float32", nodes=nodes, draft=choose_draft(card, draft, "float32"))
    placement = client.plan(card, request, client.statuses(), sharding)
    assert placement.sharding == sharding and len(placement.shards) == nodes
    return client.load(card, ref, placement).instance_id


def generate(
    client: Cluster, instance_id: str, prompt: str, params: SamplingParams, speculative: bool
) -> Completion:
    view = instances_of(client.statuses())[instance_id]
    generation = client.generate(view, params, prompt=prompt, cache_prompt=False, speculative=speculative)
    list(generation)
    assert generation.result is not None
    return generation.result


def speculation(client: Cluster, instance_id: str) -> SpeculationReport:
    view = instances_of(client.statuses())[instance_id]
    report = view.runners[view.nodes[0]].speculation
    assert report is not None
    return report


# Prompt lookup runs on SmolLM2, a real model that copies the list it is asked to repeat (a random
# tiny model's text repeats nothing for it to find); draft models run on the tiny models.
@pytest.mark.parametrize(
    ("kind", "sharding", "nodes", "draft"),
    [
        ("smollm2", "pipeline", 1, "ngram"),
        ("smollm2", "pipeline", 2, "ngram"),
        ("smollm2", "pipeline", 4, "ngram"),
        ("smollm2", "tensor", 3, "ngram"),  # its 9 heads and 3 KV heads split by 3, not 2
        ("llama", "pipeline", 1, "self"),
        ("llama", "pipeline", 2, "self"),
        ("qwen2", "pipeline", 4, "llama"),  # another random model of the same tokenizer
        ("llama", "tensor", 2, "self"),
        ("qwen2", "tensor", 2, "llama-tied"),
        ("mixtral", "tensor", 2, "llama"),  # expert-parallel, drafted by a dense model
    ],
)
def test_every_sharding_gives_exactly_the_greedy_tokens(
    cluster: WorkerCluster, tiny_models: dict[str, Path], kind: str, sharding: str, nodes: int, draft: str
) -> None:
    drafter = "ngram" if draft == "ngram" else str(tiny_models[kind if draft == "self" else draft])
    target = Path(DEFAULT_MODEL_ID) if kind == "smollm2" else tiny_models[kind]
    with cluster.client() as client:
        instance_id = place(client, target, sharding, nodes, drafter)
        try:
            for params in (GREEDY, PENALIZED):
                plain = generate(client, instance_id, COPY, params, speculative=False)
                fast = generate(client, instance_id, COPY, params, speculative=True)
                assert fast.token_ids == plain.token_ids and fast.text == plain.text
            report = speculation(client, instance_id)
            assert report.verify_passes > 0 and report.drafted > 0
            assert report.tokens == report.passes + report.accepted
            if draft == "self":
                assert report.accepted == report.drafted  # the target guesses itself right every time
            elif draft == "ngram":
                assert report.accepted > report.drafted / 2  # it copies most of the list
            else:
                assert report.accepted < report.drafted
        finally:
            client.unload(instance_id)


def test_place_state_and_metrics_show_the_drafter(
    cluster: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    model = str(tiny_models["llama"])
    placed = cluster.cli_json(
        "place", model, "--nodes", "2", "--sharding", "pipeline", "--draft", model, "--draft-dtype", "float32"
    )
    try:
        draft = placed["draft"]
        assert draft["drafter"] == "llama" and draft["dtype"] == "float32" and draft["bytes"] > 0
        # the draft model is counted on the head's node only
        assert [s["draft_bytes"] for s in placed["shards"]] == [draft["bytes"], 0]
        answer = cluster.cli_json("run", "--raw", "-n", "12", "-m", model, COPY)
        assert answer["usage"]["completion_tokens"] == 12
        state = cluster.cli_json("state")
        doc = next(iter(state["instances"][placed["instance_id"]].values()))
        spec = doc["speculation"]
        assert spec["drafter"] == "llama" and spec["drafted"] > 0 and spec["accepted"] == spec["drafted"]
        assert spec["tokensPerPass"] > 1 and spec["acceptance"] == 1.0
        table = cluster.cli("state").stdout
        assert "speculative decoding" in table and "100%" in table
    finally:
        cluster.cli("delete", placed["instance_id"])


def test_a_draft_of_another_tokenizer_is_refused_with_the_reason(
    cluster: WorkerCluster, tiny_models: dict[str, Path]
) -> None:
    other = next(iter(tiny_models.values())).parent / "other-tokens"
    if not other.exists():
        source = tiny_models["qwen2"]
        tokenizer = Tokenizer(source)
        tokenizer.hf.add_tokens(["<exoctl-extra-token>"])
        tokenizer.hf.save_pretrained(other)
        for name in ("config.json", "model.safetensors", "generation_config.json"):
            if (source / name).exists():
                (other / name).write_bytes((source / name).read_bytes())
    result = cluster.cli("place", str(tiny_models["llama"]), "--nodes", "1", "--draft", str(other))
    assert result.returncode != 0
    assert "draft model other-tokens has another tokenizer: 49153 tokens against the target's 49152" in (
        result.stderr + result.stdout
    )
    assert "--draft ngram" in result.stderr + result.stdout
    with cluster.client() as client:  # nothing is left loaded anywhere
        assert wait_for(lambda: not instances_of(client.statuses()), 5)


def test_a_node_lost_mid_verification_fails_the_request(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    with running(make_cluster(tmp_path, 2, next(iter(tiny_models.values())).parent)) as two:
        with two.client() as client:
            card, ref = resolve_card(DEFAULT_MODEL_ID)
            request = PlacementRequest(dtype="float32", nodes=2, draft=choose_draft(card, "ngram"))
            instance_id = client.load(card, ref, client.plan(card, request, client.statuses())).instance_id
            view = instances_of(client.statuses())[instance_id]
            generation = client.generate(view, SamplingParams(max_tokens=400, ignore_eos=True), prompt=COPY)
            hit_at = 0.0
            with pytest.raises(ExoctlError) as caught:
                for count, _ in enumerate(generation):
                    if count == 10:
                        os.kill(two.pid("node2"), signal.SIGKILL)
                        hit_at = time.monotonic()
            assert hit_at, "the generation ended before the worker was hit"
            assert "node2" in caught.value.message and "stopped answering" in caught.value.message
            assert time.monotonic() - hit_at < DOWN_AFTER_S + 4.0
            view = instances_of(client.statuses()).get(instance_id)
            assert view is not None and view.status == "failed"
