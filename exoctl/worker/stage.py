"""A stage: the part of one instance's compute that lives on this node — its layers, and the KV
cache of every sequence that passed through them.

`Stage` is the one interface the head drives (`admit`, `step`, `release`, `forget`) and the lane
feeds (`forward` from another runner, `renew`); `PipelineStage` and `TensorRank` are its two kinds. A
stage computes only: each method returns the messages to send (`outbox`), and what it has to say
to the head it sends by the route it was built with (`to_head`), never by calling into the head.

Beside the live sequences' caches a stage keeps cached prefixes (`PrefixStore`): a sequence's first
step may say to start from a copy of one (`SequenceStart.reuse`), and a release may say to keep the
sequence's cache as one. What is kept and reused is the head's word, the same on every runner.
"""

from __future__ import annotations

import gc
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path

import torch

from exoctl.engine.constraint import Constraint, Grammars
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.mixtral import SparseMoE
from exoctl.engine.model import CausalLM, held_in_float_note
from exoctl.engine.weights import trim_heap
from exoctl.errors import ExoctlError
from exoctl.wire.instance_messages import Forward, ForwardStep, Reuse, SeqError, SequenceStart, Tokens
from exoctl.wire.runner_report import ExpertLoad, Failure, RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.loader import LoadCancelled
from exoctl.worker.outbox import Out
from exoctl.worker.prefix_store import PrefixStore
from exoctl.worker.steps import check_room

log = logging.getLogger("exoctl.worker")

# How a stage reaches the head of its instance: queued on this node's lane when the head is here,
# else sent to the head's node. Chosen once, where the instance's parts are built (`instance`).
HeadRoute = Callable[[Tokens | SeqError], Out]


def release_memory() -> None:
    """Return freed tensor memory to the OS so RSS drops after an unload."""
    gc.collect()
    trim_heap()


