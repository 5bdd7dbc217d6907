"""`serve`'s supervisor: an instance that lost a node is placed again on the live nodes.

Every few seconds it reads the cluster; an instance whose runners declared a node lost (their
failure names the lost node: it stopped answering their heartbeats, or restarted) is unloaded
from the nodes that still hold a part of it and placed again with the same model, sharding and
dtype on the live nodes, when their memory allows (reformation). A node that comes back is
live again at once: the next placement may use it.

An instance placed again smaller than it was asked for (on fewer nodes, or in another sharding)
is restored to what was asked once enough nodes are back and it is idle: the asked shape is
loaded beside it (or, when memory does not allow both, in its place), and the smaller one is
unloaded once no request runs on it. A node that flaps (comes and goes) is not chased: each
reformation of the same ask within FLAP_WINDOW_S doubles the wait before the next restore.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import replace

from exoctl.api.service import ClusterService
from exoctl.api.supervisor_plan import (
    Action,
    Asked,
    ForgetAsked,
    Memory,
    Reform,
    Restore,
    Retire,
    Seen,
    Served,
    StopRetiring,
    UnloadLeftovers,
    plan,
)
from exoctl.cluster.views import InstanceView, instances_of
from exoctl.errors import ExoctlError
from exoctl.placement.pipeline import Placement, PlacementError
from exoctl.wire.messages import Record
from exoctl.wire.supervisor_event import SupervisorEvent

log = logging.getLogger("exoctl.serve")

RESTORE_AFTER_S = 5.0  # a node back for this long (and the instance idle): the asked shape again
RESTORE_MAX_S = 300.0
FLAP_WINDOW_S = 600.0


REFORMED_KEPT = 1000  # instance ids placed again, remembered to unload their leftovers


class Supervisor:
    def __init__(self, service: ClusterService, interval_s: float = 2.0) -> None:
        self.service = service
        self.interval_s = interval_s
        self.events = service.events  # what it did, newest last (shown in /state)
        # an instance is placed again only if it once served, and only once: a failed placement
        # is final (its caller got the error), and the leftovers of one placed again (a node that
        # was frozen, back with a stale runner) are unloaded, not placed a second time
        self.served: set[str] = set()
        # kept after the instance leaves the state: a frozen node's stale rank may bring it back
        # (as a failed instance with one ready runner and no lost node) minutes later
        self.reformed: OrderedDict[str, None] = OrderedDict()
        self.asked: dict[str, Asked] = {}  # instances placed again smaller, and what was asked
        self.restore_at: dict[str, float] = {}  # ... and when a restore may be tried (monotonic)
        self.retiring: set[str] = set()  # restored: unloaded once idle
        self.flaps: dict[Asked, list[float]] = {}  # when each ask was placed again smaller
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="supervisor", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.run_once()
            except Exception:  # never let one bad round end the supervision
                log.exception("supervisor round failed")

    def run_once(self) -> None:
        """Read the cluster, plan the round (`supervisor_plan.plan`, pure), do what it says."""
        statuses = self.service.statuses()
        loaded = {i for i, record in self.service.loads.items() if record.status == "ready"}
        seen = Seen(instances_of(statuses), loaded, sum(1 for s in statuses if s.up), time.monotonic())
        memory = Memory(
            frozenset(self.served),
            frozenset(self.reformed),
            dict(self.asked),
            dict(self.restore_at),
            frozenset(self.retiring),
        )
        for action in plan(seen, memory):
            self.perform(action)

    def perform(self, action: Action) -> None:
        match action:
            case Served(instance_ids):
                self.served = set(instance_ids)
            case UnloadLeftovers(view) | Retire(view):
                self.unload(view)
            case Reform(view):
                self.reform(view)
            case StopRetiring(instance_id):
                self.retiring.discard(instance_id)
            case ForgetAsked(instance_id):
                self.asked.pop(instance_id, None)
            case Restore(view, asked):
                self.restore(view, asked)

    def unload(self, view: InstanceView) -> None:
        with self.service.cluster() as cluster:
            cluster.unload(view.instance_id, [cluster.inventory.node(n) for n in view.runners])

    def reform(self, view: InstanceView) -> None:
        record = self.service.loads.get(view.instance_id)
        model = record.ref if record is not None else view.model_id
        # as it was asked: an auto placement is chosen afresh for the nodes that are left
        sharding = record.sharding if record is not None else view.sharding
        prefix = record.prefix_cache_bytes if record is not None else None
        draft, draft_dtype = (record.draft, record.draft_dtype) if record is not None else (None, "auto")
        # an instance that was itself placed again smaller keeps the first ask
        asked = self.asked.pop(view.instance_id, None) or Asked(
            model, sharding, len(view.nodes), view.dtype, prefix, draft, draft_dtype
        )
        self.reformed[view.instance_id] = None
        while len(self.reformed) > REFORMED_KEPT:
            self.reformed.popitem(last=False)
        self.unload(view)
        self.service.loads.pop(view.instance_id, None)
        event = new_event(view, "replaced", view.failure)
        try:
            new_id, chosen = self.service.place(
                model,
                sharding,
                None,
                1,
                view.dtype,
                True,
                asked.prefix_cache_bytes,
                asked.draft,
                asked.draft_dtype,
            )
            placement = chosen.placement
            event = replace(event, new_instance_id=new_id, nodes=tuple(placement.nodes))
            if smaller(placement, asked):
                wait = self._flapped(asked)
                self.asked[new_id] = asked
                self.restore_at[new_id] = time.monotonic() + wait
                event = replace(event, restore_after_s=wait)
        except ExoctlError as exc:
            event = replace(event, action="not replaced", error=exc.message)
        self._record(event, f"lost a node ({view.failure})")

    def _flapped(self, asked: Asked) -> float:
        """Seconds to wait before restoring `asked`: doubled for each time it was placed again
        smaller within FLAP_WINDOW_S."""
        now = time.monotonic()
        times = [t for t in self.flaps.get(asked, []) if now - t < FLAP_WINDOW_S] + [now]
        self.flaps[asked] = times
        return float(min(RESTORE_MAX_S, RESTORE_AFTER_S * 2 ** (len(times) - 1)))

    def restore(self, view: InstanceView, asked: Asked) -> None:
        """Load what was asked beside the smaller instance (or in its place when memory does not
        allow both); the smaller one goes once idle."""
        why = f"nodes are live again for what was asked ({asked.nodes} nodes, {asked.sharding})"
        event = new_event(view, "restored", why)
        self.asked.pop(view.instance_id, None)

        def place_asked() -> tuple[str, Placement]:
            new_id, chosen = self.service.place(
                asked.model,
                asked.sharding,
                asked.nodes,
                1,
                asked.dtype,
                True,
                asked.prefix_cache_bytes,
                asked.draft,
                asked.draft_dtype,
            )
            return new_id, chosen.placement

        try:
            new_id, placement = place_asked()
            self.retiring.add(view.instance_id)
        except PlacementError:  # not beside it: in its place (it is idle)
            self.unload(view)
            try:
                new_id, placement = place_asked()
            except ExoctlError as exc:  # the smaller shape again, rather than nothing
                self._record(replace(event, action="not restored", error=exc.message))
                again, _ = self.service.place(
                    asked.model,
                    view.sharding,
                    len(view.nodes),
                    1,
                    view.dtype,
                    True,
                    asked.prefix_cache_bytes,
                    asked.draft,
                    asked.draft_dtype,
                )
                self.asked[again] = asked
                self.restore_at[again] = time.monotonic() + self._flapped(asked)
                return
        except ExoctlError as exc:  # the smaller instance still serves: try again later
            self.asked[view.instance_id] = asked
            self.restore_at[view.instance_id] = time.monotonic() + self._flapped(asked)
            self._record(replace(event, action="not restored", error=exc.message))
            return
        self._record(replace(event, new_instance_id=new_id, nodes=tuple(placement.nodes)))

    def _record(self, event: SupervisorEvent, why: str = "") -> None:
        """Log `event`, keep it for /state and on the live nodes, so `exoctl state` shows the
        history (from any machine, and after this server restarts)."""
        where = (
            f" as {event.new_instance_id} on {', '.join(event.nodes)}" if event.nodes else f": {event.error}"
        )
        log.warning(
            "instance %s of %s%s: %s%s",
            event.instance_id,
            event.model_id,
            f" {why}" if why else "",
            event.action,
            where,
        )
        self.events.append(event)
        del self.events[:-50]
        try:
            live = [s.node for s in self.service.statuses() if s.up]
            with self.service.cluster() as cluster:
                cluster.ask_all(Record(event), live)
        except ExoctlError as exc:  # the history is a record, not a reason to stop
            log.warning("could not record event %s on the nodes: %s", event.id, exc.message)


def new_event(view: InstanceView, action: str, reason: str | None) -> SupervisorEvent:
    return SupervisorEvent(uuid.uuid4().hex, time.time(), view.instance_id, view.model_id, action, reason)


def smaller(placement: Placement, asked: Asked) -> bool:
    """Whether a placement is less than what was asked: fewer nodes, or another sharding."""
    other_sharding = asked.sharding.lower() not in ("auto", placement.sharding)
    return len(placement.nodes) < asked.nodes or other_sharding
