"""gRPC plumbing shared by every server and client: server construction with the standard health
and reflection services, the one interceptor mapping domain exceptions to a status with rich
details (`rich_status`; `abort_with_details` for the asyncio coordinator), the way back from a
failed call to the same domain exception (`error_from_rpc`), channel options, address helpers.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import TYPE_CHECKING, Any, TypeAlias

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from grpc_status import rpc_status

from pipeserve.common.errors import (
    ConfigError,
    ModelFormatError,
    ModelNotFoundError,
    PipeserveError,
    Reason,
    make_error,
)

if TYPE_CHECKING:
    from pipeserve.common.config import Config

log = logging.getLogger(__name__)

DOMAIN = "pipeserve"  # google.rpc.ErrorInfo.domain of every error we raise

# The status code of each reason (the details say which reason exactly).
GRPC_CODE: dict[Reason, grpc.StatusCode] = {
    Reason.INVALID_PARAMETER: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.SCHEMA_VIOLATION: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.CONTEXT_LENGTH_EXCEEDED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.MODEL_REFUSED: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.UNKNOWN_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    Reason.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    Reason.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    Reason.METHOD_NOT_ALLOWED: grpc.StatusCode.UNIMPLEMENTED,
    Reason.REQUEST_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.QUEUE_FULL: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.CACHE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Reason.CLIENT_CLOSED: grpc.StatusCode.CANCELLED,
    Reason.INTERNAL: grpc.StatusCode.INTERNAL,
    Reason.UPSTREAM_ERROR: grpc.StatusCode.INTERNAL,
    Reason.STAGE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    Reason.TIMEOUT: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# What a status without our details (from the transport or another server) most likely means.
REASON_OF_CODE: dict[grpc.StatusCode, Reason] = {
    grpc.StatusCode.INVALID_ARGUMENT: Reason.INVALID_PARAMETER,
    grpc.StatusCode.NOT_FOUND: Reason.NOT_FOUND,
    grpc.StatusCode.UNAVAILABLE: Reason.SERVICE_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Reason.TIMEOUT,
    grpc.StatusCode.CANCELLED: Reason.CLIENT_CLOSED,
}

RpcFailure: TypeAlias = grpc.aio.AioRpcError | grpc.Call  # what a failed call raises (aio, or sync stubs)


def status_for(exc: Exception) -> grpc.StatusCode:
    if not isinstance(exc, PipeserveError):
        return grpc.StatusCode.INTERNAL
    if isinstance(exc, ModelNotFoundError | ModelFormatError | ConfigError):
        return grpc.StatusCode.FAILED_PRECONDITION  # the server cannot serve until it is reconfigured
    return GRPC_CODE[exc.reason]


def rich_status(exc: PipeserveError) -> grpc.Status:
    """The status that carries `exc` as data: ErrorInfo (reason in UPPER_SNAKE_CASE, domain
    "pipeserve", metadata param/part/node), RetryInfo when retry_after_s is set, BadRequest when
    a field is named."""
    code = status_for(exc)
    metadata = {
        k: str(v) for k, v in (("param", exc.param), ("part", exc.part), ("node", exc.node)) if v is not None
    }
    status = status_pb2.Status(code=code.value[0], message=exc.message)
    status.details.add().Pack(
        error_details_pb2.ErrorInfo(reason=exc.reason.upper(), domain=DOMAIN, metadata=metadata)
    )
    if exc.retry_after_s is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(round(exc.retry_after_s * 1e9))
        status.details.add().Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    if exc.param is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=exc.param, description=exc.message)
        status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
    return rpc_status.to_status(status)


def error_from_rpc(exc: RpcFailure, message: str | None = None) -> PipeserveError:
    """The domain exception a failed call carries, with its reason and fields read back from the
    status details; `message` replaces the text. Without our details (the transport failed, or
    another server answered) the reason is the likeliest one for the status code."""
    code = exc.code()
    text = message or exc.details() or code.name
    info, retry, bad = _details(exc)
    if info is None:
        return make_error(REASON_OF_CODE.get(code, Reason.UPSTREAM_ERROR), text)
    try:
        reason = Reason(info.reason.lower())
    except ValueError:
        reason = Reason.UPSTREAM_ERROR  # a newer peer's reason: say what we can
    md = info.metadata
    param = md.get("param") or (bad.field_violations[0].field if bad and bad.field_violations else None)
    part = md.get("part", "")
    return make_error(
        reason,
        text,
        param=param,
        part=int(part) if part.isdigit() else None,
        node=md.get("node"),
        retry_after_s=retry.retry_delay.ToNanoseconds() / 1e9 if retry else None,
    )


def error_reason(exc: BaseException) -> Reason | None:
    """The reason in a failed call's details; None for other exceptions or statuses not ours."""
    if not isinstance(exc, RpcFailure) or _details(exc)[0] is None:
        return None
    return error_from_rpc(exc).reason


