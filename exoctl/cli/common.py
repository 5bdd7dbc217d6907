"""What the cluster commands share: the inventory option, opening the cluster, finding or placing
the instance to talk to."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer

from exoctl.dtypes import check_dtype
from exoctl.errors import ExoctlError
from exoctl.models.catalog import DEFAULT_MODEL_ID

if TYPE_CHECKING:
    from exoctl.cluster.client import Cluster
    from exoctl.cluster.views import InstanceView, NodeStatus
    from exoctl.models.catalog import ModelCard
    from exoctl.placement.sharding import Plan

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


def plan_for(
    cluster: Cluster,
    statuses: list[NodeStatus],
    card: ModelCard,
    dtype: str,
    sharding: str,
    nodes: int | None = None,
    min_nodes: int = 1,
    prefix_cache_gb: float | None = None,
    draft: str | None = None,
    draft_dtype: str = "auto",
    partials: str = "auto",
) -> Plan:
    """Where `place` would put `card` on these nodes, and why (`auto` dtype resolved for them);
    `draft`: speculative decoding's drafter (`cluster.drafts`)."""
    from exoctl.cluster.drafts import choose_draft
    from exoctl.cluster.views import runtime_dtype
    from exoctl.placement.pipeline import GB, PlacementRequest

    request = PlacementRequest(
        dtype=runtime_dtype(dtype, statuses, card.native_dtype),
        nodes=nodes,
        min_nodes=min_nodes,
        prefix_cache_bytes=None if prefix_cache_gb is None else int(prefix_cache_gb * GB),
        draft=choose_draft(card, draft, draft_dtype),
        partials=partials,
    )
    return cluster.choose(card, request, statuses, sharding)


def ensure_instance(
    cluster: Cluster, statuses: list[NodeStatus], model: str | None, dtype: str, say: Callable[[str], None]
) -> InstanceView:
    """The instance for `model` in this sweep of `statuses`, placing it with the defaults first
    (and saying so) if needed."""
    from exoctl.cluster.views import find_instance
    from exoctl.models.store import resolve_card

    view = find_instance(statuses, model)
    if view is not None:
        return view
    card, ref = resolve_card(model or DEFAULT_MODEL_ID)
    chosen = plan_for(cluster, statuses, card, dtype, "auto")
    say(f"{card.id} is not placed: placing it with the defaults ({chosen.placement.dtype}; {chosen.reason})…")
    return cluster.load(card, ref, chosen.placement)


def suggest_models(incomplete: str) -> list[str]:
    """Shell completion: catalog ids."""
    from exoctl.models.catalog import load_catalog

    return [card.id for card in load_catalog() if card.id.startswith(incomplete)]


def suggest_nodes(incomplete: str) -> list[str]:
    """Shell completion: node names of the inventory in force (none if it cannot be read)."""
    from exoctl.inventory import load_inventory

    try:
        return [n.name for n in load_inventory().nodes if n.name.startswith(incomplete)]
    except ExoctlError:
        return []


def check_request(model: str | None, dtype: str) -> None:
    """Errors found without asking the cluster: an unknown model or dtype."""
    import re

    from exoctl.models.store import hub_reference, resolve_card

    check_dtype(dtype)
    if model is None or re.fullmatch(r"[0-9a-f-]{8,36}", model):  # an instance id
        return
    if hub_reference(model) is not None:  # well formed; its headers are fetched only to place it
        return
    resolve_card(model)


def live_statuses(cluster: Cluster) -> list[NodeStatus]:
    """One sweep of the nodes' statuses, for a command that needs at least one worker up."""
    from exoctl.cluster.views import no_node_up

    statuses = cluster.statuses()
    down = no_node_up(statuses)
    if down is not None:
        refused = [s for s in statuses if s.key_refused]
        if refused:  # they run, but with another key: starting them again is not the fix
            names = ", ".join(s.node.name for s in refused)
            raise ExoctlError(
                f"node{'s' if len(refused) > 1 else ''} {names} refused this machine's cluster key: "
                "the workers run with another key",
                hint="copy the key they were started with into $EXOCTL_HOME/keys here, or stop them "
                "(`exoctl down` stops the workers it started) and `exoctl up` again with this key",
            )
        raise down
    return statuses
