"""All-gather and all-reduce among the k ranks of a tensor-parallel instance, over ZeroMQ.

One round: every rank sends its partial to every other rank (PUSH to each peer's PULL); the
all-reduce sums the k partials in rank order, so every rank holds bit-identical results.
Decoding on CPU does about 2 x layers of these per token, so latency is what counts:
`benchmarks/allreduce.py` measures this against torch.distributed's gloo on the same tensors.

Partials that cross the network may go as 8-bit blocks (`partials.py`, EXOCTL_TP_PARTIALS=q8):
each message says how it is encoded, and every rank sums what was sent, its own partial included,
so every rank still holds the same bits. all_gather (the token choice's summaries) is always exact.

A rank binds its PULL socket first (on a port the OS picks, when the worker's runners share
one host), tells its peers the address, and connects once it knows all of theirs. Ranks that all
share one host exchange partials through shared memory instead (`shm_exchange.py`): no thread
but the ranks' own between a partial and its reader.
"""

from __future__ import annotations

import time
from typing import Any

import msgpack
import torch
import zmq

from exoctl.errors import CollectiveError
from exoctl.keys import ClusterKeys
from exoctl.transport import secure_client, secure_server
from exoctl.worker.partials import decode, encode, quantized_partials
from exoctl.worker.shm_exchange import ShmExchange

POLL_MS = 100  # how often a wait checks whether the instance was failed meanwhile


