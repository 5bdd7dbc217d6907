"""The static YAML inventory of nodes, and where to find it.

Found by `--inventory PATH`, then `$EXOCTL_INVENTORY`, then `./cluster.yaml`; with none, the
embedded default is a local cluster of worker processes on 127.0.0.1. Every problem in a file
is reported at once, each naming the file, the node and the field.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from exoctl.cpu_policy import ACTIVATION_CHOICES
from exoctl.errors import ExoctlError
from exoctl.paths import exoctl_home

DEFAULT_PORT = 52416
DEFAULT_INVENTORY_NAME = "cluster.yaml"
DEVICES = ("cpu", "cuda")


class InventoryError(ExoctlError):
    """An inventory file that cannot be used; `problems` lists each one."""

    def __init__(self, source: str, problems: list[str]) -> None:
        count = f"{len(problems)} problem{'s' if len(problems) > 1 else ''}"
        super().__init__(
            f"{count} in {source}:\n" + "\n".join(f"  - {p}" for p in problems),
            hint="fix the inventory (cluster.example.yaml documents every field)",
        )
        self.problems = problems


@dataclass(frozen=True)
class Node:
    name: str
    host: str
    port: int = DEFAULT_PORT
    ssh_user: str | None = None
    ssh_port: int = 22
    ssh_identity: str | None = None
    ssh_config: str | None = None  # passed to ssh as -F
    command: str = "exoctl"
    work_dir: str = "~/.cache/exoctl"
    model_dir: str = "~/models"
    device: str = "cpu"
    memory_gb: float | None = None
    threads: int | None = None  # torch threads of the node's worker (default: its cores, shared
    # among the workers of this machine for local ones); fewer for a node that runs other work
    activations: str | None = None  # bfloat16 or float32 forces what `auto`/int8/int4 compute in
    # on this node; auto (the default) chooses by its CPU (see exoctl.cpu_policy)
    prefix_cache_gb: float | None = None  # GB this node gives each instance's cached prefixes (0:
    # none); default: the KV of PREFIX_CACHE_TOKENS positions of its part of the model

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    @property
    def uses_ssh(self) -> bool:
        """Remote hosts, and loopback nodes given any ssh setting, are started over ssh."""
        ssh_set = bool(self.ssh_user or self.ssh_identity or self.ssh_config) or self.ssh_port != 22
        return ssh_set or not self.is_loopback

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Inventory:
    name: str
    nodes: tuple[Node, ...]
    source: str  # the file, or "embedded default"

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        known = ", ".join(n.name for n in self.nodes)
        raise ExoctlError(f"no node named {name!r} in {self.source}", hint=f"the nodes are: {known}")


NODE_FIELDS = {f.name: f for f in fields(Node)}
DEFAULTABLE = set(NODE_FIELDS) - {"name", "host"}
TOP_LEVEL = {"cluster", "defaults", "nodes"}


def _check_field(key: str, value: Any, where: str, problems: list[str]) -> Any:
    """The value converted to the field's type, or None with a problem recorded."""
    if key in ("port", "ssh_port"):
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
            problems.append(f"{where}: field '{key}' must be a port number from 1 to 65535, got {value!r}")
            return None
        return value
    if key == "threads":
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1024:
            problems.append(
                f"{where}: field 'threads' must be a whole number of threads from 1 to 1024, got {value!r}"
            )
            return None
        return value
    if key == "activations":
        if value not in ACTIVATION_CHOICES:
            choices = ", ".join(ACTIVATION_CHOICES)
            problems.append(f"{where}: field 'activations' must be one of {choices}, got {value!r}")
            return None
        return value
    if key == "prefix_cache_gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
            problems.append(
                f"{where}: field 'prefix_cache_gb' must be a number of GB, 0 or more (0 turns the "
                f"prefix cache off), got {value!r}"
            )
            return None
        return float(value)
    if key == "memory_gb":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            problems.append(f"{where}: field 'memory_gb' must be a positive number of GB, got {value!r}")
            return None
        return float(value)
    if key == "device":
        if value not in DEVICES:
            problems.append(f"{where}: field 'device' must be one of {', '.join(DEVICES)}, got {value!r}")
            return None
        return value
    if not isinstance(value, (str, int)) or isinstance(value, bool) or str(value).strip() == "":
        problems.append(f"{where}: field '{key}' must be a non-empty string, got {value!r}")
        return None
    return str(value)


