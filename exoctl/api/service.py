"""What `serve` does with the cluster, without HTTP: placement, previews, state, generation.

Each call opens its own `Cluster` on one shared ZeroMQ context, because sockets belong to
one thread and the server answers many requests at once on a thread pool.
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import zmq

from exoctl.api.instance_doc import planned_placement
from exoctl.cluster.client import Cluster
from exoctl.cluster.drafts import choose_draft
from exoctl.cluster.state import history, planned_instance, state_document
from exoctl.cluster.views import (
    InstanceView,
    NodeStatus,
    find_instance,
    instances_of,
    no_node_up,
    runtime_dtype,
)
from exoctl.dtypes import check_dtype
from exoctl.errors import ExoctlError, ModelNotFoundError
from exoctl.inventory import Inventory
from exoctl.keys import ClusterKeys
from exoctl.models.catalog import ModelCard, find_card, get_card, load_catalog
from exoctl.models.gguf.file import is_gguf_model
from exoctl.models.store import allowed_roots, as_path, hub_reference, is_model_folder, resolve_card
from exoctl.placement.pipeline import Placement, PlacementError, PlacementRequest
from exoctl.placement.sharding import Plan, check_sharding
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.supervisor_event import SupervisorEvent


class NotPlacedError(ExoctlError):
    """A chat for a model that has no ready instance."""


class Forbidden(ExoctlError):
    """A model folder outside the cluster's model directories: never opened, nor said whether it exists."""


@dataclass
class LoadRecord:
    """A placement `serve` started in the background (`"wait": false`)."""

    model_id: str
    ref: str  # what was asked for: catalog id or folder, to place it again after a failure
    sharding: str = "auto"  # as asked (auto stays auto when it is placed again)
    prefix_cache_bytes: int | None = None  # as asked (None: each node's own budget)
    draft: str | None = None  # speculative decoding's drafter, as asked (`cluster.drafts`)
    draft_dtype: str = "auto"
    status: str = "loading"  # loading | ready | failed
    error: str = ""
    placement: Placement | None = None


