"""Speculative decoding's pure parts: prompt lookup, the adaptive rule (on a fake clock), the
acceptance rule's output distribution (a chi-square test on a tiny vocabulary, one process and
two simulated tensor ranks), the wire form of a verification step, and placement of a draft model."""

from __future__ import annotations

import math
import threading
from typing import Any

import msgpack
import pytest
import torch

from exoctl.cluster.drafts import choose_draft, natural_draft
from exoctl.engine.parallel_sampling import RankSampler, choose_tokens
from exoctl.engine.prompt_lookup import PromptLookup
from exoctl.engine.sampling import Sampler, verify_drafts
from exoctl.engine.shard import TensorShard
from exoctl.models.catalog import get_card
from exoctl.placement.pipeline import GB, NodeProfile, PlacementError, PlacementRequest, place
from exoctl.placement.tensor import place_tensor
from exoctl.wire import protocol
from exoctl.wire.instance_messages import Forward, ForwardStep, StepRefused
from exoctl.wire.messages import parse
from exoctl.wire.protocol import Tensor
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.speculation import MAX_K, PAUSE_PASSES, START_K, Speculator, best_k

# --- prompt lookup --------------------------------------------------------------------------------


def test_prompt_lookup_continues_the_most_recent_longest_match() -> None:
    lookup = PromptLookup()
    #          0  1  2  3  4  5  6  7  8  9 10 11
    ids = [1, 2, 3, 9, 9, 2, 3, 4, 5, 6, 7, 2, 3]
    # the 2-gram (2, 3) last appeared at 5-6, followed by 4 5 6 (not the older 9 9)
    assert lookup.propose("s", ids, 3) == [4, 5, 6]
    # a longer n-gram wins: (9, 2, 3) appeared once, followed by 4 5
    assert lookup.propose("t", [9, 2, 3, 4, 5, 0, 9, 2, 3], 2) == [4, 5]
    assert lookup.propose("u", [1, 2, 3, 4], 4) == []  # nothing repeats
    assert lookup.propose("u", [1, 2, 3, 4, 1, 2], 4) == [3, 4, 1, 2]  # grown by two: read incrementally
    assert lookup.propose("u", [7, 7, 8], 2) == []  # not what it was: read again from nothing
    lookup.forget("u")
    assert "u" not in lookup.seen


# --- the adaptive rule ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Fixed:
    """A drafter that always guesses k tokens (the rule, not the guesses, is under test)."""

    name = "fixed"

    def propose(self, seq: str, ids: Any, k: int) -> list[int]:
        return list(range(k))

    def forget(self, seq: str) -> None:
        pass


def pass_of(
    spec: Speculator, clock: Clock, seconds: float, accepted: int | None = None, room: int = 100
) -> int:
    """One decode pass: guesses asked, `seconds` later its tokens back (all guesses accepted when
    `accepted` is None); the number guessed."""
    guessed = len(spec.guesses("s", [1, 2, 3], room, allowed=True))
    clock.now += seconds
    spec.took("s", 1 + (guessed if accepted is None else min(accepted, guessed)))
    return guessed


def test_k_is_chosen_by_acceptance_and_cost() -> None:
    assert best_k(0.99, 0.05) == MAX_K  # guesses come true and positions are cheap: long runs
    assert best_k(0.2, 0.1) == 1  # they mostly fail
    assert best_k(0.7, 0.05) in (4, 5, 6)
    assert best_k(0.9, 0.6) <= 2  # a draft model that costs most of a plain pass per guess


def test_k_follows_what_the_sequence_shows() -> None:
    clock = Clock()
    spec = Speculator(Fixed(), clock)
    assert pass_of(spec, clock, 1.0) == START_K
    for _ in range(5):  # two more guessing passes, then three plain ones (timed, to judge against)
        pass_of(spec, clock, 1.0)
    assert spec.sequences["s"].plain.passes == 3
    for _ in range(6):  # every guess accepted, each costing 5% of a plain pass
        guessed = len(spec.guesses("s", [1, 2, 3], 100, allowed=True))
        clock.now += 1.0 + 0.05 * guessed
        spec.took("s", 1 + guessed)
    assert spec.sequences["s"].k == MAX_K
    state = spec.sequences["s"]
    while state.rejected < 3:  # now nothing is accepted, and each guess costs 10% of a plain pass
        guessed = len(spec.guesses("s", [1, 2, 3], 100, allowed=True))
        clock.now += 1.0 + 0.1 * guessed
        spec.took("s", 1)
    assert state.k <= 2 and state.accepted / (state.accepted + state.rejected) < 0.5
    assert pass_of(spec, clock, 1.0, room=2) <= 1  # k + 1 tokens must fit what is left
    assert spec.guesses("s", [1], 100, allowed=False) == ()  # a batch, or a request that said no


