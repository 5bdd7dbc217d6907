"""Errors as HTTP answers: OpenAI's envelope `{"error": {"message", "type", "param", "code"}}`,
with the status each kind of `ExoctlError` maps to."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse

from exoctl.api.service import Forbidden, NotFound, NotPlacedError
from exoctl.cluster.views import NoNodeUpError
from exoctl.errors import ExoctlError, InvalidRequestError, ModelNotFoundError
from exoctl.placement.pipeline import PlacementError
from exoctl.placement.sharding import UnknownShardingError
from exoctl.transport import NodeError

# ExoctlError subclasses -> (HTTP status, OpenAI error type)
ERROR_STATUS: list[tuple[type[ExoctlError], int, str]] = [
    (NotPlacedError, 404, "not_found_error"),
    (Forbidden, 403, "permission_error"),
    (ModelNotFoundError, 404, "not_found_error"),
    (NotFound, 404, "not_found_error"),
    (InvalidRequestError, 400, "invalid_request_error"),
    (UnknownShardingError, 400, "invalid_request_error"),
    (PlacementError, 409, "placement_error"),
    (NodeError, 503, "server_error"),
    (NoNodeUpError, 503, "server_error"),
]


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def classify(exc: ExoctlError) -> tuple[int, str]:
    for cls, status, kind in ERROR_STATUS:
        if isinstance(exc, cls):
            return status, kind
    return 500, "server_error"


def exoctl_error_response(exc: ExoctlError) -> JSONResponse:
    status, kind = classify(exc)
    message = exc.message + (f" ({exc.hint})" if exc.hint else "")
    return JSONResponse(error_body(message, kind, code=type(exc).__name__), status_code=status)
