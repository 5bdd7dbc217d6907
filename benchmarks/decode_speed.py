"""Decode tokens/s of the exoctl engine against transformers' `generate`, same model, same run.

    python benchmarks/decode_speed.py [--models smollm2,llama-1.1b] [--dtypes float32,bfloat16] [--tokens 64]

For each model and dtype it prints both speeds, their ratio, and the fraction of the memory
bandwidth limit each reaches: a decode step reads every matmul weight once, so the limit is
(measured read bandwidth) / (weight bytes per token). The bandwidth is measured here too.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from exoctl.engine.model import CausalLM, load_model
from exoctl.engine.node_speed import best_pass
from exoctl.worker.profile import cpu_model

PROMPT_TOKENS = 32

LLAMA_1B = {  # TinyLlama-1.1B's shape, random weights
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 22,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
}


def cpu_name() -> str:
    return cpu_model()  # what each worker reports too


def read_bandwidth_gbs(gib: float = 1.0, repeats: int = 5) -> float:
    """Best-of sustained read bandwidth: summing a buffer far larger than the caches."""
    buffer = torch.ones(int(gib * 2**30) // 4, dtype=torch.float32)
    buffer.sum()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best / 1e9


def make_llama_1b(
    folder: Path, overrides: dict[str, int] | None = None, dtype: torch.dtype = torch.float32
) -> Path:
    """TinyLlama-1.1B's shape (with `overrides` to its config), random weights, saved in `dtype`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**{**LLAMA_1B, **(overrides or {})}))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    model.to(dtype).save_pretrained(str(folder))
    return folder


def timed(fn: Callable[[], object], repeats: int = 2) -> float:
    """The best of `repeats` runs' seconds (as a node times its own speed)."""
    return best_pass(fn, repeats)


def decode_rate(run: Callable[[int], object], tokens: int) -> float:
    """tokens/s of decoding alone: time(prefill + N tokens) - time(prefill + 1 token)."""
    run(2)  # warm-up
    return (tokens - 1) / (timed(lambda: run(tokens)) - timed(lambda: run(1)))


def transformers_rate(folder: Path, dtype: torch.dtype, prompt: torch.Tensor, tokens: int) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).eval()

    def run(n: int) -> object:
        with torch.inference_mode():
            return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    return decode_rate(run, tokens)


def engine_rate(model: CausalLM, prompt: torch.Tensor, tokens: int) -> float:
    def run(n: int) -> object:
        cache = model.new_cache()
        logits = model.forward(prompt, torch.arange(prompt.shape[1])[None], [cache])
        for _ in range(n - 1):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = model.forward(token, torch.tensor([[cache.length]]), [cache])
        return logits

    return decode_rate(run, tokens)


def matmul_bytes(model: CausalLM) -> int:
    """Weight bytes read per decoded token: everything but the embedding (a one-row lookup)."""
    embed = 0 if model.embed is None else model.embed.numel() * model.embed.element_size()
    return model.weight_bytes() - embed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,llama-1.1b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bandwidth = read_bandwidth_gbs()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, cpu capability {torch.backends.cpu.get_cpu_capability()}"
    )
    print(f"measured read bandwidth: {bandwidth:.1f} GB/s\n")
    header = (
        f"{'model':<12} {'dtype':<9} {'weights':>9} {'transformers':>13} {'exoctl':>9} "
        f"{'ratio':>6} {'bw% hf':>7} {'bw% exo':>8}"
    )
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        folders = {}
        for name in args.models.split(","):
            if name == "smollm2":
                from smollm2 import smollm2_folder

                folders[name] = smollm2_folder()
            elif name == "llama-1.1b":
                folders[name] = make_llama_1b(Path(tmp) / "llama-1.1b")
            else:
                folders[name] = Path(name)
        prompt = torch.randint(100, 30000, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
        for name, folder in folders.items():
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                model = load_model(folder, dtype=dtype_name)
                weight_bytes = matmul_bytes(model)
                ours = engine_rate(model, prompt, args.tokens)
                del model
                gc.collect()
                theirs = transformers_rate(folder, dtype, prompt, args.tokens)
                limit = bandwidth * 1e9 / weight_bytes
                print(
                    f"{name:<12} {dtype_name:<9} {weight_bytes / 1e9:>7.2f}GB {theirs:>9.1f} t/s "
                    f"{ours:>5.1f} t/s {ours / theirs:>5.2f}x "
                    f"{100 * theirs / limit:>6.0f}% {100 * ours / limit:>7.0f}%",
                    flush=True,
                )


if __name__ == "__main__":
    main()
