"""`exoctl worker`: one process per node. The I/O loop owns every socket; compute runs beside it.

Threads: this loop (ZMQ ROUTER for clients and peers, DEALERs to peers, heartbeats), one
compute lane per instance (a FIFO of jobs: prefill and decode steps, so concurrent requests
interleave token by token) and one loader thread per load. Lanes hand outgoing messages back
over an inproc socket, so a worker busy decoding still answers `status` at once. A lane per
instance, not one for the worker: a tensor-parallel step blocks in its collective until every
rank has run it, and two instances sharing nodes could otherwise wait on each other.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import threading
import time
import traceback
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import zmq

from exoctl import protocol
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.keys import ClusterKeys
from exoctl.protocol import Message, ProtocolError
from exoctl.transport import secure_client, secure_server, start_authenticator
from exoctl.worker.model_access import check_reference, locate
from exoctl.worker.profile import NodeProfiler

log = logging.getLogger("exoctl.worker")

HEARTBEAT_S = 0.5
DOWN_AFTER_S = 3.0  # a peer silent this long is down: its instances fail
KEEPALIVE_S = 1.0  # clients of running requests hear from the head at least this often
OUTBOX = "inproc://outbox"
PEER_REQUESTS = frozenset({"forward", "token", "release", "seq_error"})
COLLECTIVE_TIMEOUT_S = 30.0  # a rank silent this long mid-step fails the instance (heartbeats: 3 s)


@dataclass
class WorkerOptions:
    name: str
    host: str
    port: int
    keys: ClusterKeys | None
    model_dirs: list[Path]
    device: str = "cpu"
    insecure: bool = False
    threads: int | None = None
    max_batch: int = 32


def check_bind(host: str, keys: ClusterKeys | None, insecure: bool) -> None:
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback and keys is None and not insecure:
        raise ExoctlError(
            f"refusing to listen on {host} without the cluster key: anyone on the network could load models",
            hint="make keys with `exoctl keys init` and pass --keys-dir, "
            "or pass --insecure on a trusted network",
        )


@dataclass
class ActiveRequest:
    client: bytes
    instance_id: str


class Worker:
    def __init__(self, options: WorkerOptions) -> None:
        check_bind(options.host, options.keys, options.insecure)
        self.options = options
        self.name = options.name
        self.ctx: zmq.Context[Any] = zmq.Context()
        self.auth = start_authenticator(self.ctx, options.keys) if options.keys else None
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.ROUTER_MANDATORY, 0)
        secure_server(self.router, options.keys)
        try:
            self.router.bind(f"tcp://{options.host}:{options.port}")
        except zmq.ZMQError as exc:
            self.close()
            raise ExoctlError(
                f"worker {self.name} cannot listen on {options.host}:{options.port}: {exc.strerror}",
                hint="another process holds the port: stop it, or give this node another port",
            ) from None
        self.outbox = self.ctx.socket(zmq.PULL)
        self.outbox.bind(OUTBOX)
        self.profiler = NodeProfiler(self.name, options.device, uuid.uuid4().hex)
        self.runners: dict[str, Any] = {}  # instance id -> Runner
        self.peers: dict[str, zmq.Socket[Any]] = {}  # address -> DEALER
        self.peer_seen: dict[str, float] = {}
        self.peer_boot: dict[str, str] = {}
        self.active: dict[str, ActiveRequest] = {}  # request id -> client of a running request
        self.lanes: dict[str, Lane] = {}  # instance id -> its compute lane
        self.hellos: dict[str, dict[int, str]] = {}  # instance id -> rank -> collective address
        self.stopping = False

    # --- main loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        log.info("exoctl worker %s listening on %s:%d", self.name, self.options.host, self.options.port)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox, zmq.POLLIN)
        registered: set[str] = set()
        next_beat = next_keepalive = next_cpu = 0.0
        try:
            while not self.stopping:
                for address, sock in self.peers.items():
                    if address not in registered:
                        poller.register(sock, zmq.POLLIN)
                        registered.add(address)
                events = dict(poller.poll(100))
                if self.router in events:
                    self._drain(self.router, self._inbound)
                if self.outbox in events:
                    self._drain(self.outbox, self._outbound)
                for address, sock in self.peers.items():
                    if sock in events:
                        self._drain(sock, lambda frames, a=address: self._peer_reply(a, frames))
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + HEARTBEAT_S
                if now >= next_keepalive:
                    for request_id, request in list(self.active.items()):
                        self._reply(request.client, "keepalive", {"request_id": request_id})
                    next_keepalive = now + KEEPALIVE_S
                if now >= next_cpu:
                    self.profiler.sample_cpu()
                    next_cpu = now + 1.0
        finally:
            log.info("worker %s stopping", self.name)
            for runner in list(self.runners.values()):
                runner.free()
            for lane in self.lanes.values():
                lane.stop()
            for lane in self.lanes.values():
                lane.thread.join(2)
            self.close()

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)

    def _drain(self, sock: zmq.Socket[Any], handle: Any) -> None:
        for _ in range(256):  # bounded so one busy socket cannot starve the others
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    # --- sending ------------------------------------------------------------------------------

    def _reply(self, client: bytes, kind: str, fields: dict[str, Any], tensors: Any = ()) -> None:
        self.router.send_multipart([client, *protocol.encode(kind, fields, tensors)], copy=False)

    def _peer(self, address: str) -> zmq.Socket[Any]:
        sock = self.peers.get(address)
        if sock is None:
            sock = self.peers[address] = self.ctx.socket(zmq.DEALER)
            secure_client(sock, self.options.keys)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(f"tcp://{address}")
        return sock

    def _send_peer(self, address: str, frames: list[Any]) -> None:
        # never block the I/O loop on a dead or frozen peer: its messages are dropped, and the
        # heartbeat fails its instances
        try:
            self._peer(address).send_multipart(frames, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            log.warning("dropped a message to unresponsive peer %s", address)

    def _outbound(self, frames: list[Any]) -> None:
        """A message from a compute lane: [to, target, *message frames]; to "fail" fails an instance."""
        to, target, rest = bytes(frames[0]), bytes(frames[1]), frames[2:]
        if to == b"fail":  # a lane found its instance broken (a tensor-parallel step failed)
            instance_id, message = target.decode(), bytes(rest[0]).decode()
            runner = self.runners.get(instance_id)
            if runner is not None and runner.status != "RunnerFailed":
                self._fail_instance(instance_id, message, notify=True)
            return
        if to == b"client":
            header = msgpack.unpackb(bytes(rest[0]), raw=False)
            request_id = header.get("request_id")
            if request_id not in self.active:
                return  # the request failed or was answered already
            if header["type"] in ("done", "error"):
                del self.active[request_id]
            self.router.send_multipart([target, *rest], copy=False)
        else:
            self._send_peer(target.decode(), rest)

    # --- receiving ---------------------------------------------------------------------------

    def _inbound(self, frames: list[Any]) -> None:
        client, body = bytes(frames[0]), [f.buffer for f in frames[1:]]
        request_id = _peek_id(body)
        try:
            message = protocol.decode(body)
            self._dispatch(client, message)
        except ExoctlError as exc:
            log.warning("request from %s refused: %s", client.hex()[:8], exc.message)
            self._reply(client, "error", {"id": request_id, "message": exc.message, "hint": exc.hint})
        except Exception as exc:  # a bug must not take the worker down with it
            log.error("error handling a message: %s", traceback.format_exc())
            self._reply(client, "error", {"id": request_id, "message": f"internal error: {exc!r}"})

    def _dispatch(self, client: bytes, message: Message) -> None:
        kind, request_id = message.type, message.get("id")
        ok = {"id": request_id}
        if kind == "ping":
            self._reply(client, "pong", {**ok, "profile": self.profiler.profile()})
        elif kind == "status":
            runners = [r.describe() for r in self.runners.values()]
            self._reply(
                client, "status_reply", {**ok, "profile": self.profiler.profile(), "runners": runners}
            )
        elif kind == "load":
            self._load(message)
            self._reply(client, "ok", ok)
        elif kind == "unload":
            freed = self._unload(message["instance_id"])
            self._reply(client, "ok", {**ok, "freed": freed})
        elif kind == "generate":
            runner = self._runner(message["instance_id"])
            if runner.status != "RunnerReady":
                raise ExoctlError(
                    f"instance {runner.spec.instance_id} is {runner.status} on node {self.name}"
                    + (f": {runner.message}" if runner.message else "")
                )
            if not runner.spec.is_head:
                raise ExoctlError(f"node {self.name} is not the head of instance {runner.spec.instance_id}")
            if message["request_id"] in self.active:
                raise ExoctlError(f"request id {message['request_id']} is already running")
            self.active[message["request_id"]] = ActiveRequest(client, runner.spec.instance_id)
            self.lanes[runner.spec.instance_id].put(("generate", client, message))
        elif kind == "cancel":
            request = self.active.get(message["request_id"])
            if request is not None and request.instance_id in self.lanes:
                self.lanes[request.instance_id].put(("cancel", message["request_id"]))
            self._reply(client, "ok", ok)
        elif kind == "shutdown":
            self._reply(client, "ok", ok)
            self.stopping = True
        elif kind in PEER_REQUESTS:
            self._runner(message["instance_id"])
            self.lanes[message["instance_id"]].put(("peer", message))
        elif kind == "tp_hello":
            self._hello(message["instance_id"], message["rank"], message["address"])
        elif kind == "fail":
            runner = self.runners.get(message["instance_id"])
            if runner is not None and runner.status != "RunnerFailed":
                self._fail_instance(message["instance_id"], message["message"], notify=False)
        else:
            raise ProtocolError(f"a worker does not accept '{kind}' messages")

    def _peer_reply(self, address: str, frames: list[Any]) -> None:
        try:
            message = protocol.decode([f.buffer for f in frames])
        except ProtocolError as exc:
            log.warning("bad message from peer %s: %s", address, exc.message)
            return
        self.peer_seen[address] = time.monotonic()
        if message.type == "pong":
            boot = message["profile"].get("boot_id")
            previous = self.peer_boot.setdefault(address, boot)
            if previous != boot:
                self.peer_boot[address] = boot
                self._peer_lost(address, "restarted and lost its runners")
        elif message.type == "error":
            log.warning("peer %s answered with an error: %s", address, message["message"])

    def _runner(self, instance_id: str) -> Any:
        runner = self.runners.get(instance_id)
        if runner is None:
            raise ExoctlError(
                f"node {self.name} holds no runner of instance {instance_id}",
                hint="`exoctl state` lists the instances",
            )
        return runner

    # --- loading -----------------------------------------------------------------------------

    def _load(self, message: Message) -> None:
        from exoctl.worker.runner import Runner, RunnerSpec

        peers = message["peers"]
        if not all(isinstance(p, list) and len(p) == 2 and all(isinstance(x, str) for x in p) for p in peers):
            raise ProtocolError("'peers' must be a list of [node name, address] pairs")
        spec = RunnerSpec(
            **{k: message[k] for k in protocol.SCHEMAS["load"] if k != "peers"},
            peers=tuple((name, address) for name, address in peers),
        )
        if spec.sharding not in ("pipeline", "tensor"):
            raise ExoctlError(
                f"sharding {spec.sharding!r} is not supported by this worker", hint="use pipeline or tensor"
            )
        if not (0 <= spec.rank < spec.world == len(spec.peers)) or not (
            0 <= spec.start_layer < spec.end_layer <= spec.n_layers
        ):
            raise ProtocolError("inconsistent rank, world, peers or layer range in 'load'")
        if spec.sharding == "tensor" and (spec.start_layer, spec.end_layer) != (0, spec.n_layers):
            raise ProtocolError("a tensor-parallel rank holds every layer: give [0, n_layers)")
        if spec.dtype not in ("float32", "bfloat16"):
            raise ExoctlError(f"dtype {spec.dtype!r} is not supported", hint="use float32 or bfloat16")
        if spec.instance_id in self.runners:
            raise ExoctlError(f"instance {spec.instance_id} is already on node {self.name}")
        check_reference(spec.model, self.options.model_dirs, self.name)
        if spec.sharding == "tensor":
            runner = self._tensor_runner(spec)
        else:
            runner = Runner(spec, self.options.max_batch)
        self.runners[spec.instance_id] = runner
        lane = self.lanes[spec.instance_id] = Lane(self, runner)
        lane.thread.start()
        now = time.monotonic()
        for _, address in spec.peers:
            self.peer_seen[address] = now  # the clock of a peer starts now, not at an old instance
        threading.Thread(target=self._load_runner, args=(runner,), name="load", daemon=True).start()

    def _tensor_runner(self, spec: Any) -> Any:
        """A tensor-parallel rank: bind its collective socket and tell the other ranks where it is."""
        from exoctl.worker.collective import ZmqCollective
        from exoctl.worker.tensor_runner import TensorRunner

        names = [name for name, _ in spec.peers]
        collective = ZmqCollective(
            self.ctx,
            spec.rank,
            spec.world,
            f"{self.options.host}:*",
            self.options.keys,
            COLLECTIVE_TIMEOUT_S,
            names,
        )
        runner = TensorRunner(spec, self.options.max_batch, collective)
        # peers reach this node at the host they were given for it
        host = spec.peers[spec.rank][1].rsplit(":", 1)[0]
        address = f"{host}:{collective.port}"
        runner.met(spec.rank, address)
        for rank, known in self.hellos.pop(spec.instance_id, {}).items():
            runner.met(rank, known)
        hello = {"instance_id": spec.instance_id, "rank": spec.rank, "address": address}
        for rank, (_, peer) in enumerate(spec.peers):
            if rank != spec.rank:
                self._send_peer(peer, protocol.encode("tp_hello", hello))
        return runner

    def _hello(self, instance_id: str, rank: int, address: str) -> None:
        runner = self.runners.get(instance_id)
        if runner is None:  # its load message has not come yet: keep the address for it
            if len(self.hellos) > 1000:
                self.hellos.pop(next(iter(self.hellos)))
            self.hellos.setdefault(instance_id, {})[rank] = address
            return
        from exoctl.worker.tensor_runner import TensorRunner

        if not isinstance(runner, TensorRunner) or not 0 <= rank < runner.spec.world:
            raise ProtocolError(f"'tp_hello' for rank {rank} of an instance that has no such rank")
        runner.met(rank, address)

    def _load_runner(self, runner: Any) -> None:
        from exoctl.worker.runner import LoadCancelled

        spec = runner.spec
        log.info(
            "loading %s layers [%d, %d) in %s", spec.model_id, spec.start_layer, spec.end_layer, spec.dtype
        )
        try:
            folder = locate(
                spec.model,
                self.options.model_dirs,
                self.name,
                (spec.start_layer, spec.end_layer),
                spec.n_layers,
            )
            runner.load(folder)
            log.info("instance %s ready: %.1f MB", spec.instance_id, runner.memory_bytes / 1e6)
        except LoadCancelled:
            log.info("load of instance %s cancelled", spec.instance_id)
        except ExoctlError as exc:
            log.warning("load of instance %s failed: %s", spec.instance_id, exc.message)
            runner.fail(f"node {self.name}: {exc.message}")
        except MemoryError:
            runner.fail(
                f"node {self.name} ran out of memory loading layers [{spec.start_layer}, {spec.end_layer})"
            )
        except Exception as exc:
            log.error("load of instance %s failed: %s", spec.instance_id, traceback.format_exc())
            runner.fail(f"node {self.name}: {type(exc).__name__}: {exc}")

    def _unload(self, instance_id: str) -> int:
        runner = self.runners.pop(instance_id, None)
        if runner is None:
            return 0
        freed = runner.memory_bytes
        self.hellos.pop(instance_id, None)
        for request_id, request in list(self.active.items()):
            if request.instance_id == instance_id:
                self._reply(
                    request.client,
                    "error",
                    {"request_id": request_id, "message": f"instance {instance_id} was deleted"},
                )
                del self.active[request_id]
        runner.free()
        lane = self.lanes.pop(instance_id, None)
        if lane is not None:
            lane.stop()
        log.info("unloaded instance %s (%.1f MB)", instance_id, freed / 1e6)
        return int(freed)

    # --- failures ----------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        watched = {a for r in self.runners.values() if r.status != "RunnerFailed" for _, a in r.spec.peers}
        watched.discard(f"{self.options.host}:{self.options.port}")
        for address in watched:
            self._send_peer(address, protocol.encode("ping", {"id": 0}))
            silent = now - self.peer_seen.get(address, now)
            if silent > DOWN_AFTER_S:
                self._peer_lost(address, f"stopped answering (no heartbeat for {silent:.1f} s)")

    def _peer_lost(self, address: str, why: str) -> None:
        for instance_id, runner in list(self.runners.items()):
            if runner.status == "RunnerFailed":
                continue
            names = [name for name, a in runner.spec.peers if a == address]
            if names:
                self._fail_instance(instance_id, f"node {names[0]} ({address}) {why}", notify=True)

    def _fail_instance(self, instance_id: str, message: str, notify: bool) -> None:
        """The instance lost a node: fail its requests now, free this runner, tell the others."""
        runner = self.runners[instance_id]
        log.warning("instance %s failed: %s", instance_id, message)
        for request_id, request in list(self.active.items()):
            if request.instance_id == instance_id:
                self._reply(
                    request.client,
                    "error",
                    {
                        "request_id": request_id,
                        "message": message,
                        "hint": "place the model again: `exoctl place`",
                    },
                )
                del self.active[request_id]
        runner.fail(message)
        if notify:
            me = f"{self.options.host}:{self.options.port}"
            for _, address in runner.spec.peers:
                if address != me:
                    self._send_peer(
                        address, protocol.encode("fail", {"instance_id": instance_id, "message": message})
                    )


class Lane:
    """One instance's compute thread: its jobs in arrival order, its token messages batched."""

    def __init__(self, worker: Worker, runner: Any) -> None:
        self.worker = worker
        self.runner = runner
        self.jobs: queue.Queue[tuple[Any, ...] | None] = queue.Queue()
        self.thread = threading.Thread(
            target=self._loop, name=f"compute-{runner.spec.instance_id[:8]}", daemon=True
        )

    def put(self, job: tuple[Any, ...]) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)

    def _loop(self) -> None:
        push = self.worker.ctx.socket(zmq.PUSH)
        push.connect(OUTBOX)

        def send(out: Any) -> None:
            if out.to == "self":
                self.jobs.put(("peer", Message(out.kind, out.fields)))
                return
            if out.to == "fail":
                push.send_multipart([b"fail", out.target.encode(), out.fields["message"].encode()])
                return
            target = out.target if out.to == "client" else out.target.encode()
            frames = protocol.encode(out.kind, out.fields, out.tensors)
            push.send_multipart([out.to.encode(), target, *frames], copy=False)

        self.runner.emit = send
        running = True
        try:
            while running:
                queued = [self.jobs.get()]
                while True:  # everything queued now is handled together: decode steps get batched
                    try:
                        queued.append(self.jobs.get_nowait())
                    except queue.Empty:
                        break
                pending = [job for job in queued if job is not None]
                running = len(pending) == len(queued)
                for job in merge_token_jobs(pending):
                    for out in self._compute(job):
                        send(out)
        finally:
            self.runner.close()
            push.close(0)

    def _compute(self, job: tuple[Any, ...]) -> list[Any]:
        from exoctl.worker.runner import Out

        kind, runner = job[0], self.runner
        if runner.status == "RunnerFailed" or (runner.unloading and kind != "generate"):
            return []
        try:
            if kind == "generate":
                return list(runner.start(job[2], job[1]))
            if kind == "cancel":
                runner.cancel(job[1])
                return []
            if kind == "tokens":
                return list(runner.tokens(job[2]))
            message = job[1]
            if message.type == "forward":
                return list(runner.forward(message))
            if message.type == "release":
                return list(runner.release(message["seq"]))
            if message.type == "seq_error":
                return list(runner.abort(message["seqs"], message["message"]))
            return []
        except Exception as exc:
            name = self.worker.name
            code = "invalid_request" if isinstance(exc, InvalidRequestError) else "failed"
            if isinstance(exc, ExoctlError):
                text, hint = exc.message, exc.hint
            elif type(exc).__name__ == "CollectiveError":
                text, hint = f"node {name}: {exc}", None
            else:
                log.error("compute error: %s", traceback.format_exc())
                text, hint = f"node {name}: {type(exc).__name__}: {exc}", None
            outs: list[Any] = []
            if kind == "generate":
                request_id = job[2]["request_id"]
                error = {"request_id": request_id, "message": text, "hint": hint, "code": code}
                outs = [Out("client", job[1], "error", error), *runner.release(request_id)]
            else:
                seqs = job_sequences(job)
                if runner.spec.is_head:
                    outs = list(runner.abort(seqs, text))
                elif seqs:
                    fields = {"instance_id": runner.spec.instance_id, "seqs": seqs, "message": text}
                    outs = [Out("peer", runner.spec.peers[0][1], "seq_error", fields)]
            if runner.spec.sharding == "tensor" and code != "invalid_request":
                # the ranks ran part of a step and their collectives are out of step: the instance is broken
                outs.append(Out("fail", runner.spec.instance_id, "fail", {"message": text}))
            return outs


