"""A runner: the part of one instance that lives on this node — a layer range, its KV caches.

Compute only: each method takes a decoded message and returns the messages to send (`outbox`),
so the worker's I/O loop owns every socket. Pipeline: rank 0 (the head) tokenises, embeds and
runs its layers, each stage passes the hidden state [1, T, D] to the next, the last stage
samples and sends the token id back to the head, which streams text to the client.
"""

from __future__ import annotations

import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from exoctl.engine.generate import SequenceStream, check_prompt
from exoctl.engine.generation_defaults import read_defaults
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.logprobs import token_logprob
from exoctl.engine.mixtral import SparseMoE
from exoctl.engine.model import CausalLM, held_in_float_note, load_model
from exoctl.engine.sampling import Sampler
from exoctl.engine.tokenizer import Tokenizer
from exoctl.engine.weights import trim_heap
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire.chat_options import ChatOptions
from exoctl.wire.protocol import Message
from exoctl.wire.runner_report import ExpertLoad, Failure, RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingDefaults, SamplingParams
from exoctl.worker.loader import LoadCancelled
from exoctl.worker.outbox import Out, ToClient, ToPeer, ToSelf, client_error
from exoctl.worker.steps import PROMPT_IDS, ForwardStep, check_hidden, check_room
from exoctl.worker.tensors import from_tensor, to_tensor

log = logging.getLogger("exoctl.worker")
# Prompt positions the head runs before it lets queued decode steps of other sequences go: a
# SmolLM2 chunk of 256 takes about a second on 2 cores, so no chat waits longer than that.
PREFILL_STEP = 256


@dataclass
class HeadSequence:
    """One request as the head sees it: who asked, and its stream of tokens and text."""

    request_id: str
    client: bytes
    stream: SequenceStream


def release_memory() -> None:
    """Return freed tensor memory to the OS so RSS drops after an unload."""
    gc.collect()
    trim_heap()


