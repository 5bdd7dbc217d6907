"""A runner: the part of one instance that lives on this node — a layer range, its KV caches.

Compute only: each method takes a decoded message and returns the messages to send (`Out`),
so the worker's I/O loop owns every socket. Pipeline: rank 0 (the head) tokenises, embeds and
runs its layers, each stage passes the hidden state [1, T, D] to the next, the last stage
samples and sends the token id back to the head, which streams text to the client.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from exoctl.engine.generate import TextStream, check_prompt
from exoctl.engine.kv_cache import KVCache
from exoctl.engine.model import CausalLM, load_model
from exoctl.engine.sampling import SamplingParams, make_generator, sample
from exoctl.engine.tokenizer import Tokenizer
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.protocol import Message, Tensor

log = logging.getLogger("exoctl.worker")

TORCH_DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "int64": torch.int64,
}
SAMPLING_FIELDS = ("temperature", "top_k", "top_p", "seed", "max_tokens", "stop")


class LoadCancelled(Exception):
    """The runner was unloaded while it was still loading."""


@dataclass(frozen=True)
class RunnerSpec:
    instance_id: str
    runner_id: str
    model: str  # what the worker resolves: catalog id, repo id, or a folder under its model dirs
    model_id: str
    sharding: str
    dtype: str
    start_layer: int
    end_layer: int
    n_layers: int
    rank: int
    world: int
    peers: tuple[tuple[str, str], ...]  # (node name, address) by rank

    @property
    def is_head(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world - 1


@dataclass
class Out:
    """A message for the I/O loop: to a client (by ZMQ identity), a peer (by address) or this node."""

    to: str  # "client" | "peer" | "self"
    target: Any
    kind: str
    fields: dict[str, Any]
    tensors: tuple[Tensor, ...] = ()


@dataclass
class HeadSequence:
    """One request as the head sees it."""

    request_id: str
    client: bytes
    prompt_tokens: int
    budget: int
    params: SamplingParams
    text: TextStream
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float = 0.0
    token_ids: list[int] = field(default_factory=list)
    output: str = ""
    cancelled: bool = False


def sampling_from_wire(raw: dict[str, Any]) -> SamplingParams:
    """SamplingParams from a request's `params` (stop strings travel as a list)."""
    unknown = set(raw) - set(SAMPLING_FIELDS)
    if unknown:
        raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
    try:
        return SamplingParams(**{**raw, "stop": tuple(raw.get("stop") or ())})
    except TypeError as exc:
        raise InvalidRequestError(f"bad sampling parameters: {exc}") from None


def step_fields(message: Message) -> tuple[list[str], list[int], dict[str, Any]]:
    """A 'forward' message's sequence ids, their start positions and their first-step params."""
    seqs, starts = message["seqs"], message["positions"]
    params = message.get("params") or {}
    if (
        not seqs
        or len(starts) != len(seqs)
        or not all(isinstance(x, str) for x in seqs)
        or not all(isinstance(x, int) and not isinstance(x, bool) for x in starts)
        or not isinstance(params, dict)
    ):
        raise ExoctlError("'forward' needs matching lists of sequence ids and positions")
    return seqs, starts, params


