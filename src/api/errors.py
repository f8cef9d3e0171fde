"""The API's one error body, `{"error": {"message", "type", "code"}}` (OpenAI style), built here
and nowhere else: ApiError, the mapping of upstream gRPC failures to HTTP statuses (`from_rpc`),
and the FastAPI exception handlers. Routes and clients raise; they never build error responses.
SSE streams send the same body as a `data:` event once the status line has gone out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    499: "client_closed_request",
    500: "internal_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "timeout_error",
}

DEFAULT_RETRY_AFTER_S = 1


class ApiError(Exception):
    """An error with its HTTP status; the handlers render it as the one error body."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = dict(headers or {})

    def payload(self) -> dict[str, Any]:
        return error_payload(self.status, self.message)


def error_payload(status: int, message: str) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "upstream_error")
    return {"error": {"message": message, "type": kind, "code": status}}


def error_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_payload(status, message), status_code=status, headers=dict(headers or {}))


def retry_after_s(metadata: Any) -> int:
    """The coordinator's `retry-after` trailer (seconds, may be fractional) rounded up."""
    for key, value in metadata or ():
        if key == "retry-after":
            try:
                return max(1, math.ceil(float(value)))
            except ValueError:
                break
    return DEFAULT_RETRY_AFTER_S


def from_rpc(
    exc: grpc.aio.AioRpcError,
    service: str,
    address: str,
    *,
    reachable: bool = True,
    timeout_s: float | None = None,
) -> ApiError:
    """Map a failed gRPC call to the HTTP status a client can act on.

    `reachable` is False when the channel had no connection after the failure: then an
    UNAVAILABLE came from the transport (the service is down), not from the service itself
    (which names the part that is down)."""
    code, details = exc.code(), exc.details() or exc.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return ApiError(400, details)
    if code == grpc.StatusCode.NOT_FOUND:
        return ApiError(404, details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return ApiError(429, details, {"Retry-After": str(retry_after_s(exc.trailing_metadata()))})
    if code == grpc.StatusCode.UNAVAILABLE:
        return ApiError(
            503, details if reachable else f"the {service} at {address} is unreachable: {details}"
        )
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        within = f" within {timeout_s:g} s" if timeout_s is not None else " in time"
        return ApiError(504, f"the {service} at {address} did not finish the request{within} ({details})")
    return ApiError(502, f"the {service} at {address} failed with {code.name}: {details}")


def describe_validation(exc: RequestValidationError) -> str:
    """`metadata.type: Input should be 'text_generation' or 'chat' (got 'x')`, one per problem."""
    parts = []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) or "body"
        msg = str(err.get("msg", "invalid"))
        got = err.get("input")
        if err.get("type") != "missing" and isinstance(got, str | int | float | bool):
            msg += f" (got {_short(got)})"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "the request body is invalid"


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return error_response(exc.status, exc.message, exc.headers)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(exc.status_code, str(exc.detail), exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(422, describe_validation(exc))

    async def on_rpc(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, grpc.aio.AioRpcError)
        err = from_rpc(exc, "upstream service", "?")
        return error_response(err.status, err.message, err.headers)

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"internal error in the API: {type(exc).__name__}: {exc}")

    app.add_exception_handler(ApiError, on_api_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(grpc.aio.AioRpcError, on_rpc)
    app.add_exception_handler(Exception, on_bug)
