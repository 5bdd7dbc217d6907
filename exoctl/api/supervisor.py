"""`serve`'s supervisor: an instance that lost a node is placed again on the live nodes.

Every few seconds it reads the cluster; an instance whose runners declared a node lost (their
failure names the lost node: it stopped answering their heartbeats, or restarted) is unloaded
from the nodes that still hold a part of it and placed again with the same model, sharding and
dtype on the live nodes, when their memory allows (reformation). A node that comes back is simply
live again: the next placement may use it.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from exoctl.api.service import ClusterService
from exoctl.cluster.views import InstanceView, instances_of
from exoctl.errors import ExoctlError

log = logging.getLogger("exoctl.serve")


class Supervisor:
    def __init__(self, service: ClusterService, interval_s: float = 2.0) -> None:
        self.service = service
        self.interval_s = interval_s
        self.events = service.events  # what it did, newest last (shown in /state)
        # an instance is placed again only if it once served, and only once: a failed placement
        # is final (its caller got the error), and the leftovers of one placed again (a node that
        # was frozen, back with a stale runner) are unloaded, not placed a second time
        self.served: set[str] = set()
        self.reformed: set[str] = set()
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
        views = instances_of(self.service.statuses())
        for view in views.values():
            record = self.service.loads.get(view.instance_id)
            if view.serving or (record is not None and record.status == "ready"):
                self.served.add(view.instance_id)
            if view.lost_node is None or view.instance_id not in self.served:
                continue
            if view.instance_id in self.reformed:
                self.unload(view)
            else:
                self.reform(view)
        self.served &= set(views)
        self.reformed &= set(views)

    def unload(self, view: InstanceView) -> None:
        with self.service.cluster() as cluster:
            cluster.unload(view.instance_id, [cluster.inventory.node(n) for n in view.runners])

    def reform(self, view: InstanceView) -> None:
        record = self.service.loads.get(view.instance_id)
        model = record.ref if record is not None else view.model_id
        # as it was asked: an auto placement is chosen afresh for the nodes that are left
        sharding = record.sharding if record is not None else view.sharding
        self.reformed.add(view.instance_id)
        self.unload(view)
        self.service.loads.pop(view.instance_id, None)
        event: dict[str, Any] = {
            "time": time.time(),
            "instanceId": view.instance_id,
            "modelId": view.model_id,
            "reason": view.failure,
        }
        try:
            new_id, chosen = self.service.place(model, sharding, None, 1, view.dtype, wait=True)
            placement = chosen.placement
            event.update(action="replaced", newInstanceId=new_id, nodes=list(placement.nodes))
            log.warning(
                "instance %s of %s lost a node (%s): placed again as %s on %s",
                view.instance_id,
                view.model_id,
                view.failure,
                new_id,
                ", ".join(placement.nodes),
            )
        except ExoctlError as exc:
            event.update(action="not replaced", error=exc.message)
            log.warning(
                "instance %s of %s lost a node and cannot be placed again: %s",
                view.instance_id,
                view.model_id,
                exc.message,
            )
        self.events.append(event)
        del self.events[:-50]