def parse_inventory(data: Any, source: str) -> Inventory:
    problems: list[str] = []
    if not isinstance(data, dict):
        raise InventoryError(source, ["the file must be a mapping with 'cluster', 'defaults' and 'nodes'"])
    for key in sorted(set(data) - TOP_LEVEL):
        problems.append(f"unknown top-level key {key!r} (expected cluster, defaults, nodes)")
    name = str(data.get("cluster") or Path(source).stem)

    defaults: dict[str, Any] = {}
    raw_defaults = data.get("defaults") or {}
    if not isinstance(raw_defaults, dict):
        problems.append("'defaults' must be a mapping of node fields")
        raw_defaults = {}
    for key, value in raw_defaults.items():
        if key not in DEFAULTABLE:
            problems.append(f"defaults: unknown field {key!r}")
            continue
        checked = _check_field(key, value, "defaults", problems)
        if checked is not None:
            defaults[key] = checked

    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, list) or not raw_nodes:
        problems.append("'nodes' must be a non-empty list of nodes")
        raw_nodes = []
    nodes: list[Node] = []
    seen_names: dict[str, int] = {}
    seen_addresses: dict[str, str] = {}
    for index, raw in enumerate(raw_nodes):
        label = f"node {index + 1}"
        if not isinstance(raw, dict):
            problems.append(f"{label}: must be a mapping with at least 'name' and 'host'")
            continue
        if isinstance(raw.get("name"), str) and raw["name"].strip():
            label = f"node {raw['name']!r}"
        values = dict(defaults)
        ok = True
        for key, value in raw.items():
            if key not in NODE_FIELDS:
                problems.append(f"{label}: unknown field {key!r}")
                ok = False
                continue
            checked = _check_field(key, value, label, problems)
            if checked is None:
                ok = False
            else:
                values[key] = checked
        for required in ("name", "host"):
            if required not in raw:
                problems.append(f"{label}: missing field '{required}'")
                ok = False
        if not ok:
            continue
        node = Node(**values)
        if node.name in seen_names:
            problems.append(f"{label}: duplicate node name (also node {seen_names[node.name]})")
            continue
        if node.address in seen_addresses:
            other = seen_addresses[node.address]
            problems.append(f"{label}: duplicate address {node.address} (also node {other!r})")
            continue
        seen_names[node.name] = index + 1
        seen_addresses[node.address] = node.name
        nodes.append(node)
    if problems:
        raise InventoryError(source, problems)
    return Inventory(name, tuple(nodes), source)


def load_inventory_file(path: Path) -> Inventory:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ExoctlError(f"cannot read inventory {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        byte = exc.object[exc.start]
        raise InventoryError(
            str(path), [f"not UTF-8 text: byte {exc.start} is {byte:#04x}; save it as UTF-8"]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise InventoryError(str(path), [f"not valid YAML{where}: {problem}"]) from None
    return parse_inventory(data, str(path))


def local_inventory(
    count: int = 2,
    base_port: int = DEFAULT_PORT,
    host: str = "127.0.0.1",
    model_dir: str | None = None,
    threads: int | None = None,
    activations: str | None = None,
    prefix_cache_gb: float | None = None,
) -> Inventory:
    """The embedded default: `count` worker processes on this machine, run by this Python."""
    if count < 1:
        raise ExoctlError(f"--local must be at least 1, got {count}")
    if threads is not None and threads < 1:
        raise ExoctlError(f"--threads must be at least 1, got {threads}")
    if prefix_cache_gb is not None and prefix_cache_gb < 0:
        raise ExoctlError(f"--prefix-cache-gb must be 0 or more, got {prefix_cache_gb:g}")
    if not 1 <= base_port <= 65535 - count:
        raise ExoctlError(f"--base-port must leave room for {count} ports below 65536, got {base_port}")
    common: dict[str, Any] = {
        "command": f"{shlex.quote(sys.executable)} -m exoctl",
        "work_dir": str(exoctl_home()),
    }
    if model_dir:
        common["model_dir"] = model_dir
    if threads is not None:
        common["threads"] = threads
    if activations is not None:
        common["activations"] = activations
    if prefix_cache_gb is not None:
        common["prefix_cache_gb"] = prefix_cache_gb
    nodes = tuple(Node(name=f"local{i + 1}", host=host, port=base_port + i, **common) for i in range(count))
    return Inventory("local", nodes, "embedded default")


def local_inventory_path() -> Path:
    """Where `exoctl up --local` writes the inventory it made, for later commands to find."""
    return exoctl_home() / "local-cluster.yaml"


def write_local_inventory(inventory: Inventory) -> Path:
    path = local_inventory_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    keep = (
        "name",
        "host",
        "port",
        "command",
        "work_dir",
        "model_dir",
        "threads",
        "activations",
        "prefix_cache_gb",
    )
    data = {
        "cluster": inventory.name,
        "nodes": [{k: getattr(n, k) for k in keep if getattr(n, k) is not None} for n in inventory.nodes],
    }
    header = "# written by `exoctl up --local`; `exoctl down` leaves it, `exoctl up --local N` rewrites it\n"
    path.write_text(header + yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def load_inventory(explicit: str | None = None) -> Inventory:
    """The inventory in force: a file found by the lookup order, the one `up --local` wrote, or
    the embedded default of two local workers."""
    path = find_inventory_path(explicit)
    if path is not None:
        return load_inventory_file(path)
    local = local_inventory_path()
    if local.is_file():
        return load_inventory_file(local)
    return local_inventory()


def find_inventory_path(explicit: str | None, cwd: Path | None = None) -> Path | None:
    """`--inventory`, then `$EXOCTL_INVENTORY`, then `./cluster.yaml`; None means the embedded default."""
    for candidate, origin in (
        (explicit, "--inventory"),
        (os.environ.get("EXOCTL_INVENTORY"), "$EXOCTL_INVENTORY"),
    ):
        if candidate:
            path = Path(candidate).expanduser()
            if not path.is_file():
                raise ExoctlError(f"{origin} names {path}, which is not a file")
            return path
    local = (cwd or Path.cwd()) / DEFAULT_INVENTORY_NAME
    return local if local.is_file() else None
