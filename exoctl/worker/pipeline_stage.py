"""A pipeline stage: a layer range of an instance. Rank 0 embeds the token ids the head gives it;
each stage passes the hidden state [B, T, D] on to the next (`HandOn`); the last one samples the
next token of each sequence and sends it to the head (`SampleHere`). Which of the two a stage
does is chosen once, when the instance's parts are built.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch

from exoctl.engine.constraint import Constraint
from exoctl.engine.logprobs import PromptScores, token_logprob
from exoctl.engine.model import CausalLM, load_model
from exoctl.engine.sampling import Sampler, verify_drafts
from exoctl.errors import ExoctlError
from exoctl.wire.instance_messages import (
    Forward,
    ForwardStep,
    LogprobWire,
    Reuse,
    SeqError,
    SequenceStart,
    Tokens,
)
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingParams
from exoctl.worker.outbox import Out, ToPeer
from exoctl.worker.stage import HeadRoute, Stage
from exoctl.worker.steps import check_hidden
from exoctl.worker.tensors import from_tensor, to_tensor

ConstraintFor = Callable[[SamplingParams], Constraint | None]  # the stage's, for the sampling end


class HandOn:
    """Not the last stage: the hidden state goes on to the next stage's node."""

    def __init__(self, instance_id: str, address: str) -> None:
        self.instance_id = instance_id
        self.address = address

    def admit(
        self, seq: str, params: SamplingParams, prompt: list[int], constrain: ConstraintFor
    ) -> SequenceStart:
        # the last stage penalizes the prompt's tokens too (and scores them, where asked), and sees
        # only hidden states
        wanted = params.repetition_penalty != 1 or params.prompt_logprobs is not None
        prompt_ids = tuple(prompt) if wanted else ()
        return SequenceStart(params, prompt_ids)

    def first_step(self, seq: str, start: SequenceStart, constrain: ConstraintFor) -> None:
        """Nothing to set up: this stage does not sample."""

    def finish(self, step: ForwardStep, out: torch.Tensor) -> list[Out]:
        return [ToPeer(self.address, Forward(self.instance_id, step, from_tensor(out)))]

    def release(self, seq: str) -> None:
        pass

    def held(self) -> set[str]:
        return set()


