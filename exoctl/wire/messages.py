"""Every message a worker takes or sends, as a frozen type: decoded once where it is received
(`parse`), built where it is sent (`KIND` and `to_fields`), dispatched with `match`.

`protocol` checks the frames and each field's type; `parse` turns the checked `Message` into its
class. `KINDS` is the one place a type name maps to a class. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from exoctl.errors import ExoctlError, error_class
from exoctl.wire import protocol
from exoctl.wire.answer import Completion
from exoctl.wire.download_report import DownloadReport
from exoctl.wire.generate_request import GenerateRequest
from exoctl.wire.instance_messages import DECODERS, InstanceMessage
from exoctl.wire.node_speed import LinkMeasure
from exoctl.wire.protocol import Message, ProtocolError
from exoctl.wire.runner_report import RunnerReport
from exoctl.wire.runner_spec import MAX_WORLD, RunnerSpec, check_address
from exoctl.wire.supervisor_event import SupervisorEvent
from exoctl.wire.worker_profile import WorkerProfile

# --- requests to a worker (each sent with an "id" its reply echoes) --------------------------


@dataclass(frozen=True)
class Ping:
    KIND: ClassVar[str] = "ping"

    def to_fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class StatusRequest:
    KIND: ClassVar[str] = "status"

    def to_fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class Load:
    KIND: ClassVar[str] = "load"
    spec: RunnerSpec

    def to_fields(self) -> dict[str, Any]:
        return self.spec.to_fields()


@dataclass(frozen=True)
class Unload:
    KIND: ClassVar[str] = "unload"
    instance_id: str

    def to_fields(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id}


@dataclass(frozen=True)
class DownloadRequest:
    """Fetch the files of layers [start_layer, end_layer) (all of them for [0, n_layers))."""

    KIND: ClassVar[str] = "download"
    model: str
    start_layer: int
    end_layer: int
    n_layers: int

    def to_fields(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "start_layer": self.start_layer,
            "end_layer": self.end_layer,
            "n_layers": self.n_layers,
        }


@dataclass(frozen=True)
class Record:
    """An event of the supervisor's (a reformation, a restore), kept for `exoctl state`."""

    KIND: ClassVar[str] = "record"
    event: SupervisorEvent

    def to_fields(self) -> dict[str, Any]:
        return {"event": self.event.to_wire()}


@dataclass(frozen=True)
class Generate:
    KIND: ClassVar[str] = "generate"
    request: GenerateRequest

    def to_fields(self) -> dict[str, Any]:
        return self.request.to_fields()


@dataclass(frozen=True)
class Cancel:
    KIND: ClassVar[str] = "cancel"
    request_id: str

    def to_fields(self) -> dict[str, Any]:
        return {"request_id": self.request_id}


@dataclass(frozen=True)
class Alive:
    """The client of a running request, answering the head's keepalive: still reading."""

    KIND: ClassVar[str] = "alive"
    request_id: str

    def to_fields(self) -> dict[str, Any]:
        return {"request_id": self.request_id}


@dataclass(frozen=True)
class Shutdown:
    KIND: ClassVar[str] = "shutdown"

    def to_fields(self) -> dict[str, Any]:
        return {}


@dataclass(frozen=True)
class ProbeLinks:
    """Measure the links from this worker to each of `targets` (node name, address), one after
    another; answered with `LinksReply` once all are measured."""

    KIND: ClassVar[str] = "probe_links"
    targets: tuple[tuple[str, str], ...]

    def to_fields(self) -> dict[str, Any]:
        return {"targets": [list(t) for t in self.targets]}


@dataclass(frozen=True)
class Echo:
    """A probe's frame: answered `Ok` at once; `pad` is the bytes that measure a link's throughput."""

    KIND: ClassVar[str] = "echo"
    pad: bytes = b""

    def to_fields(self) -> dict[str, Any]:
        return {"pad": self.pad}


# --- between workers, beside the instance messages --------------------------------------------


@dataclass(frozen=True)
class TensorHello:
    """A tensor rank's collective address (and shared-memory offer), for the other ranks."""

    KIND: ClassVar[str] = "tp_hello"
    instance_id: str
    rank: int
    address: str
    shm: str | None = None  # "host key|file" where the node has /dev/shm

    def to_fields(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "rank": self.rank, "address": self.address, "shm": self.shm}


@dataclass(frozen=True)
class InstanceFailed:
    """An instance failed on another node (it lost a node): fail it here too."""

    KIND: ClassVar[str] = "fail"
    instance_id: str
    message: str
    lost_node: str | None = None

    def to_fields(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "message": self.message, "lost_node": self.lost_node}