class Runner:
    def __init__(self, spec: RunnerSpec, max_batch: int = 32) -> None:
        self.spec = spec
        self.max_batch = max_batch  # decode steps of at most this many sequences at once
        self.status = RunnerStatus.LOADING
        self.failure: Failure | None = None
        self.layers_loaded = 0
        self.model: CausalLM | None = None
        self.tokenizer: Tokenizer | None = None
        self.sampling_defaults: SamplingDefaults | None = None  # head: the model's own (its files)
        self.note: str | None = None  # what the load kept other than asked (held_in_float_note)
        self.caches: dict[str, KVCache] = {}
        self.samplers: dict[str, Sampler] = {}
        self.heads: dict[str, HeadSequence] = {}
        self.prompts: dict[str, list[int]] = {}  # head: prompts not yet wholly prefilled
        self.unloading = False
        self.leased: set[str] = set()  # sequences held here when the head last said which live
        self.decoded = 0  # decode positions computed here, and the time they took
        self.compute_s = 0.0
        self.last_decode_tps = 0.0  # head: end-to-end decode speed of the last request
        # sends a message at once, before the step that produced it ends (set by the compute lane)
        self.emit: Callable[[Out], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    @property
    def failed(self) -> bool:
        return self.status is RunnerStatus.FAILED

    def _load_model(self, folder: Path, progress: Callable[[int], None]) -> CausalLM:
        spec = self.spec
        return load_model(folder, (spec.start_layer, spec.end_layer), spec.dtype, on_layer=progress)

    def _loaded(self) -> None:
        self.status = RunnerStatus.READY

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
            tokenizer = Tokenizer(folder) if spec.is_head else None
            if spec.is_head:
                self.sampling_defaults = read_defaults(folder)
        except BaseException:
            release_memory()
            raise
        if self.unloading:
            raise LoadCancelled
        self.model, self.tokenizer = model, tokenizer
        self._loaded()

    def fail(self, failure: Failure) -> None:
        self.status = RunnerStatus.FAILED
        self.failure = failure
        self.free()

    def free(self) -> None:
        self.unloading = True
        self.model = None
        self.tokenizer = None
        self.caches.clear()
        self.samplers.clear()
        self.heads.clear()
        release_memory()

    def close(self) -> None:
        """Close what the compute lane used, once it has stopped (nothing here for a pipeline)."""

    @property
    def memory_bytes(self) -> int:
        model = self.model
        if model is None:
            return 0
        return model.weight_bytes() + sum(c.nbytes for c in list(self.caches.values()))

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
            decode_tokens_per_s=round(self.last_decode_tps, 2),
            decoded_tokens=self.decoded,
            compute_s=self.compute_s,
            active_sequences=len(self.caches),
            experts=self.experts(),
            tool_format=self.tokenizer.tool_format if self.tokenizer is not None else None,
            sampling_defaults=self.sampling_defaults,
            note=self.note,
        )

    def experts(self) -> tuple[ExpertLoad, ...]:
        """Mixtral: the experts held here and the tokens routed to each, over this runner's layers."""
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

    # --- compute ---------------------------------------------------------------------------

    def _model(self) -> CausalLM:
        if self.model is None:
            raise ExoctlError(f"runner {self.spec.runner_id} is {self.status.value}, not ready")
        return self.model

    def _run(self, seqs: list[str], inputs: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """This range on B sequences: inputs [B, T] ids or [B, T, D] hidden, each at its own start."""
        model = self._model()
        count = inputs.shape[1]
        self._check_room(seqs, starts, count)
        for seq, start in zip(seqs, starts, strict=True):
            cache = self.caches.get(seq)
            length = 0 if cache is None else cache.length
            if length != start:
                raise ExoctlError(f"sequence {seq} is at position {length} here, not {start}")
        new = [seq for seq in seqs if seq not in self.caches]
        for seq in new:
            self.caches[seq] = model.new_cache()
        caches = [self.caches[seq] for seq in seqs]
        positions = torch.tensor(starts)[:, None] + torch.arange(count)[None, :]  # [B, T]
        began = time.perf_counter()
        out = model.forward(inputs, positions, caches)
        if count == 1:
            self.decoded += len(seqs)
            self.compute_s += time.perf_counter() - began
        return out

    def _check_room(self, seqs: list[str], starts: list[int], count: int) -> None:
        new = sum(1 for seq in seqs if seq not in self.caches)
        context = self._model().config.max_position_embeddings
        check_room(seqs, starts, count, context, len(self.caches), new, self.spec.runner_id)

    def check_step(self, message: Message) -> ForwardStep:
        """A `forward` checked against this runner before any compute: its fields, its tensor's
        dtype and shape, the context and the sequence limit. Cheap and read-only, so the I/O loop
        runs it too and refuses a bad step to its sender."""
        step = ForwardStep.from_message(message)
        if len(message.tensors) != 1:
            raise ExoctlError("'forward' needs exactly one tensor")
        tensor = message.tensors[0]
        self._check_input(tensor.dtype, tensor.shape, len(step.seqs))
        self._check_room(step.seqs, step.starts, tensor.shape[1])
        return step

    def _check_input(self, dtype: str, shape: tuple[int, ...], seqs: int) -> None:
        check_hidden(dtype, shape, seqs, self._model().config.hidden_size)

    def _next(self, step: ForwardStep, out: torch.Tensor) -> list[Out]:
        """What to do with this stage's output [B, T, D] (or logits [B, 1, V] on the last stage):
        pass the hidden states on, or sample one token per sequence and send them to the head."""
        spec = self.spec
        if not spec.is_last:
            fields = step.fields(spec.instance_id)
            return [ToPeer(spec.peers[spec.rank + 1][1], "forward", fields, (from_tensor(out),))]
        if step.partial:
            return []  # more of the prompt is coming: nothing to sample yet
        logits = out[:, -1]  # [B, V]
        choices = [self.samplers[seq] for seq in step.seqs]
        if all(s.params.greedy and not s.params.penalizes for s in choices):
            picked = dict(zip(step.seqs, (int(t) for t in logits.argmax(dim=-1)), strict=True))
        else:
            picked = {}
            failed: dict[str, str] = {}
            for i, seq in enumerate(step.seqs):
                try:
                    picked[seq] = choices[i].choose(logits[i : i + 1])
                except RuntimeError as exc:  # this sequence's draw failed: only it ends
                    failed[seq] = f"node {spec.nodes[spec.rank]}: sampling failed: {exc}"
            if failed:
                return self._sampled(picked, self._logprobs(step.seqs, logits, picked)) + self._failed(failed)
        return self._sampled(picked, self._logprobs(step.seqs, logits, picked))

    def _logprobs(
        self, seqs: list[str], logits: torch.Tensor, picked: dict[str, int]
    ) -> dict[str, list[object]]:
        """The chosen tokens' logprobs (wire form) of the sequences that asked for them."""
        wanted: dict[str, list[object]] = {}
        for i, seq in enumerate(seqs):
            n = self.samplers[seq].params.logprobs
            if n is not None and seq in picked:
                wanted[seq] = token_logprob(logits[i], picked[seq], n).to_wire()
        return wanted

    def _sampled(self, picked: dict[str, int], logprobs: dict[str, list[object]]) -> list[Out]:
        """The last stage's tokens (and logprobs where asked), to the head."""
        spec = self.spec
        if not picked:
            return []
        fields = {
            "instance_id": spec.instance_id,
            "seqs": list(picked),
            "tokens": list(picked.values()),
            "logprobs": [logprobs.get(seq) for seq in picked],
        }
        if spec.is_head:
            return [ToSelf(Message("token", fields))]
        return [ToPeer(spec.peers[0][1], "token", fields)]

    def _failed(self, failed: dict[str, str]) -> list[Out]:
        """Sequences that failed here, each with why: ended at the head, which tells their clients."""
        outs: list[Out] = []
        for seq, why in failed.items():
            if self.spec.is_head:
                outs += self.abort([seq], why)
            else:
                fields = {"instance_id": self.spec.instance_id, "seqs": [seq], "message": why}
                outs.append(ToPeer(self.spec.peers[0][1], "seq_error", fields))
        return outs

    def start(self, request: Message, client: bytes) -> list[Out]:
        """Head: a new request — tokenise, check, prefill this stage."""
        model, tokenizer = self._model(), self.tokenizer
        assert tokenizer is not None
        request_id = request["request_id"]
        if request_id in self.heads:
            raise InvalidRequestError(f"request id {request_id} is already running")
        params = SamplingParams.from_wire(request["params"])
        chat = ChatOptions.from_wire(request["chat"])
        if request["messages"] is not None:
            ids = tokenizer.encode_chat(request["messages"], chat.tools, chat.prefix)
        elif request["prompt"] is not None:
            ids = tokenizer.encode(request["prompt"])
        else:
            raise InvalidRequestError("a request needs 'messages' or 'prompt'")
        context = model.config.max_position_embeddings
        check_prompt(ids, context)
        stream = SequenceStream(tokenizer, params, len(ids), context, special=chat.special)
        self.heads[request_id] = HeadSequence(request_id, client, stream)
        self.prompts[request_id] = ids
        return self.prefill(request_id, self._admit(request_id, params))

    def prefill(self, seq: str, params: dict[str, object] | None = None) -> list[Out]:
        """Head: the next PREFILL_STEP positions of a prompt. A longer prompt queues a `prefill` to
        itself for the rest, so the decode steps of other sequences waiting in the lane run between
        its chunks instead of after the whole prompt; the last stage samples after the last chunk."""
        ids = self.prompts.get(seq)
        if ids is None or seq not in self.heads:
            return []  # cancelled or failed meanwhile
        cache = self.caches.get(seq)
        done = 0 if cache is None else cache.length
        chunk = ids[done : done + PREFILL_STEP]
        more = done + len(chunk) < len(ids)
        step = ForwardStep([seq], [done], {} if params is None else {seq: params}, partial=more)
        outs = self._step(step, torch.tensor([chunk]))
        if more:
            outs.append(ToSelf(Message("prefill", {"instance_id": self.spec.instance_id, "seq": seq})))
        else:
            del self.prompts[seq]
        return outs

    def _admit(self, seq: str, params: SamplingParams) -> dict[str, object]:
        """Head: set up sampling for a new sequence; the params the other stages get for it."""
        prompt = self.prompts.get(seq, [])
        if self.spec.is_last:
            self.samplers[seq] = Sampler.create(params, prompt)
            return params.to_wire()
        if params.repetition_penalty != 1:  # the last stage penalizes the prompt's tokens too
            return {**params.to_wire(), PROMPT_IDS: list(prompt)}
        return params.to_wire()

    def _step(self, step: ForwardStep, inputs: torch.Tensor) -> list[Out]:
        """Head: one step of B sequences, ids [B, T]: this stage's layers, then on down the pipeline."""
        return self._next(step, self._run(step.seqs, inputs, step.starts))

    def _batch_size(self) -> int:
        # one micro-batch per stage keeps every stage of the pipeline busy: with all sequences in
        # one batch, stage k would wait while the others compute
        return min(self.max_batch, max(1, math.ceil(len(self.heads) / self.spec.world)))

    def forward(self, message: Message) -> list[Out]:
        """A middle or last stage: run this range on the hidden states from the previous stage."""
        step = self.check_step(message)
        for seq in step.seqs:
            if seq in self.caches:
                continue
            sampling = step.first_params(seq)
            if self.spec.is_last:
                self.samplers[seq] = Sampler.create(sampling, step.first_prompt(seq))
        hidden = to_tensor(message.tensors[0])
        return self._next(step, self._run(step.seqs, hidden, step.starts))

    def tokens(self, messages: list[Message]) -> list[Out]:
        """Head: tokens the last stage sampled, from one or more messages. Stream each, then run
        the next step of every sequence that goes on as one batch [B, 1] (continuous batching)."""
        outs: list[Out] = []
        going: list[HeadSequence] = []
        for message in messages:
            for seq_id, token, logprob in zip(
                message["seqs"], message["tokens"], message["logprobs"], strict=True
            ):
                seq = self.heads.get(seq_id)
                if seq is None:
                    continue  # cancelled or failed meanwhile
                try:
                    outs += self._take(seq, token, logprob)
                except Exception as exc:  # one bad token (or a tokenizer error) ends its sequence only
                    log.warning("sequence %s failed at token %r: %s", seq_id, token, exc)
                    outs += self.abort([seq_id], f"node {self.spec.nodes[0]}: {type(exc).__name__}: {exc}")
                    continue
                if seq.request_id in self.heads:
                    going.append(seq)
        size = self._batch_size()
        for first in range(0, len(going), size):
            batch = going[first : first + size]
            step = ForwardStep(
                [seq.request_id for seq in batch], [seq.stream.next_position for seq in batch], {}
            )
            inputs = torch.tensor([[seq.stream.token_ids[-1]] for seq in batch])  # [B, 1]
            outs += self._step(step, inputs)
        return outs

    def _take(self, seq: HeadSequence, token: int, logprob: list[Any] | None = None) -> list[Out]:
        """One sampled token of one sequence: stream its text (and its logprobs, OpenAI's entry);
        finish the sequence if it is done."""
        vocab = self._model().config.vocab_size
        if not 0 <= token < vocab:
            raise ExoctlError(f"token id {token} is outside the vocabulary of {vocab}")
        delta = seq.stream.push(token)
        entries = [] if logprob is None else [self._logprob_entry(token, logprob)]
        fields = {"text": delta, "tokens": [token], "logprobs": entries}
        outs: list[Out] = [ToClient(seq.client, "delta", seq.request_id, fields)]
        if not seq.stream.done:
            return outs
        completion = seq.stream.completion()
        self.last_decode_tps = completion.timings.decode_tokens_per_s
        outs.append(ToClient(seq.client, "done", seq.request_id, {"result": completion.to_wire()}))
        return outs + self.release(seq.request_id)

    def _logprob_entry(self, token: int, logprob: list[Any]) -> dict[str, Any]:
        """OpenAI's {token, logprob, bytes, top_logprobs} for a token and its alternatives."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        value, ids, values = logprob
        top = [{"logprob": v, **tokenizer.token_text(i)} for i, v in zip(ids, values, strict=True)]
        return {**tokenizer.token_text(token), "logprob": value, "top_logprobs": top}

    def release(self, seq: str) -> list[Out]:
        """Free a sequence here; the head also tells every other stage to free it."""
        self.caches.pop(seq, None)
        self.samplers.pop(seq, None)
        self.prompts.pop(seq, None)
        head = self.heads.pop(seq, None)
        if head is None or not self.spec.is_head:
            return []
        fields = {"instance_id": self.spec.instance_id, "seq": seq}
        return [ToPeer(address, "release", fields) for _, address in self.spec.peers[1:]]

    def held(self) -> set[str]:
        """The sequences this runner holds any state of."""
        return set(self.caches) | set(self.samplers)

    def renew(self, live: list[str]) -> list[Out]:
        """Not the head: the head's word on which sequences live. One held here at its last word and
        not named in this one is freed: the head never knew it, or its `release` was lost. (One
        that came since the last word waits for the next, so a word overtaken by a new sequence's
        first step frees nothing.)"""
        for seq in self.leased - set(live):
            self.release(seq)
        self.leased = self.held()
        return []

    def abort(self, seqs: list[str], message: str) -> list[Out]:
        """Head: a stage failed these sequences; tell their clients and free them everywhere."""
        outs: list[Out] = []
        for seq in seqs:
            head = self.heads.get(seq)
            released = self.release(seq)
            if head is not None:
                outs.append(client_error(head.client, seq, message))
            outs += released
        return outs

    def cancel(self, request_id: str) -> None:
        seq = self.heads.get(request_id)
        if seq is not None:
            seq.stream.cancelled = True
