"""`exoctl worker`: one process per node. The I/O loop owns every socket; compute runs beside it.

Threads: this loop (a ROUTER for clients and peers, a DEALER to each peer, heartbeats), one
compute lane per instance (`lane.py`: prefill and decode steps in arrival order, so concurrent
requests interleave token by token) and one loader thread per load (`loader.py`). Lanes post
outgoing messages to the `Outbox`, so a worker busy decoding still answers `status` at once. A
lane per instance, not one for the worker: a tensor-parallel step blocks in its collective until
every rank has run it, and two instances sharing nodes could otherwise wait on each other.

Torch-free at import: torch loads in `main.run_worker`, after the OpenMP settings are in place.
"""

from __future__ import annotations

import functools
import logging
import time
import traceback
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgpack
import zmq

from exoctl.errors import ExoctlError
from exoctl.transport import secure_server, start_authenticator
from exoctl.wire import protocol
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import Forget, Forward, Lease, Release, SeqError, StepRefused, Tokens
from exoctl.wire.messages import (
    WORKER_TAKES,
    Alive,
    Cancel,
    DownloadRequest,
    Echo,
    ErrorReply,
    Generate,
    InstanceFailed,
    Keepalive,
    LinksReply,
    Load,
    Ok,
    Ping,
    Pong,
    ProbeLinks,
    Record,
    Reply,
    Shutdown,
    StatusReply,
    StatusRequest,
    TensorHello,
    Unload,
    WireMessage,
    frames,
    parse,
)
from exoctl.wire.node_speed import LinkMeasure, NodeSpeed
from exoctl.wire.protocol import ProtocolError
from exoctl.wire.runner_report import Failure, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.worker.downloads import Downloads
from exoctl.worker.event_log import EventLog
from exoctl.worker.held_instances import HeldInstances
from exoctl.worker.lane import CancelJob, FromPeer, GenerateJob
from exoctl.worker.lease_clock import LEASE_S, LeaseClock
from exoctl.worker.link_probe import probe_links
from exoctl.worker.loader import start_loading
from exoctl.worker.model_access import check_reference
from exoctl.worker.node_memory import NodeMemory
from exoctl.worker.options import WorkerOptions, check_bind
from exoctl.worker.outbox import FailInstance, LinksMeasured, Out, Outbox, Poster, ToClient, ToPeer
from exoctl.worker.peers import DOWN_AFTER_S, HEARTBEAT_S, SILENT_AFTER_S, Peers
from exoctl.worker.profile import NodeProfiler
from exoctl.worker.running_requests import KEEPALIVE_S, RunningRequests
from exoctl.worker.tensor_meeting import Meeting

if TYPE_CHECKING:
    pass

__all__ = ["DOWN_AFTER_S", "SILENT_AFTER_S", "Worker"]

log = logging.getLogger("exoctl.worker")