class ZmqCollective:
    def __init__(
        self,
        ctx: zmq.Context[Any],
        rank: int,
        world: int,
        bind: str,
        keys: ClusterKeys | None = None,
        timeout_s: float = 10.0,
        names: list[str] | None = None,
        shm: ShmExchange | None = None,
        partials: str = "exact",
    ) -> None:
        """`bind`: host:port, or host:* for a port the OS picks (then read `address`). `shm`: this
        rank's shared-memory file, used if every rank offers one on this host (`connect`)."""
        self.ctx = ctx
        self.keys = keys
        self.rank = rank
        self.world = world
        self.names = names or [f"rank {r}" for r in range(world)]
        self.timeout_ms = int(timeout_s * 1000)
        self.step = 0
        self.busy_s = 0.0  # time spent in collectives, sending and waiting
        self.aborted: str | None = None  # set from another thread: the instance failed
        # (step, rank) -> (8-bit?, partial) that came ahead
        self.early: dict[tuple[int, int], tuple[bool, bytes]] = {}
        self.quantize = quantized_partials(partials)  # this rank's all-reduce partials go as 8-bit blocks
        self.pull = ctx.socket(zmq.PULL)
        self.pull.setsockopt(zmq.LINGER, 0)
        secure_server(self.pull, keys)
        self.pull.bind(f"tcp://{bind}")
        endpoint = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)
        self.port = int(endpoint.rsplit(":", 1)[1])
        self.push: dict[int, zmq.Socket[Any]] = {}
        self.shm = shm
        self.shared = False  # partials go through shared memory (every rank on this host)
        self.shared_steps = 0

    @classmethod
    def mesh(
        cls,
        ctx: zmq.Context[Any],
        rank: int,
        addresses: list[str],
        keys: ClusterKeys | None = None,
        timeout_s: float = 10.0,
    ) -> ZmqCollective:
        """Bind at addresses[rank] and connect to the others: for ranks whose ports are known."""
        collective = cls(ctx, rank, len(addresses), addresses[rank], keys, timeout_s)
        collective.connect(addresses)
        return collective

    @property
    def offer(self) -> str | None:
        """What this rank tells the others about its shared memory (None: it has none)."""
        return None if self.shm is None else self.shm.offer

    @property
    def connected(self) -> bool:
        return len(self.push) == self.world - 1

    def connect(self, addresses: list[str], offers: list[str | None] | None = None) -> None:
        """Connect to every rank's address; with every rank's shared-memory offer, use shared
        memory if they are all on this host (each rank sees the same offers, so all agree)."""
        if self.shm is not None and offers is not None and not self.shared:
            if self.shm.colocated(offers):
                self.shm.attach(offers)
                self.shared = True
            else:
                self.shm.close()
                self.shm = None
        for peer, address in enumerate(addresses):
            if peer != self.rank and peer not in self.push:
                sock = self.ctx.socket(zmq.PUSH)
                secure_client(sock, self.keys)
                sock.connect(f"tcp://{address}")
                self.push[peer] = sock

    def abort(self, reason: str) -> None:
        """Make a wait in progress (in another thread) give up within POLL_MS."""
        self.aborted = reason

    def close(self, linger_s: float = 1.0) -> None:
        # the last partial sent may still be queued while a slower peer waits for it: let it go out
        for sock in self.push.values():
            sock.close(int(linger_s * 1000))
        self.pull.close(0)
        if self.shm is not None:
            self.shm.close()

    def all_gather(self, partial: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `partial` (the same shape and dtype on every rank), in rank order."""
        parts = self._gather(partial)
        return [part if r == self.rank else part.clone() for r, part in enumerate(parts)]

    def _gather(self, partial: torch.Tensor, lossy: bool = False) -> list[torch.Tensor]:
        """all_gather, where other ranks' parts may be views of shared memory, valid until this
        rank's next collective returns. `lossy`: over ZeroMQ, send 8-bit blocks (float32 parts)."""
        step, self.step = self.step, self.step + 1
        if self.world == 1:
            return [partial]
        began = time.perf_counter()
        partial = partial.contiguous()
        try:
            if (
                self.shared
                and self.shm is not None
                and self.shm.fits(partial.numel() * partial.element_size())
            ):
                return self._exchange_shared(self.shm, step, partial)
            # ranks of one host send a partial too big for shared memory as it is: no link to spare
            return self._exchange(step, partial, lossy and not self.shared and partial.is_floating_point())
        finally:
            self.busy_s += time.perf_counter() - began

    def _exchange_shared(self, shm: ShmExchange, step: int, partial: torch.Tensor) -> list[torch.Tensor]:
        shm.publish(step, partial)
        parts = []
        for peer in range(self.world):
            if peer == self.rank:
                parts.append(partial)
                continue
            waited = 0
            while not shm.wait(peer, step, POLL_MS):
                if self.aborted is not None:
                    raise CollectiveError(self.aborted)
                waited += POLL_MS
                if waited >= self.timeout_ms:
                    raise self._silent(step, [peer])
            parts.append(shm.view(peer, step, partial))
        self.shared_steps += 1
        if self.shared_steps == 1:
            shm.unlink()  # every peer has mapped this rank's file: they published after attaching
        return parts

    def _silent(self, step: int, missing: list[int]) -> CollectiveError:
        who = ", ".join(f"{self.names[r]} (rank {r})" for r in missing)
        return CollectiveError(
            f"all-reduce step {step}: no partial from {who} within {self.timeout_ms / 1000:g} s"
        )

    def _exchange(self, step: int, partial: torch.Tensor, lossy: bool = False) -> list[torch.Tensor]:
        header = msgpack.packb((step, self.rank, lossy))
        mine = partial
        if lossy:
            encoded = encode(partial)
            mine = decode(encoded, partial)  # what the others will add: the same rounding here
            payload = encoded.numpy().data
        else:
            payload = partial.view(torch.uint8).numpy().data
        for sock in self.push.values():
            sock.send_multipart([header, payload], copy=False)
        parts: dict[int, torch.Tensor] = {self.rank: mine}
        for peer in range(self.world):
            early = self.early.pop((step, peer), None)
            if early is not None:
                parts[peer] = self._part(*early, partial)
        waited = 0
        while len(parts) < self.world:
            if self.aborted is not None:
                raise CollectiveError(self.aborted)
            if not self.pull.poll(POLL_MS):
                waited += POLL_MS
                if waited >= self.timeout_ms:
                    raise self._silent(step, sorted(set(range(self.world)) - set(parts)))
                continue
            head, raw = self.pull.recv_multipart()
            their_step, peer, packed = msgpack.unpackb(head)
            if their_step == step:
                parts[peer] = self._part(packed, raw, partial)
            else:
                self.early[(their_step, peer)] = (packed, raw)
        return [parts[r] for r in range(self.world)]

    def _part(self, packed: bool, raw: bytes, like: torch.Tensor) -> torch.Tensor:
        if packed:
            return decode(torch.frombuffer(bytearray(raw), dtype=torch.uint8), like)
        return self._view(raw, like)

    def all_reduce(self, partial: torch.Tensor) -> torch.Tensor:
        """The sum over ranks of `partial` (any shape), added in rank order; parts that came as
        8-bit blocks (float32 once decoded) are summed in float32."""
        parts = self._gather(partial, lossy=self.quantize)
        if len(parts) == 1:
            return parts[0]
        if any(part.dtype != partial.dtype for part in parts):
            wide = parts[0].float().clone()
            for part in parts[1:]:
                wide += part.float()
            return wide.to(partial.dtype)
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total

    @staticmethod
    def _view(raw: bytes, like: torch.Tensor) -> torch.Tensor:
        return torch.frombuffer(bytearray(raw), dtype=like.dtype).view(like.shape)
