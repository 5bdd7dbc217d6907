"""The head of an instance: on rank 0 only, it owns the instance's sequences.

It tokenises each request, drives its node's stage through the `Stage` interface (admit a
sequence, run a step, release it), streams each sampled token's text to the client, and decides
what goes on: the next prompt chunk, the next decode step of every running sequence as one batch
(continuous batching), the end of a sequence everywhere. A runner elsewhere in the instance is a
`Follower`: the head's leases and releases reach its stage there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from exoctl.engine.generate import SequenceStream, check_prompt
from exoctl.engine.generation_defaults import read_defaults
from exoctl.engine.tokenizer import Tokenizer
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import (
    ForwardStep,
    Lease,
    LogprobWire,
    Prefill,
    Release,
    SeqError,
    SequenceStart,
    Tokens,
)
from exoctl.wire.messages import Delta, Done
from exoctl.wire.runner_report import RunnerReport
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingDefaults
from exoctl.worker.outbox import Out, ToClient, ToPeer, ToSelf, client_error
from exoctl.worker.stage import Stage

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


class Head:
    def __init__(self, spec: RunnerSpec, stage: Stage) -> None:
        self.spec = spec
        self.stage = stage
        self.instance_id = spec.instance_id
        self.followers = [address for _, address in spec.peers[1:]]  # every other runner's node
        self.tokenizer: Tokenizer | None = None
        self.sampling_defaults: SamplingDefaults | None = None  # the model's own (its files)
        self.sequences: dict[str, HeadSequence] = {}
        self.prompts: dict[str, list[int]] = {}  # prompts not yet wholly prefilled
        self.last_decode_tps = 0.0  # end-to-end decode speed of the last request

    # --- lifecycle ---------------------------------------------------------------------------

    def load(self, folder: Path) -> None:
        self.tokenizer = Tokenizer(folder)
        self.sampling_defaults = read_defaults(folder)

    def free(self) -> None:
        self.tokenizer = None
        self.sequences.clear()
        self.prompts.clear()

    def take_requests(self, node: str) -> None:
        """This node serves the instance's requests."""

    def report(self, report: RunnerReport) -> RunnerReport:
        tokenizer = self.tokenizer
        return replace(
            report,
            decode_tokens_per_s=round(self.last_decode_tps, 2),
            tool_format=tokenizer.tool_format if tokenizer is not None else None,
            sampling_defaults=self.sampling_defaults,
        )

    def leases(self) -> list[Out]:
        """The head's word to the other runners on which sequences live (read from the I/O
        loop's thread: `tuple` takes a snapshot of the dict's keys whole)."""
        live = Lease(self.instance_id, tuple(self.sequences))
        return [ToPeer(address, live) for address in self.followers]

    # --- requests ----------------------------------------------------------------------------

    def start(self, request: GenerateRequest, client: bytes) -> list[Out]:
        """A new request: tokenise, check, prefill."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        request_id = request.request_id
        if request_id in self.sequences:
            raise InvalidRequestError(f"request id {request_id} is already running")
        chat = request.chat
        if request.messages is not None:
            ids = tokenizer.encode_chat(request.messages, chat.tools, chat.prefix)
        else:
            ids = tokenizer.encode(request.prompt or "")
        context = self.stage.context
        check_prompt(ids, context)
        stream = SequenceStream(tokenizer, request.params, len(ids), context, special=chat.special)
        self.sequences[request_id] = HeadSequence(request_id, client, stream)
        self.prompts[request_id] = ids
        return self.prefill(request_id, self.stage.admit(request_id, request.params, ids))

    def prefill(self, seq: str, first: SequenceStart | None = None) -> list[Out]:
        """The next PREFILL_STEP positions of a prompt. A longer prompt queues a `Prefill` to
        itself for the rest, so the decode steps of other sequences waiting in the lane run between
        its chunks instead of after the whole prompt; the last stage samples after the last chunk."""
        ids = self.prompts.get(seq)
        if ids is None or seq not in self.sequences:
            return []  # cancelled or failed meanwhile
        done = self.stage.position(seq)
        chunk = ids[done : done + PREFILL_STEP]
        more = done + len(chunk) < len(ids)
        step = ForwardStep([seq], [done], {} if first is None else {seq: first}, partial=more)
        outs = self.stage.step(step, torch.tensor([chunk]))
        if more:
            outs.append(ToSelf(Prefill(self.instance_id, seq)))
        else:
            del self.prompts[seq]
        return outs

    def tokens(self, batches: list[Tokens]) -> list[Out]:
        """Tokens the sampling runner chose, from one or more messages. Stream each, then run the
        next step of every sequence that goes on, as batches [B, 1] (continuous batching)."""
        outs: list[Out] = []
        going: list[HeadSequence] = []
        for batch in batches:
            for seq_id, token, logprob in zip(batch.seqs, batch.tokens, batch.logprobs, strict=True):
                seq = self.sequences.get(seq_id)
                if seq is None:
                    continue  # cancelled or failed meanwhile
                try:
                    outs += self._take(seq, token, logprob)
                except Exception as exc:  # one bad token (or a tokenizer error) ends its sequence only
                    log.warning("sequence %s failed at token %r: %s", seq_id, token, exc)
                    outs += self.abort((seq_id,), f"node {self.spec.nodes[0]}: {type(exc).__name__}: {exc}")
                    continue
                if seq.request_id in self.sequences:
                    going.append(seq)
        size = self.stage.batch_size(len(self.sequences))
        for first in range(0, len(going), size):
            group = going[first : first + size]
            step = ForwardStep([s.request_id for s in group], [s.stream.next_position for s in group])
            inputs = torch.tensor([[s.stream.token_ids[-1]] for s in group])  # [B, 1]
            outs += self.stage.step(step, inputs)
        return outs

    def _take(self, seq: HeadSequence, token: int, logprob: LogprobWire | None) -> list[Out]:
        """One sampled token of one sequence: stream its text (and its logprobs, OpenAI's entry);
        finish the sequence if it is done."""
        vocab = self.stage.vocab_size
        if not 0 <= token < vocab:
            raise ExoctlError(f"token id {token} is outside the vocabulary of {vocab}")
        delta = seq.stream.push(token)
        entries = [] if logprob is None else [self._logprob_entry(token, logprob)]
        outs: list[Out] = [ToClient(seq.client, Delta(seq.request_id, delta, (token,), tuple(entries)))]
        if not seq.stream.done:
            return outs
        completion = seq.stream.completion()
        self.last_decode_tps = completion.timings.decode_tokens_per_s
        outs.append(ToClient(seq.client, Done(seq.request_id, completion)))
        return outs + self.release(seq.request_id)

    def _logprob_entry(self, token: int, logprob: LogprobWire) -> dict[str, Any]:
        """OpenAI's {token, logprob, bytes, top_logprobs} for a token and its alternatives."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        value, ids, values = logprob
        top = [{"logprob": v, **tokenizer.token_text(i)} for i, v in zip(ids, values, strict=True)]
        return {**tokenizer.token_text(token), "logprob": value, "top_logprobs": top}

    # --- ends --------------------------------------------------------------------------------

    def release(self, seq: str) -> list[Out]:
        """Free a sequence here and tell every other runner to free it."""
        self.stage.release(seq)
        self.prompts.pop(seq, None)
        if self.sequences.pop(seq, None) is None:
            return []
        return [ToPeer(address, Release(self.instance_id, seq)) for address in self.followers]

    def abort(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        """These sequences failed (here or on a stage): tell their clients, free them everywhere."""
        outs: list[Out] = []
        for seq in seqs:
            head = self.sequences.get(seq)
            released = self.release(seq)
            if head is not None:
                outs.append(client_error(head.client, seq, message))
            outs += released
        return outs

    def failed(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        """A job of this node's lane failed these sequences."""
        return self.abort(seqs, message)

    def refused(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        """A step refused at the socket: no runner of this instance sends the head a step."""
        return []

    def cancel(self, request_id: str) -> None:
        seq = self.sequences.get(request_id)
        if seq is not None:
            seq.stream.cancelled = True

    def renew(self, live: tuple[str, ...]) -> None:
        """A lease names the head's own sequences: the head gives leases, it takes none."""


class Follower:
    """A runner of the instance on a node other than the head's: its stage serves the head's steps;
    what the head says of its sequences (releases, leases) frees them here."""

    def __init__(self, spec: RunnerSpec, stage: Stage) -> None:
        self.instance_id = spec.instance_id
        self.stage = stage
        self.head_address = spec.peers[0][1]

    def load(self, folder: Path) -> None:
        """No tokenizer here: only the head reads text."""

    def free(self) -> None:
        pass

    def take_requests(self, node: str) -> None:
        raise ExoctlError(f"node {node} is not the head of instance {self.instance_id}")

    def report(self, report: RunnerReport) -> RunnerReport:
        return report

    def leases(self) -> list[Out]:
        return []

    def start(self, request: GenerateRequest, client: bytes) -> list[Out]:
        raise ExoctlError(f"this node is not the head of instance {self.instance_id}")

    def prefill(self, seq: str) -> list[Out]:
        return []

    def tokens(self, batches: list[Tokens]) -> list[Out]:
        return []  # tokens go to the head; one that came here is moot

    def release(self, seq: str) -> list[Out]:
        self.stage.release(seq)
        return []

    def abort(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        for seq in seqs:
            self.stage.release(seq)
        return []

    def failed(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        """A job here failed these sequences: the head ends them and tells their clients."""
        if not seqs:
            return []
        return [ToPeer(self.head_address, SeqError(self.instance_id, seqs, message))]

    def refused(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        return self.failed(seqs, message)

    def cancel(self, request_id: str) -> None:
        pass

    def renew(self, live: tuple[str, ...]) -> None:
        self.stage.renew(live)


Role = Head | Follower