class Stage(ABC):
    # a failed step leaves the instance usable (pipeline), or its ranks out of step (tensor)
    breaks_instance_on_error = False

    def __init__(self, spec: RunnerSpec, max_batch: int, to_head: HeadRoute) -> None:
        self.spec = spec
        self.max_batch = max_batch  # decode steps of at most this many sequences at once
        self.to_head = to_head
        self.node = spec.nodes[spec.rank]
        self.status = RunnerStatus.LOADING
        self.failure: Failure | None = None
        self.layers_loaded = 0
        self.model: CausalLM | None = None
        self.folder: Path | None = None  # what it loaded from (the tokenizer a grammar compiles against)
        self.grammars: Grammars | None = None  # built on the first constrained sequence
        self.note: str | None = None  # what the load kept other than asked (held_in_float_note)
        self.caches: dict[str, KVCache] = {}
        self.prefixes = PrefixStore(self.node, spec.prefix_bytes)
        self.unloading = False
        self.leased: set[str] = set()  # sequences held here when the head last said which live
        # sequence -> the first position of its last verification step's guesses: a later step
        # may start anywhere from there, and the rejected positions after its start are cut
        self.guessed_from: dict[str, int] = {}
        self.decoded = 0  # decode positions computed here, and the time they took
        self.compute_s = 0.0
        # sends a message at once, before the step that produced it ends (set by the compute lane)
        self.emit: Callable[[Out], None] | None = None

    # --- what each kind does -----------------------------------------------------------------

    @abstractmethod
    def admit(
        self, seq: str, params: SamplingParams, prompt: list[int], reuse: Reuse | None
    ) -> SequenceStart:
        """Head: set up sampling for a new sequence; what every runner needs of it (how to sample
        it, the cached prefix it starts from), sent with its first step."""

    @abstractmethod
    def step(self, step: ForwardStep, ids: torch.Tensor) -> list[Out]:
        """Head: one step of B sequences, ids [B, T], through this stage and on."""

    @abstractmethod
    def forward(self, message: Forward) -> list[Out]:
        """Not the head: a step another runner of the instance sent."""

    @abstractmethod
    def batch_size(self, sequences: int) -> int:
        """How many of the head's running sequences one decode step takes."""

    @abstractmethod
    def _check_input(self, dtype: str, shape: tuple[int, ...], seqs: int) -> None:
        """Refuse a `forward` tensor this kind cannot run."""

    @abstractmethod
    def _load_model(self, folder: Path, progress: Callable[[int], None]) -> CausalLM:
        """This stage's part of the model, read from `folder`."""

    def _loaded(self) -> None:
        self.status = RunnerStatus.READY

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.status is RunnerStatus.FAILED

    def load(self, folder: Path) -> None:
        spec = self.spec

        def progress(count: int) -> None:
            if self.unloading:
                raise LoadCancelled
            self.layers_loaded = count

        try:
            model = self._load_model(folder, progress)
            if model.config.num_hidden_layers != spec.n_layers:
                raise ExoctlError(
                    f"{folder} has {model.config.num_hidden_layers} layers but the placement expected "
                    f"{spec.n_layers}",
                    hint="the nodes hold different versions of the model; give every node the same files",
                )
            self.note = held_in_float_note(model.held_in_float)
            if self.note is not None:
                log.info("instance %s: %s", spec.instance_id[:8], self.note)
        except BaseException:
            release_memory()
            raise
        if self.unloading:
            raise LoadCancelled
        self.model = model
        self.folder = folder
        self._loaded()

    def fail(self, failure: Failure) -> None:
        self.status = RunnerStatus.FAILED
        self.failure = failure
        self.free()

    def free(self) -> None:
        self.unloading = True
        self.model = None
        self.grammars = None
        self.caches.clear()
        self.guessed_from.clear()
        self.prefixes.clear()
        release_memory()

    def close(self) -> None:  # noqa: B027  (a pipeline stage has nothing to close)
        """Close what the compute lane used, once it has stopped."""

    @property
    def memory_bytes(self) -> int:
        model = self.model
        if model is None:
            return 0
        live = sum(c.nbytes for c in list(self.caches.values()))
        return model.weight_bytes() + live + self.prefixes.nbytes

    @property
    def tokens_per_s(self) -> float:
        return self.decoded / self.compute_s if self.compute_s > 0 else 0.0

    def report(self) -> RunnerReport:
        spec = self.spec
        return RunnerReport(
            runner_id=spec.runner_id,
            instance_id=spec.instance_id,
            model_id=spec.model_id,
            sharding=spec.sharding,
            dtype=spec.dtype,
            start_layer=spec.start_layer,
            end_layer=spec.end_layer,
            n_layers=spec.n_layers,
            rank=spec.rank,
            world=spec.world,
            nodes=spec.nodes,
            status=self.status,
            failure=self.failure,
            layers_loaded=self.layers_loaded,
            memory_bytes=self.memory_bytes,
            tokens_per_s=round(self.tokens_per_s, 2),
            decoded_tokens=self.decoded,
            compute_s=self.compute_s,
            active_sequences=len(self.caches),
            experts=self.experts(),
            note=self.note,
            prefix=self.prefixes.report(),
        )

    def experts(self) -> tuple[ExpertLoad, ...]:
        """Mixtral: the experts held here and the tokens routed to each, over this stage's layers."""
        model = self.model
        if model is None:
            return ()
        moes = [b.mlp for b in model.blocks if isinstance(b.mlp, SparseMoE)]
        counts = sum(
            (moe.tokens_per_expert for moe in moes),
            torch.zeros(model.config.num_local_experts, dtype=torch.int64),
        )
        held = sorted(moes[0].experts) if moes else []
        return tuple(ExpertLoad(e, int(counts[e])) for e in held)

    # --- compute -----------------------------------------------------------------------------

    def _model(self) -> CausalLM:
        if self.model is None:
            raise ExoctlError(f"runner {self.spec.runner_id} is {self.status.value}, not ready")
        return self.model

    @property
    def context(self) -> int:
        return self._model().config.max_position_embeddings

    @property
    def vocab_size(self) -> int:
        return self._model().config.vocab_size

    def constraint_for(self, params: SamplingParams) -> Constraint | None:
        """The matcher of a sequence's grammar, where it has one (the runner that samples it)."""
        if params.grammar is None:
            return None
        if self.grammars is None:
            if self.folder is None:
                raise ExoctlError(f"runner {self.spec.runner_id} is {self.status.value}, not ready")
            self.grammars = Grammars(self.folder, self.vocab_size)
        return self.grammars.constraint(params.grammar)

    def scores_prompt(self, step: ForwardStep) -> bool:
        """Whether this runner scores the prompt of a sequence of the step (its logprobs)."""
        return False

    def position(self, seq: str) -> int:
        """How many positions of a sequence this stage's KV cache holds."""
        cache = self.caches.get(seq)
        return 0 if cache is None else cache.length

    def run(self, step: ForwardStep, inputs: torch.Tensor) -> torch.Tensor:
        """These layers on B sequences: inputs [B, T] ids or [B, T, D] hidden, each at its own start."""
        model = self._model()
        seqs, starts = step.seqs, step.starts
        count = inputs.shape[1]
        self._check_room(seqs, starts, count)
        opened = {seq: self._open(step, seq, count) for seq in seqs if seq not in self.caches}
        for seq, start in zip(seqs, starts, strict=True):
            held = opened[seq].length if seq in opened else self._cut_rejected(seq, start)
            if held != start:
                raise ExoctlError(f"sequence {seq} is at position {held} here, not {start}")
        self.caches.update(opened)
        caches = [self.caches[seq] for seq in seqs]
        positions = torch.tensor(starts)[:, None] + torch.arange(count)[None, :]  # [B, T]
        began = time.perf_counter()
        # a verification step's sampling runner needs every position's logits ([B, k + 1, V]), and
        # so does a prompt whose tokens are scored
        out = model.forward(
            inputs, positions, caches, all_logits=bool(step.drafts) or self.scores_prompt(step)
        )
        for seq, start in zip(seqs, starts, strict=True):
            if seq in step.drafts:
                self.guessed_from[seq] = start + 1
            else:
                self.guessed_from.pop(seq, None)
        if count == 1 or step.drafts:  # decode passes (a verification step is one pass)
            self.decoded += len(seqs)
            self.compute_s += time.perf_counter() - began
        return out

    def _cut_rejected(self, seq: str, start: int) -> int:
        """The positions a sequence holds here for a step at `start`: a verification step's
        rejected guesses after `start` are cut first."""
        cache = self.caches[seq]
        floor = self.guessed_from.get(seq)
        if floor is not None and floor <= start < cache.length:
            cache.truncate(start)
        return cache.length

    def _open(self, step: ForwardStep, seq: str, count: int) -> KVCache:
        """The cache of a sequence new here: empty, or a copy of the cached prefix its first step
        names (with room for this step's `count` positions)."""
        start = step.first.get(seq)
        if start is None or start.reuse is None:
            return self._model().new_cache()
        return self.prefixes.reuse(start.reuse, self.caches, count)

    def _check_room(self, seqs: list[str], starts: list[int], count: int) -> None:
        new = sum(1 for seq in seqs if seq not in self.caches)
        check_room(seqs, starts, count, self.context, len(self.caches), new, self.spec.runner_id)

    def check(self, message: Forward) -> None:
        """A `forward` checked against this stage before any compute: its tensor's dtype and shape,
        the context and the sequence limit. Cheap and read-only, so the I/O loop runs it too and
        refuses a bad step to its sender."""
        tensor, step = message.tensor, message.step
        self._check_input(tensor.dtype, tensor.shape, len(step.seqs))
        self._check_room(step.seqs, step.starts, tensor.shape[1])

    # --- sequences ---------------------------------------------------------------------------

    def release(self, seq: str, keep: int | None = None) -> None:
        """Free a sequence; or keep its first `keep` positions as a cached prefix of its name."""
        cache = self.caches.pop(seq, None)
        self.guessed_from.pop(seq, None)
        if keep is not None and cache is not None:
            self.prefixes.keep(seq, cache, keep)

    def forget(self, entries: tuple[str, ...]) -> None:
        self.prefixes.forget(entries)

    def held(self) -> set[str]:
        """The sequences this stage holds any state of."""
        return set(self.caches)

    def renew(self, live: tuple[str, ...], kept: tuple[str, ...]) -> None:
        """Not the head: the head's word on which sequences live and which cached prefixes it keeps.
        A sequence held here at its last word and not named in this one is freed: the head never
        knew it, or its `release` was lost. (One that came since the last word waits for the next,
        so a word overtaken by a new sequence's first step frees nothing.) A cached prefix it does
        not name is freed at once: its `release` and this word travel the same way, in order."""
        for seq in self.leased - set(live):
            self.release(seq)
        self.leased = self.held()
        self.prefixes.retain(kept)