def merge_token_jobs(jobs: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """Token messages for one instance become one job, at the place of the first: the head then
    runs the next step of all those sequences as one batch."""
    merged: list[tuple[Any, ...]] = []
    groups: dict[str, list[Message]] = {}
    for job in jobs:
        if job[0] == "peer" and job[1].type == "token":
            instance_id = job[1]["instance_id"]
            if instance_id not in groups:
                groups[instance_id] = []
                merged.append(("tokens", instance_id, groups[instance_id]))
            groups[instance_id].append(job[1])
        else:
            merged.append(job)
    return merged


def job_sequences(job: tuple[Any, ...]) -> list[str]:
    """The sequences a failed job was about, so each can be failed on its own."""
    if job[0] == "tokens":
        return [s for message in job[2] for s in message["seqs"]]
    message = job[1]
    if not isinstance(message, Message):
        return []
    seqs = message.get("seqs")
    if isinstance(seqs, list):
        return [s for s in seqs if isinstance(s, str)]
    seq = message.get("seq")
    return [seq] if isinstance(seq, str) else []


def _peek_id(frames: list[Any]) -> Any:
    """The request id of a message that may fail validation, so its error reply can be matched."""
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False)
        return header.get("id") if isinstance(header, dict) else None
    except Exception:
        return None


