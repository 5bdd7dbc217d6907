"""`exoctl worker`'s process: logging with bounded lines, OpenMP settings and imports before torch
loads, then the worker's I/O loop (`server.py`)."""

from __future__ import annotations

import logging
import os

from exoctl import cpu_policy
from exoctl.errors import ExoctlError
from exoctl.wire.node_speed import NodeSpeed
from exoctl.worker.options import WorkerOptions
from exoctl.worker.server import Worker


def warm_imports() -> None:
    """Import torch, the engine and transformers' tokenizer before serving: an import in a loader
    thread holds the import lock for seconds (the I/O loop would stall behind it), and transformers'
    lazy modules are not safe to import from two threads at once."""
    from transformers import AutoTokenizer  # noqa: F401

    import exoctl.worker.instance
    import exoctl.worker.tensor_rank  # noqa: F401


# OpenMP threads of a stage that just handed its hidden state on spin for GOMP's default
# 300000 iterations, taking the cores the next stage needs when stages share a machine
# (measured: SmolLM2 over 4 local workers went from 0.51x to 0.88x of one worker). 50000 still
# bridges the gaps between the ops of one layer, so one worker alone keeps its speed.
OMP_ENV = {"GOMP_SPINCOUNT": "50000"}


class BoundedFormatter(logging.Formatter):
    """Log lines of bounded length: a refused message's values (a 100 KB name, say) are echoed
    as a summary, so a stream of bad messages cannot fill the node's disk at their size."""

    LINE = 400
    RECORD = 4000

    def format(self, record: logging.LogRecord) -> str:
        lines = [
            line if len(line) <= self.LINE else f"{line[: self.LINE]}… ({len(line)} characters)"
            for line in super().format(record).splitlines()
        ]
        text = "\n".join(lines)
        return text if len(text) <= self.RECORD else f"{text[: self.RECORD]}… (cut)"


def measured_speed() -> NodeSpeed | None:
    """This node's decode and prompt speed (engine.node_speed; cached per boot); None with
    EXOCTL_NODE_SPEED=off (placement then splits by memory alone)."""
    if os.environ.get("EXOCTL_NODE_SPEED", "").lower() in ("off", "0", "no"):
        return None
    from exoctl.engine.node_speed import node_speed

    return node_speed(cpu_policy.kernel_path())


def run_worker(options: WorkerOptions) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(BoundedFormatter("%(asctime)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler])
    for key, value in OMP_ENV.items():
        os.environ.setdefault(key, value)  # read when torch loads libgomp, just below
    if options.activations is not None:
        # the engine and the profile read the switch from the environment (exoctl.cpu_policy)
        os.environ[cpu_policy.ACTIVATIONS_ENV] = cpu_policy.check_activations(options.activations)
    cpu_policy.activations_name()  # a bad EXOCTL_ACTIVATIONS stops the start, with what it takes
    cpu_policy.kernel_isa()  # and so does a bad EXOCTL_KERNEL_ISA
    if options.threads is not None:
        if options.threads < 1:
            raise ExoctlError(f"--threads must be at least 1, got {options.threads}")
        os.environ["OMP_NUM_THREADS"] = str(options.threads)
    warm_imports()
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    worker = Worker(options, measured_speed())
    worker.serve()
