"""All-reduce among the k ranks of a tensor-parallel instance, over ZeroMQ.

One round: every rank sends its partial to every other rank (PUSH to each peer's PULL) and sums
the k partials in rank order, so every rank holds bit-identical results. Decoding on CPU does
about 2 x layers of these per token, so latency is what counts: `benchmarks/allreduce.py`
measures this against torch.distributed's gloo on the same tensors.
"""

from __future__ import annotations

from typing import Any

import msgpack
import torch
import zmq

from exoctl.keys import ClusterKeys
from exoctl.transport import secure_client, secure_server


class CollectiveError(Exception):
    """A peer did not deliver its partial in time."""


class ZmqAllReduce:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        rank: int,
        addresses: list[str],
        keys: ClusterKeys | None = None,
        timeout_s: float = 10.0,
    ) -> None:
        self.rank = rank
        self.world = len(addresses)
        self.timeout_ms = int(timeout_s * 1000)
        self.step = 0
        self.early: dict[tuple[int, int], bytes] = {}  # (step, rank) -> partial that came ahead
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        secure_server(self.pull, keys)
        self.pull.bind(f"tcp://{addresses[rank]}")
        self.push: dict[int, zmq.Socket[Any]] = {}
        for peer, address in enumerate(addresses):
            if peer != rank:
                sock = ctx.socket(zmq.PUSH)
                secure_client(sock, keys)
                sock.connect(f"tcp://{address}")
                self.push[peer] = sock

    def close(self, linger_s: float = 1.0) -> None:
        # the last partial sent may still be queued while a slower peer waits for it: let it go out
        for sock in self.push.values():
            sock.close(int(linger_s * 1000))
        self.pull.close(0)

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `partial` (contiguous, any shape), added in rank order."""
        step, self.step = self.step, self.step + 1
        if self.world == 1:
            return partial
        partial = partial.contiguous()
        header = msgpack.packb((step, self.rank))
        payload = partial.view(torch.uint8).numpy().data
        for sock in self.push.values():
            sock.send_multipart([header, payload], copy=False)
        parts: dict[int, torch.Tensor] = {self.rank: partial}
        for peer in range(self.world):
            raw = self.early.pop((step, peer), None)
            if raw is not None:
                parts[peer] = self._view(raw, partial)
        while len(parts) < self.world:
            if not self.pull.poll(self.timeout_ms):
                missing = sorted(set(range(self.world)) - set(parts))
                raise CollectiveError(f"all-reduce step {step}: no partial from rank(s) {missing}")
            head, raw = self.pull.recv_multipart()
            their_step, peer = msgpack.unpackb(head)
            if their_step == step:
                parts[peer] = self._view(raw, partial)
            else:
                self.early[(their_step, peer)] = raw
        total = parts[0].clone()
        for peer in range(1, self.world):
            total += parts[peer]
        return total

    @staticmethod
    def _view(raw: bytes, like: torch.Tensor) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=like.dtype).view(like.shape)
