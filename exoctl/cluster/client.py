"""The cluster as the CLI sees it: ask every worker, place instances, stream generations.

Stateless: the state lives on the workers; every command reads the inventory, asks each node
for its status, and assembles what it needs. Torch-free.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from exoctl.catalog import ModelCard, card_from_folder, find_card, get_card
from exoctl.errors import ExoctlError, InvalidRequestError, ModelNotFoundError
from exoctl.inventory import Inventory, Node
from exoctl.keys import ClusterKeys
from exoctl.model_store import is_model_folder
from exoctl.placement import GB, NodeProfile, Placement, PlacementError, PlacementRequest
from exoctl.protocol import Message
from exoctl.sharding import Plan
from exoctl.sharding import plan as plan_sharding
from exoctl.transport import NodeClient, NodeError, error_reply

STATUS_TIMEOUT_S = 1.5  # a node silent this long is shown as down
GENERATION_SILENCE_S = 6.0  # the head sends keepalives every second while a request runs
LOAD_STALL_S = 10.0


@dataclass
class NodeStatus:
    node: Node
    profile: dict[str, Any] | None = None
    runners: list[dict[str, Any]] = field(default_factory=list)
    error: str | None = None

    @property
    def up(self) -> bool:
        return self.profile is not None


@dataclass
class InstanceView:
    """One placed model, assembled from the runners the nodes report."""

    instance_id: str
    model_id: str
    sharding: str
    dtype: str
    nodes: tuple[str, ...]  # by rank
    runners: dict[str, dict[str, Any]]  # node -> runner description

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def missing(self) -> list[str]:
        return [n for n in self.nodes if n not in self.runners]

    @property
    def status(self) -> str:
        states = {r["status"] for r in self.runners.values()}
        if self.missing or "RunnerFailed" in states:
            return "failed"
        if "RunnerLoading" in states:
            return "loading"
        if any(r["active_sequences"] for r in self.runners.values()):
            return "running"
        return "ready"

    @property
    def failure(self) -> str:
        messages = [r["message"] for r in self.runners.values() if r["message"]]
        if messages:
            return str(messages[0])
        if self.missing:
            return f"node {', '.join(self.missing)} is down"
        return ""


def instances_of(statuses: list[NodeStatus]) -> dict[str, InstanceView]:
    views: dict[str, InstanceView] = {}
    for status in statuses:
        for runner in status.runners:
            view = views.get(runner["instance_id"])
            if view is None:
                view = views[runner["instance_id"]] = InstanceView(
                    runner["instance_id"],
                    runner["model_id"],
                    runner["sharding"],
                    runner["dtype"],
                    tuple(runner["nodes"]),
                    {},
                )
            view.runners[status.node.name] = runner
    return views


def node_profiles(statuses: list[NodeStatus]) -> list[NodeProfile]:
    """Placement's view of the nodes. Workers on one machine (same machine id) share its memory:
    each is given an equal part of it, so it is not counted once per worker, and equal nodes
    are then taken in inventory order."""
    machines: dict[str, list[dict[str, Any]]] = {}
    for status in statuses:
        if status.profile is not None:
            machines.setdefault(str(status.profile.get("machine_id")), []).append(status.profile)
    profiles = []
    for status in statuses:
        cap = int(status.node.memory_gb * GB) if status.node.memory_gb else None
        if status.profile is None:
            profiles.append(NodeProfile(status.node.name, 0, 0, cap, live=False))
            continue
        # memory the node's own runners hold is reported as used, so it counts as unavailable
        shared = machines[str(status.profile.get("machine_id"))]
        total = min(p["ram_total"] for p in shared) // len(shared)
        available = min(p["ram_available"] for p in shared) // len(shared)
        profiles.append(NodeProfile(status.node.name, total, available, cap, live=True))
    return profiles


def resolve_card(model: str) -> tuple[ModelCard, str]:
    """The card for placement and the reference a worker resolves: a catalog id or an absolute folder."""
    card = find_card(model)
    if card is not None:
        return card, card.id
    path = Path(model).expanduser()
    if is_model_folder(path):
        return card_from_folder(path.resolve()), str(path.resolve())
    if path.exists():
        raise ModelNotFoundError(f"{model} is not a model folder", hint="a model folder holds config.json")
    if model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise ModelNotFoundError(f"no model folder at {model}")
    return get_card(model), model  # raises the unknown-model error with the catalog's ids


def runtime_dtype(dtype: str, statuses: list[NodeStatus]) -> str:
    """`auto`: bfloat16 when every live node has native bf16 maths, else float32."""
    if dtype != "auto":
        return dtype
    live = [s for s in statuses if s.up]
    return "bfloat16" if live and all(s.profile and s.profile.get("bf16_native") for s in live) else "float32"


class Generation:
    """A running request: iterate for text deltas; `result` holds the final answer."""

    def __init__(self, client: NodeClient, request_id: str, send_id: int, silence: float) -> None:
        self.client = client
        self.request_id = request_id
        self.send_id = send_id
        self.silence = silence
        self.result: dict[str, Any] | None = None
        self.tokens: list[int] = []

    def _next(self) -> Message:
        while True:
            message = self.client.receive(self.silence)
            if message is None:
                raise NodeError(
                    self.client.name,
                    f"node {self.client.name} ({self.client.address}), the head of the instance, stopped "
                    f"answering during generation (nothing for {self.silence:.0f} s)",
                    hint=f"`exoctl nodes` shows whether it is down; `exoctl logs {self.client.name}`",
                )
            if message.get("request_id") == self.request_id or message.get("id") == self.send_id:
                return message

    def __iter__(self) -> Iterator[str]:
        while self.result is None:
            message = self._next()
            if message.type == "delta":
                self.tokens += message["tokens"]
                if message["text"]:
                    yield message["text"]
            elif message.type == "done":
                self.result = message["result"]
            elif message.type == "error":
                self.result = {}
                error = InvalidRequestError if message.get("code") == "invalid_request" else ExoctlError
                raise error(message["message"], message.get("hint"))

    def cancel(self) -> dict[str, Any] | None:
        """Stop the request; returns what was generated until then (None if the head is gone)."""
        if self.result is not None:
            return self.result
        self.client.send("cancel", {"request_id": self.request_id})
        try:
            for _ in self:
                pass
        except ExoctlError:
            return None
        return self.result


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
        self,
        kind: str,
        nodes: list[Node] | None = None,
        timeout: float | None = None,
        fields: dict[str, Any] | None = None,
    ) -> dict[str, Message | NodeError]:
        """One request to many nodes at once; each answer or the error for that node."""
        nodes = list(self.inventory.nodes) if nodes is None else nodes
        timeout = self.timeout if timeout is None else timeout
        pending = {n.name: self.client(n.name).send(kind, fields) for n in nodes}
        answers: dict[str, Message | NodeError] = {}
        poller = zmq.Poller()
        for name in pending:
            poller.register(self.client(name).sock, zmq.POLLIN)
        deadline = time.monotonic() + timeout
        while pending and (left := deadline - time.monotonic()) > 0:
            for sock, _ in poller.poll(int(left * 1000) + 1):
                name = next(n for n in pending if self.client(n).sock is sock)
                try:
                    message = self.client(name).receive(0)
                except NodeError as exc:  # a message we cannot read: another protocol version
                    del pending[name]
                    poller.unregister(sock)
                    answers[name] = exc
                    continue
                if message is None or message.get("id") != pending[name]:
                    continue
                del pending[name]
                poller.unregister(sock)
                if message.type == "error":
                    answers[name] = error_reply(name, message)
                else:
                    answers[name] = message
        for name in pending:
            answers[name] = self.client(name).silence_error(timeout)
        return answers

    def statuses(self, timeout: float | None = None) -> list[NodeStatus]:
        answers = self.ask_all("status", timeout=timeout)
        result = []
        for node in self.inventory.nodes:
            answer = answers[node.name]
            if isinstance(answer, NodeError):
                result.append(NodeStatus(node, error=answer.message))
            else:
                result.append(NodeStatus(node, answer["profile"], answer["runners"]))
        return result

    def profiles(self, statuses: list[NodeStatus]) -> list[NodeProfile]:
        return node_profiles(statuses)

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
        return plan_sharding(card, self.profiles(statuses), request, sharding)

    def load(
        self,
        card: ModelCard,
        model_ref: str,
        placement: Placement,
        on_progress: Callable[[dict[str, dict[str, Any]]], None] | None = None,
        instance_id: str | None = None,
    ) -> str:
        """Load every shard; returns the instance id when all are ready, else unloads and raises."""
        instance_id = instance_id or str(uuid.uuid4())
        nodes = [self.inventory.node(s.node) for s in placement.shards]
        peers = [[n.name, n.address] for n in nodes]
        sent: list[Node] = []
        try:
            for rank, (shard, node) in enumerate(zip(placement.shards, nodes, strict=True)):
                self.client(node.name).request(
                    "load",
                    {
                        "instance_id": instance_id,
                        "runner_id": str(uuid.uuid4()),
                        "model": model_ref,
                        "model_id": card.id,
                        "sharding": placement.sharding,
                        "dtype": placement.dtype,
                        "start_layer": shard.start_layer,
                        "end_layer": shard.end_layer,
                        "n_layers": card.n_layers,
                        "rank": rank,
                        "world": len(nodes),
                        "peers": peers,
                    },
                )
                sent.append(node)
            self._wait_loaded(instance_id, nodes, on_progress)
        except BaseException:
            self.unload(instance_id, sent)
            raise
        return instance_id

    def _wait_loaded(
        self,
        instance_id: str,
        nodes: list[Node],
        on_progress: Callable[[dict[str, dict[str, Any]]], None] | None,
    ) -> None:
        last_heard = {n.name: time.monotonic() for n in nodes}
        while True:
            answers = self.ask_all("status", nodes)
            runners: dict[str, dict[str, Any]] = {}
            now = time.monotonic()
            for node in nodes:
                answer = answers[node.name]
                if isinstance(answer, NodeError):
                    if now - last_heard[node.name] > LOAD_STALL_S:
                        raise NodeError(
                            node.name,
                            f"node {node.name} stopped answering while loading",
                            hint=f"`exoctl logs {node.name}` shows its log",
                        )
                    continue
                last_heard[node.name] = now
                mine = [r for r in answer["runners"] if r["instance_id"] == instance_id]
                if not mine:
                    raise ExoctlError(
                        f"node {node.name} lost its runner of instance {instance_id} while loading"
                    )
                runners[node.name] = mine[0]
            if on_progress is not None:
                on_progress(runners)
            failed = [r for r in runners.values() if r["status"] == "RunnerFailed"]
            if failed:
                raise ExoctlError(f"loading failed: {failed[0]['message']}")
            if len(runners) == len(nodes) and all(r["status"] == "RunnerReady" for r in runners.values()):
                return
            time.sleep(0.2)

    def unload(self, instance_id: str, nodes: list[Node] | None = None) -> dict[str, int]:
        """Unload an instance from its nodes; bytes freed per node that answered."""
        answers = self.ask_all("unload", nodes, fields={"instance_id": instance_id})
        return {name: int(a.get("freed", 0)) for name, a in answers.items() if not isinstance(a, NodeError)}

    def generate(
        self,
        instance: InstanceView,
        params: dict[str, Any],
        messages: list[dict[str, str]] | None = None,
        prompt: str | None = None,
        silence: float = GENERATION_SILENCE_S,
    ) -> Generation:
        client = self.client(instance.head)
        request_id = uuid.uuid4().hex
        send_id = client.send(
            "generate",
            {
                "instance_id": instance.instance_id,
                "request_id": request_id,
                "messages": messages,
                "prompt": prompt,
                "params": params,
            },
        )
        return Generation(client, request_id, send_id, silence)
