"""Whether a value read off the wire is of a dataclass field's declared type (the annotation as
`from __future__ import annotations` leaves it: a string). For the typed reports a worker sends,
checked once where they are decoded. Torch-free."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from exoctl.wire.protocol import ProtocolError


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def fits(value: object, annotation: str) -> bool:
    match annotation:
        case "str":
            return isinstance(value, str)
        case "str | None":
            return value is None or isinstance(value, str)
        case "int":
            return _is_int(value)
        case "float":
            return _is_int(value) or isinstance(value, float)
        case "bool":
            return isinstance(value, bool)
        case "tuple[float, ...]":
            return isinstance(value, list) and all(_is_int(x) or isinstance(x, float) for x in value)
    raise AssertionError(f"no check for {annotation}")


def checked_fields(cls: type, raw: Any, what: str, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The fields of dataclass `cls` read from the map `raw`, each checked against its type;
    ProtocolError naming `what` and the field otherwise."""
    if not isinstance(raw, dict):
        raise ProtocolError(f"{what} must be a map")
    values: dict[str, Any] = {}
    for f in fields(cls):
        if f.name in skip:
            continue
        value = raw.get(f.name)
        if not fits(value, str(f.type)):
            raise ProtocolError(f"{what} field '{f.name}' must be {f.type}, got {value!r:.40}")
        values[f.name] = value
    return values
