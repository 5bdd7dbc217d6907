"""Perplexity of SmolLM2 in each dtype, exoctl against llama.cpp's `llama-perplexity`, same text.

    python benchmarks/perplexity.py [--dtypes float32,bfloat16,int8,int4] [--ctx 512] [--cache DIR]

The text is the LICENSE.txt that ships with Python's standard library (the history of Python
and its licence terms: English prose, about 3,300 tokens), so every machine has the same one.
It is scored as llama-perplexity scores it: cut into windows of `--ctx` tokens, each run from
scratch, and the negative log-likelihood taken over the second half of each window (the first
half is context). llama.cpp's side reads the GGUF files vs_llamacpp.py made (F32, BF16, Q8_0,
Q4_0 and Q4_1 of the same weights), so run that first, or let this build them.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from vs_llamacpp import GGUF_TYPES, gguf, llamacpp, run

from exoctl.engine.model import load_model
from exoctl.engine.tokenizer import Tokenizer

TEXT = Path(os.__file__).parent / "LICENSE.txt"


@torch.inference_mode()
def exoctl_perplexity(folder: Path, dtype: str, ids: list[int], ctx: int) -> tuple[float, int]:
    model = load_model(folder, dtype=dtype)
    total, count = 0.0, 0
    for start in range(0, len(ids) - ctx + 1, ctx):
        window = torch.tensor([ids[start : start + ctx]])
        logits = model.forward(window, torch.arange(ctx)[None], [model.new_cache()], all_logits=True)[0]
        first = ctx // 2
        # position t predicts token t + 1: score the tokens of the window's second half
        nll = F.cross_entropy(logits[first : ctx - 1].float(), window[0, first + 1 : ctx], reduction="sum")
        total += float(nll)
        count += ctx - 1 - first
    return math.exp(total / count), count


def llamacpp_perplexity(bin_dir: Path, model: Path, ctx: int, threads: int) -> float:
    result = run(
        [
            str(bin_dir / "llama-perplexity"),
            "-m",
            str(model),
            "-f",
            str(TEXT),
            "-c",
            str(ctx),
            "-t",
            str(threads),
        ]
    )
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", result.stdout + result.stderr)
    if not found:
        raise RuntimeError(f"llama-perplexity printed no estimate:\n{result.stderr[-2000:]}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "exoctl-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from smollm2 import smollm2_folder

    folder = smollm2_folder()
    ids = Tokenizer(folder).encode(TEXT.read_text(encoding="utf-8"))
    bin_dir = llamacpp(args.cache)
    print(f"text: {TEXT} ({len(ids)} tokens), windows of {args.ctx}, second halves scored\n")
    print(f"{'dtype':<9} {'exoctl ppl':>10} {'llama.cpp':>10} {'type':<5} {'exoctl vs bf16':>14}")
    base = None
    for dtype in args.dtypes.split(","):
        ours, _ = exoctl_perplexity(folder, dtype, ids, args.ctx)
        if dtype == "bfloat16":
            base = ours
        versus = f"{100 * (ours / base - 1):+.2f}%" if base else ""
        for kind in GGUF_TYPES[dtype]:
            theirs = llamacpp_perplexity(
                bin_dir, gguf(args.cache, bin_dir, "smollm2", folder, kind), args.ctx, args.threads
            )
            print(f"{dtype:<9} {ours:>10.3f} {theirs:>10.3f} {kind:<5} {versus:>14}", flush=True)


if __name__ == "__main__":
    main()
