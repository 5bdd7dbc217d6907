"""The cluster as the workers report it: each node's status, and the instances their runners form.

Torch-free and I/O-free: built from the status replies `Cluster.statuses()` gathers, and read by
the state document, the tables, placement, the API and the supervisor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from exoctl.dtypes import auto_dtype
from exoctl.errors import ExoctlError
from exoctl.inventory import Node
from exoctl.models.catalog import DEFAULT_MODEL_ID, find_card
from exoctl.models.gguf.file import model_name
from exoctl.models.store import as_path, hub_reference
from exoctl.placement.cost import LinkCost, Topology
from exoctl.placement.pipeline import GB, NodeProfile
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.node_speed import LinkMeasure
from exoctl.wire.runner_report import RunnerReport, RunnerStatus
from exoctl.wire.sampling_params import SamplingDefaults
from exoctl.wire.supervisor_event import SupervisorEvent
from exoctl.wire.worker_profile import WorkerProfile


class InstanceStatus(str, Enum):
    READY = "ready"
    RUNNING = "running"  # ready, with requests in flight
    LOADING = "loading"
    FAILED = "failed"


@dataclass
class NodeStatus:
    node: Node
    profile: WorkerProfile | None = None
    runners: list[RunnerReport] = field(default_factory=list)
    error: str | None = None
    key_refused: bool = False  # the node answered, but its handshake refused this machine's key
    downloads: list[DownloadReport] = field(default_factory=list)
    events: list[SupervisorEvent] = field(default_factory=list)  # the supervisor's, kept by the node

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
    runners: dict[str, RunnerReport]  # node -> its runner's report

    @property
    def head(self) -> str:
        return self.nodes[0]

    @property
    def sampling_defaults(self) -> SamplingDefaults | None:
        """The model's own sampling defaults, as its head runner read them."""
        head = self.runners.get(self.head)
        return head.sampling_defaults if head is not None else None

    @property
    def missing(self) -> list[str]:
        return [n for n in self.nodes if n not in self.runners]

    @property
    def status(self) -> InstanceStatus:
        states = {r.status for r in self.runners.values()}
        if self.missing or RunnerStatus.FAILED in states:
            return InstanceStatus.FAILED
        if RunnerStatus.LOADING in states:
            return InstanceStatus.LOADING
        if any(r.active_sequences for r in self.runners.values()):
            return InstanceStatus.RUNNING
        return InstanceStatus.READY

    @property
    def serving(self) -> bool:
        return self.status in (InstanceStatus.READY, InstanceStatus.RUNNING)

    @property
    def failure(self) -> str:
        messages = [r.message for r in self.runners.values() if r.message]
        if messages:
            return messages[0]
        if self.missing:
            return f"node {', '.join(self.missing)} is down"
        return ""

    @property
    def lost_node(self) -> str | None:
        """The node its own runners declared lost (their heartbeats missed it), if any.

        A node that merely misses one status poll is not lost: its runners may still be serving."""
        for runner in self.runners.values():
            if runner.failure is not None and runner.failure.lost_node is not None:
                return runner.failure.lost_node
        return None


def instances_of(statuses: list[NodeStatus]) -> dict[str, InstanceView]:
    views: dict[str, InstanceView] = {}
    for status in statuses:
        for runner in status.runners:
            view = views.get(runner.instance_id)
            if view is None:
                view = views[runner.instance_id] = InstanceView(
                    runner.instance_id, runner.model_id, runner.sharding, runner.dtype, runner.nodes, {}
                )
            view.runners[status.node.name] = runner
    return views


def model_matches(view_model_id: str, model: str) -> bool:
    """Whether `model` (catalog id, Hugging Face repo id, `ID:QUANT` / `REPO:QUANT`, a folder or
    GGUF file) names an instance's model."""
    if view_model_id == model:
        return True
    card = find_card(model)
    if card is not None:
        return card.id == view_model_id
    try:
        hub = hub_reference(model)
    except ExoctlError:  # a catalog id with a quantisation but no GGUF source: names nothing
        return False
    if hub is not None:
        return hub.reference == view_model_id
    path = as_path(model)
    return path.name == view_model_id or (path.suffix == ".gguf" and model_name(path) == view_model_id)


def find_instance(statuses: list[NodeStatus], model: str | None) -> InstanceView | None:
    """The ready instance serving `model` — an instance id or anything `model_matches` — or, with
    no model, the only ready instance, else the embedded default's."""
    views = [v for v in instances_of(statuses).values() if v.serving]
    if model is None:
        if len(views) == 1:
            return views[0]
        model = DEFAULT_MODEL_ID
    for view in views:
        if view.instance_id == model or model_matches(view.model_id, model):
            return view
    return None


