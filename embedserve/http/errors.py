"""The one place exceptions become HTTP responses, always in OpenAI's error shape.

``{"error": {"message", "type", "param", "code"}}`` with ``Content-Type: application/json``. Validation
failures are 400 (never 422); unexpected faults are a 500 whose message carries no trace or path.
"""

from __future__ import annotations

import logging
import math

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from embedserve.errors import EmbedServeError, Overloaded
from embedserve.protocol import ErrorBody, ErrorDetail, encoder

log = logging.getLogger(__name__)

_HTTP_TYPES = {404: ("invalid_request_error", "not_found"), 405: ("invalid_request_error", "method_not_allowed")}


def error_response(
    status: int, message: str, type_: str, *, param: str | None = None, code: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    body = encoder.encode(ErrorBody(error=ErrorDetail(message=message, type=type_, param=param, code=code)))
    return Response(body, status_code=status, media_type="application/json", headers=headers)


class ClientGone(Exception):
    """The client disconnected before its answer was ready (its queued work is cancelled)."""


async def handle_client_gone(request: Request, exc: Exception) -> Response:
    return Response(status_code=499)  # nobody reads it; uvicorn discards it, the access log and metrics count it


async def handle_embedserve_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, EmbedServeError)
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    if exc.status >= 500:
        log.warning("%s %s -> %d %s", request.method, request.url.path, exc.status, exc.message)
    return error_response(exc.status, exc.message, exc.type, param=exc.param, code=exc.code, headers=headers)


async def handle_http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    type_, code = _HTTP_TYPES.get(exc.status_code, ("invalid_request_error", None))
    if exc.status_code == 404:
        message = f"Unknown route {request.method} {request.url.path}; embeddings are at POST /v1/embeddings"
    else:
        message = f"{request.method} {request.url.path}: {exc.detail}"
    return error_response(exc.status_code, message, type_, code=code, headers=exc.headers)


async def handle_unexpected(request: Request, exc: Exception) -> Response:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_response(500, "The server had an internal error while processing the request.", "server_error",
                          code="internal_error")


EXCEPTION_HANDLERS = {
    ClientGone: handle_client_gone,
    EmbedServeError: handle_embedserve_error,
    HTTPException: handle_http_exception,
    Exception: handle_unexpected,
}
