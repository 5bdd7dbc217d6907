"""What the cluster benchmarks share: their models, workers on this machine started with
`exoctl up` from an inventory of their own (random ports), and the decode speed the head measures."""

from __future__ import annotations

import random
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from exoctl.cluster.client import Cluster
from exoctl.cluster.views import instances_of
from exoctl.models.catalog import DEFAULT_MODEL_ID
from exoctl.wire.sampling_params import SamplingParams

PROMPT = "1, 2, 3, 4, 5, 6, 7, 8,"
EXOCTL = [sys.executable, "-m", "exoctl"]


def model_ref(name: str, models_dir: Path) -> str:
    """smollm2 (the embedded default), llama-1.1b (made here), or a catalog id or folder as given."""
    if name == "smollm2":
        return DEFAULT_MODEL_ID
    if name != "llama-1.1b":
        return name
    from decode_speed import make_llama_1b
    from smollm2 import smollm2_folder

    # random weights; SmolLM2's tokenizer (the prompt's ids are all below 32000)
    folder = make_llama_1b(models_dir / "llama-1.1b")
    for file in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_folder() / file, folder / file)
    return str(folder)


@contextmanager
def local_workers(tmp: Path, count: int, models_dir: Path, quiet: bool = False) -> Iterator[Path]:
    """`count` workers on 127.0.0.11 on; yields their inventory, and stops them on the way out."""
    base = random.randrange(30000, 40000, 10)
    nodes = [{"name": f"w{i + 1}", "host": f"127.0.0.{11 + i}", "port": base + i} for i in range(count)]
    inventory = tmp / f"cluster-{count}.yaml"
    defaults = {
        "command": f"{shlex.quote(sys.executable)} -m exoctl",
        "work_dir": f"{tmp}/work",
        "model_dir": str(models_dir),
    }
    inventory.write_text(yaml.safe_dump({"cluster": "bench", "defaults": defaults, "nodes": nodes}))
    subprocess.run([*EXOCTL, "up", "-i", str(inventory)], check=True, timeout=120, capture_output=quiet)
    try:
        yield inventory
    finally:
        subprocess.run([*EXOCTL, "down", "-i", str(inventory)], timeout=120, capture_output=True)


def decode_rate(cluster: Cluster, instance_id: str, tokens: int) -> float:
    """The best decode tokens/s the head reports over two runs of `tokens`, after a warm-up."""
    view = instances_of(cluster.statuses())[instance_id]
    best = 0.0
    for max_tokens in (8, tokens, tokens):  # the first run warms up
        generation = cluster.generate(view, SamplingParams(max_tokens=max_tokens), prompt=PROMPT)
        for _ in generation:
            pass
        assert generation.result is not None
        if max_tokens == tokens:
            best = max(best, generation.result.timings.decode_tokens_per_s)
    return best
