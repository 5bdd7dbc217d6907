"""`exoctl bench`: what a placed instance does on this cluster, measured as llama-bench measures a
machine — a warm-up first, each number repeated and shown with its spread — plus what only a
cluster has: aggregate throughput under concurrent streams, and per node the time in compute
versus the time between nodes.

Torch-free: it drives the instance through the cluster client as `run` does. Prefill and decode
times are the head's own (`Completion.timings`); latencies are the client's wall clock; the
per-node split is the difference of the runners' counters around the decode runs. Those runs read
every prompt whole (`cache_prompt` off); the multi-turn test measures a conversation's time to
first token turn by turn with the cached prefixes and without them.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import InstanceView, NodeStatus, instances_of
from exoctl.errors import ExoctlError
from exoctl.wire.answer import Completion
from exoctl.wire.runner_report import RunnerReport, SpeculationReport
from exoctl.wire.sampling_params import SamplingParams

# common English words that are one token each in the Llama 3, Qwen2.5, Mistral and SmolLM2
# vocabularies (with their leading space), so a prompt of n of them is about n tokens
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we their has been if more when will would who so no"
).split()


@dataclass
class Stat:
    """Repeated measurements of one quantity: mean and sample standard deviation."""

    values: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values) if self.values else 0.0

    @property
    def sd(self) -> float:
        return statistics.stdev(self.values) if len(self.values) > 1 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "mean": round(self.mean, 4),
            "sd": round(self.sd, 4),
            "values": [round(v, 4) for v in self.values],
        }


@dataclass
class BenchConfig:
    prompt_lengths: tuple[int, ...] = (32, 128, 512)
    decode_tokens: int = 64
    concurrency: tuple[int, ...] = (1, 4, 8)
    repetitions: int = 3
    turns: int = 4  # of the multi-turn conversation (0: not measured)
    turn_tokens: int = 128  # about this many tokens each user turn adds
    answer_tokens: int = 32  # at most this many each answer adds


def prompt_of(length: int, salt: int) -> str:
    """About `length` tokens of text, different for each `salt` (nothing can be reused between runs)."""
    return " ".join(WORDS[(i * 7 + salt * 13) % len(WORDS)] for i in range(max(length, 1)))


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) by linear interpolation between closest ranks."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


class Bench:
    def __init__(self, cluster: Cluster, instance: InstanceView, config: BenchConfig) -> None:
        self.cluster = cluster
        self.instance = instance
        self.config = config
        self.salt = 0

    def _run(
        self,
        cluster: Cluster,
        prompt: str,
        max_tokens: int,
        speculative: bool = False,
        messages: list[dict[str, Any]] | None = None,
    ) -> tuple[Completion, float]:
        """One request to the end, its prompt read whole (as raw text, or `messages` through the
        chat template); its completion and the client's wall time. Speculation only where asked:
        the other measurements are of one token a step."""
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        began = time.perf_counter()
        generation = cluster.generate(
            self.instance,
            params,
            prompt=None if messages else prompt,
            messages=messages,
            cache_prompt=False,
            speculative=speculative,
        )
        for _ in generation:
            pass
        if generation.result is None:
            raise ExoctlError("the head ended a benchmark request without an answer")
        return generation.result, time.perf_counter() - began

    def _prompt(self, length: int) -> str:
        self.salt += 1
        return prompt_of(length, self.salt)

    def warm_up(self) -> None:
        self._run(self.cluster, self._prompt(16), 8)

    def prefill(self, length: int) -> dict[str, Any]:
        """Prompt tokens per second and time to first token for a prompt of about `length` tokens."""
        speed, ttft, tokens = Stat(), Stat(), 0
        for _ in range(self.config.repetitions):
            completion, _ = self._run(self.cluster, self._prompt(length), 1)
            first = completion.timings.time_to_first_token_s
            tokens = completion.prompt_tokens
            speed.values.append(tokens / first if first > 0 else 0.0)
            ttft.values.append(first * 1000)
        return {"prompt_tokens": tokens, "tokens_per_s": speed.to_json(), "ttft_ms": ttft.to_json()}

    def decode(self) -> dict[str, Any]:
        """One stream: decode tokens per second (the head's), TTFT and total time."""
        speed, ttft, total = Stat(), Stat(), Stat()
        for _ in range(self.config.repetitions):
            completion, wall = self._run(self.cluster, self._prompt(32), self.config.decode_tokens)
            speed.values.append(completion.timings.decode_tokens_per_s)
            ttft.values.append(completion.timings.time_to_first_token_s * 1000)
            total.values.append(wall * 1000)
        return {
            "tokens": self.config.decode_tokens,
            "tokens_per_s": speed.to_json(),
            "ttft_ms": ttft.to_json(),
            "total_ms": total.to_json(),
        }

    def concurrent(self, streams: int) -> dict[str, Any]:
        """`streams` requests at once, each decoding `decode_tokens`: the tokens all of them made per
        second of wall time, and each request's latency (p50, p95 over every repetition)."""
        aggregate, latencies, ttfts = Stat(), [], []
        clusters = [Cluster(self.cluster.inventory, self.cluster.keys) for _ in range(streams)]
        try:
            for _ in range(self.config.repetitions):
                results: list[tuple[Completion, float] | BaseException] = [ExoctlError("not run")] * streams
                prompts = [self._prompt(32) for _ in range(streams)]

                def one(i: int, prompt: str, results: list[Any]) -> None:
                    try:
                        results[i] = self._run(clusters[i], prompt, self.config.decode_tokens)
                    except BaseException as exc:  # said below, in this thread
                        results[i] = exc

                threads = [
                    threading.Thread(target=one, args=(i, prompts[i], results)) for i in range(streams)
                ]
                began = time.perf_counter()
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                wall = time.perf_counter() - began
                for result in results:
                    if isinstance(result, BaseException):
                        raise result
                done = [r for r in results if not isinstance(r, BaseException)]
                aggregate.values.append(sum(c.completion_tokens for c, _ in done) / wall)
                latencies += [w * 1000 for _, w in done]
                ttfts += [c.timings.time_to_first_token_s * 1000 for c, _ in done]
        finally:
            for cluster in clusters:
                cluster.close()
        return {
            "streams": streams,
            "aggregate_tokens_per_s": aggregate.to_json(),
            "latency_ms": {
                "p50": round(percentile(latencies, 50), 2),
                "p95": round(percentile(latencies, 95), 2),
            },
            "ttft_ms": {"p50": round(percentile(ttfts, 50), 2), "p95": round(percentile(ttfts, 95), 2)},
        }

    def conversation(self, cached: bool) -> list[Completion]:
        """A chat of `turns` turns, each user turn about `turn_tokens` tokens of new text and each
        greedy answer at most `answer_tokens`, the whole history sent every turn (as every chat
        client does): each turn's completion, with its time to first token and cached tokens."""
        params = SamplingParams(temperature=0.0, max_tokens=self.config.answer_tokens)
        messages: list[dict[str, Any]] = []
        turns = []
        for _ in range(self.config.turns):
            messages.append({"role": "user", "content": self._prompt(self.config.turn_tokens)})
            generation = self.cluster.generate(self.instance, params, messages=messages, cache_prompt=cached)
            for _ in generation:
                pass
            if generation.result is None:
                raise ExoctlError("the head ended a benchmark request without an answer")
            turns.append(generation.result)
            messages.append({"role": "assistant", "content": generation.result.text})
        return turns

    def multi_turn(self) -> dict[str, Any]:
        """Time to first token turn by turn, with the cached prefixes and without (alternated,
        `repetitions` conversations each): flat with them, growing with the history without."""
        ttft = {
            True: [Stat() for _ in range(self.config.turns)],
            False: [Stat() for _ in range(self.config.turns)],
        }
        history = [Stat() for _ in range(self.config.turns)]
        reused = [Stat() for _ in range(self.config.turns)]
        for _ in range(self.config.repetitions):
            for cached in (False, True):
                for turn, completion in enumerate(self.conversation(cached)):
                    ttft[cached][turn].values.append(completion.timings.time_to_first_token_s * 1000)
                    if cached:
                        history[turn].values.append(completion.prompt_tokens)
                        reused[turn].values.append(completion.cached_tokens)
        rows = [
            {
                "turn": turn + 1,
                "prompt_tokens": round(history[turn].mean),
                "cached_tokens": round(reused[turn].mean),
                "ttft_ms_cached": ttft[True][turn].to_json(),
                "ttft_ms_uncached": ttft[False][turn].to_json(),
            }
            for turn in range(self.config.turns)
        ]

        def growth(cached: bool) -> float:  # the last turn's time to first token over the first's
            first = ttft[cached][0].mean
            return round(ttft[cached][-1].mean / first, 3) if first else 0.0

        return {
            "turns": rows,
            "turn_tokens": self.config.turn_tokens,
            "answer_tokens": self.config.answer_tokens,
            "last_over_first": {"cached": growth(True), "uncached": growth(False)},
        }

    def speculation(self) -> dict[str, Any] | None:
        """An instance with a drafter: one stream's decode tokens/s with speculation and without
        (alternated, `repetitions` each) on a prompt that asks to copy a text (where guesses come
        true) and on one that does not, with the acceptance and tokens per pass the head counted."""
        if self._speculation_report() is None:
            return None
        text = prompt_of(96, 0)
        prompts = {
            "copy": [{"role": "user", "content": f"Repeat this text exactly, word for word:\n\n{text}"}],
            "free": [{"role": "user", "content": "Write a short story about a lighthouse keeper."}],
        }
        rows = []
        for name, messages in prompts.items():
            speed = {True: Stat(), False: Stat()}
            before = self._speculation_report()
            for _ in range(self.config.repetitions):
                for speculative in (False, True):
                    completion, _ = self._run(
                        self.cluster, "", self.config.decode_tokens, speculative, messages
                    )
                    speed[speculative].values.append(completion.timings.decode_tokens_per_s)
            after = self._speculation_report()
            assert before is not None and after is not None
            drafted, accepted = after.drafted - before.drafted, after.accepted - before.accepted
            passes, tokens = after.passes - before.passes, after.tokens - before.tokens
            plain = speed[False].mean
            rows.append(
                {
                    "prompt": name,
                    "tokens_per_s_speculative": speed[True].to_json(),
                    "tokens_per_s_plain": speed[False].to_json(),
                    "speedup": round(speed[True].mean / plain, 3) if plain else 0.0,
                    "acceptance": round(accepted / drafted, 3) if drafted else 0.0,
                    # over the passes of both kinds of run: the plain runs' count one token each
                    "tokens_per_pass": round(tokens / passes, 3) if passes else 0.0,
                }
            )
        report = self._speculation_report()
        return {"drafter": report.drafter if report else "", "prompts": rows}

    def _speculation_report(self) -> SpeculationReport | None:
        head = self.runners().get(self.instance.head)
        return head.speculation if head is not None else None

    def runners(self) -> dict[str, RunnerReport]:
        view = instances_of(self.cluster.statuses()).get(self.instance.instance_id)
        if view is None:
            raise ExoctlError(f"instance {self.instance.instance_id} went away during the benchmark")
        return dict(view.runners)


def per_node(
    before: dict[str, RunnerReport], after: dict[str, RunnerReport], statuses: list[NodeStatus], e2e_ms: float
) -> dict[str, Any]:
    """Per node, over the decode runs: compute ms per token (its forward passes, collectives left
    out), transport ms per token (tensor ranks: time in collectives; pipeline: the step's time not
    spent computing on any stage, which is hand-offs between nodes and waiting), memory."""
    nodes: dict[str, Any] = {}
    rss = {s.node.name: s.profile.rss if s.profile else 0 for s in statuses}
    stage_compute = 0.0
    for node, report in after.items():
        old = before.get(node)
        tokens = report.decoded_tokens - (old.decoded_tokens if old else 0)
        compute = report.compute_s - (old.compute_s if old else 0.0)
        collective = report.collective_s - (old.collective_s if old else 0.0)
        per = 1000 / tokens if tokens else 0.0
        entry = {
            "layers": [report.start_layer, report.end_layer],
            "rank": report.rank,
            "compute_ms_per_token": round((compute - collective) * per, 3),
            "memory_bytes": report.memory_bytes,
            "worker_rss_bytes": rss.get(node, 0),
        }
        if report.sharding == "tensor":
            entry["transport_ms_per_token"] = round(collective * per, 3)
            entry["transport"] = report.collective_transport
        else:
            stage_compute += (compute - collective) * per
        nodes[node] = entry
    pipeline = [n for n, r in after.items() if r.sharding != "tensor"]
    if len(pipeline) > 1 and e2e_ms > 0:
        # a pipeline's stages run one after another for one stream: what is left of a step is
        # the hand-offs (and the head's sampling), shared by the stages
        left = max(e2e_ms - stage_compute, 0.0)
        for node in pipeline:
            nodes[node]["transport_ms_per_token"] = round(left / len(pipeline), 3)
            nodes[node]["transport"] = "pipeline hand-off (step time not in any stage's compute, shared)"
    return nodes


def run_bench(
    cluster: Cluster, instance: InstanceView, config: BenchConfig, say: Callable[[str], None]
) -> dict[str, Any]:
    """Every measurement, in order, as one document (`exoctl bench --json`); `say` hears each step."""
    bench = Bench(cluster, instance, config)
    say("warming up…")
    bench.warm_up()
    prefill = []
    for length in config.prompt_lengths:
        say(f"prefill, {length} tokens…")
        prefill.append(bench.prefill(length))
    say(f"decode, 1 stream of {config.decode_tokens} tokens…")
    before = bench.runners()
    decode = bench.decode()
    after = bench.runners()
    e2e_ms = 1000 / decode["tokens_per_s"]["mean"] if decode["tokens_per_s"]["mean"] else 0.0
    nodes = per_node(before, after, cluster.statuses(), e2e_ms)
    concurrency = []
    for streams in config.concurrency:
        say(f"{streams} concurrent streams…")
        concurrency.append(bench.concurrent(streams))
    say("speculative decoding, if the instance drafts…")
    speculation = bench.speculation()
    multi_turn = None
    if config.turns:
        say(f"a conversation of {config.turns} turns, with and without cached prefixes…")
        multi_turn = bench.multi_turn()
    return {
        "model": instance.model_id,
        "instance_id": instance.instance_id,
        "sharding": instance.sharding,
        "dtype": instance.dtype,
        "nodes_in_instance": list(instance.nodes),
        "repetitions": config.repetitions,
        "prefill": prefill,
        "decode": decode,
        "concurrency": concurrency,
        "multi_turn": multi_turn,
        "speculation": speculation,
        "nodes": nodes,
    }