def _details(
    exc: RpcFailure,
) -> tuple[
    error_details_pb2.ErrorInfo | None,
    error_details_pb2.RetryInfo | None,
    error_details_pb2.BadRequest | None,
]:
    """Our ErrorInfo (None when the status has none from domain "pipeserve"), RetryInfo, BadRequest."""
    try:
        status = rpc_status.from_call(exc)
    except ValueError:  # details that do not match the status: not ours
        return None, None, None
    info, retry, bad = None, None, None
    for detail in status.details if status is not None else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
        elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
    if info is None or info.domain != DOMAIN:
        return None, None, None
    return info, retry, bad


async def abort_with_details(context: grpc.aio.ServicerContext, exc: PipeserveError) -> None:
    """End an asyncio servicer's call with `exc` as rich status."""
    status = rich_status(exc)
    log.warning("call failed: %s", exc, extra={"code": status.code.name, "reason": exc.reason.value})
    await context.abort(status.code, status.details, trailing_metadata=status.trailing_metadata)


class AsyncErrorInterceptor(grpc.aio.ServerInterceptor):
    """The asyncio server's twin of ErrorInterceptor (the coordinator): an async servicer method
    raises domain exceptions, unary or server-streaming, and this sends each as its rich status; a
    bug is INTERNAL. Synchronous handlers (grpc's health service) pass as they are."""

    async def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = handler_call_details.method

        async def fail(context: grpc.aio.ServicerContext, exc: Exception) -> None:
            if not isinstance(exc, PipeserveError):
                log.exception("%s crashed", method)
                exc = PipeserveError(f"{type(exc).__name__}: {exc}")
            await abort_with_details(context, exc)

        if handler.unary_unary is not None and inspect.iscoroutinefunction(handler.unary_unary):
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner(request, context)
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc)

            return grpc.unary_unary_rpc_method_handler(
                unary,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        if handler.unary_stream is not None and inspect.isasyncgenfunction(handler.unary_stream):
            inner_stream = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    async for msg in inner_stream(request, context):
                        yield msg
                except grpc.aio.AbortError:
                    raise
                except Exception as exc:
                    await fail(context, exc)

            return grpc.unary_stream_rpc_method_handler(
                stream,
                request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer,
            )
        return handler


def channel_options(max_message_mb: int = 64) -> list[tuple[str, Any]]:
    n = max_message_mb * 1024 * 1024
    return [
        ("grpc.max_send_message_length", n),
        ("grpc.max_receive_message_length", n),
        ("grpc.enable_retries", 0),
        ("grpc.keepalive_time_ms", 10000),
        ("grpc.keepalive_timeout_ms", 5000),
        ("grpc.initial_reconnect_backoff_ms", 200),
        ("grpc.max_reconnect_backoff_ms", 1000),
    ]


def bind_address(address: str) -> str:
    """Where a server listens for `address` (host:port): that IP if it is one, else all interfaces."""
    host, port = address.rsplit(":", 1)
    try:
        ipaddress.ip_address(host)
        return address
    except ValueError:
        return f"0.0.0.0:{port}"


class ErrorInterceptor(grpc.ServerInterceptor):
    """Maps every domain exception raised by a servicer to its status and details, in one place."""

    def intercept_service(self, continuation: Callable, handler_call_details: Any) -> Any:
        handler = continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        inner = handler.unary_unary
        method = handler_call_details.method

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            try:
                return inner(request, context)
            except PipeserveError as exc:
                status = rich_status(exc)
                log.warning(
                    "%s failed: %s", method, exc, extra={"code": status.code.name, "reason": exc.reason.value}
                )
                context.abort_with_status(status)
            except Exception as exc:  # a bug: report INTERNAL, keep serving
                log.exception("%s crashed", method)
                context.abort_with_status(rich_status(PipeserveError(f"{type(exc).__name__}: {exc}")))

        return grpc.unary_unary_rpc_method_handler(
            wrapper,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def add_health_and_reflection(server: Any, service_names: Iterable[str]) -> health.HealthServicer:
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


def set_serving(health_servicer: health.HealthServicer, names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *names]:
        health_servicer.set(name, status)


def probe(
    address: str, timeout_s: float = 2.0, service: str = "", cfg: Config | None = None, name: str = ""
) -> bool:
    """True when the server at `address` answers SERVING on grpc.health.v1. With TLS enabled in
    `cfg`, the probe connects as service `name` and checks that the server is `name` too (a
    service probing itself, or a launcher probing what it started)."""
    from pipeserve.common import tls

    with tls.sync_channel(cfg, name, name, address) as ch:
        try:
            resp = health_pb2_grpc.HealthStub(ch).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def sync_server(workers: int, name: str, max_message_mb: int = 64) -> grpc.Server:
    """A thread-pool gRPC server with the error interceptor (nodes and the tokenizer)."""
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name),
        interceptors=[ErrorInterceptor()],
        options=[*channel_options(max_message_mb), ("grpc.so_reuseport", 0)],
    )