class Worker:
    def __init__(self, options: WorkerOptions, speed: NodeSpeed | None = None) -> None:
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
        self.address = f"{options.host}:{options.port}"
        self.outbox = Outbox(self.ctx)
        self.peers = Peers(self.ctx, options.keys)
        self.meeting = Meeting(self.ctx, options.host, options.keys, options.max_batch, self.peers)
        self.downloads = Downloads(self.name, options.model_dirs)
        self.history = EventLog()  # the supervisor's record
        self.profiler = NodeProfiler(self.name, options.device, uuid.uuid4().hex, speed)
        self.probing = False  # a link probe runs (one at a time: two would measure each other)
        # a head reads its nodes' free memory from here (its own now, its peers' from their pongs)
        memory = NodeMemory(self.address, self.peers.rooms.get)
        self.held = HeldInstances(self.name, options.max_batch, self.meeting, self.outbox, memory)
        self.leases = LeaseClock()  # when each stage here last heard its head name the live sequences
        self.requests = RunningRequests()  # the requests this node heads, while they run
        self.stopping = False
        self.next_lease = 0.0
        self.last_beat = time.monotonic()

    # --- main loop ---------------------------------------------------------------------------

    def serve(self) -> None:
        log.info("exoctl worker %s listening on %s", self.name, self.address)
        poller = zmq.Poller()
        poller.register(self.router, zmq.POLLIN)
        poller.register(self.outbox.bell, zmq.POLLIN)
        registered: set[str] = set()
        next_beat = next_keepalive = next_cpu = 0.0
        try:
            while not self.stopping:
                for address, sock in self.peers.sockets.items():
                    if address not in registered:
                        poller.register(sock, zmq.POLLIN)
                        registered.add(address)
                events = dict(poller.poll(100))
                if self.router in events:
                    self._drain(self.router, self._inbound)
                if self.outbox.bell in events:
                    for out in self.outbox.take():
                        self._outbound(out)
                for address, sock in self.peers.sockets.items():
                    if sock in events:
                        self._drain(sock, functools.partial(self._peer_reply, address))
                now = time.monotonic()
                if now >= next_beat:
                    self._heartbeat(now)
                    next_beat = now + HEARTBEAT_S
                    for sock in self.peers.prune(self.held.watched(self.address), now):
                        poller.unregister(sock)
                        sock.close(linger=500)  # what was just sent (a `fail`, a `release`) still goes
                    registered &= set(self.peers.sockets)
                if now >= next_keepalive:
                    self._keepalives(now)
                    next_keepalive = now + KEEPALIVE_S
                if now >= next_cpu:
                    self.profiler.sample_cpu()
                    next_cpu = now + 1.0
        finally:
            log.info("worker %s stopping", self.name)
            self.held.stop()
            self.close()

    def _keepalives(self, now: float) -> None:
        for request_id, request in list(self.requests.running.items()):
            self._reply(request.client, None, Keepalive(request_id))
        for request_id, request, quiet in self.requests.silent(now):
            log.warning("request %s: its client said nothing for %.0f s; cancelled", request_id[:8], quiet)
            self.held.put(request.instance_id, CancelJob(request_id))

    def close(self) -> None:
        if self.auth is not None:
            self.auth.stop()
        self.ctx.destroy(linger=0)

    def _drain(self, sock: zmq.Socket[Any], handle: Callable[[list[Any]], None]) -> None:
        for _ in range(256):  # bounded so one busy socket cannot starve the others
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    # --- sending ------------------------------------------------------------------------------

    def _reply(self, client: bytes, reply_to: Any, message: Reply) -> None:
        """A reply to a client; `reply_to` is the id of the request it answers (None: a running
        request's message, matched by its request id)."""
        self.router.send_multipart([client, *frames(message, reply_to)], copy=False)

    def _outbound(self, out: Out) -> None:
        match out:
            case ToClient():
                if not self.requests.answering(out.request_id, out.ends_request):
                    return  # the request failed or was answered already
                self.router.send_multipart([out.client, *out.frames()], copy=False)
            case ToPeer():
                self.peers.send(out.address, out.frames())
            case LinksMeasured(client, reply_to, links, failure):
                self.probing = False
                self.profiler.keep_links(links)
                if failure is not None and not links:
                    self._reply(client, reply_to, ErrorReply(f"node {self.name}: {failure}"))
                else:  # what was measured; a failed target is missing from it
                    self._reply(client, reply_to, LinksReply(links))
            case FailInstance(instance_id, message):
                # a lane found its instance broken (a tensor-parallel step failed part-way)
                runner = self.held.runners.get(instance_id)
                if runner is not None and not runner.failed:
                    self._fail_instance(instance_id, Failure(message), notify=True)

    # --- receiving ---------------------------------------------------------------------------

    def _inbound(self, frames: list[Any]) -> None:
        client, body = bytes(frames[0]), [f.buffer for f in frames[1:]]
        reply_to = _peek_id(body)
        try:
            message = parse(protocol.decode(body), WORKER_TAKES)
            self._dispatch(client, reply_to, message)
        except StepRefused as exc:
            self._tell_head(exc)
            self._refuse(client, reply_to, exc)
        except ExoctlError as exc:
            self._refuse(client, reply_to, exc)
        except Exception as exc:  # a bug must not take the worker down with it
            log.error("error handling a message: %s", traceback.format_exc())
            self._reply(client, reply_to, ErrorReply(f"internal error: {exc!r}"))

    def _refuse(self, client: bytes, reply_to: Any, exc: ExoctlError) -> None:
        log.warning("request from %s refused: %s", client.hex()[:8], exc.message)
        self._reply(client, reply_to, ErrorReply.of(exc))

    def _dispatch(self, client: bytes, reply_to: Any, message: WireMessage) -> None:
        match message:
            case Ping():
                self._reply(client, reply_to, Pong(self.profiler.profile()))
            case StatusRequest():
                reports = self.held.reports()
                downloads, events = tuple(self.downloads.reports()), tuple(self.history.events)
                self._reply(
                    client, reply_to, StatusReply(self.profiler.profile(), reports, downloads, events)
                )
            case DownloadRequest():
                self._reply(client, reply_to, Ok(download_id=self.downloads.start(message)))
            case Record(event):
                self.history.record(event)
                self._reply(client, reply_to, Ok())
            case Load(spec):
                self._load(spec)
                self._reply(client, reply_to, Ok())
            case Unload(instance_id):
                self._reply(client, reply_to, Ok(freed=self._unload(instance_id)))
            case Generate(request):
                self._generate(client, request)
            case Alive(request_id):
                self.requests.heard(request_id, client, time.monotonic())
            case Cancel(request_id):
                running = self.requests.get(request_id)
                if running is not None:
                    self.held.put(running.instance_id, CancelJob(request_id))
                self._reply(client, reply_to, Ok())
            case Shutdown():
                self._reply(client, reply_to, Ok())
                self.stopping = True
            case Echo():
                self._reply(client, reply_to, Ok())
            case ProbeLinks(targets):
                self._probe(client, reply_to, targets)
            case Forward() | Tokens() | Release() | Forget() | SeqError() | Lease():  # another runner's
                self._from_peer(message)
            case TensorHello():
                holder = self.held.runners.get(message.instance_id)
                self.meeting.hello(holder.stage if holder is not None else None, message)
            case InstanceFailed(instance_id, text, lost_node):
                holder = self.held.runners.get(instance_id)
                if holder is not None and not holder.failed:
                    self._fail_instance(instance_id, Failure(text, lost_node), notify=False)
            case _:
                raise ProtocolError(f"a worker does not accept '{message.KIND}' messages")

    def _probe(self, client: bytes, reply_to: Any, targets: tuple[tuple[str, str], ...]) -> None:
        if self.probing:
            raise ExoctlError(
                f"node {self.name} is measuring its links already", hint="ask again when that is done"
            )
        self.probing = True

        def done(links: tuple[LinkMeasure, ...], failure: str | None) -> None:
            poster = Poster(self.outbox)
            poster.post(LinksMeasured(client, reply_to, links, failure))
            poster.close()

        mine = [(name, address) for name, address in targets if address != self.address]
        probe_links(self.ctx, self.options.keys, tuple(mine), done)

    def _generate(self, client: bytes, request: GenerateRequest) -> None:
        runner = self.held.get(request.instance_id)
        spec = runner.spec
        if runner.status is not RunnerStatus.READY:
            raise ExoctlError(
                f"instance {spec.instance_id} is {runner.status.value} on node {self.name}"
                + (f": {runner.failure.message}" if runner.failure else "")
            )
        runner.role.take_requests(self.name)
        self.requests.start(request.request_id, client, spec.instance_id)
        self.held.put(spec.instance_id, GenerateJob(client, request))

    def _from_peer(self, message: Forward | Tokens | Release | Forget | SeqError | Lease) -> None:
        """A message between runners, checked and queued on its instance's lane."""
        instance_id = message.instance_id
        if instance_id in self.held.failures:
            return  # the instance failed here: what its other runners still send is moot
        runner = self.held.get(instance_id)
        if isinstance(message, Forward):
            try:
                runner.check(message)
            except ExoctlError as exc:
                raise StepRefused(exc.message, instance_id, tuple(message.step.seqs)) from None
        if isinstance(message, Lease):
            self.leases.heard(instance_id, time.monotonic())
        self.held.put(instance_id, FromPeer(message))

    def _tell_head(self, refused: StepRefused) -> None:
        """A step refused to its sender: the head hears of it too, so a request waiting on those
        sequences ends rather than hangs."""
        runner = self.held.runners.get(refused.instance_id)
        if runner is not None:
            for out in runner.role.refused(refused.seqs, refused.message):
                self._outbound(out)

    def _peer_reply(self, address: str, frames: list[Any]) -> None:
        try:
            message = parse(protocol.decode([f.buffer for f in frames]))
        except ExoctlError as exc:
            log.warning("bad message from peer %s: %s", address, exc.message)
            return
        why = self.peers.heard(address, message, time.monotonic())
        if why is not None:
            self._peer_lost(address, why)

    # --- loading -----------------------------------------------------------------------------

    def _load(self, spec: RunnerSpec) -> None:
        check_reference(spec.model, self.options.model_dirs, self.name)
        if spec.drafts_with_model and spec.rank == 0:  # the head loads the draft model
            check_reference(spec.draft, self.options.model_dirs, self.name)
        runner = self.held.add(spec)
        self.peers.expect([address for _, address in spec.peers], time.monotonic())
        start_loading(runner, self.options.model_dirs, self.name, self.downloads)

    def _unload(self, instance_id: str) -> int:
        self._end_requests(instance_id, f"instance {instance_id} was deleted", None)
        return self.held.remove(instance_id)

    # --- failures ----------------------------------------------------------------------------

    def _heartbeat(self, now: float) -> None:
        if now - self.last_beat > DOWN_AFTER_S:
            # this process itself was stopped (SIGSTOP, a hung machine): the silence it sees is
            # its own, not its peers'. Their clocks start again; they have judged it meanwhile.
            log.warning("worker %s did not run for %.1f s", self.name, now - self.last_beat)
            self.peers.expect(list(self.peers.seen), now)
        self.last_beat = now
        for instance_id in [i for i, r in self.held.runners.items() if r.failed]:  # a load that failed
            self.held.retire(instance_id)
        if now >= self.next_lease:
            self._renew_leases()
            self._expire_leases(now)
            self.next_lease = now + LEASE_S
        for address, why in self.peers.beat(self.held.watched(self.address), now).items():
            self._peer_lost(address, why)

    def _expire_leases(self, now: float) -> None:
        """A stage whose head has gone quiet about its sequences frees them (two empty words free
        all: what was held at the first, then what came since)."""
        for instance_id, quiet in self.leases.lost(self.held.following(), now):
            log.warning(
                "instance %s: no lease from its head for %.0f s; freeing it all", instance_id[:8], quiet
            )
            self.held.put(instance_id, FromPeer(Lease(instance_id, ())))

    def _renew_leases(self) -> None:
        """Each head tells its instance's other runners which sequences live."""
        for runner in self.held.runners.values():
            for out in runner.leases():
                self._outbound(out)

    def _peer_lost(self, address: str, why: str) -> None:
        for instance_id, runner in list(self.held.runners.items()):
            if runner.failed:
                continue
            names = [name for name, a in runner.spec.peers if a == address]
            if names:
                failure = Failure(f"node {names[0]} ({address}) {why}", lost_node=names[0])
                self._fail_instance(instance_id, failure, notify=True)

    def _end_requests(
        self, instance_id: str, message: str, hint: str | None, lost_node: str | None = None
    ) -> None:
        for request_id, request in self.requests.end(instance_id):
            # a lost node is named: the client answers "unavailable", naming it
            self._reply(
                request.client, None, ErrorReply(message, hint, request_id=request_id, node=lost_node)
            )

    def _fail_instance(self, instance_id: str, failure: Failure, notify: bool) -> None:
        """The instance lost a node: fail its requests now, free this runner, tell the others."""
        runner = self.held.runners[instance_id]
        log.warning("instance %s failed: %s", instance_id, failure.message)
        hint = "place the model again: `exoctl place`"
        self._end_requests(instance_id, failure.message, hint, failure.lost_node)
        runner.fail(failure)
        self.held.retire(instance_id)
        if notify:
            failed = InstanceFailed(instance_id, failure.message, failure.lost_node)
            for _, address in runner.spec.peers:
                if address != self.address:
                    self.peers.send(address, frames(failed))


def _peek_id(frames: list[Any]) -> Any:
    """The request id of a message that may fail validation, so its error reply can be matched."""
    try:
        header = msgpack.unpackb(bytes(frames[0]), raw=False)
        return header.get("id") if isinstance(header, dict) else None
    except Exception:
        return None