def node_profiles(statuses: list[NodeStatus]) -> list[NodeProfile]:
    """Placement's view of the nodes. Workers on one machine (same machine id) share its memory:
    each is given an equal part of it, so it is not counted once per worker, and equal nodes
    are then taken in inventory order."""
    machines: dict[str, list[WorkerProfile]] = {}
    for status in statuses:
        if status.profile is not None:
            machines.setdefault(status.profile.machine_id, []).append(status.profile)
    profiles = []
    for status in statuses:
        cap = int(status.node.memory_gb * GB) if status.node.memory_gb else None
        prefix = status.node.prefix_cache_gb
        prefix_bytes = None if prefix is None else int(prefix * GB)
        if status.profile is None:
            profiles.append(
                NodeProfile(status.node.name, 0, 0, cap, live=False, prefix_cache_bytes=prefix_bytes)
            )
            continue
        # memory the node's own runners hold is reported as used, so it counts as unavailable
        shared = machines[status.profile.machine_id]
        total = min(p.ram_total for p in shared) // len(shared)
        available = min(p.ram_available for p in shared) // len(shared)
        profile = status.profile
        profiles.append(
            NodeProfile(
                status.node.name,
                total,
                available,
                cap,
                True,
                prefix_bytes,
                machine=profile.machine_id,
                host=profile.host_id,
                speed=profile.speed,
                threads=profile.threads,
                cpus=profile.cpu_count,
            )
        )
    return profiles


def fresh_links(statuses: list[NodeStatus]) -> dict[tuple[str, str], LinkMeasure]:
    """The links the up workers measured to each other, (source, sink) -> its measure: only those
    whose sink still runs as it did then (a restarted worker is measured again)."""
    boots = {s.node.name: s.profile.boot_id for s in statuses if s.profile is not None}
    links: dict[tuple[str, str], LinkMeasure] = {}
    for status in statuses:
        if status.profile is None:
            continue
        for link in status.profile.links:
            if boots.get(link.sink) == link.sink_boot:
                links[(status.node.name, link.sink)] = link
    return links


def topology(statuses: list[NodeStatus]) -> Topology:
    """Placement's view of the links (cost model)."""
    return Topology(
        {pair: LinkCost(link.rtt_s, link.bytes_per_s) for pair, link in fresh_links(statuses).items()}
    )


def offline_statuses(statuses: list[NodeStatus]) -> list[NodeStatus]:
    """Statuses to plan by when no node is up (`place --dry-run`): a node's declared memory_gb,
    and for loopback nodes this machine's free memory (psutil), shared among them as their
    workers would share it. A node with neither cannot be planned on."""
    import psutil

    from exoctl import cpu_policy

    free = psutil.virtual_memory().available
    planned = []
    unknown = []
    for status in statuses:
        node = status.node
        if node.memory_gb:
            size = int(node.memory_gb * GB)
            # without its CPU's flags, float32 activations: the larger (safe) count
            planned.append(
                NodeStatus(node, WorkerProfile.planned(node.name, node.device, size, node.name, "float32"))
            )
        elif node.is_loopback:
            here = WorkerProfile.planned(
                node.name, node.device, free, "this machine", cpu_policy.activations_name()
            )
            planned.append(NodeStatus(node, here))
        else:
            unknown.append(node.name)
            planned.append(NodeStatus(node, None, error=status.error))
    if len(unknown) == len(statuses):
        raise ExoctlError(
            f"no node is up and the inventory declares no memory for {', '.join(unknown)}: "
            "nothing to plan by",
            hint="start the workers with `exoctl up`, or give the nodes memory_gb in the inventory",
        )
    return planned


def runtime_dtype(dtype: str, statuses: list[NodeStatus], native: str = "") -> str:
    """`auto`: a GGUF model's `native` dtype (the closest to its file's type: int4 for Q4_K_M);
    else bfloat16 when every live node computes in bfloat16 (native bf16 maths, or the activations
    switch), else float32."""
    if dtype != "auto":
        return dtype
    if native:
        return native
    live = [s for s in statuses if s.up]

    return auto_dtype(
        bool(live) and all(s.profile is not None and s.profile.activations == "bfloat16" for s in live)
    )


class NoNodeUpError(ExoctlError):
    """Not one node of the inventory answered."""


def no_node_up(statuses: list[NodeStatus]) -> NoNodeUpError | None:
    """The one error for "no node is up" that `nodes`, `state`, chat and /healthz give, or None."""
    if any(s.up for s in statuses):
        return None
    shown = "; ".join(f"{s.node.name} ({s.node.address}): {s.error or 'down'}" for s in statuses[:3])
    more = f"; and {len(statuses) - 3} more" if len(statuses) > 3 else ""
    return NoNodeUpError(
        f"no node is up: none of the {len(statuses)} nodes answered ({shown}{more})",
        hint="start the workers with `exoctl up` (`exoctl up --local 2` for a local cluster)",
    )