def listen(
    server: Any, service: str, address: str, who: str, cfg: Config | None = None, name: str = ""
) -> tuple[health.HealthServicer, int]:
    """Add health (NOT_SERVING until set) and reflection, bind `address` (with mTLS as service
    `name` when cfg.tls is enabled); returns (health, port)."""
    from pipeserve.common import tls

    health_servicer = add_health_and_reflection(server, [service])
    set_serving(health_servicer, [service], False)
    port = tls.add_port(server, bind_address(address), cfg, name)
    if port == 0:
        raise OSError(f"{who}: cannot listen on {bind_address(address)} (address in use?)")
    return health_servicer, port


def rpc_error_text(exc: BaseException) -> str:
    """A failed call in one line for logs and messages ("UNAVAILABLE: ...", with a TLS hint)."""
    from pipeserve.common import tls

    if isinstance(exc, grpc.aio.AioRpcError):
        text = f"{exc.code().name}: {exc.details()}"
        return text + tls.describe_failure(text)
    return f"{type(exc).__name__}: {exc}"


def remote_error(
    exc: RpcFailure, service: str, address: str, *, timeout_s: float | None = None
) -> PipeserveError:
    """The domain exception a failed call to `service` at `address` carries (its status details,
    so an error raised there arrives intact). A status without our details came from the
    transport: the service is unreachable (UNAVAILABLE), the deadline passed (DEADLINE_EXCEEDED),
    or something else answered. Every client turns failed calls into these: callers above the
    clients never see a gRPC error."""
    err = error_from_rpc(exc)
    if error_reason(exc) is not None:
        return err
    details = rpc_error_text(exc).split(": ", 1)[-1] if isinstance(exc, grpc.aio.AioRpcError) else ""
    details = details or exc.details() or exc.code().name
    if err.reason == Reason.SERVICE_UNAVAILABLE:
        return make_error(Reason.SERVICE_UNAVAILABLE, f"the {service} at {address} is unreachable: {details}")
    if err.reason == Reason.TIMEOUT:
        within = f" within {timeout_s:g} s" if timeout_s is not None else " in time"
        return make_error(Reason.TIMEOUT, f"the {service} at {address} did not finish the request{within}")
    return make_error(err.reason, f"the {service} at {address} failed with {exc.code().name}: {details}")
