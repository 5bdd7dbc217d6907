"""Speculative decoding: one stream's decode tokens/s with speculation against the same instance
without it, side by side in one run (alternated, best and mean of `--repeat` runs each).

    python benchmarks/speculative.py [--workers 1,2] [--dtypes float32,int4] [--tokens 128] [--repeat 3]

Starts real workers on 127.0.0.11.. with `exoctl up` and places the embedded SmolLM2-135M:
- prompt lookup (`--draft ngram`), in each of `--dtypes`, on 1 and 2 workers (pipeline);
- a draft model: SmolLM2 in int4 drafting for SmolLM2 in float32 (the same tokenizer; the draft
  is only ~2x cheaper than this target, so this measures the machinery, not the ceiling).
Two prompts each: one that asks to repeat a text with small changes (where guesses come true)
and one that asks for new text (where they rarely do: the adaptive rule's case). Greedy output
with and without speculation is compared token by token.

Then a projection for llama-3.1-70b-cpu drafted by llama-3.2-1b-cpu on the test plan's 4 nodes,
from costs measured here in one process: a step of k+1 positions against a step of one on the
1.1B shape in int4 (the weights are read once either way), and the 1.1B shape's int4 decode as
the draft's per-token cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from exoctl.cluster.client import Cluster
from exoctl.cluster.drafts import choose_draft
from exoctl.cluster.views import instances_of
from exoctl.inventory import load_inventory_file
from exoctl.keys import find_keys
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.models.store import resolve_card
from exoctl.placement.pipeline import PlacementRequest
from exoctl.wire.runner_report import SpeculationReport
from exoctl.wire.sampling_params import SamplingParams

PARAGRAPH = (
    "The cat sat by the window every morning. When the sun came up, the cat stretched, yawned and "
    "watched the birds in the garden. Nobody knew where the cat had come from, but everyone in the "
    "street agreed that the cat was the calmest animal they had ever met. In the evening the cat "
    "walked along the fence, and at night the cat slept on the warm stones by the door."
)
PROMPTS = {
    "edit": f"Repeat this paragraph exactly, but write 'dog' instead of 'cat':\n\n{PARAGRAPH}",
    "free": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def run_once(
    cluster: Cluster, instance_id: str, prompt: str, tokens: int, speculative: bool
) -> tuple[float, list[int]]:
    view = instances_of(cluster.statuses())[instance_id]
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    messages = [{"role": "user", "content": prompt}]
    generation = cluster.generate(
        view, params, messages=messages, cache_prompt=False, speculative=speculative
    )
    for _ in generation:
        pass
    assert generation.result is not None
    return generation.result.timings.decode_tokens_per_s, generation.result.token_ids


def head_report(cluster: Cluster, instance_id: str) -> SpeculationReport:
    view = instances_of(cluster.statuses())[instance_id]
    report = view.runners[view.nodes[0]].speculation
    assert report is not None
    return report


def compare(cluster: Cluster, instance_id: str, prompt: str, tokens: int, repeat: int) -> dict[str, Any]:
    run_once(cluster, instance_id, prompt, 8, True)  # warm up both paths
    run_once(cluster, instance_id, prompt, 8, False)
    before = head_report(cluster, instance_id)
    speeds: dict[bool, list[float]] = {True: [], False: []}
    outputs: dict[bool, list[int]] = {}
    for _ in range(repeat):
        for speculative in (False, True):
            rate, ids = run_once(cluster, instance_id, prompt, tokens, speculative)
            speeds[speculative].append(rate)
            outputs[speculative] = ids
    after = head_report(cluster, instance_id)
    drafted, accepted = after.drafted - before.drafted, after.accepted - before.accepted
    verify = after.verify_passes - before.verify_passes
    return {
        "plain": speeds[False],
        "spec": speeds[True],
        "ratio_mean": statistics.fmean(speeds[True]) / statistics.fmean(speeds[False]),
        "ratio_best": max(speeds[True]) / max(speeds[False]),
        "acceptance": accepted / drafted if drafted else 0.0,
        # tokens a verification pass gave (its accepted guesses and its own token)
        "tokens_per_verify_pass": (accepted + verify) / verify if verify else 0.0,
        "identical": outputs[True] == outputs[False],
    }


def row(label: str, result: dict[str, Any]) -> str:
    plain, spec = result["plain"], result["spec"]
    return (
        f"| {label} | {statistics.fmean(plain):.1f} (best {max(plain):.1f}) | "
        f"{statistics.fmean(spec):.1f} (best {max(spec):.1f}) | **{result['ratio_mean']:.2f}x** "
        f"({result['ratio_best']:.2f}x) | {result['acceptance']:.0%} | "
        f"{result['tokens_per_verify_pass']:.2f} | {'yes' if result['identical'] else 'NO'} |"
    )


def step_cost_ratio(k: int) -> tuple[float, float]:
    """(ms of one decode step of the 1.1B shape in int4 at 128 positions of history, the cost of a
    step of k+1 positions over that), in this process, best of 20 each."""
    sys.path.insert(0, str(Path(__file__).parent))
    from decode_speed import make_llama_1b

    from exoctl.engine.model import load_model

    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(make_llama_1b(Path(tmp) / "llama-1.1b"), None, "int4")
    cache = model.new_cache()
    model.forward(torch.randint(0, 32000, (1, 128)), torch.arange(128)[None, :], [cache])

    def best(count: int) -> float:
        times = []
        for _ in range(20):
            ids = torch.randint(0, 32000, (1, count))
            began = time.perf_counter()
            model.forward(ids, torch.arange(128, 128 + count)[None, :], [cache], all_logits=True)
            times.append(time.perf_counter() - began)
            cache.truncate(128)
        return min(times)

    one = best(1)
    return 1000 * one, best(k + 1) / one


def step_costs() -> None:
    """SmolLM2's step at 128 positions of history, one process: T positions of one sequence (a
    verification step) and B sequences of one position (a batch), against one position of one."""
    from exoctl.engine.model import load_model
    from exoctl.models.default import find_gguf

    print("| SmolLM2 step | B=1, T=1 | T=2 | T=3 | T=5 | T=9 | B=2, T=1 | B=4, T=1 |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, dtype, f32 in (
        ("float32, oneDNN", "float32", "torch"),
        ("float32, the kernel", "float32", "kernel"),
        ("int4", "int4", "kernel"),
    ):
        os.environ["EXOCTL_F32_MATMUL"] = f32
        model = load_model(find_gguf(), None, dtype)
        caches = [model.new_cache() for _ in range(4)]
        for cache in caches:
            model.forward(torch.randint(0, 32000, (1, 128)), torch.arange(128)[None, :], [cache])

        def best(batch: int, count: int, model: Any = model, caches: list[Any] = caches) -> float:
            times = []
            for _ in range(15):
                ids = torch.randint(0, 32000, (batch, count))
                positions = torch.arange(128, 128 + count)[None, :].repeat(batch, 1)
                began = time.perf_counter()
                model.forward(ids, positions, caches[:batch], all_logits=count > 1)
                times.append(time.perf_counter() - began)
                for cache in caches[:batch]:
                    cache.truncate(128)
            return min(times)

        one = best(1, 1)
        ratios = [best(1, t) / one for t in (2, 3, 5, 9)] + [best(b, 1) / one for b in (2, 4)]
        print(f"| {label} | {one * 1000:.1f} ms | " + " | ".join(f"{r:.2f}x" for r in ratios) + " |")
    os.environ.pop("EXOCTL_F32_MATMUL", None)


def main() -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from bench_cluster import local_workers
    from decode_speed import cpu_name

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--dtypes", default="float32,int4")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-projection", action="store_true")
    parser.add_argument("--step-costs", action="store_true", help="Only the cost of a step by its shape.")
    args = parser.parse_args()
    if args.step_costs:
        step_costs()
        return
    counts = [int(c) for c in args.workers.split(",")]
    flags = set(Path("/proc/cpuinfo").read_text().split()) if Path("/proc/cpuinfo").exists() else set()
    features = ", ".join(
        f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags
    )
    print(f"machine: {cpu_name()} ({features}), {os.cpu_count()} cores")
    print(f"SmolLM2-135M, {args.tokens} tokens, greedy\n")
    print(
        "| run | plain tok/s | speculative tok/s | ratio mean (best) | accepted | tokens/verify pass ", end=""
    )
    print("| same tokens |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | :---: |")
    card, ref = resolve_card(DEFAULT_MODEL_ID)
    drafts = [("ngram", dtype) for dtype in args.dtypes.split(",")] + [(DEFAULT_MODEL_ID, "float32")]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        models = tmp / "models"
        models.mkdir()
        with local_workers(tmp, max(counts), models, quiet=True) as inventory:
            with Cluster(load_inventory_file(inventory), find_keys()) as cluster:
                for drafter, dtype in drafts:
                    for count in counts:
                        draft = choose_draft(card, drafter, "int4")
                        request = PlacementRequest(dtype=dtype, nodes=count, draft=draft)
                        placement = cluster.plan(card, request, cluster.statuses(), "pipeline")
                        instance_id = cluster.load(card, ref, placement).instance_id
                        name = "ngram" if drafter == "ngram" else "int4 SmolLM2 draft"
                        try:
                            for prompt_name, prompt in PROMPTS.items():
                                result = compare(cluster, instance_id, prompt, args.tokens, args.repeat)
                                label = f"{name}, {dtype}, {count} worker(s), {prompt_name}"
                                print(row(label, result), flush=True)
                        finally:
                            cluster.unload(instance_id)
    if args.skip_projection:
        return
    k = 4
    one_ms, ratio = step_cost_ratio(k)
    print(
        f"\n1.1B shape, int4, one process: a decode step {one_ms:.1f} ms; a step of {k + 1} positions "
        f"{ratio:.2f}x that"
    )
    # llama-3.1-70b-cpu in int4: 45.9 GB of weights; 24 GB/s read per node; 4-rank all-reduce 1.18 ms
    # (RESULTS.md: "Tensor-parallel decode"). The draft, llama-3.2-1b-cpu in int4, costs about the
    # 1.1B shape's int4 step on the head's node.
    weights_gb, bandwidth, allreduce_s = 45.9, 24.0, 1.18e-3
    plans = {
        "tensor, 4 nodes": weights_gb / 4 / bandwidth + 2 * 80 * allreduce_s,
        "pipeline, 4 nodes": weights_gb / bandwidth,
    }
    draft_s = one_ms / 1000
    print(
        "\n| plan | plain s/token | acceptance | tokens/pass | s/pass (verify + drafts) | tok/s plain ",
        end="",
    )
    print("| tok/s speculative | speed-up |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for plan, target_s in plans.items():
        for acceptance in (0.6, 0.7, 0.8):
            expected = (1 - acceptance ** (k + 1)) / (1 - acceptance)
            per_pass = target_s * ratio + k * draft_s
            print(
                f"| {plan} | {target_s:.2f} | {acceptance:.0%} | {expected:.2f} | {per_pass:.2f} | "
                f"{1 / target_s:.2f} | {expected / per_pass:.2f} | {expected * target_s / per_pass:.2f}x |"
            )


if __name__ == "__main__":
    main()
