"""How the ranks of a tensor-parallel instance meet before they are ready.

Each rank binds its collective socket on a port the OS picks and tells the other ranks the address
and, where the node has /dev/shm, its shared-memory file and host key (`tp_hello` "shm"); a hello
that comes before its instance's `load` is kept until the load comes. A rank is ready once its
weights are loaded and it knows every other rank's address (`TensorRank`).
Torch-free at import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq

from exoctl.keys import ClusterKeys
from exoctl.wire.messages import TensorHello, frames
from exoctl.wire.protocol import ProtocolError
from exoctl.wire.runner_spec import RunnerSpec

if TYPE_CHECKING:
    from exoctl.worker.peers import Peers
    from exoctl.worker.stage import HeadRoute, Stage
    from exoctl.worker.tensor_rank import TensorRank

COLLECTIVE_TIMEOUT_S = 30.0  # a rank silent this long mid-step fails the instance (heartbeats: 3 s)
MAX_EARLY_INSTANCES = 1000  # hellos kept for instances whose load has not come


class Meeting:
    def __init__(
        self, ctx: zmq.Context[Any], host: str, keys: ClusterKeys | None, max_batch: int, peers: Peers
    ) -> None:
        self.ctx = ctx
        self.host = host  # the collective binds here, on a port the OS picks
        self.keys = keys
        self.max_batch = max_batch
        self.peers = peers
        # instance id -> rank -> (collective address, shared-memory offer)
        self.early: dict[str, dict[int, tuple[str, str | None]]] = {}

    def rank(self, spec: RunnerSpec, to_head: HeadRoute) -> TensorRank:
        """This node's rank: bind its collective socket and tell the other ranks where it is."""
        from exoctl.worker.collective import ZmqCollective
        from exoctl.worker.shm_exchange import ShmExchange, host_key
        from exoctl.worker.tensor_rank import TensorRank

        bind = f"{self.host}:*"
        key = host_key()
        shm = ShmExchange(spec.rank, spec.world, key) if key is not None else None
        collective = ZmqCollective(
            self.ctx,
            spec.rank,
            spec.world,
            bind,
            self.keys,
            COLLECTIVE_TIMEOUT_S,
            list(spec.nodes),
            shm,
            spec.partials,
        )
        runner = TensorRank(spec, self.max_batch, to_head, collective)
        # peers reach this node at the host they were given for it
        address = f"{spec.address.rsplit(':', 1)[0]}:{collective.port}"
        runner.met(spec.rank, address, collective.offer)
        for rank, (known, offer) in self.early.pop(spec.instance_id, {}).items():
            runner.met(rank, known, offer)
        hello = TensorHello(spec.instance_id, spec.rank, address, collective.offer)
        for rank, (_, peer) in enumerate(spec.peers):
            if rank != spec.rank:
                self.peers.send(peer, frames(hello))
        return runner

    def hello(self, runner: Stage | None, message: TensorHello) -> None:
        """Another rank's address, for this node's stage of its instance (None: its load message
        has not come yet)."""
        instance_id, rank, address, offer = message.instance_id, message.rank, message.address, message.shm
        if offer is not None:
            from exoctl.worker.shm_exchange import offer_path

            try:
                offer_path(offer)
            except ValueError as exc:
                raise ProtocolError(
                    f"'tp_hello' field 'shm' must be null or 'host key|file': {exc}"
                ) from None
        if runner is None:
            if len(self.early) > MAX_EARLY_INSTANCES:
                self.early.pop(next(iter(self.early)))
            self.early.setdefault(instance_id, {})[rank] = (address, offer)
            return
        from exoctl.worker.tensor_rank import TensorRank

        if not isinstance(runner, TensorRank) or not 0 <= rank < runner.spec.world:
            raise ProtocolError(f"'tp_hello' for rank {rank} of an instance that has no such rank")
        runner.met(rank, address, offer)

    def forget(self, instance_id: str) -> None:
        self.early.pop(instance_id, None)