def test_speculation_that_loses_to_plain_passes_pauses_and_backs_off() -> None:
    clock = Clock()
    spec = Speculator(Fixed(), clock)
    for _ in range(3):
        pass_of(spec, clock, 1.5, accepted=0)  # 1 token in 1.5 s
    for _ in range(3):
        pass_of(spec, clock, 1.0)  # 1 token in 1.0 s: plain wins
    assert spec.sequences["s"].pause == PAUSE_PASSES
    assert [pass_of(spec, clock, 1.0) for _ in range(PAUSE_PASSES)] == [0] * PAUSE_PASSES
    for _ in range(3):  # it tries again, and loses again: twice the pause
        assert pass_of(spec, clock, 1.5, accepted=0) > 0
    assert spec.sequences["s"].pause == 2 * PAUSE_PASSES
    stats = spec.stats
    assert stats.verify_passes == 6 and stats.accepted == 0 and stats.tokens == stats.passes


def test_speculation_that_wins_keeps_going() -> None:
    clock = Clock()
    spec = Speculator(Fixed(), clock)
    for _ in range(3):
        pass_of(spec, clock, 1.2, accepted=3)  # 4 tokens in 1.2 s
    for _ in range(3):
        pass_of(spec, clock, 1.0)
    assert spec.sequences["s"].pause == 0 and pass_of(spec, clock, 1.2, accepted=3) > 0
    assert spec.stats.report("").tokens_per_pass > 2


# --- the acceptance rule keeps the target's distribution ------------------------------------------

LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.2, -1.0, -3.0])
PARAMS = SamplingParams(temperature=0.8, top_k=5, seed=7)
# chi-square with 5 degrees of freedom (6 tokens, one of which top_k=5 rules out: 4 df among the
# 5 allowed, counted over 6 cells with the empty one contributing nothing): 18.47 is the 0.1%
# critical value of 4 df, so a correct rule fails a check once in a thousand seeds; the seeds
# are fixed, so the test is deterministic
CRITICAL = 18.47


def target_distribution() -> torch.Tensor:
    scaled = LOGITS / PARAMS.temperature
    kept = scaled.masked_fill(scaled < torch.topk(scaled, PARAMS.top_k).values[-1], -math.inf)
    return kept.softmax(dim=0)


def chi_square(counts: list[int], expected: torch.Tensor) -> float:
    total = sum(counts)
    return sum(
        (count - total * float(p)) ** 2 / (total * float(p))
        for count, p in zip(counts, expected, strict=True)
        if p > 0
    )


@pytest.mark.parametrize("draft", [0, 2, 5], ids=["likely", "unlikely", "ruled-out"])
def test_accepting_a_draft_by_p_keeps_the_targets_distribution(draft: int) -> None:
    sampler = Sampler.create(PARAMS)
    counts = [0] * len(LOGITS)
    for _ in range(20000):
        counts[sampler.verify(LOGITS[None, :], draft)] += 1
    expected = target_distribution()
    assert counts[5] == 0  # outside top_k: never, even when drafted
    assert chi_square(counts, expected) < CRITICAL, counts


