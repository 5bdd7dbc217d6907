"""Every error `serve` answers, in OpenAI's envelope (`errors.error_body`), counted in /metrics by
its type: a request the schema refuses (400), an ExoctlError (its status by class), a route
or method that does not exist (404, 405)."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from exoctl.api.errors import classify, error_body, exoctl_error_response
from exoctl.api.metrics import Metrics
from exoctl.errors import ExoctlError


def install_error_handlers(app: FastAPI, metrics: Metrics) -> None:
    """Every error in OpenAI's envelope, counted in /metrics by its type."""

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        message = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            message, where = "the request body is not valid JSON", ""
        metrics.errors.labels("invalid_request_error").inc()
        text = f"{where}: {message}" if where else message
        return JSONResponse(error_body(text, "invalid_request_error", param=where or None), status_code=400)

    @app.exception_handler(ExoctlError)
    async def exoctl_error(_: Request, exc: ExoctlError) -> JSONResponse:
        metrics.errors.labels(classify(exc)[1]).inc()
        return exoctl_error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = (
                f"no such route: {request.method} {request.url.path[:200]} (the API: /v1/chat/completions, "
                "/v1/models, /state, /instance, /place_instance, /healthz; see the README)"
            )
            return JSONResponse(error_body(message, "not_found_error", code="not_found"), status_code=404)
        if exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path[:200]}"
            body = error_body(message, "invalid_request_error", code="method_not_allowed")
            return JSONResponse(body, status_code=405)
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"), status_code=exc.status_code)
