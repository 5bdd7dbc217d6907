"""The cluster as the CLI sees it: ask every worker, place instances, stream generations.

Stateless: the state lives on the workers; every command reads the inventory, asks each node
for its status (`views.py` assembles what the answers say), and does what it needs. Torch-free.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import zmq

from exoctl.cluster.views import InstanceView, NodeStatus, fresh_links, node_profiles, topology
from exoctl.errors import ExoctlError, InvalidRequestError
from exoctl.inventory import Inventory, Node
from exoctl.keys import ClusterKeys
from exoctl.models.catalog import ModelCard
from exoctl.placement.pipeline import Placement, PlacementError, PlacementRequest
from exoctl.placement.sharding import Plan
from exoctl.placement.sharding import plan as plan_sharding
from exoctl.transport import KeyRefusedError, NodeClient, NodeError, reply_or_raise
from exoctl.wire.answer import Completion
from exoctl.wire.chat_options import ChatOptions
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.messages import (
    Alive,
    Cancel,
    Delta,
    Done,
    DownloadRequest,
    ErrorReply,
    Generate,
    Keepalive,
    Load,
    Ok,
    ProbeLinks,
    Reply,
    Request,
    StatusReply,
    StatusRequest,
    Unload,
    WireMessage,
)
from exoctl.wire.protocol import MAX_HEADER_BYTES
from exoctl.wire.runner_report import RunnerReport, RunnerStatus
from exoctl.wire.runner_spec import RunnerSpec
from exoctl.wire.sampling_params import SamplingParams

# what `load` reports while it waits: each node's runner, and the download a node runs for it
LoadWatcher = Callable[[dict[str, RunnerReport], dict[str, DownloadReport]], None]

STATUS_TIMEOUT_S = 1.5  # a node silent this long is shown as down
PROBE_TIMEOUT_S = 15.0  # a worker measures one link within this (link_probe.LINK_TIMEOUT_S and more)
GENERATION_SILENCE_S = 6.0  # the head sends keepalives every second while a request runs
LOAD_STALL_S = 10.0
# what one request's text may weigh: the generate message's header has to stay within the limit
MAX_PROMPT_BYTES = MAX_HEADER_BYTES - 2**16


class Generation:
    """A running request: iterate for text deltas; `result` holds the final answer."""

    def __init__(self, client: NodeClient, request_id: str, send_id: int, silence: float) -> None:
        self.client = client
        self.request_id = request_id
        self.send_id = send_id
        self.silence = silence
        self.result: Completion | None = None  # set when the head says the request is done
        self.ended = False
        self.tokens: list[int] = []

    def _next(self) -> WireMessage:
        while True:
            received = self.client.receive(self.silence)
            if received is None:
                raise NodeError(
                    self.client.name,
                    f"node {self.client.name} ({self.client.address}), the head of the instance, stopped "
                    f"answering during generation (nothing for {self.silence:.0f} s)",
                    hint=f"`exoctl nodes` shows whether it is down; `exoctl logs {self.client.name}`",
                )
            message = received.message
            if received.reply_to == self.send_id or getattr(message, "request_id", None) == self.request_id:
                return message

    def __iter__(self) -> Iterator[str]:
        for text, _ in self.deltas():
            if text:
                yield text

    def deltas(self) -> Iterator[tuple[str, list[dict[str, Any]]]]:
        """(text, the logprobs of its tokens) per token: the text may be empty (held back for a
        stop string or a character's other bytes) while its tokens' logprobs are not."""
        while not self.ended:
            match self._next():
                case Keepalive():
                    # still reading: the head cancels a request whose client stopped answering these
                    self.client.send(Alive(self.request_id))
                case Delta(text=text, tokens=tokens, logprobs=logprobs):
                    self.tokens += tokens
                    yield text, list(logprobs)
                case Done(result=result):
                    self.ended = True
                    self.result = result
                case ErrorReply() as error:
                    self.ended = True
                    if error.node is not None:  # the instance lost a node: the client says which
                        raise NodeError(error.node, error.message, error.hint)
                    raise error.error_class(error.message, error.hint)

    def cancel(self) -> Completion | None:
        """Stop the request; returns what was generated until then (None if the head is gone)."""
        if self.ended:
            return self.result
        self.client.send(Cancel(self.request_id))
        try:
            for _ in self:
                pass
        except ExoctlError:
            return None
        return self.result


def draft_fields(placement: Placement) -> dict[str, Any]:
    """The `RunnerSpec` fields of the placement's drafter (every rank gets them; rank 0 drafts)."""
    draft = placement.draft
    if draft is None:
        return {}
    return {
        "draft": draft.reference,
        "draft_model_id": draft.model_id,
        "draft_dtype": draft.dtype,
        "draft_layers": draft.layers,
    }


class Cluster:
    def __init__(
        self,
        inventory: Inventory,
        keys: ClusterKeys | None,
        timeout: float = STATUS_TIMEOUT_S,
        ctx: zmq.Context[Any] | None = None,
    ) -> None:
        """`ctx`: a shared context (thread-safe; `serve` makes one Cluster per request on it)."""
        self.inventory = inventory
        self.keys = keys
        self.timeout = timeout
        self._own_ctx = ctx is None
        self.ctx: zmq.Context[Any] = ctx if ctx is not None else zmq.Context()
        self._clients: dict[str, NodeClient] = {}

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()
        if self._own_ctx:
            self.ctx.destroy(linger=0)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def client(self, name: str) -> NodeClient:
        if name not in self._clients:
            node = self.inventory.node(name)
            self._clients[name] = NodeClient(self.ctx, name, node.address, self.keys, self.timeout)
        return self._clients[name]

    def ask_all(
        self, message: Request, nodes: list[Node] | None = None, timeout: float | None = None
    ) -> dict[str, Reply | NodeError]:
        """One request to many nodes at once; each answer or the error for that node."""
        nodes = list(self.inventory.nodes) if nodes is None else nodes
        timeout = self.timeout if timeout is None else timeout
        pending = {n.name: self.client(n.name).send(message) for n in nodes}
        answers: dict[str, Reply | NodeError] = {}
        poller = zmq.Poller()
        for name in pending:
            poller.register(self.client(name).sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                name = next(n for n in pending if self.client(n).sock is sock)
                try:
                    received = self.client(name).receive(0)
                    if received is None or received.reply_to != pending[name]:
                        continue
                    answers[name] = reply_or_raise(name, received.message)
                except NodeError as exc:  # an error reply, or one we cannot read (another version)
                    answers[name] = exc
                del pending[name]
                poller.unregister(sock)
        for name in pending:
            answers[name] = self.client(name).silence_error(timeout)
        return answers

    def statuses(self, timeout: float | None = None) -> list[NodeStatus]:
        answers = self.ask_all(StatusRequest(), timeout=timeout)
        result = []
        for node in self.inventory.nodes:
            answer = answers[node.name]
            if isinstance(answer, NodeError):
                refused = isinstance(answer, KeyRefusedError)
                result.append(NodeStatus(node, error=answer.message, key_refused=refused))
            elif not isinstance(answer, StatusReply):
                result.append(
                    NodeStatus(node, error=f"node {node.name} answered 'status' with '{answer.KIND}'")
                )
            else:
                runners, downloads, events = list(answer.runners), list(answer.downloads), list(answer.events)
                result.append(NodeStatus(node, answer.profile, runners, downloads=downloads, events=events))
        return result

    def measure_links(
        self, statuses: list[NodeStatus], force: bool = False, failures: dict[str, str] | None = None
    ) -> list[NodeStatus]:
        """Have each up worker measure its links to the other up workers (those not measured since
        either started, or all with `force`), one worker at a time so that no two probes share a
        link; the statuses again, with the links in their profiles. A worker that fails to
        measure a link leaves it unmeasured (placement then assumes it); why goes in `failures`
        by the measuring node's name."""
        up = [s for s in statuses if s.profile is not None]
        known = fresh_links(statuses)
        probed = False
        for status in up:
            targets = tuple(
                (other.node.name, other.node.address)
                for other in up
                if other is not status and (force or (status.node.name, other.node.name) not in known)
            )
            if not targets:
                continue
            try:
                self.client(status.node.name).request(
                    ProbeLinks(targets), timeout=PROBE_TIMEOUT_S * len(targets)
                )
            except NodeError as exc:
                if failures is not None:  # that worker's links stay unmeasured
                    failures[status.node.name] = exc.message
                continue
            probed = True
        return self.statuses() if probed else statuses

    def plan(
        self,
        card: ModelCard,
        request: PlacementRequest,
        statuses: list[NodeStatus],
        sharding: str = "pipeline",
    ) -> Placement:
        return self.choose(card, request, statuses, sharding).placement

    def choose(
        self, card: ModelCard, request: PlacementRequest, statuses: list[NodeStatus], sharding: str
    ) -> Plan:
        """The placement under `sharding` (auto, pipeline or tensor), with why it was chosen."""
        if not any(s.up for s in statuses):
            raise PlacementError(
                f"no worker of {self.inventory.name} answers "
                f"({len(statuses)} nodes in {self.inventory.source})",
                hint="start them with `exoctl up`",
            )
        live = [s for s in statuses if s.up]
        if len(live) > 1 and all(s.profile is not None and s.profile.speed is not None for s in live):
            statuses = self.measure_links(statuses)  # nodes that joined since: measured once
        return plan_sharding(card, node_profiles(statuses), request, sharding, topology(statuses))

    def load(
        self,
        card: ModelCard,
        model_ref: str,
        placement: Placement,
        on_progress: LoadWatcher | None = None,
        instance_id: str | None = None,
    ) -> InstanceView:
        """Load every shard; the ready instance as its runners last reported it, else unload and raise."""
        instance_id = instance_id or str(uuid.uuid4())
        nodes = [self.inventory.node(s.node) for s in placement.shards]
        peers = tuple((n.name, n.address) for n in nodes)
        position_bytes = tuple(s.position_bytes for s in placement.shards)
        sent: list[Node] = []
        try:
            for rank, (shard, node) in enumerate(zip(placement.shards, nodes, strict=True)):
                spec = RunnerSpec(
                    instance_id=instance_id,
                    runner_id=str(uuid.uuid4()),
                    model=model_ref,
                    model_id=card.id,
                    sharding=placement.sharding,
                    dtype=placement.dtype,
                    start_layer=shard.start_layer,
                    end_layer=shard.end_layer,
                    n_layers=card.n_layers,
                    rank=rank,
                    world=len(nodes),
                    peers=peers,
                    prefix_positions=placement.prefix_positions,
                    prefix_bytes=shard.prefix_bytes,
                    position_bytes=position_bytes,
                    partials=placement.partials,
                    **draft_fields(placement),
                )
                self.client(node.name).request(Load(spec))
                sent.append(node)
            runners = self._wait_loaded(instance_id, nodes, on_progress)
        except BaseException:
            self.unload(instance_id, sent)
            raise
        nodes_by_rank = tuple(n.name for n in nodes)
        return InstanceView(instance_id, card.id, placement.sharding, placement.dtype, nodes_by_rank, runners)

    def _watch(self, nodes: list[Node], doing: str, hint: str) -> Iterator[dict[str, StatusReply]]:
        """The status answers of the nodes that answered, a round every 0.2 s, while `doing`; a
        node silent for LOAD_STALL_S is an error (`hint` after its log's)."""
        last_heard = {n.name: time.monotonic() for n in nodes}
        while True:
            answers = self.ask_all(StatusRequest(), nodes)
            now = time.monotonic()
            heard: dict[str, StatusReply] = {}
            for node in nodes:
                answer = answers[node.name]
                if not isinstance(answer, StatusReply):
                    if now - last_heard[node.name] > LOAD_STALL_S:
                        raise NodeError(
                            node.name,
                            f"node {node.name} stopped answering while {doing}",
                            hint=f"`exoctl logs {node.name}` shows its log{hint}",
                        )
                    continue
                last_heard[node.name] = now
                heard[node.name] = answer
            yield heard
            time.sleep(0.2)

    def _wait_loaded(
        self,
        instance_id: str,
        nodes: list[Node],
        on_progress: LoadWatcher | None,
    ) -> dict[str, RunnerReport]:
        for answers in self._watch(nodes, "loading", ""):
            runners: dict[str, RunnerReport] = {}
            downloads: dict[str, DownloadReport] = {}  # node -> the download this load started there
            for name, answer in answers.items():
                mine = [r for r in answer.runners if r.instance_id == instance_id]
                if not mine:
                    raise ExoctlError(f"node {name} lost its runner of instance {instance_id} while loading")
                runners[name] = mine[0]
                fetching = [d for d in answer.downloads if d.instance_id == instance_id]
                if fetching:
                    downloads[name] = fetching[-1]
            if on_progress is not None:
                on_progress(runners, downloads)
            failed = [r.failure for r in runners.values() if r.failure is not None]
            if failed:
                if failed[0].lost_node is not None:
                    raise NodeError(failed[0].lost_node, f"loading failed: {failed[0].message}")
                raise ExoctlError(f"loading failed: {failed[0].message}")
            if len(runners) == len(nodes) and all(r.status is RunnerStatus.READY for r in runners.values()):
                return runners
        raise AssertionError("unreachable: _watch never ends")

    def download(
        self,
        model_ref: str,
        n_layers: int,
        targets: list[tuple[Node, tuple[int, int]]],
        on_progress: Callable[[dict[str, DownloadReport]], None] | None = None,
    ) -> dict[str, DownloadReport]:
        """Each node fetches the files of its layer range; their last reports once all have ended
        (completed or failed), watched through `status` as `load` is."""
        started: dict[str, str] = {}  # node -> download id
        for node, (start, end) in targets:
            asked = self.client(node.name).request(DownloadRequest(model_ref, start, end, n_layers))
            if not isinstance(asked, Ok) or asked.download_id is None:
                raise NodeError(node.name, f"node {node.name} started no download of {model_ref}")
            started[node.name] = asked.download_id
        nodes = [node for node, _ in targets]
        reports: dict[str, DownloadReport] = {}
        for answers in self._watch(nodes, "downloading", "; `exoctl download` again resumes"):
            for name, answer in answers.items():
                mine = [d for d in answer.downloads if d.id == started[name]]
                if not mine:
                    raise ExoctlError(f"node {name} lost its download of {model_ref} (was it restarted?)")
                reports[name] = mine[0]
            if on_progress is not None:
                on_progress(reports)
            if len(reports) == len(nodes) and all(r.ended for r in reports.values()):
                return reports
        raise AssertionError("unreachable: _watch never ends")

    def unload(self, instance_id: str, nodes: list[Node] | None = None) -> dict[str, int]:
        """Unload an instance from its nodes; bytes freed per node that answered."""
        answers = self.ask_all(Unload(instance_id), nodes)
        return {name: a.freed or 0 for name, a in answers.items() if isinstance(a, Ok)}

    def generate(
        self,
        instance: InstanceView,
        params: SamplingParams,
        messages: list[dict[str, Any]] | None = None,
        prompt: str | None = None,
        silence: float = GENERATION_SILENCE_S,
        chat: ChatOptions | None = None,
        cache_prompt: bool = True,
        speculative: bool = True,
        prompt_ids: list[int] | None = None,
    ) -> Generation:
        """Start a request on the instance's head (a chat, a text prompt, or `prompt_ids`, token ids
        as they are); `cache_prompt` False neither reuses a cached prefix nor keeps this one's;
        `speculative` False decodes it one token a step even where the instance has a drafter."""
        texts = [str(m.get("content") or "") for m in messages or []] + [prompt or "", *params.stop]
        if chat is not None:  # tools and calls count too
            texts += [json.dumps(chat.tools or [], ensure_ascii=False), chat.prefix]
            texts += [json.dumps(m.get("tool_calls") or [], ensure_ascii=False) for m in messages or []]
        try:
            size = sum(len(t.encode("utf-8")) for t in texts)
        except UnicodeEncodeError as exc:  # a lone surrogate: from JSON's \ud800, or undecodable argv bytes
            raise InvalidRequestError(
                f"the prompt is not valid Unicode text ({exc.reason}: {exc.object[exc.start : exc.end]!r})"
            ) from None
        if prompt_ids is not None:
            size += 4 * len(prompt_ids)
        if size > MAX_PROMPT_BYTES:
            raise InvalidRequestError(
                f"the prompt is {size} bytes, over the limit of {MAX_PROMPT_BYTES} bytes",
                hint="shorten it: a model's context holds far less text than that",
            )
        client = self.client(instance.head)
        request_id = uuid.uuid4().hex
        chat = chat or ChatOptions()
        request = GenerateRequest(
            instance.instance_id,
            request_id,
            params,
            messages,
            prompt,
            prompt_ids,
            chat,
            cache_prompt,
            speculative,
        )
        send_id = client.send(Generate(request))
        return Generation(client, request_id, send_id, silence)