# --- replies -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pong:
    KIND: ClassVar[str] = "pong"
    profile: WorkerProfile

    def to_fields(self) -> dict[str, Any]:
        return {"profile": self.profile.to_wire()}


@dataclass(frozen=True)
class StatusReply:
    KIND: ClassVar[str] = "status_reply"
    profile: WorkerProfile
    runners: tuple[RunnerReport, ...]
    downloads: tuple[DownloadReport, ...]
    events: tuple[SupervisorEvent, ...]

    def to_fields(self) -> dict[str, Any]:
        return {
            "profile": self.profile.to_wire(),
            "runners": [r.to_wire() for r in self.runners],
            "downloads": [d.to_wire() for d in self.downloads],
            "events": [e.to_wire() for e in self.events],
        }


@dataclass(frozen=True)
class Ok:
    KIND: ClassVar[str] = "ok"
    freed: int | None = None  # an unload: the bytes it gave back
    download_id: str | None = None  # a download: the id its progress is reported under

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {}
        if self.freed is not None:
            fields["freed"] = self.freed
        if self.download_id is not None:
            fields["download_id"] = self.download_id
        return fields


@dataclass(frozen=True)
class ErrorReply:
    """A request refused or failed: the error's class travels by name (`errors.error_class`), so
    the client raises the same kind; `node` names a node an instance lost."""

    KIND: ClassVar[str] = "error"
    message: str
    hint: str | None = None
    kind: str = "ExoctlError"
    request_id: str | None = None  # the running request it ends (a `generate`)
    node: str | None = None

    @classmethod
    def of(cls, exc: ExoctlError, request_id: str | None = None, node: str | None = None) -> ErrorReply:
        return cls(exc.message, exc.hint, type(exc).__name__, request_id, node)

    @property
    def error_class(self) -> type[ExoctlError]:
        return error_class(self.kind)

    def to_fields(self) -> dict[str, Any]:
        fields: dict[str, Any] = {"message": self.message, "hint": self.hint, "kind": self.kind}
        if self.request_id is not None:
            fields["request_id"] = self.request_id
        if self.node is not None:
            fields["node"] = self.node
        return fields


@dataclass(frozen=True)
class Delta:
    """A running request's next token: its text (may be empty: held back for a stop string or a
    character's other bytes), its id, and its logprobs entry where asked."""

    KIND: ClassVar[str] = "delta"
    request_id: str
    text: str
    tokens: tuple[int, ...]
    logprobs: tuple[dict[str, Any], ...] = field(default=())

    def to_fields(self) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "text": self.text,
            "tokens": list(self.tokens),
            "logprobs": list(self.logprobs),
        }


@dataclass(frozen=True)
class Done:
    KIND: ClassVar[str] = "done"
    request_id: str
    result: Completion

    def to_fields(self) -> dict[str, Any]:
        return {"request_id": self.request_id, "result": self.result.to_wire()}


@dataclass(frozen=True)
class Keepalive:
    """The head to the client of a running request, every second: it still runs; answer `Alive`."""

    KIND: ClassVar[str] = "keepalive"
    request_id: str

    def to_fields(self) -> dict[str, Any]:
        return {"request_id": self.request_id}


@dataclass(frozen=True)
class LinksReply:
    """What `ProbeLinks` measured: one entry per target that answered."""

    KIND: ClassVar[str] = "links"
    links: tuple[LinkMeasure, ...]

    def to_fields(self) -> dict[str, Any]:
        return {"links": [link.to_wire() for link in self.links]}


Request = (
    Ping
    | StatusRequest
    | Load
    | Unload
    | DownloadRequest
    | Record
    | Generate
    | Cancel
    | Alive
    | Shutdown
    | ProbeLinks
    | Echo
)
BetweenWorkers = TensorHello | InstanceFailed | InstanceMessage
Reply = Pong | StatusReply | Ok | ErrorReply | Delta | Done | Keepalive | LinksReply
WireMessage = Request | BetweenWorkers | Reply
Outgoing = Request | TensorHello | InstanceFailed | Reply


def _error(m: Message) -> ErrorReply:
    kind = m.get("kind", "ExoctlError")
    node = m.get("node")
    request_id = m.get("request_id")
    return ErrorReply(
        m["message"],
        m.get("hint") if isinstance(m.get("hint"), str) else None,
        kind if isinstance(kind, str) else "ExoctlError",
        request_id if isinstance(request_id, str) else None,
        node if isinstance(node, str) else None,
    )