@dataclass
class ClusterService:
    inventory: Inventory
    keys: ClusterKeys | None
    ctx: zmq.Context[Any] = field(default_factory=zmq.Context)
    loads: dict[str, LoadRecord] = field(default_factory=dict)
    events: list[SupervisorEvent] = field(default_factory=list)  # the supervisor's, shown in /state

    @contextmanager
    def cluster(self) -> Iterator[Cluster]:
        cluster = Cluster(self.inventory, self.keys, ctx=self.ctx)
        try:
            yield cluster
        finally:
            cluster.close()

    def node_id(self) -> str:
        """EXO's `/node_id` (the node the API runs on): the first node on this machine, else the
        cluster's name (`serve` may run on a machine that is no node)."""
        local = [n.name for n in self.inventory.nodes if n.is_loopback]
        return local[0] if local else self.inventory.name

    def statuses(self) -> list[NodeStatus]:
        with self.cluster() as cluster:
            return cluster.statuses()

    def state(self) -> dict[str, Any]:
        statuses = self.statuses()
        return {
            **state_document(statuses, self.inventory.name),
            "reformations": [e.to_wire() for e in history(statuses, self.events)],
        }

    # --- models and instances ---------------------------------------------------------------

    def models(self) -> list[tuple[ModelCard, list[str], list[str]]]:
        """Every catalog card and every model in the nodes' model directories (as this machine
        sees them): its sources on this machine, and the ids of its ready instances."""
        views = list(instances_of(self.statuses()).values())
        result = []
        for card in load_catalog():
            placed = [v.instance_id for v in views if v.model_id == card.id and v.serving]
            result.append((card, local_sources(card), placed))
        for name, card in self.local_models():
            placed = [v.instance_id for v in views if v.model_id == card.id and v.serving]
            result.append((replace(card, id=name), ["folder"], placed))
        return result

    def local_models(self, most: int = 100) -> list[tuple[str, ModelCard]]:
        """The model folders and GGUF files directly inside the nodes' model directories, with the
        name a place request gives them (their folder or file name)."""
        cards: dict[str, ModelCard] = {}
        for folder in dict.fromkeys(as_path(node.model_dir) for node in self.inventory.nodes):
            try:
                entries = sorted(folder.iterdir())[:most] if folder.is_dir() else []
            except OSError:
                continue
            for entry in entries:
                if entry.name in cards or not (is_model_folder(entry) or is_gguf_model(entry)):
                    continue
                try:
                    card, _ = resolve_card(str(entry))
                except ExoctlError:  # a broken folder is not listed; placing it names what is wrong
                    continue
                cards[entry.name] = (
                    card if "local" in card.tags else replace(card, tags=(*card.tags, "local"))
                )
        return list(cards.items())

    def reference(self, model: str) -> tuple[ModelCard, str]:
        """`resolve_card`, confined as a worker is: the API opens a folder only inside the nodes'
        model directories, exoctl's store or the Hub cache, and tells nothing about other paths."""
        if find_card(model) is not None or hub_reference(model) is not None:
            return resolve_card(model)
        model_dirs = [as_path(node.model_dir) for node in self.inventory.nodes]
        path = as_path(model)
        if not path.is_absolute():
            if ".." not in path.parts:
                for folder in model_dirs:
                    if is_model_folder(folder / path) or is_gguf_model(folder / path):
                        return resolve_card(str(folder / path))
            return get_card(model), model  # unknown: the error lists the catalog's ids
        real = path.resolve()
        if not any(real.is_relative_to(root) for root in allowed_roots(model_dirs)):
            raise Forbidden(
                f"model folder {model} is outside the cluster's model directories",
                hint="give a catalog id, or a folder inside a node's model_dir (inventory field 'model_dir')",
            )
        return resolve_card(str(real))

    def instance_for(self, model: str, statuses: list[NodeStatus]) -> InstanceView:
        """The ready instance that serves `model` (catalog id, HF repo id, folder name or instance id)."""
        view = find_instance(statuses, model)
        if view is not None:
            return view
        down = no_node_up(statuses)
        if down is not None:
            raise down
        card = find_card(model)
        wanted = card.id if card is not None else model
        placed = (
            ", ".join(sorted({v.model_id for v in instances_of(statuses).values() if v.serving})) or "none"
        )
        path_like = "/" in model or model.startswith(("~", ".")) or model.endswith(".gguf")
        if card is None and hub_reference(model) is None and not path_like:
            raise ModelNotFoundError(
                f"unknown model {model[:200]!r}: not a catalog id, a placed model or instance, a Hub "
                f"repo id or a model folder (placed models: {placed})",
                hint="`exoctl models` (GET /v1/models) lists the models; place one with `exoctl place ID`",
            )
        named = f"model {model!r}" + (f" ({wanted})" if wanted != model else "")
        raise NotPlacedError(
            f"{named} is not placed (placed models: {placed})",
            hint=f'place it first: POST /place_instance {{"model_id": "{wanted}"}} '
            f"or `exoctl place {wanted}`",
        )

    def plan(
        self,
        model_id: str,
        sharding: str,
        nodes: int | None,
        min_nodes: int,
        dtype: str,
        statuses: list[NodeStatus],
        prefix_cache_bytes: int | None = None,
        draft: str | None = None,
        draft_dtype: str = "auto",
    ) -> tuple[ModelCard, str, Plan]:
        kind = check_sharding(sharding)
        card, ref = self.reference(model_id)
        with self.cluster() as cluster:
            request = PlacementRequest(
                dtype=runtime_dtype(dtype, statuses, card.native_dtype),
                nodes=nodes,
                min_nodes=min_nodes,
                prefix_cache_bytes=prefix_cache_bytes,
                draft=choose_draft(card, draft, draft_dtype),
            )
            return card, ref, cluster.choose(card, request, statuses, kind)

    def place(
        self,
        model_id: str,
        sharding: str,
        nodes: int | None,
        min_nodes: int,
        dtype: str,
        wait: bool,
        prefix_cache_bytes: int | None = None,
        draft: str | None = None,
        draft_dtype: str = "auto",
    ) -> tuple[str, Plan]:
        """Plan and load; `prefix_cache_bytes` over each node's budget for cached prefixes, `draft`
        the head's drafter for speculative decoding."""
        statuses = self.statuses()
        card, ref, chosen = self.plan(
            model_id, sharding, nodes, min_nodes, dtype, statuses, prefix_cache_bytes, draft, draft_dtype
        )
        instance_id = str(uuid.uuid4())
        self.start_load(card, ref, sharding, chosen.placement, instance_id, wait, prefix_cache_bytes)
        record = self.loads.get(instance_id)
        if record is not None:
            record.draft, record.draft_dtype = draft, draft_dtype
        return instance_id, chosen

    def start_load(
        self,
        card: ModelCard,
        ref: str,
        sharding: str,
        placement: Placement,
        instance_id: str,
        wait: bool,
        prefix_cache_bytes: int | None = None,
    ) -> None:
        """Load `placement`: now (errors raised), or on a thread (errors kept in its `LoadRecord`)."""
        record = self.loads[instance_id] = LoadRecord(
            card.id, ref, sharding, prefix_cache_bytes, placement=placement
        )

        def load() -> None:
            try:
                with self.cluster() as cluster:
                    cluster.load(card, ref, placement, instance_id=instance_id)
                record.status = "ready"
            except ExoctlError as exc:
                record.status, record.error = "failed", exc.message
                if wait:
                    raise

        if wait:
            load()
        else:
            threading.Thread(target=load, name=f"load-{instance_id[:8]}", daemon=True).start()

    def previews(
        self,
        model_id: str,
        dtype: str = "auto",
        instance_meta: str | None = None,
        node_ids: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """Every sharding over 1..live nodes, in EXO's shape (`instance`, `memory_delta_by_node`,
        `error` null when it fits) with exoctl's own fields (`nodes`, `ok`, `dtype`, `shards`).

        Without `instance_meta`, each plan is listed once per runtime kind: exoctl's CpuRing and
        EXO's MlxRing and MlxJaccl, all run as the CPU ring (EXO's dashboard offers only its MLX
        kinds, and finds "No valid configurations" in previews of another). `node_ids` (EXO's
        filter) keeps to those nodes."""
        check_dtype(dtype)
        statuses = self.statuses()
        if node_ids:
            statuses = [s for s in statuses if s.node.name in node_ids]
        card, ref = self.reference(model_id)
        live = sum(1 for s in statuses if s.up)
        metas = (instance_meta,) if instance_meta else ("CpuRing", "MlxRing", "MlxJaccl")
        previews = []
        for sharding in ("Pipeline", "Tensor"):
            for count in range(1, max(live, 1) + 1):
                entry: dict[str, Any] = {"model_id": card.id, "sharding": sharding, "nodes": count}
                try:
                    _, _, chosen = self.plan(ref, sharding, count, 1, dtype, statuses)
                    placement = chosen.placement
                    entry.update(
                        instance=planned_instance(statuses, placement, card.n_layers, str(uuid.uuid4())),
                        memory_delta_by_node={s.node: s.memory_bytes for s in placement.shards},
                        error=None,
                        ok=True,
                        dtype=placement.dtype,
                        shards=shards_json(placement),
                        # the cost model's (placement.cost), null where a node's speed is unknown
                        predicted=None if chosen.prediction is None else chosen.prediction.to_json(),
                    )
                except (PlacementError, ModelNotFoundError) as exc:
                    entry.update(instance=None, memory_delta_by_node=None, error=exc.message, ok=False)
                previews += [{**entry, "instance_meta": meta} for meta in metas]
        return {"model_id": card.id, "live_nodes": live, "previews": previews}

    def placement_for(self, model_id: str, sharding: str, min_nodes: int, dtype: str) -> dict[str, Any]:
        """EXO's `GET /instance/placement`: the instance `place` would load, not loaded."""
        check_dtype(dtype)
        statuses = self.statuses()
        card, _, chosen = self.plan(model_id, sharding, None, min_nodes, dtype, statuses)
        return planned_instance(statuses, chosen.placement, card.n_layers, str(uuid.uuid4()))

    def place_planned(self, instance: dict[str, dict[str, Any]], wait: bool) -> tuple[str, Placement]:
        """EXO's `POST /instance`: load exactly the instance a preview returned (its nodes, ranks and
        layer ranges), after checking it is whole and its nodes are live."""
        statuses = self.statuses()
        card, ref, placement, instance_id = planned_placement(instance, statuses, self.reference)
        if not instance_id or instance_id in instances_of(statuses) or instance_id in self.loads:
            instance_id = str(uuid.uuid4())  # the same preview posted twice: a second instance
        self.start_load(card, ref, placement.sharding, placement, instance_id, wait)
        return instance_id, placement

    def pull(
        self, model: str, on_progress: Callable[[dict[str, DownloadReport]], None]
    ) -> dict[str, DownloadReport]:
        """The model's files onto the nodes `place` would give it, as `exoctl download` fetches them
        (each node its layer range; every layer for a tensor split); each node's last report."""
        statuses = self.statuses()
        try:
            card, ref = self.reference(model)
        except ModelNotFoundError:
            if not REPO_ID.fullmatch(model):
                raise
            card, ref = resolve_card(model)  # a Hub repo id: its card from the Hub
        with self.cluster() as cluster:
            request = PlacementRequest(dtype=runtime_dtype("auto", statuses, card.native_dtype))
            placement = cluster.choose(card, request, statuses, "auto").placement
        whole = (0, card.n_layers)
        targets = [
            (
                self.inventory.node(s.node),
                whole if placement.sharding == "tensor" else (s.start_layer, s.end_layer),
            )
            for s in placement.shards
        ]
        with self.cluster() as cluster:
            return cluster.download(ref, card.n_layers, targets, on_progress)

    def delete(self, instance_id: str) -> dict[str, int]:
        statuses = self.statuses()
        view = instances_of(statuses).get(instance_id)
        if view is None:
            raise NotFound(f"no instance {instance_id}", hint="GET /state lists the instances")
        with self.cluster() as cluster:
            nodes = [cluster.inventory.node(n) for n in view.nodes if n in view.runners]
            freed = cluster.unload(instance_id, nodes)
        self.loads.pop(instance_id, None)
        return freed


REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # a Hugging Face repo id: owner/name


class NotFound(ExoctlError):
    """An instance id that names nothing."""


def shards_json(placement: Placement) -> list[dict[str, Any]]:
    return [
        {
            "node": s.node,
            "start_layer": s.start_layer,
            "end_layer": s.end_layer,
            "memory_bytes": s.memory_bytes,
            "prefix_cache_bytes": s.prefix_bytes,
        }
        for s in placement.shards
    ]


def local_sources(card: ModelCard) -> list[str]:
    """Which of the card's sources this machine holds: "embedded" (the default's package), or in
    the Hugging Face cache "safetensors" (the repo's config) and "gguf" (the card's default
    quantisation)."""
    from exoctl.models.catalog import DEFAULT_MODEL_ID

    if card.id == DEFAULT_MODEL_ID:
        from exoctl.models.default import is_installed

        return ["embedded"] if is_installed() else []
    from huggingface_hub import try_to_load_from_cache

    from exoctl.models.gguf.hub import cached_files, quant_files

    found = []
    if isinstance(try_to_load_from_cache(card.hf_repo, "config.json"), str):
        found.append("safetensors")
    if card.gguf_repo and quant_files(cached_files(card.gguf_repo), card.gguf_quant):
        found.append("gguf")
    return found