def warm_imports() -> None:
    """Import torch, the engine and transformers' tokenizer before serving: an import in a loader
    thread holds the import lock for seconds (the I/O loop would stall behind it), and transformers'
    lazy modules are not safe to import from two threads at once."""
    from transformers import AutoTokenizer  # noqa: F401

    import exoctl.worker.runner  # noqa: F401  (torch, the engine)


# OpenMP threads of a stage that just handed its hidden state on spin for GOMP's default
# 300000 iterations, taking the cores the next stage needs when stages share a machine
# (measured: SmolLM2 over 4 local workers went from 0.51x to 0.88x of one worker). 50000 still
# bridges the gaps between the ops of one layer, so one worker alone keeps its speed.
OMP_ENV = {"GOMP_SPINCOUNT": "50000"}


def run_worker(options: WorkerOptions) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    for key, value in OMP_ENV.items():
        os.environ.setdefault(key, value)  # read when torch loads libgomp, just below
    if options.threads is not None:
        if options.threads < 1:
            raise ExoctlError(f"--threads must be at least 1, got {options.threads}")
        os.environ["OMP_NUM_THREADS"] = str(options.threads)
    warm_imports()
    if options.threads is not None:
        import torch

        torch.set_num_threads(options.threads)
    worker = Worker(options)
    worker.serve()