def test_a_run_of_guesses_stops_at_the_first_rejection() -> None:
    sampler = Sampler.create(SamplingParams())  # greedy
    rows = torch.tensor([[0.0, 5.0, 0.0], [0.0, 0.0, 5.0], [5.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    assert verify_drafts(sampler, rows, [1, 2, 0]) == [1, 2, 0, 1]  # all accepted, and a bonus token
    assert verify_drafts(sampler, rows, [1, 0, 0]) == [1, 2]  # the correction ends the run
    assert verify_drafts(sampler, rows, [2, 2, 0]) == [1]


class Ranks:
    """k ranks on threads meeting in an all-gather, as ZmqCollective's does across processes."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.slots: list[torch.Tensor | None] = [None] * world
        self.barrier = threading.Barrier(world)

    def gather_for(self, rank: int) -> Any:
        def gather(mine: torch.Tensor) -> list[torch.Tensor]:
            self.slots[rank] = mine.clone()
            self.barrier.wait()
            got = [t for t in self.slots if t is not None]
            self.barrier.wait()
            return got

        return gather


@pytest.mark.parametrize("draft", [1, 4], ids=["likely-on-rank-0", "unlikely-on-rank-1"])
def test_tensor_ranks_accept_by_the_same_rule_and_agree(draft: int) -> None:
    world, draws = 2, 6000
    ranks = Ranks(world)
    chosen: list[list[int]] = [[] for _ in range(world)]

    def run(rank: int) -> None:
        shard = TensorShard(rank, world)
        part = shard.part(len(LOGITS))
        sampler = RankSampler.create(PARAMS, 11, rank)
        gather = ranks.gather_for(rank)
        for _ in range(draws):
            row = LOGITS[part.start : part.stop][None, :]
            chosen[rank] += choose_tokens(row, shard, len(LOGITS), [sampler], gather, [draft])

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert chosen[0] == chosen[1] and len(chosen[0]) == draws  # every rank derives the same token
    counts = [chosen[0].count(i) for i in range(len(LOGITS))]
    assert counts[5] == 0 and chi_square(counts, target_distribution()) < CRITICAL, counts


# --- the wire -------------------------------------------------------------------------------------


def test_a_verification_step_travels_with_its_guesses() -> None:
    step = ForwardStep(["a"], [17], drafts={"a": (5, 6, 7)})
    message = Forward("i", step, Tensor("int64", (1, 4), b"\0" * 32))
    got = parse(protocol.decode([bytes(memoryview(f)) for f in message.frames()]))
    assert isinstance(got, Forward) and got.step == step


@pytest.mark.parametrize(
    ("drafts", "partial"),
    [
        ({"b": [1]}, False),
        ({"a": []}, False),
        ({"a": [1, -2]}, False),
        ({"a": "12"}, False),
        ({"a": [1]}, True),
    ],
)
def test_malformed_guesses_are_refused_naming_the_sequence(drafts: Any, partial: bool) -> None:
    header = {
        "v": protocol.PROTOCOL_VERSION,
        "type": "forward",
        "instance_id": "i",
        "seqs": ["a"],
        "positions": [4],
        "drafts": drafts,
        "partial": partial,
        "tensors": [{"dtype": "int64", "shape": [1, 2]}],
    }
    with pytest.raises(StepRefused, match="drafts") as refused:
        parse(protocol.decode([msgpack.packb(header), b"\0" * 16]))
    assert refused.value.seqs == ("a",)


# --- placement ------------------------------------------------------------------------------------


def test_the_catalog_pairs_the_test_plans_models_with_their_drafts() -> None:
    assert natural_draft(get_card("llama-3.1-70b-cpu")) == "llama-3.2-1b-cpu"
    assert natural_draft(get_card("llama-3.1-8b-cpu")) == "llama-3.2-1b-cpu"
    assert natural_draft(get_card("qwen2.5-32b-cpu")) == "qwen2.5-0.5b-cpu"
    assert natural_draft(get_card("mixtral-8x7b-cpu")) == "ngram"  # no small model of its tokenizer
    draft = choose_draft(get_card("llama-3.1-70b-cpu"), "auto")
    assert draft is not None and draft.model_id == "llama-3.2-1b-cpu" and draft.dtype == "int4"
    assert 0.5 * GB < draft.bytes < 2 * GB  # int4 weights and a KV reserve
    assert choose_draft(get_card("llama-3.1-70b-cpu"), "none") is None
    assert choose_draft(get_card("llama-3.1-70b-cpu"), "ngram").bytes == 0  # type: ignore[union-attr]


def test_the_draft_model_is_counted_on_the_head_node_only() -> None:
    card = get_card("llama-3.1-70b-cpu")
    nodes = [NodeProfile(f"n{i}", 96 * GB, 96 * GB) for i in range(4)]
    draft = choose_draft(card, "llama-3.2-1b-cpu", "int4")
    plain = place(card, nodes, PlacementRequest(dtype="int4", nodes=4))
    drafted = place(card, nodes, PlacementRequest(dtype="int4", nodes=4, draft=draft))
    assert drafted.draft == draft and draft is not None
    assert [s.draft_bytes for s in drafted.shards] == [draft.bytes, 0, 0, 0]
    assert drafted.shards[0].weight_bytes <= plain.shards[0].weight_bytes  # its layers make room
    tensor = place_tensor(card, nodes, PlacementRequest(dtype="int4", nodes=4, draft=draft))
    assert [s.draft_bytes for s in tensor.shards] == [draft.bytes, 0, 0, 0]
    assert tensor.shards[0].memory_bytes - tensor.shards[1].memory_bytes == draft.bytes
    small = [NodeProfile("only", 5 * GB, 5 * GB)]
    with pytest.raises(PlacementError, match="the draft model"):
        place(get_card("llama-3.1-8b-cpu"), small, PlacementRequest(dtype="int4", nodes=1, draft=draft))


# --- what /metrics and /state say -------------------------------------------------------------------


def test_metrics_and_the_state_document_carry_the_heads_counts() -> None:
    from prometheus_client import generate_latest

    from exoctl.api.metrics import Metrics
    from exoctl.cluster.state import speculation_doc
    from exoctl.cluster.views import NodeStatus
    from exoctl.inventory import Node
    from exoctl.wire.runner_report import RunnerReport, RunnerStatus, SpeculationReport

    report = SpeculationReport("ngram", passes=10, tokens=25, verify_passes=6, drafted=20, accepted=15)
    runner = RunnerReport(
        "r", "i", "m", "pipeline", "float32", 0, 4, 4, 0, 1, ("a",), RunnerStatus.READY, speculation=report
    )
    assert RunnerReport.from_wire(runner.to_wire()) == runner  # through a status reply
    text = generate_latest(Metrics(lambda: [NodeStatus(Node("a", "127.0.0.1"), None, [runner])]).registry)
    lines = text.decode().splitlines()
    for name, value in (
        ("exoctl_decode_passes_total", 10),
        ("exoctl_decode_pass_tokens_total", 25),
        ("exoctl_speculative_drafted_tokens_total", 20),
        ("exoctl_speculative_accepted_tokens_total", 15),
    ):
        assert f'{name}{{drafter="ngram",instance="i",model="m"}} {value:.1f}' in lines, name
    doc = speculation_doc(report)
    assert doc["tokensPerPass"] == 2.5 and doc["acceptance"] == 0.75 and doc["verifyPasses"] == 6
