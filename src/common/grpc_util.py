"""gRPC plumbing shared by every server and client: server construction with the standard health
and reflection services, the one interceptor mapping domain exceptions to status codes, channel
options, and the address helpers.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Iterable
from concurrent import futures
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from pipeserve.common.errors import (
    CacheBudgetError,
    ConfigError,
    InvalidInputError,
    ModelFormatError,
    ModelNotFoundError,
    PipeserveError,
    QueueFullError,
    StageUnavailableError,
)

log = logging.getLogger(__name__)

STATUS_OF: list[tuple[type[Exception], grpc.StatusCode]] = [
    (InvalidInputError, grpc.StatusCode.INVALID_ARGUMENT),
    (CacheBudgetError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (QueueFullError, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (StageUnavailableError, grpc.StatusCode.UNAVAILABLE),
    (ModelNotFoundError, grpc.StatusCode.FAILED_PRECONDITION),
    (ModelFormatError, grpc.StatusCode.FAILED_PRECONDITION),
    (ConfigError, grpc.StatusCode.FAILED_PRECONDITION),
    (PipeserveError, grpc.StatusCode.INTERNAL),
]


# Trailing metadata naming the domain exception, so clients can tell e.g. a lost cache
# (UnknownRequestError) from other INVALID_ARGUMENT errors without parsing messages.
ERROR_KIND_KEY = "pipeserve-error"


def error_kind(exc: BaseException) -> str:
    if not isinstance(exc, grpc.aio.AioRpcError | grpc.Call):
        return ""
    md = exc.trailing_metadata() or ()
    return next((str(v) for k, v in md if k == ERROR_KIND_KEY), "")


def status_for(exc: Exception) -> grpc.StatusCode:
    return next((code for cls, code in STATUS_OF if isinstance(exc, cls)), grpc.StatusCode.INTERNAL)


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
    """Maps every domain exception raised by a servicer to a status code, in one place."""

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
                code = status_for(exc)
                log.warning("%s failed: %s", method, exc, extra={"code": code.name})
                context.set_trailing_metadata(((ERROR_KIND_KEY, type(exc).__name__),))
                context.abort(code, str(exc))
            except Exception as exc:  # a bug: report INTERNAL, keep serving
                log.exception("%s crashed", method)
                context.abort(grpc.StatusCode.INTERNAL, f"{type(exc).__name__}: {exc}")

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


def probe(address: str, timeout_s: float = 2.0, service: str = "") -> bool:
    """True when the server at `address` answers SERVING on grpc.health.v1."""
    with grpc.insecure_channel(address) as ch:
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


def listen(server: Any, service: str, address: str, who: str) -> tuple[health.HealthServicer, int]:
    """Add health (NOT_SERVING until set) and reflection, bind `address`; returns (health, port)."""
    health_servicer = add_health_and_reflection(server, [service])
    set_serving(health_servicer, [service], False)
    port = server.add_insecure_port(bind_address(address))
    if port == 0:
        raise OSError(f"{who}: cannot listen on {bind_address(address)} (address in use?)")
    return health_servicer, port
