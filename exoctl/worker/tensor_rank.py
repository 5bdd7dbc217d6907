"""A tensor-parallel rank: this node's 1/k of every layer of an instance (see `engine.shard`).

Every rank runs every step. The head (rank 0) tokenises, sends each step's token ids [B, T] to
the other ranks, and runs the step itself; each layer sums its partial outputs over the ranks
through the ZeroMQ collective, so every rank holds the same hidden state. The ranks then agree
on each sequence's next token from a few numbers per sequence (`engine.parallel_sampling`) —
never the full logits — and the head streams it and sends the next step.

Ranks meet before they are ready: each binds its collective socket on a port the OS picks and
tells the other ranks the address and, where it can, its shared-memory file (`tp_hello`); a rank
is ready when its weights are loaded and it knows every other rank's address. Ranks that all
share a host then exchange partials through shared memory (`shm_exchange`).
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from exoctl.engine.logprobs import PromptScores
from exoctl.engine.model import CausalLM, load_model
from exoctl.engine.parallel_sampling import (
    RankSampler,
    choose_tokens,
    rank_logprobs,
    rank_prompt_logprobs,
    verify_drafts,
)
from exoctl.engine.shard import TensorShard
from exoctl.errors import CollectiveError, ExoctlError
from exoctl.wire.instance_messages import Forward, ForwardStep, LogprobWire, Reuse, SequenceStart, Tokens
from exoctl.wire.runner_report import Failure, RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.collective import ZmqCollective
from exoctl.worker.outbox import Out, ToPeer
from exoctl.worker.stage import HeadRoute, Stage
from exoctl.worker.tensors import from_tensor, to_tensor


class TensorRank(Stage):
    # a failed step leaves the ranks' collectives out of step: the instance fails
    breaks_instance_on_error = True

    def __init__(
        self, spec: RunnerSpec, max_batch: int, to_head: HeadRoute, collective: ZmqCollective
    ) -> None:
        super().__init__(spec, max_batch, to_head)
        self.shard = TensorShard(spec.rank, spec.world)
        self.collective = collective
        self.rank_samplers: dict[str, RankSampler] = {}
        self.scores: dict[str, PromptScores] = {}  # prompt logprobs, until a sequence's first token
        self.addresses: dict[int, str] = {}  # rank -> collective address, this rank's included
        self.offers: dict[int, str | None] = {}  # rank -> its shared-memory offer (None: none)
        self.weights_loaded = False
        self.decode_collective_s = 0.0
        self.lock = threading.Lock()  # the loader thread and the I/O loop both may make it ready

    # --- lifecycle -------------------------------------------------------------------------

    def _load_model(self, folder: Path, progress: Callable[[int], None]) -> CausalLM:
        spec = self.spec
        return load_model(
            folder, None, spec.dtype, on_layer=progress, shard=self.shard, reduce=self.collective.all_reduce
        )

    def _loaded(self) -> None:
        with self.lock:
            self.weights_loaded = True
            self._ready_if_complete()

    def met(self, rank: int, address: str, offer: str | None = None) -> None:
        """Rank `rank` of this instance listens for partials at `address` (and offers its
        shared-memory file, for ranks on its host)."""
        with self.lock:
            self.addresses[rank] = address
            self.offers[rank] = offer
            self._ready_if_complete()

    def _ready_if_complete(self) -> None:
        if self.status is not RunnerStatus.LOADING or not self.weights_loaded:
            return
        if len(self.addresses) < self.spec.world:
            return
        ranks = range(self.spec.world)
        try:
            self.collective.connect([self.addresses[r] for r in ranks], [self.offers.get(r) for r in ranks])
        except CollectiveError as exc:
            self.fail(Failure(f"node {self.node}: {exc.message}"))
            return
        self.status = RunnerStatus.READY

    def fail(self, failure: Failure) -> None:
        self.collective.abort(failure.message)  # a step waiting on a peer gives up at once
        super().fail(failure)

    def free(self) -> None:
        self.collective.abort("the instance was unloaded")
        self.rank_samplers.clear()
        super().free()

    def close(self) -> None:
        self.collective.close()

    def release(self, seq: str, keep: int | None = None) -> None:
        self.rank_samplers.pop(seq, None)
        self.scores.pop(seq, None)
        super().release(seq, keep)

    def held(self) -> set[str]:
        return super().held() | set(self.rank_samplers)

    def report(self) -> RunnerReport:
        # decode steps only: time in collectives (sending, and waiting for the other ranks) per token
        per_token = round(1000 * self.decode_collective_s / max(self.decoded, 1), 3)
        # "zmq+q8": partials cross the links as 8-bit blocks (placement's choice, or the worker's)
        transport = "shm" if self.collective.shared else "zmq+q8" if self.collective.quantize else "zmq"
        return replace(
            super().report(),
            collective_ms_per_token=per_token,
            collective_transport=transport,
            collective_s=self.decode_collective_s,
        )

    # --- compute ---------------------------------------------------------------------------

    def admit(
        self, seq: str, params: SamplingParams, prompt: list[int], reuse: Reuse | None
    ) -> SequenceStart:
        # every rank needs the same seed for the draws they share: pick one if the request has none
        seed = params.seed if params.seed is not None else secrets.randbits(62)
        sampler = self.rank_samplers[seq] = RankSampler.create(
            params, seed, self.spec.rank, self.constraint_for(params)
        )
        # a reused prefix's ids pass no rank's step: a repetition penalty reads them from here
        reused = tuple(prompt[: reuse.positions]) if reuse is not None else ()
        sampler.saw_prompt(list(reused))
        penalized = reused if params.repetition_penalty != 1 else ()
        if params.prompt_logprobs is not None:
            # every rank scores the prompt (its part of each row), so every rank needs all of it
            self.scores[seq] = PromptScores(tuple(prompt), params.prompt_logprobs, [])
            penalized = tuple(prompt)
        return SequenceStart(replace(params, seed=seed), penalized, reuse)

    def batch_size(self, sequences: int) -> int:
        return self.max_batch  # no pipeline to keep busy: every sequence in one step

    def scores_prompt(self, step: ForwardStep) -> bool:
        return any(seq in self.scores for seq in step.seqs)

    def step(self, step: ForwardStep, ids: torch.Tensor) -> list[Out]:
        """The head's rank: every rank runs the step on the same ids [B, T]; the tokens they agree
        on go to the head."""
        spec = self.spec
        assert self.emit is not None
        # the other ranks must start this step now: the head's own layers wait for their partials
        forward = Forward(spec.instance_id, step, from_tensor(ids))
        for _, address in spec.peers[1:]:
            self.emit(ToPeer(address, forward))
        chosen = self._tokens_of(step, ids)
        if chosen is None:
            return []
        seqs, tokens, logprobs, prompt = chosen
        return [self.to_head(Tokens(spec.instance_id, tuple(seqs), tuple(tokens), tuple(logprobs), prompt))]

    def _tokens_of(
        self, step: ForwardStep, inputs: torch.Tensor
    ) -> tuple[list[str], list[int], list[LogprobWire | None], dict[str, list[LogprobWire]]] | None:
        """Run every layer's part on ids [B, T]; the next token of each sequence, as all ranks agree
        (after a verification step, each sequence once per token it accepted), or None for a
        prompt chunk with more to come (every rank runs it, none samples)."""
        seqs = step.seqs
        for row, seq in enumerate(seqs):  # a prompt's ids, for its repetition penalty
            self.rank_samplers[seq].saw_prompt(inputs[row].tolist())
        waited = self.collective.busy_s
        out = self.run(step, inputs)
        vocab = self._model().config.vocab_size
        gather = self.collective.all_gather
        for row, seq in enumerate(seqs):
            if seq in self.scores:  # [T, V / k] of a prompt chunk
                rank_prompt_logprobs(out[row], self.shard, vocab, self.scores[seq], step.starts[row], gather)
        if step.partial:
            return None
        began = time.perf_counter()
        samplers = [self.rank_samplers[seq] for seq in seqs]
        if step.drafts:
            chosen = self._verify(step, out, samplers)
        else:
            logits = out[:, -1]  # [B, V / k]
            tokens = choose_tokens(logits, self.shard, vocab, samplers, gather)
            logprobs = rank_logprobs(logits, self.shard, vocab, samplers, tokens, gather)
            chosen = list(seqs), tokens, logprobs
        if inputs.shape[1] == 1 or step.drafts:
            self.compute_s += time.perf_counter() - began
            self.decode_collective_s += self.collective.busy_s - waited
        prompt = {seq: self.scores.pop(seq).to_wire() for seq in seqs if seq in self.scores}
        return (*chosen, prompt)

    def _verify(
        self, step: ForwardStep, out: torch.Tensor, samplers: list[RankSampler]
    ) -> tuple[list[str], list[int], list[LogprobWire | None]]:
        """A verification step's logits [B, k + 1, V / k]: the tokens every rank accepts for each
        sequence, in order, with their logprobs (the same gathers on every rank)."""
        vocab = self._model().config.vocab_size
        gather = self.collective.all_gather
        seqs: list[str] = []
        tokens: list[int] = []
        logprobs: list[LogprobWire | None] = []
        for b, (seq, sampler) in enumerate(zip(step.seqs, samplers, strict=True)):
            drafts = list(step.drafts.get(seq, ()))
            rows = out[b, : len(drafts) + 1]
            accepted = verify_drafts(rows, self.shard, vocab, sampler, drafts, gather)
            for i, token in enumerate(accepted):
                seqs.append(seq)
                tokens.append(token)
                logprobs += rank_logprobs(rows[i : i + 1], self.shard, vocab, [sampler], [token], gather)
        return seqs, tokens, logprobs

    def forward(self, message: Forward) -> list[Out]:
        """A rank other than the head: run this step on the ids the head sent."""
        self.check(message)
        step = message.step
        for seq in step.seqs:
            if seq in self.rank_samplers:
                continue
            sampling = step.first_of(seq).params
            if sampling.seed is None:
                raise ExoctlError(f"sequence {seq} is unknown here and its first message has no seed")
            sampler = self.rank_samplers[seq] = RankSampler.create(
                sampling, sampling.seed, self.spec.rank, self.constraint_for(sampling)
            )
            sampler.saw_prompt(list(step.first_of(seq).prompt_ids))
            if sampling.prompt_logprobs is not None:
                self.scores[seq] = PromptScores(step.first_of(seq).prompt_ids, sampling.prompt_logprobs, [])
        self._tokens_of(step, to_tensor(message.tensor))
        return []

    def _check_input(self, dtype: str, shape: tuple[int, ...], seqs: int) -> None:
        """A rank's input: the step's token ids [B, T] as int64 (T > 1 only for one sequence)."""
        if (
            dtype != "int64"
            or len(shape) != 2
            or shape[0] != seqs
            or shape[1] < 1
            or (seqs > 1 and shape[1] != 1)
        ):
            raise ExoctlError(
                f"'forward' of a tensor-parallel instance needs int64 token ids [B, T] for {seqs} "
                f"sequence(s), got {dtype} {list(shape)}"
            )