class SampleHere:
    """The last stage: sample each sequence's next token from the logits, for the head."""

    def __init__(self, instance_id: str, node: str, to_head: HeadRoute) -> None:
        self.instance_id = instance_id
        self.node = node
        self.to_head = to_head
        self.samplers: dict[str, Sampler] = {}
        self.scores: dict[str, PromptScores] = {}  # prompt logprobs, until the sequence's first token

    def admit(
        self, seq: str, params: SamplingParams, prompt: list[int], constrain: ConstraintFor
    ) -> SequenceStart:
        self.samplers[seq] = Sampler.create(params, prompt, constrain(params))
        self._score(seq, params, prompt)
        return SequenceStart(params)

    def first_step(self, seq: str, start: SequenceStart, constrain: ConstraintFor) -> None:
        self.samplers[seq] = Sampler.create(start.params, list(start.prompt_ids), constrain(start.params))
        self._score(seq, start.params, list(start.prompt_ids))

    def _score(self, seq: str, params: SamplingParams, prompt: list[int]) -> None:
        if params.prompt_logprobs is not None:
            self.scores[seq] = PromptScores(tuple(prompt), params.prompt_logprobs, [])

    def finish(self, step: ForwardStep, out: torch.Tensor) -> list[Out]:
        """Logits [B, 1, V] (or [1, T, V] after a prompt): one token per sequence, to the head; a
        sequence whose draw fails is reported failed, and only it ends."""
        for b, seq in enumerate(step.seqs):
            if seq in self.scores:
                self.scores[seq].add(out[b], step.starts[b])
        if step.partial:
            return []  # more of the prompt is coming: nothing to sample yet
        if step.drafts:
            return self._verify(step, out)
        logits = out[:, -1]  # [B, V]
        choices = [self.samplers[seq] for seq in step.seqs]
        picked: dict[str, int] = {}
        failed: dict[str, str] = {}
        if all(s.params.greedy and not s.params.penalizes and s.constraint is None for s in choices):
            picked = dict(zip(step.seqs, (int(t) for t in logits.argmax(dim=-1)), strict=True))
        else:
            for i, seq in enumerate(step.seqs):
                try:
                    picked[seq] = choices[i].choose(logits[i : i + 1])
                except (RuntimeError, ExoctlError) as exc:  # this sequence's draw failed: only it ends
                    failed[seq] = f"node {self.node}: sampling failed: {exc}"
        outs: list[Out] = []
        if picked:
            logprobs = self._logprobs(step.seqs, logits, picked)
            entries = tuple(logprobs.get(seq) for seq in picked)
            prompt = {seq: self.scores.pop(seq).to_wire() for seq in picked if seq in self.scores}
            outs.append(
                self.to_head(Tokens(self.instance_id, tuple(picked), tuple(picked.values()), entries, prompt))
            )
        outs += [self.to_head(SeqError(self.instance_id, (seq,), why)) for seq, why in failed.items()]
        return outs

    def _verify(self, step: ForwardStep, out: torch.Tensor) -> list[Out]:
        """A verification step's logits [B, k + 1, V]: each sequence's accepted tokens, in order
        (its guesses while the target agrees, then its own token), each with its logprobs."""
        seqs: list[str] = []
        tokens: list[int] = []
        entries: list[LogprobWire | None] = []
        outs: list[Out] = []
        for b, seq in enumerate(step.seqs):
            sampler = self.samplers[seq]
            drafts = step.drafts.get(seq, ())
            try:
                accepted = verify_drafts(sampler, out[b, : len(drafts) + 1], drafts)
            except (RuntimeError, ExoctlError) as exc:
                outs.append(
                    self.to_head(
                        SeqError(self.instance_id, (seq,), f"node {self.node}: sampling failed: {exc}")
                    )
                )
                continue
            n = sampler.params.logprobs
            for i, token in enumerate(accepted):
                seqs.append(seq)
                tokens.append(token)
                entries.append(None if n is None else token_logprob(out[b, i], token, n).to_wire())
        if seqs:
            outs.insert(0, self.to_head(Tokens(self.instance_id, tuple(seqs), tuple(tokens), tuple(entries))))
        return outs

    def _logprobs(
        self, seqs: list[str], logits: torch.Tensor, picked: dict[str, int]
    ) -> dict[str, LogprobWire]:
        """The chosen tokens' logprobs (wire form) of the sequences that asked for them."""
        wanted: dict[str, LogprobWire] = {}
        for i, seq in enumerate(seqs):
            n = self.samplers[seq].params.logprobs
            if n is not None and seq in picked:
                wanted[seq] = token_logprob(logits[i], picked[seq], n).to_wire()
        return wanted

    def release(self, seq: str) -> None:
        self.samplers.pop(seq, None)
        self.scores.pop(seq, None)

    def held(self) -> set[str]:
        return set(self.samplers)


Onward = HandOn | SampleHere


class PipelineStage(Stage):
    def __init__(self, spec: RunnerSpec, max_batch: int, to_head: HeadRoute, onward: Onward) -> None:
        super().__init__(spec, max_batch, to_head)
        self.onward = onward

    def _load_model(self, folder: Path, progress: Callable[[int], None]) -> CausalLM:
        spec = self.spec
        return load_model(folder, (spec.start_layer, spec.end_layer), spec.dtype, on_layer=progress)

    def admit(
        self, seq: str, params: SamplingParams, prompt: list[int], reuse: Reuse | None
    ) -> SequenceStart:
        return replace(self.onward.admit(seq, params, prompt, self.constraint_for), reuse=reuse)

    def step(self, step: ForwardStep, ids: torch.Tensor) -> list[Out]:
        return self.onward.finish(step, self.run(step, ids))

    def scores_prompt(self, step: ForwardStep) -> bool:
        scores = self.onward.scores if isinstance(self.onward, SampleHere) else {}
        return any(seq in scores for seq in step.seqs)

    def forward(self, message: Forward) -> list[Out]:
        """A middle or last stage: run this range on the hidden states from the previous stage."""
        self.check(message)
        step = message.step
        for seq in step.seqs:
            if seq not in self.caches:
                self.onward.first_step(seq, step.first_of(seq), self.constraint_for)
        hidden = to_tensor(message.tensor)
        return self.onward.finish(step, self.run(step, hidden))

    def batch_size(self, sequences: int) -> int:
        # one micro-batch per stage keeps every stage of the pipeline busy: with all sequences in
        # one batch, stage k would wait while the others compute
        return min(self.max_batch, max(1, math.ceil(sequences / self.spec.world)))

    def _check_input(self, dtype: str, shape: tuple[int, ...], seqs: int) -> None:
        check_hidden(dtype, shape, seqs, self._model().config.hidden_size)

    def free(self) -> None:
        for seq in self.onward.held():
            self.onward.release(seq)
        super().free()

    def release(self, seq: str, keep: int | None = None) -> None:
        self.onward.release(seq)
        super().release(seq, keep)

    def held(self) -> set[str]:
        return super().held() | self.onward.held()
