"""The head of an instance: on rank 0 only, it owns the instance's sequences.

It tokenises each request, drives its node's stage through the `Stage` interface (admit a
sequence, run a step, release it), streams each sampled token's text to the client, and decides
what goes on: the next prompt chunk, the next decode step of every running sequence as one batch
(continuous batching), the end of a sequence everywhere. A runner elsewhere in the instance is a
`Follower`: the head's leases and releases reach its stage there.

The head also decides the instance's cached prefixes (`PrefixIndex`): a new request reuses the
longest cached prefix of its token ids (named in its first step, so every runner copies the same
positions), and an ended one is kept as a cached prefix (named in its `Release`) or not.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from exoctl.engine.draft_model import DraftModel
from exoctl.engine.generate import SequenceStream, check_prompt
from exoctl.engine.generation_defaults import read_defaults
from exoctl.engine.model import load_model
from exoctl.engine.prompt_lookup import PromptLookup
from exoctl.engine.tokenizer import Tokenizer, same_tokens
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import (
    Forget,
    ForwardStep,
    Lease,
    LogprobWire,
    Prefill,
    Release,
    Reuse,
    SeqError,
    SequenceStart,
    Tokens,
)
from exoctl.wire.messages import Delta, Done
from exoctl.wire.runner_report import HeadPrefixStats, RunnerReport, SpeculationReport
from exoctl.wire.runner_spec import NGRAM_DRAFT, RunnerSpec
from exoctl.wire.sampling_params import SamplingDefaults
from exoctl.worker.node_memory import MemoryView, positions_to_free
from exoctl.worker.outbox import Out, ToClient, ToPeer, ToSelf, client_error
from exoctl.worker.prefix_index import PrefixIndex
from exoctl.worker.speculation import Speculator
from exoctl.worker.stage import Stage

log = logging.getLogger("exoctl.worker")
# Prompt positions the head runs before it lets queued decode steps of other sequences go: a
# SmolLM2 chunk of 256 takes about a second on 2 cores, so no chat waits longer than that.
PREFILL_STEP = 256


@dataclass
class HeadSequence:
    """One request as the head sees it: who asked, its prompt, and its stream of tokens and text."""

    request_id: str
    client: bytes
    stream: SequenceStream
    request: GenerateRequest  # as asked (`cache_prompt`: its KV may be kept when it ends)
    prompt_ids: list[int]
    pinned: str | None = None  # the cached prefix its first step copies, until its first token

    def known_ids(self) -> list[int]:
        """Every token id of it so far: the prompt and every sampled token (what a drafter reads)."""
        return self.prompt_ids + self.stream.token_ids

    def held_ids(self) -> list[int]:
        """The token ids of the positions every runner's cache holds for it: the prompt and every
        sampled token but the last (which no step has run yet)."""
        return (self.prompt_ids + self.stream.token_ids)[: self.stream.next_position]


class Head:
    def __init__(self, spec: RunnerSpec, stage: Stage, memory: MemoryView | None = None) -> None:
        self.spec = spec
        self.stage = stage
        self.memory = memory  # the free memory of the instance's nodes (None: not watched)
        self.instance_id = spec.instance_id
        self.followers = [address for _, address in spec.peers[1:]]  # every other runner's node
        self.tokenizer: Tokenizer | None = None
        self.sampling_defaults: SamplingDefaults | None = None  # the model's own (its files)
        self.sequences: dict[str, HeadSequence] = {}
        self.prompts: dict[str, list[int]] = {}  # prompts not yet wholly prefilled
        self.prefixes = PrefixIndex(spec.prefix_positions)  # the instance's cached prefixes
        self.last_decode_tps = 0.0  # end-to-end decode speed of the last request
        self.speculator = Speculator(PromptLookup() if spec.draft == NGRAM_DRAFT else None)
        self.draft_model: DraftModel | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def load(self, folder: Path, draft_folder: Path | None = None) -> None:
        self.tokenizer = Tokenizer(folder)
        self.sampling_defaults = read_defaults(folder)
        if draft_folder is not None:
            self._load_draft(draft_folder)

    def _load_draft(self, folder: Path) -> None:
        """The draft model, whole, beside this node's part of the target: its tokenizer first (a
        draft of other tokens is refused before its weights are read)."""
        spec = self.spec
        assert self.tokenizer is not None
        same_tokens(self.tokenizer, Tokenizer(folder), spec.draft_model_id or spec.draft)
        model = load_model(folder, None, spec.draft_dtype)
        if model.config.num_hidden_layers != spec.draft_layers:
            raise ExoctlError(
                f"draft model {folder} has {model.config.num_hidden_layers} layers but the placement "
                f"expected {spec.draft_layers}",
                hint="the node holds another version of the draft model; give it the catalog's files",
            )
        self.draft_model = DraftModel(model)
        self.speculator = Speculator(self.draft_model)

    @property
    def memory_bytes(self) -> int:
        """What the head holds besides its stage: the draft model and its caches."""
        return self.draft_model.nbytes if self.draft_model is not None else 0

    def free(self) -> None:
        self.speculator.clear()
        self.draft_model = None
        self.speculator = Speculator(None)
        self.tokenizer = None
        self.sequences.clear()
        self.prompts.clear()
        self.prefixes.clear()

    def take_requests(self, node: str) -> None:
        """This node serves the instance's requests."""

    def report(self, report: RunnerReport) -> RunnerReport:
        tokenizer = self.tokenizer
        index = self.prefixes
        stats = index.stats
        return replace(
            report,
            decode_tokens_per_s=round(self.last_decode_tps, 2),
            tool_format=tokenizer.tool_format if tokenizer is not None else None,
            sampling_defaults=self.sampling_defaults,
            head_prefix=HeadPrefixStats(
                index.budget, stats.lookups, stats.hits, stats.reused_tokens, stats.evictions
            ),
            speculation=self._speculation_report(),
            memory_bytes=report.memory_bytes + self.memory_bytes,
        )

    def _speculation_report(self) -> SpeculationReport | None:
        if not self.spec.draft:
            return None
        return self.speculator.stats.report(self.spec.draft_model_id or self.spec.draft)

    def leases(self) -> list[Out]:
        """The head's word to the other runners on which sequences live and which cached prefixes
        it keeps (read from the I/O loop's thread: `tuple` takes a snapshot of a dict's keys whole)."""
        live = Lease(self.instance_id, tuple(self.sequences), tuple(self.prefixes.entries))
        return [ToPeer(address, live) for address in self.followers]

    # --- requests ----------------------------------------------------------------------------

    def start(self, request: GenerateRequest, client: bytes, reuse_cached: bool = True) -> list[Out]:
        """A new request: tokenise, check, prefill (after the cached prefix it reuses, unless
        `reuse_cached` is off: a sequence run again because a runner lacked its prefix)."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        request_id = request.request_id
        if request_id in self.sequences:
            raise InvalidRequestError(f"request id {request_id} is already running")
        chat = request.chat
        if request.messages is not None:
            ids = tokenizer.encode_chat(request.messages, chat.tools, chat.prefix)
        elif request.prompt_ids is not None:
            ids = self._check_ids(request.prompt_ids)
        else:
            ids = tokenizer.encode(request.prompt or "")
        context = self.stage.context
        check_prompt(ids, context)
        relieved = self._relieve(min(len(ids) + request.params.max_tokens, context))
        # a prompt whose tokens are scored runs whole: a cached prefix's positions are not computed
        scored = request.params.prompt_logprobs is not None
        reuse = self._reuse(ids) if request.cache_prompt and reuse_cached and not scored else None
        cached = reuse.positions if reuse is not None else 0
        stream = SequenceStream(
            tokenizer, request.params, len(ids), context, special=chat.special, cached_tokens=cached
        )
        pinned = reuse.entry if reuse is not None else None
        self.sequences[request_id] = HeadSequence(request_id, client, stream, request, ids, pinned)
        self.prompts[request_id] = ids
        return relieved + self.prefill(request_id, self.stage.admit(request_id, request.params, ids, reuse))

    def _check_ids(self, ids: list[int]) -> list[int]:
        vocab = self.stage.vocab_size
        bad = next((i for i in ids if not 0 <= i < vocab), None)
        if bad is not None:
            raise InvalidRequestError(
                f"prompt token id {bad} is outside the model's vocabulary of {vocab}",
                hint=f"token ids run from 0 to {vocab - 1}",
            )
        return list(ids)

    def _relieve(self, positions: int) -> list[Out]:
        """Memory pressure: where a new sequence of `positions` positions would leave a node less
        than its floor free, evict cached prefixes (least recently used first) to make it up."""
        if self.memory is None or not self.prefixes.entries or not self.spec.position_bytes:
            return []
        rooms = [
            (room, cost)
            for (_, address), cost in zip(self.spec.peers, self.spec.position_bytes, strict=True)
            if (room := self.memory(address)) is not None
        ]
        short = positions_to_free(rooms, positions)
        if short <= 0:
            return []
        evicted = self.prefixes.evict(short)
        if evicted:
            log.warning(
                "instance %s: memory is short; evicted %d cached prefixes for a request of %d positions",
                self.instance_id[:8],
                len(evicted),
                positions,
            )
        return self._forget(evicted)

    def _reuse(self, ids: list[int]) -> Reuse | None:
        """The cached prefix a new prompt starts from, pinned until its first step has passed every
        runner; None when no entry shares its start."""
        match = self.prefixes.match(ids)
        if match is None:
            return None
        reuse = Reuse(match.entry, match.positions)
        if not self.stage.prefixes.holds(reuse):  # never so unless a keep was refused: forget it
            self.stage.forget(self.prefixes.drop(match.entry))
            return None
        self.prefixes.pin(match.entry)
        return reuse

    def prefill(self, seq: str, first: SequenceStart | None = None) -> list[Out]:
        """The next PREFILL_STEP positions of a prompt (after the cached prefix it reuses). A
        longer prompt queues a `Prefill` to itself for the rest, so the decode steps of other
        sequences waiting in the lane run between its chunks instead of after the whole prompt; the
        last stage samples after the last chunk."""
        ids = self.prompts.get(seq)
        if ids is None or seq not in self.sequences:
            return []  # cancelled or failed meanwhile
        reused = first.reuse if first is not None else None
        done = reused.positions if reused is not None else self.stage.position(seq)
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
        """Tokens the sampling runner chose, from one or more messages (after a verification step,
        a sequence's accepted tokens in order). Stream each, then run the next step of every
        sequence that goes on, as batches [B, 1] (continuous batching), or a sequence that steps
        alone as a verification step of its guesses [1, k + 1]."""
        outs: list[Out] = []
        going: dict[str, HeadSequence] = {}
        for batch in batches:
            taken: dict[str, int] = {}
            for seq_id, token, logprob in zip(batch.seqs, batch.tokens, batch.logprobs, strict=True):
                seq = self.sequences.get(seq_id)
                if seq is None:
                    continue  # cancelled, failed or finished meanwhile (a run's tokens after its end)
                taken[seq_id] = taken.get(seq_id, 0) + 1
                try:
                    scored = batch.prompt_logprobs.get(seq_id)
                    if scored is not None and seq.stream.prompt_logprobs is None:
                        seq.stream.prompt_logprobs = self._prompt_entries(seq.prompt_ids, scored)
                    outs += self._take(seq, token, logprob)
                except Exception as exc:  # one bad token (or a tokenizer error) ends its sequence only
                    log.warning("sequence %s failed at token %r: %s", seq_id, token, exc)
                    outs += self.abort((seq_id,), f"node {self.spec.nodes[0]}: {type(exc).__name__}: {exc}")
                    continue
                if seq.request_id in self.sequences:
                    going[seq_id] = seq
            for seq_id, count in taken.items():
                self.speculator.took(seq_id, count)
        group_size = self.stage.batch_size(len(self.sequences))
        # a run's later token may have ended a sequence an earlier one kept going
        ordered = [seq for seq_id, seq in going.items() if seq_id in self.sequences]
        for first in range(0, len(ordered), group_size):
            group = ordered[first : first + group_size]
            outs += self._decode(group)
        return outs

    def _decode(self, group: list[HeadSequence]) -> list[Out]:
        """The next decode step of these sequences: [B, 1] ids, or for one sequence that steps
        alone, its last token and the drafter's guesses [1, k + 1]."""
        guesses: tuple[int, ...] = ()
        for seq in group:
            stream = seq.stream
            room = min(stream.budget - len(stream.token_ids), self.stage.context - stream.next_position)
            allowed = len(group) == 1 and seq.request.speculative
            guesses = self.speculator.guesses(seq.request_id, seq.known_ids(), room, allowed)
        if guesses:
            seq = group[0]
            step = ForwardStep([seq.request_id], [seq.stream.next_position], drafts={seq.request_id: guesses})
            return self.stage.step(step, torch.tensor([[seq.stream.token_ids[-1], *guesses]]))  # [1, k + 1]
        step = ForwardStep([s.request_id for s in group], [s.stream.next_position for s in group])
        inputs = torch.tensor([[s.stream.token_ids[-1]] for s in group])  # [B, 1]
        return self.stage.step(step, inputs)

    def _take(self, seq: HeadSequence, token: int, logprob: LogprobWire | None) -> list[Out]:
        """One sampled token of one sequence: stream its text (and its logprobs, OpenAI's entry);
        finish the sequence if it is done."""
        vocab = self.stage.vocab_size
        if not 0 <= token < vocab:
            raise ExoctlError(f"token id {token} is outside the vocabulary of {vocab}")
        self._unpin(seq)  # its first step has passed every runner: none copies from the entry now
        delta = seq.stream.push(token)
        entries = [] if logprob is None else [self._logprob_entry(token, logprob)]
        outs: list[Out] = [ToClient(seq.client, Delta(seq.request_id, delta, (token,), tuple(entries)))]
        if not seq.stream.done:
            return outs
        completion = seq.stream.completion()
        self.last_decode_tps = completion.timings.decode_tokens_per_s
        outs.append(ToClient(seq.client, Done(seq.request_id, completion)))
        return outs + self._end(seq.request_id, keep=True)

    def _prompt_entries(self, prompt: list[int], scored: list[LogprobWire]) -> list[dict[str, Any]]:
        """OpenAI's entries of a prompt's tokens: the first has no logprob (nothing comes before it)."""
        tokenizer = self.tokenizer
        assert tokenizer is not None
        first = {**tokenizer.token_text(prompt[0]), "logprob": None, "top_logprobs": []}
        return [first] + [self._logprob_entry(t, e) for t, e in zip(prompt[1:], scored, strict=True)]

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
        return self._end(seq, keep=False)

    def _end(self, seq: str, keep: bool) -> list[Out]:
        """A sequence ends: everywhere its cache is freed, or (`keep`, when the index takes it) kept
        as a cached prefix; entries it covers or that make room for it are forgotten."""
        head = self.sequences.pop(seq, None)
        self.prompts.pop(seq, None)
        self.speculator.forget(seq)
        if head is None:
            self.stage.release(seq)
            return []
        self._unpin(head)
        kept: int | None = None
        forget: tuple[str, ...] = ()
        if keep and head.request.cache_prompt and self.prefixes.enabled:
            decision = self.prefixes.keep(seq, head.held_ids())
            kept, forget = (head.stream.next_position if decision.kept else None), decision.forget
        self.stage.release(seq, kept)
        outs: list[Out] = [
            ToPeer(address, Release(self.instance_id, seq, kept)) for address in self.followers
        ]
        return outs + self._forget(forget)

    def _forget(self, entries: tuple[str, ...]) -> list[Out]:
        """Entries gone from the index: freed here, and the other runners told."""
        if not entries:
            return []
        self.stage.forget(entries)
        return [ToPeer(address, Forget(self.instance_id, entries)) for address in self.followers]

    def _unpin(self, seq: HeadSequence) -> None:
        if seq.pinned is not None:
            self.prefixes.unpin(seq.pinned)
            seq.pinned = None

    def released(self, message: Release) -> list[Out]:
        """The head sends releases and takes none: one sent to it is moot."""
        return []

    def forget(self, entries: tuple[str, ...]) -> list[Out]:
        """The head forgets its own entries; a word from elsewhere is moot."""
        return []

    def abort(self, seqs: tuple[str, ...], message: str, missing: tuple[str, ...] = ()) -> list[Out]:
        """These sequences failed (here or on a stage): tell their clients, free them everywhere. A
        stage that lacked the cached prefixes they reuse (`missing`, a lost word of the head's): the
        entries are forgotten everywhere, and a sequence with no token yet runs again without."""
        outs: list[Out] = []
        if missing:
            outs, seqs = self._run_again(seqs, message, missing)
        for seq in seqs:
            head = self.sequences.get(seq)
            released = self.release(seq)
            if head is not None:
                outs.append(client_error(head.client, seq, message))
            outs += released
        return outs

    def _run_again(
        self, seqs: tuple[str, ...], message: str, missing: tuple[str, ...]
    ) -> tuple[list[Out], tuple[str, ...]]:
        """Forget the `missing` entries everywhere and start again, without a cached prefix, the
        sequences that have no token yet (their client has seen nothing); the others, to abort."""
        outs: list[Out] = []
        for entry in missing:
            outs += self._forget(self.prefixes.drop(entry))
        rest = []
        for seq in seqs:
            head = self.sequences.get(seq)
            if head is None or head.stream.token_ids:
                rest.append(seq)
                continue
            log.warning("sequence %s: %s; running it again without the cached prefix", seq, message)
            outs += self._end(seq, keep=False)
            outs += self.start(head.request, head.client, reuse_cached=False)
        return outs, tuple(rest)

    def failed(self, seqs: tuple[str, ...], message: str, missing: tuple[str, ...] = ()) -> list[Out]:
        """A job of this node's lane failed these sequences."""
        return self.abort(seqs, message, missing)

    def refused(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        """A step refused at the socket: no runner of this instance sends the head a step."""
        return []

    def cancel(self, request_id: str) -> None:
        seq = self.sequences.get(request_id)
        if seq is not None:
            seq.stream.cancelled = True

    def renew(self, live: tuple[str, ...], kept: tuple[str, ...]) -> None:
        """A lease names the head's own sequences: the head gives leases, it takes none."""


class Follower:
    """A runner of the instance on a node other than the head's: its stage serves the head's steps;
    what the head says of its sequences (releases, leases) frees them here."""

    def __init__(self, spec: RunnerSpec, stage: Stage) -> None:
        self.instance_id = spec.instance_id
        self.stage = stage
        self.head_address = spec.peers[0][1]

    def load(self, folder: Path, draft_folder: Path | None = None) -> None:
        """No tokenizer here: only the head reads text (and drafts)."""

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

    def released(self, message: Release) -> list[Out]:
        """The head's word that a sequence ended: free it, or keep it as a cached prefix."""
        self.stage.release(message.seq, message.keep)
        return []

    def forget(self, entries: tuple[str, ...]) -> list[Out]:
        self.stage.forget(entries)
        return []

    def abort(self, seqs: tuple[str, ...], message: str, missing: tuple[str, ...] = ()) -> list[Out]:
        for seq in seqs:
            self.stage.release(seq)
        return []

    def failed(self, seqs: tuple[str, ...], message: str, missing: tuple[str, ...] = ()) -> list[Out]:
        """A job here failed these sequences: the head ends them and tells their clients (or runs
        them again, where what failed was a cached prefix missing here)."""
        if not seqs:
            return []
        return [ToPeer(self.head_address, SeqError(self.instance_id, seqs, message, missing))]

    def refused(self, seqs: tuple[str, ...], message: str) -> list[Out]:
        return self.failed(seqs, message)

    def cancel(self, request_id: str) -> None:
        pass

    def renew(self, live: tuple[str, ...], kept: tuple[str, ...]) -> None:
        self.stage.renew(live, kept)


Role = Head | Follower
