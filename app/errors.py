"""One error shape for every failure: ``{"error": {"code", "message"}}`` with the right HTTP status."""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.requests import ClientDisconnect

from rmt_service.faults import NO_SPACE_MESSAGE, disk_full

log = logging.getLogger(__name__)


class ApiError(Exception):
    """Raised anywhere in a request; rendered as the error body with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found",
               405: "method_not_allowed", 409: "conflict", 413: "payload_too_large",
               415: "unsupported_media_type", 422: "invalid_request", 429: "too_many_requests",
               503: "unavailable", 507: "insufficient_storage"}


def _field(loc: tuple) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header", "form")]
    return ".".join(parts) or "request"


async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return error_response(exc.status, exc.code, exc.message, exc.headers)


async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
    message = f"{_field(tuple(first.get('loc', ())))}: {first.get('msg', 'invalid')}"
    if len(exc.errors()) > 1:
        message += f" (and {len(exc.errors()) - 1} more)"
    return error_response(422, "invalid_request", message)


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path. Starlette's 405 names only the first route whose path
    matched, and GET /v1/jobs/{id} and DELETE /v1/jobs/{id} are two routes."""
    methods: set[str] = set()
    for route in request.app.router.routes:
        if route.matches({**request.scope, "method": "NO-SUCH-METHOD"})[0] == Match.FULL:
            continue  # a mount answers every method itself
        methods |= {m for m in _METHODS if route.matches({**request.scope, "method": m})[0] == Match.FULL}
    return sorted(methods)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else "request failed"
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 404 and detail == "Not Found":
        detail = "no such route; see /docs"
    if exc.status_code == 405:
        methods = allowed_methods(request)
        headers["Allow"] = ", ".join(methods)
        detail = f"{request.method} is not served here; allowed: {', '.join(methods)}"
    return error_response(exc.status_code, _HTTP_CODES.get(exc.status_code, "error"), detail, headers or None)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal", "internal server error; the server log has the details")


def no_space_error() -> ApiError:
    return ApiError(507, "no_space", f"{NO_SPACE_MESSAGE}; nothing was stored. Retry once the operator has "
                                     "freed space", headers={"Retry-After": "60"})


async def _os_error(request: Request, exc: OSError) -> JSONResponse:
    """A full disk answers 507 (the create stored nothing); any other OSError is an internal error."""
    if disk_full(exc):
        log.error("no space left on the data volume during %s %s", request.method, request.url.path, exc_info=exc)
        return await _api_error(request, no_space_error())
    return await _unexpected(request, exc)


def upload_interrupted() -> ApiError:
    return ApiError(503, "upload_interrupted", "the upload was cut off before it was complete (the connection "
                                               "dropped or the server is restarting); nothing was stored, retry",
                    headers={"Retry-After": "5"})


async def _client_disconnect(request: Request, _: ClientDisconnect) -> JSONResponse:
    """The body stopped arriving: a retryable 503, never a misleading 4xx about the truncated content."""
    log.info("request body cut off: %s %s", request.method, request.url.path)
    return await _api_error(request, upload_interrupted())


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(OSError, _os_error)
    app.add_exception_handler(ClientDisconnect, _client_disconnect)
    app.add_exception_handler(Exception, _unexpected)
