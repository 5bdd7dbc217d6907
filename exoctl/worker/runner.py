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
import time
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

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
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
    def __init__(self, spec: RunnerSpec) -> None:
        self.spec = spec
        self.status = "RunnerLoading"
        self.message = ""
        self.layers_loaded = 0
        self.model: CausalLM | None = None
        self.tokenizer: Tokenizer | None = None
        self.caches: dict[str, KVCache] = {}
        self.samplers: dict[str, tuple[SamplingParams, torch.Generator | None]] = {}
        self.heads: dict[str, HeadSequence] = {}
        self.unloading = False
        self.tokens = 0  # decode positions computed here, and the time they took
        self.compute_s = 0.0
        self.last_decode_tps = 0.0  # head: end-to-end decode speed of the last request

    # --- lifecycle -------------------------------------------------------------------------

    def load(self, folder: Path) -> None:
        spec = self.spec

        def progress(count: int) -> None:
            if self.unloading:
                raise LoadCancelled
            self.layers_loaded = count

        try:
            model = load_model(folder, (spec.start_layer, spec.end_layer), spec.dtype, on_layer=progress)
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
        self.status = "RunnerReady"

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

    @property
    def memory_bytes(self) -> int:
        model = self.model
        if model is None:
            return 0
        return model.weight_bytes() + sum(c.nbytes for c in list(self.caches.values()))

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.compute_s if self.compute_s > 0 else 0.0

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
        }

    # --- compute ---------------------------------------------------------------------------

    def _model(self) -> CausalLM:
        if self.model is None:
            raise ExoctlError(f"runner {self.spec.runner_id} is {self.status}, not ready")
        return self.model

    def _run(self, seq: str, inputs: torch.Tensor, start_pos: int) -> torch.Tensor:
        model = self._model()
        cache = self.caches.get(seq)
        if cache is None:
            cache = self.caches[seq] = model.new_cache()
        if cache.length != start_pos:
            raise ExoctlError(f"sequence {seq} is at position {cache.length} here, not {start_pos}")
        count = inputs.shape[1]
        positions = torch.arange(start_pos, start_pos + count)[None, :]
        began = time.perf_counter()
        out = model.forward(inputs, positions, [cache])
        if count == 1:
            self.tokens += 1
            self.compute_s += time.perf_counter() - began
        return out

    def _next(self, seq: str, start_pos: int, out: torch.Tensor, params: dict[str, Any] | None) -> Out:
        """What to do with this stage's output: pass the hidden state on, or sample a token."""
        spec = self.spec
        if not spec.is_last:
            fields: dict[str, Any] = {"instance_id": spec.instance_id, "seq": seq, "start_pos": start_pos}
            if params is not None:
                fields["params"] = params
            return Out("peer", spec.peers[spec.rank + 1][1], "forward", fields, (from_tensor(out),))
        sampling, generator = self.samplers[seq]
        token = int(sample(out[:, -1], sampling, generator))
        fields = {"instance_id": spec.instance_id, "seq": seq, "token": token}
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
        unknown = set(raw_params) - set(SAMPLING_FIELDS)
        if unknown:
            raise InvalidRequestError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        try:
            params = SamplingParams(**{**raw_params, "stop": tuple(raw_params.get("stop") or ())})
        except TypeError as exc:
            raise InvalidRequestError(f"bad sampling parameters: {exc}") from None
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
        if self.spec.is_last:
            self.samplers[request_id] = (params, make_generator(params.seed))
        out = self._run(request_id, torch.tensor([ids]), 0)
        wire_params = {**raw_params, "stop": list(params.stop)}
        return [self._next(request_id, 0, out, wire_params)]

    def forward(self, message: Message) -> list[Out]:
        """A middle or last stage: run this range on the hidden state from the previous stage."""
        seq = message["seq"]
        if seq not in self.caches:
            params = message.get("params")
            if not isinstance(params, dict):
                raise ExoctlError(f"sequence {seq} is unknown here and its first message has no params")
            if self.spec.is_last:
                sampling = SamplingParams(**{**params, "stop": tuple(params.get("stop") or ())})
                self.samplers[seq] = (sampling, make_generator(sampling.seed))
        if len(message.tensors) != 1:
            raise ExoctlError("'forward' needs exactly one hidden-state tensor")
        hidden = to_tensor(message.tensors[0])
        model = self._model()
        if hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != model.config.hidden_size:
            raise ExoctlError(f"hidden state of shape {list(hidden.shape)} does not fit this model")
        start_pos = message["start_pos"]
        out = self._run(seq, hidden, start_pos)
        return [self._next(seq, start_pos, out, message.get("params"))]

    def token(self, message: Message) -> list[Out]:
        """Head: the last stage sampled a token; stream it and start the next step or finish."""
        seq = self.heads.get(message["seq"])
        if seq is None:
            return []  # cancelled or failed meanwhile
        token = message["token"]
        if not seq.token_ids:
            seq.first_token_at = time.perf_counter()
        seq.token_ids.append(token)
        assert self.tokenizer is not None
        is_eos = token in self.tokenizer.eos_token_ids
        outs: list[Out] = []
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
        outs.append(
            Out(
                "client",
                seq.client,
                "delta",
                {"request_id": seq.request_id, "text": delta, "tokens": [token]},
            )
        )
        if finish:
            return outs + self._finish(seq, finish)
        position = seq.prompt_tokens + len(seq.token_ids) - 1
        out = self._run(seq.request_id, torch.tensor([[token]]), position)
        return [*outs, self._next(seq.request_id, position, out, None)]

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

    def abort(self, seq: str, message: str) -> list[Out]:
        """Head: a stage failed this sequence; tell the client and free it everywhere."""
        head = self.heads.get(seq)
        outs = self.release(seq)
        if head is not None:
            outs.insert(0, Out("client", head.client, "error", {"request_id": seq, "message": message}))
        return outs

    def cancel(self, request_id: str) -> None:
        seq = self.heads.get(request_id)
        if seq is not None:
            seq.cancelled = True
