"""The API's one error body, built here and nowhere else: every failure is a PipeserveError
(common/errors.py) whose reason maps once to the HTTP status (HTTP_STATUS), rendered as the
OpenAI-style `{"error": {"message", "type", "code", "param", "status", "part", "node",
"retry_after_s"}}` with `Retry-After` when waiting helps. `from_rpc` turns a failed gRPC call back
into the domain exception its status details carry. Routes and clients raise; they never build
error responses. SSE streams send the same body as a `data:` event once the status line has gone.
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

from pipeserve.common.errors import PipeserveError, Reason
from pipeserve.common.grpc_util import remote_error

log = logging.getLogger(__name__)

HTTP_STATUS: dict[Reason, int] = {
    Reason.INVALID_PARAMETER: 400,
    Reason.CONTEXT_LENGTH_EXCEEDED: 400,
    Reason.MODEL_REFUSED: 400,
    Reason.UNAUTHORIZED: 401,
    Reason.NOT_FOUND: 404,
    Reason.UNKNOWN_REQUEST: 404,
    Reason.METHOD_NOT_ALLOWED: 405,
    Reason.REQUEST_TOO_LARGE: 413,
    Reason.SCHEMA_VIOLATION: 422,
    Reason.QUEUE_FULL: 429,
    Reason.CLIENT_CLOSED: 499,
    Reason.INTERNAL: 500,
    Reason.UPSTREAM_ERROR: 502,
    Reason.STAGE_UNAVAILABLE: 503,
    Reason.SERVICE_UNAVAILABLE: 503,
    Reason.CACHE_EXHAUSTED: 503,
    Reason.TIMEOUT: 504,
}

# OpenAI's `type` for each status.
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

# An HTTPException's status (routing, the body limit) as a reason.
REASON_OF_STATUS = {
    400: Reason.INVALID_PARAMETER,
    401: Reason.UNAUTHORIZED,
    404: Reason.NOT_FOUND,
    405: Reason.METHOD_NOT_ALLOWED,
    413: Reason.REQUEST_TOO_LARGE,
    422: Reason.SCHEMA_VIOLATION,
}

DEFAULT_RETRY_AFTER_S = 1

# The coordinator names GenerateRequest's fields; an endpoint's body may call them otherwise.
BODY_FIELDS: dict[str, dict[str, str]] = {
    "/v1/chat/completions": {"prompt": "messages"},
    "/api/model/process": {"prompt": "text", "messages": "text"},
}


def http_status(err: PipeserveError) -> int:
    return HTTP_STATUS[err.reason]


def retry_after_s(err: PipeserveError) -> int | None:
    """Whole seconds to wait before retrying (the Retry-After header's value), None when waiting
    does not help. Rounded up: retrying early would only fail again."""
    if err.retry_after_s is not None:
        return max(1, math.ceil(err.retry_after_s))
    if err.reason in (Reason.QUEUE_FULL, Reason.CACHE_EXHAUSTED):
        return DEFAULT_RETRY_AFTER_S
    return None


def error_body(err: PipeserveError) -> dict[str, Any]:
    status = http_status(err)
    return {
        "error": {
            "message": err.message,
            "type": ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "upstream_error"),
            "code": err.reason.value,
            "param": err.param,
            "status": status,
            "part": err.part,
            "node": err.node,
            "retry_after_s": retry_after_s(err),
        }
    }


def error_response(err: PipeserveError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    out = dict(headers or {})
    if (wait := retry_after_s(err)) is not None:
        out["Retry-After"] = str(wait)
    return JSONResponse(error_body(err), status_code=http_status(err), headers=out)


def in_body_terms(err: PipeserveError, endpoint: str) -> PipeserveError:
    """Rename `param` from the coordinator's field name to the one the endpoint's body uses."""
    if err.param is not None:
        err.param = BODY_FIELDS.get(endpoint, {}).get(err.param, err.param)
    return err


# A failed gRPC call to a service, as the domain exception it carries (common/grpc_util.py).
from_rpc = remote_error


def describe_validation(exc: RequestValidationError) -> PipeserveError:
    """`metadata.type: Input should be 'text_generation' or 'chat' (got 'x')`, one per problem;
    `param` is the first field named."""
    parts, fields = [], []
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        field = ".".join(loc) if loc and err.get("type") != "json_invalid" else ""
        msg = str(err.get("msg", "invalid"))
        got = err.get("input")
        if err.get("type") != "missing" and isinstance(got, str | int | float | bool):
            msg += f" (got {_short(got)})"
        parts.append(f"{field or 'body'}: {msg}")
        fields.append(field)
    return PipeserveError(
        "; ".join(parts) or "the request body is invalid",
        reason=Reason.SCHEMA_VIOLATION,
        param=next((f for f in fields if f), None),
    )


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def install_handlers(app: FastAPI) -> None:
    async def on_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, PipeserveError)
        if http_status(exc) >= 500:
            log.warning(
                "%s %s failed: %s", request.method, request.url.path, exc, extra={"reason": exc.reason}
            )
        return error_response(exc)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        reason = REASON_OF_STATUS.get(exc.status_code, Reason.INTERNAL)
        message = str(exc.detail)
        where = f"{request.method} {request.url.path}"
        if reason == Reason.NOT_FOUND and message == "Not Found":
            message = f"no such endpoint: {where} (see /docs)"
        elif reason == Reason.METHOD_NOT_ALLOWED and message == "Method Not Allowed":
            allowed = (exc.headers or {}).get("Allow") or (exc.headers or {}).get("allow") or "another method"
            message = f"{where} is not allowed: use {allowed}"
        return error_response(PipeserveError(message, reason=reason), exc.headers)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        return error_response(describe_validation(exc))

    async def on_rpc(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, grpc.aio.AioRpcError)  # the clients convert theirs; this is a stray
        return error_response(from_rpc(exc, "upstream service", "?"))

    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(PipeserveError(f"internal error in the API: {type(exc).__name__}: {exc}"))

    app.add_exception_handler(PipeserveError, on_error)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(grpc.aio.AioRpcError, on_rpc)
    app.add_exception_handler(Exception, on_bug)
