"""What the cluster commands share: the inventory option, opening the cluster, finding instances."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from exoctl.catalog import DEFAULT_MODEL_ID, find_card
from exoctl.errors import ExoctlError, ModelNotFoundError

if TYPE_CHECKING:
    from exoctl.cluster.client import Cluster, InstanceView, NodeStatus

InventoryOption = Annotated[
    str | None,
    typer.Option(
        "--inventory",
        "-i",
        help="Inventory YAML (else $EXOCTL_INVENTORY, ./cluster.yaml, the local cluster `up --local` made).",
    ),
]


def open_cluster(inventory: str | None) -> Cluster:
    """The inventory in force and a client for it, with the cluster key when there is one."""
    from exoctl.cluster.client import Cluster
    from exoctl.inventory import load_inventory
    from exoctl.keys import find_keys

    return Cluster(load_inventory(inventory), find_keys())


def model_matches(view_model_id: str, model: str) -> bool:
    if view_model_id == model:
        return True
    card = find_card(model)
    if card is not None:
        return card.id == view_model_id
    from pathlib import Path

    return Path(model).expanduser().name == view_model_id


def find_instance(
    cluster: Cluster, model: str | None, statuses: list[NodeStatus] | None = None
) -> InstanceView | None:
    """The ready instance serving `model` (or the only ready instance when no model is given)."""
    from exoctl.cluster.client import instances_of

    statuses = statuses if statuses is not None else cluster.statuses()
    views = [v for v in instances_of(statuses).values() if v.status in ("ready", "running")]
    if model is None:
        if len(views) == 1:
            return views[0]
        model = DEFAULT_MODEL_ID
    for view in views:
        if view.instance_id == model or model_matches(view.model_id, model):
            return view
    return None


def ensure_instance(
    cluster: Cluster, model: str | None, dtype: str, say: Callable[[str], None]
) -> InstanceView:
    """The instance for `model`, placing it with the defaults first (and saying so) if needed."""
    from exoctl.cluster.client import resolve_card, runtime_dtype
    from exoctl.placement import PlacementRequest

    statuses = cluster.statuses()
    view = find_instance(cluster, model, statuses)
    if view is not None:
        return view
    model = model or DEFAULT_MODEL_ID
    card, ref = resolve_card(model)
    request = PlacementRequest(dtype=runtime_dtype(dtype, statuses))
    chosen = cluster.choose(card, request, statuses, "auto")
    say(f"{card.id} is not placed: placing it with the defaults ({chosen.placement.dtype}; {chosen.reason})…")
    cluster.load(card, ref, chosen.placement)
    view = find_instance(cluster, card.id)
    if view is None:
        raise ModelNotFoundError(f"{card.id} was placed but no ready instance answers")
    return view


def complete_model(incomplete: str) -> list[str]:
    """Shell completion: catalog ids."""
    from exoctl.catalog import load_catalog

    return [card.id for card in load_catalog() if card.id.startswith(incomplete)]


def complete_node(incomplete: str) -> list[str]:
    """Shell completion: node names of the inventory in force (none if it cannot be read)."""
    from exoctl.inventory import load_inventory

    try:
        return [n.name for n in load_inventory().nodes if n.name.startswith(incomplete)]
    except ExoctlError:
        return []


RUNTIME_DTYPES = ("auto", "float32", "bfloat16")


def check_request(model: str | None, dtype: str) -> None:
    """Errors found without asking the cluster: an unknown model or dtype."""
    import re

    from exoctl.cluster.client import resolve_card

    if dtype not in RUNTIME_DTYPES:
        raise ExoctlError(f"dtype {dtype!r} is not supported", hint=f"use one of {', '.join(RUNTIME_DTYPES)}")
    if model is not None and not re.fullmatch(r"[0-9a-f-]{8,36}", model):  # else an instance id
        resolve_card(model)


def not_running_hint(cluster: Cluster) -> ExoctlError:
    return ExoctlError(
        f"no worker of cluster {cluster.inventory.name!r} answers ({cluster.inventory.source})",
        hint="start them with `exoctl up` (or `exoctl up --local 2` for a local cluster)",
    )