def release_memory() -> None:
    """Return freed tensor memory to the OS so RSS drops after an unload."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def to_tensor(t: Tensor) -> torch.Tensor:
    # bytearray: a writable copy, so torch owns memory that outlives the ZMQ frame
    return torch.frombuffer(bytearray(t.data), dtype=TORCH_DTYPES[t.dtype]).view(t.shape)


def from_tensor(x: torch.Tensor) -> Tensor:
    x = x.contiguous()
    name = next(k for k, v in TORCH_DTYPES.items() if v == x.dtype)
    return Tensor(name, tuple(x.shape), x.view(torch.uint8).numpy().data)


class Runner:
    def __init__(self, spec: RunnerSpec, max_batch: int = 32) -> None:
        self.spec = spec
        self.max_batch = max_batch  # decode steps of at most this many sequences at once
        self.status = "RunnerLoading"
        self.message = ""
        self.layers_loaded = 0
        self.model: CausalLM | None = None
        self.tokenizer: Tokenizer | None = None
        self.caches: dict[str, KVCache] = {}
        self.samplers: dict[str, tuple[SamplingParams, torch.Generator | None]] = {}
        self.heads: dict[str, HeadSequence] = {}
        self.unloading = False
        self.decoded = 0  # decode positions computed here, and the time they took
        self.compute_s = 0.0
        self.last_decode_tps = 0.0  # head: end-to-end decode speed of the last request
        # sends a message at once, before the step that produced it ends (set by the compute lane)
        self.emit: Callable[[Out], None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    def _load_model(self, folder: Path, progress: Callable[[int], None]) -> CausalLM:
        spec = self.spec
        return load_model(folder, (spec.start_layer, spec.end_layer), spec.dtype, on_layer=progress)

    def _loaded(self) -> None:
        self.status = "RunnerReady"

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
            tokenizer = Tokenizer(folder) if spec.is_head else None
        except BaseException:
            release_memory()
            raise
        if self.unloading:
            raise LoadCancelled
        self.model, self.tokenizer = model, tokenizer
        self._loaded()

    def fail(self, message: str) -> None:
        self.status = "RunnerFailed"
        self.message = message
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

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "runner_id": spec.runner_id,
            "instance_id": spec.instance_id,
            "model_id": spec.model_id,
            "sharding": spec.sharding,
            "dtype": spec.dtype,
            "start_layer": spec.start_layer,
            "end_layer": spec.end_layer,
            "n_layers": spec.n_layers,
            "rank": spec.rank,
            "world": spec.world,
            "nodes": [name for name, _ in spec.peers],
            "status": self.status,
            "message": self.message,
            "layers_loaded": self.layers_loaded,
            "memory_bytes": self.memory_bytes,
            "tokens_per_s": round(self.tokens_per_s, 2),
            "decode_tokens_per_s": round(self.last_decode_tps, 2),
            "active_sequences": len(self.caches),
            "experts": self.experts(),
        }

    def experts(self) -> list[dict[str, int]]:
        """Mixtral: the experts held here and the tokens routed to each, over this runner's layers."""
        model = self.model
        if model is None or not model.config.is_moe:
            return []
        blocks = list(model.blocks)
        counts = sum(
            (b.mlp.tokens_per_expert for b in blocks),
            torch.zeros(model.config.num_local_experts, dtype=torch.int64),
        )
        held = sorted(blocks[0].mlp.experts) if blocks else []
        return [{"expert": e, "tokens": int(counts[e])} for e in held]

    # --- compute ---------------------------------------------------------------------------

    def _model(self) -> CausalLM:
        if self.model is None:
            raise ExoctlError(f"runner {self.spec.runner_id} is {self.status}, not ready")
        return self.model

    def _run(self, seqs: list[str], inputs: torch.Tensor, starts: list[int]) -> torch.Tensor:
        """This range on B sequences: inputs [B, T] ids or [B, T, D] hidden, each at its own start."""
        model = self._model()
        caches = []
        for seq, start in zip(seqs, starts, strict=True):
            cache = self.caches.get(seq)
            if cache is None:
                cache = self.caches[seq] = model.new_cache()
            if cache.length != start:
                raise ExoctlError(f"sequence {seq} is at position {cache.length} here, not {start}")
            caches.append(cache)
        count = inputs.shape[1]
        positions = torch.tensor(starts)[:, None] + torch.arange(count)[None, :]  # [B, T]
        began = time.perf_counter()
        out = model.forward(inputs, positions, caches)
        if count == 1:
            self.decoded += len(seqs)
            self.compute_s += time.perf_counter() - began
        return out

    def _next(self, seqs: list[str], starts: list[int], out: torch.Tensor, params: dict[str, Any]) -> Out:
        """What to do with this stage's output [B, T, D] (or logits [B, 1, V] on the last stage):
        pass the hidden states on, or sample one token per sequence and send them to the head."""
        spec = self.spec
        if not spec.is_last:
            fields: dict[str, Any] = {"instance_id": spec.instance_id, "seqs": seqs, "positions": starts}
            if params:
                fields["params"] = params
            return Out("peer", spec.peers[spec.rank + 1][1], "forward", fields, (from_tensor(out),))
        logits = out[:, -1]  # [B, V]
        choices = [self.samplers[seq] for seq in seqs]
        if all(sampling.greedy for sampling, _ in choices):
            tokens = [int(t) for t in logits.argmax(dim=-1)]
        else:
            tokens = [int(sample(logits[i : i + 1], *choices[i])) for i in range(len(seqs))]
        fields = {"instance_id": spec.instance_id, "seqs": seqs, "tokens": tokens}
        if spec.is_head:
            return Out("self", None, "token", fields)
        return Out("peer", spec.peers[0][1], "token", fields)

    def start(self, request: Message, client: bytes) -> list[Out]:
        """Head: a new request — tokenise, check, prefill this stage."""
        model, tokenizer = self._model(), self.tokenizer
        assert tokenizer is not None
        request_id = request["request_id"]
        if request_id in self.heads:
            raise InvalidRequestError(f"request id {request_id} is already running")
        raw_params = request["params"]
        params = sampling_from_wire(raw_params)
        if request["messages"] is not None:
            ids = tokenizer.encode_chat(request["messages"])
        elif request["prompt"] is not None:
            ids = tokenizer.encode(request["prompt"])
        else:
            raise InvalidRequestError("a request needs 'messages' or 'prompt'")
        context = model.config.max_position_embeddings
        check_prompt(ids, context)
        self.heads[request_id] = HeadSequence(
            request_id=request_id,
            client=client,
            prompt_tokens=len(ids),
            budget=min(params.max_tokens, context - len(ids)),
            params=params,
            text=TextStream(tokenizer, params.stop),
        )
        wire_params = self._admit(request_id, params, {**raw_params, "stop": list(params.stop)})
        return self._step([request_id], torch.tensor([ids]), [0], {request_id: wire_params})

    def _admit(self, seq: str, params: SamplingParams, wire: dict[str, Any]) -> dict[str, Any]:
        """Head: set up sampling for a new sequence; the params the other stages get for it."""
        if self.spec.is_last:
            self.samplers[seq] = (params, make_generator(params.seed))
        return wire

    def _step(
        self, seqs: list[str], inputs: torch.Tensor, starts: list[int], params: dict[str, Any]
    ) -> list[Out]:
        """Head: one step of B sequences, ids [B, T]: this stage's layers, then on down the pipeline."""
        return [self._next(seqs, starts, self._run(seqs, inputs, starts), params)]

    def _batch_size(self) -> int:
        # one micro-batch per stage keeps every stage of the pipeline busy: with all sequences in
        # one batch, stage k would wait while the others compute
        return min(self.max_batch, max(1, math.ceil(len(self.heads) / self.spec.world)))

    def forward(self, message: Message) -> list[Out]:
        """A middle or last stage: run this range on the hidden states from the previous stage."""
        seqs, starts, params = step_fields(message)
        for seq in seqs:
            if seq in self.caches:
                continue
            if not isinstance(params.get(seq), dict):
                raise ExoctlError(f"sequence {seq} is unknown here and its first message has no params")
            if self.spec.is_last:
                sampling = sampling_from_wire(params[seq])
                self.samplers[seq] = (sampling, make_generator(sampling.seed))
        if len(message.tensors) != 1:
            raise ExoctlError("'forward' needs exactly one hidden-state tensor")
        hidden = to_tensor(message.tensors[0])
        model = self._model()
        batch = hidden.shape[0] if hidden.dim() == 3 else -1
        if (
            batch != len(seqs)
            or hidden.shape[2] != model.config.hidden_size
            or (batch > 1 and hidden.shape[1] != 1)
        ):
            raise ExoctlError(
                f"hidden state of shape {list(hidden.shape)} does not fit {len(seqs)} sequence(s)"
            )
        out = self._run(seqs, hidden, starts)
        return [self._next(seqs, starts, out, params)]

    def tokens(self, messages: list[Message]) -> list[Out]:
        """Head: tokens the last stage sampled, from one or more messages. Stream each, then run
        the next step of every sequence that goes on as one batch [B, 1] (continuous batching)."""
        outs: list[Out] = []
        going: list[HeadSequence] = []
        for message in messages:
            for seq_id, token in zip(message["seqs"], message["tokens"], strict=True):
                seq = self.heads.get(seq_id)
                if seq is None:
                    continue  # cancelled or failed meanwhile
                outs += self._take(seq, token)
                if seq.request_id in self.heads:
                    going.append(seq)
        size = self._batch_size()
        for first in range(0, len(going), size):
            batch = going[first : first + size]
            seqs = [seq.request_id for seq in batch]
            starts = [seq.prompt_tokens + len(seq.token_ids) - 1 for seq in batch]
            inputs = torch.tensor([[seq.token_ids[-1]] for seq in batch])  # [B, 1]
            outs += self._step(seqs, inputs, starts, {})
        return outs

    def _take(self, seq: HeadSequence, token: int) -> list[Out]:
        """One sampled token of one sequence: stream its text; finish the sequence if it is done."""
        if not seq.token_ids:
            seq.first_token_at = time.perf_counter()
        seq.token_ids.append(token)
        assert self.tokenizer is not None
        is_eos = token in self.tokenizer.eos_token_ids
        delta = "" if is_eos else seq.text.push(token)
        finish = ""
        if is_eos or seq.text.stopped:
            finish = "stop"
        elif seq.cancelled:
            finish = "cancelled"
        elif len(seq.token_ids) >= seq.budget:
            finish = "length"
        if finish and not seq.text.stopped:
            delta += seq.text.finish()
        seq.output += delta
        fields = {"request_id": seq.request_id, "text": delta, "tokens": [token]}
        outs = [Out("client", seq.client, "delta", fields)]
        return outs + self._finish(seq, finish) if finish else outs

    def _finish(self, seq: HeadSequence, reason: str) -> list[Out]:
        now = time.perf_counter()
        total = now - seq.started
        ttft = seq.first_token_at - seq.started if seq.first_token_at else total
        decode = total - ttft
        tps = (len(seq.token_ids) - 1) / decode if len(seq.token_ids) > 1 and decode > 0 else 0.0
        self.last_decode_tps = tps
        result = {
            "text": seq.output,
            "token_ids": seq.token_ids,
            "finish_reason": reason,
            "usage": {"prompt_tokens": seq.prompt_tokens, "completion_tokens": len(seq.token_ids)},
            "timings": {
                "time_to_first_token_s": round(ttft, 4),
                "total_s": round(total, 4),
                "decode_tokens_per_s": round(tps, 2),
            },
        }
        return [
            Out("client", seq.client, "done", {"request_id": seq.request_id, "result": result}),
            *self.release(seq.request_id),
        ]

    def release(self, seq: str) -> list[Out]:
        """Free a sequence here; the head also tells every other stage to free it."""
        self.caches.pop(seq, None)
        self.samplers.pop(seq, None)
        head = self.heads.pop(seq, None)
        if head is None or not self.spec.is_head:
            return []
        fields = {"instance_id": self.spec.instance_id, "seq": seq}
        return [Out("peer", address, "release", fields) for _, address in self.spec.peers[1:]]

    def abort(self, seqs: list[str], message: str) -> list[Out]:
        """Head: a stage failed these sequences; tell their clients and free them everywhere."""
        outs: list[Out] = []
        for seq in seqs:
            head = self.heads.get(seq)
            released = self.release(seq)
            if head is not None:
                outs.append(Out("client", head.client, "error", {"request_id": seq, "message": message}))
            outs += released
        return outs

    def cancel(self, request_id: str) -> None:
        seq = self.heads.get(request_id)
        if seq is not None:
            seq.cancelled = True