def _status_reply(m: Message) -> StatusReply:
    runners = tuple(RunnerReport.from_wire(r) for r in m["runners"])
    downloads = tuple(DownloadReport.from_wire(d) for d in m["downloads"])
    events = tuple(SupervisorEvent.from_wire(e) for e in m["events"])
    return StatusReply(WorkerProfile.from_wire(m["profile"]), runners, downloads, events)


def _delta(m: Message) -> Delta:
    tokens, logprobs = m["tokens"], m["logprobs"]
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ProtocolError("'delta' tokens must be token ids")
    if not all(isinstance(e, dict) for e in logprobs):
        raise ProtocolError("'delta' logprobs must be a list of entries")
    return Delta(m["request_id"], m["text"], tuple(tokens), tuple(logprobs))


def _hello(m: Message) -> TensorHello:
    shm = m.get("shm")
    if shm is not None and not isinstance(shm, str):
        raise ProtocolError("'tp_hello' field 'shm' must be null or 'host key|file'")
    return TensorHello(m["instance_id"], m["rank"], m["address"], shm)


def _probe(m: Message) -> ProbeLinks:
    targets = m["targets"]
    if not all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in targets):
        raise ProtocolError("'probe_links' targets must be [node name, address] pairs")
    if len(targets) > MAX_WORLD:
        raise ProtocolError(f"'probe_links' names {len(targets)} targets; at most {MAX_WORLD}")
    for _, address in targets:
        check_address(address)
    return ProbeLinks(tuple((t[0], t[1]) for t in targets))


def _ok(m: Message) -> Ok:
    freed, download_id = m.get("freed"), m.get("download_id")
    return Ok(
        freed if isinstance(freed, int) and not isinstance(freed, bool) else None,
        download_id if isinstance(download_id, str) else None,
    )


KINDS: dict[str, Callable[[Message], WireMessage]] = {
    "ping": lambda m: Ping(),
    "status": lambda m: StatusRequest(),
    "load": lambda m: Load(RunnerSpec.from_message(m)),
    "unload": lambda m: Unload(m["instance_id"]),
    "download": lambda m: DownloadRequest(m["model"], m["start_layer"], m["end_layer"], m["n_layers"]),
    "record": lambda m: Record(SupervisorEvent.from_wire(m["event"])),
    "generate": lambda m: Generate(GenerateRequest.from_message(m)),
    "cancel": lambda m: Cancel(m["request_id"]),
    "alive": lambda m: Alive(m["request_id"]),
    "shutdown": lambda m: Shutdown(),
    "probe_links": _probe,
    "echo": lambda m: Echo(m["pad"]),
    "tp_hello": _hello,
    "fail": lambda m: InstanceFailed(m["instance_id"], m["message"], m["lost_node"]),
    **DECODERS,
    "pong": lambda m: Pong(WorkerProfile.from_wire(m["profile"])),
    "status_reply": _status_reply,
    "ok": _ok,
    "error": _error,
    "delta": _delta,
    "done": lambda m: Done(m["request_id"], Completion.from_wire(m["result"])),
    "keepalive": lambda m: Keepalive(m["request_id"]),
    "links": lambda m: LinksReply(tuple(LinkMeasure.from_wire(link) for link in m["links"])),
}


# what a worker's ROUTER takes (requests and messages between workers); the rest are replies
WORKER_TAKES = frozenset(
    kind
    for kind in KINDS
    if kind not in ("pong", "status_reply", "ok", "error", "delta", "done", "keepalive", "links")
)


def frames(message: Outgoing, reply_to: Any = None) -> list[Any]:
    """The frames of a message; `reply_to` is the id of the request it answers, or that its
    answer will echo (None: a running request's message, matched by its request id)."""
    fields = message.to_fields()
    return protocol.encode(message.KIND, fields if reply_to is None else {"id": reply_to, **fields})


def parse(message: Message, takes: frozenset[str] | None = None, who: str = "a worker") -> WireMessage:
    """A checked protocol message as its class; ProtocolError (or the request's own error, such as
    InvalidRequestError) when a field is wrong beyond its type, or when it is not one of the
    kinds the receiver `takes`."""
    if takes is not None and message.type not in takes:
        raise ProtocolError(f"{who} does not accept '{message.type}' messages")
    decoder = KINDS.get(message.type)
    if decoder is None:  # protocol.decode knows every type; a new one needs its class here
        raise ProtocolError(f"unknown message type {message.type!r}")
    return decoder(message)
