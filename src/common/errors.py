"""Domain exceptions shared by every service, and the one set of machine-readable reasons.

An error is data, not only text: its `reason` (a `Reason`), the request field it concerns
(`param`, OpenAI style), the model `part` and `node` where it happened and, when waiting helps,
`retry_after_s`. Each protocol carries these in exactly one place: gRPC in rich status details
(common/grpc_util.py: `google.rpc.ErrorInfo`, `RetryInfo`, `BadRequest`), HTTP in the JSON error
body and the Retry-After header (api/errors.py). A client turns the status back into the same
exception with the same fields, so an error raised at a node reaches the browser intact.
"""

from __future__ import annotations

from enum import StrEnum
from typing import ClassVar


class Reason(StrEnum):
    """Why a request failed. The HTTP status of each is in api/errors.py (HTTP_STATUS), its gRPC
    code in common/grpc_util.py (GRPC_CODE), the UI's text in src/frontend/src/errors.ts."""

    INVALID_PARAMETER = "invalid_parameter"  # a field's value is wrong (param names it)
    SCHEMA_VIOLATION = "schema_violation"  # the body does not match the API schema (API only)
    CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"  # prompt (+ max_tokens) past the context
    MODEL_REFUSED = "model_refused"  # the model cannot serve it as asked (e.g. its chat template)
    UNAUTHORIZED = "unauthorized"  # no or wrong API key (API only)
    NOT_FOUND = "not_found"  # no such route or object
    UNKNOWN_REQUEST = "unknown_request"  # a request id a stage holds no cache for
    METHOD_NOT_ALLOWED = "method_not_allowed"  # (API only)
    REQUEST_TOO_LARGE = "request_too_large"  # body over api.max_body_bytes (API only)
    QUEUE_FULL = "queue_full"  # the coordinator's queue is full; retry_after_s says when to retry
    CLIENT_CLOSED = "client_closed"  # the client went away; the request was cancelled (API only)
    INTERNAL = "internal"  # a bug or a server-side condition the client cannot change
    UPSTREAM_ERROR = "upstream_error"  # a service answered with something unexpected
    STAGE_UNAVAILABLE = "stage_unavailable"  # a model part (or the tokenizer) has no healthy node
    SERVICE_UNAVAILABLE = "service_unavailable"  # the API cannot reach the coordinator/tokenizer
    CACHE_EXHAUSTED = "cache_exhausted"  # a stage's KV-cache budget is full right now
    TIMEOUT = "timeout"  # the request's deadline passed


class PipeserveError(Exception):
    """Base class: every error a client or operator can act on. Subclasses fix the reason;
    `reason=` overrides it where one class covers several (e.g. an error rebuilt from gRPC)."""

    default_reason: ClassVar[Reason] = Reason.INTERNAL

    def __init__(
        self,
        message: str,
        *,
        reason: Reason | None = None,
        param: str | None = None,
        part: int | None = None,
        node: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason or type(self).default_reason
        self.param = param
        self.part = part
        self.node = node
        self.retry_after_s = retry_after_s

    def fill(self, *, part: int | None = None, node: str | None = None) -> PipeserveError:
        """Set part/node where the error did not say (a caller knows which stage it called)."""
        if self.part is None:
            self.part = part
        if self.node is None:
            self.node = node
        return self


class ModelNotFoundError(PipeserveError):
    """model_name names nothing we can load here."""


class ModelFormatError(PipeserveError):
    """A model file is corrupt, truncated, missing a tensor or has a wrong shape."""


class InvalidInputError(PipeserveError):
    """A request is malformed: wrong shape/dtype, positions out of order, empty batch..."""

    default_reason = Reason.INVALID_PARAMETER


class ContextLengthError(InvalidInputError):
    """A sequence would grow past the model's (or the configured) context length."""

    default_reason = Reason.CONTEXT_LENGTH_EXCEEDED


class ModelRefusedError(InvalidInputError):
    """The model cannot serve the request as given: it has no chat template, or its template
    rejects the messages (`raise_exception`)."""

    default_reason = Reason.MODEL_REFUSED


class CacheBudgetError(PipeserveError):
    """Admitting the tokens would exceed a stage's KV-cache token budget."""

    default_reason = Reason.CACHE_EXHAUSTED


class UnknownRequestError(InvalidInputError):
    """A request id this stage holds no cache for."""

    default_reason = Reason.UNKNOWN_REQUEST


class ConfigError(PipeserveError):
    """config.json is invalid; the message names the field and the node."""


class StageUnavailableError(PipeserveError):
    """No healthy node serves a model part (part/node name it), or the tokenizer is down."""

    default_reason = Reason.STAGE_UNAVAILABLE


class QueueFullError(PipeserveError):
    """The coordinator's waiting queue is full; retry after `retry_after_s`."""

    default_reason = Reason.QUEUE_FULL

    def __init__(
        self,
        message: str,
        retry_after_s: float | None = 1.0,
        *,
        reason: Reason | None = None,
        param: str | None = None,
        part: int | None = None,
        node: str | None = None,
    ) -> None:
        super().__init__(
            message, reason=reason, param=param, part=part, node=node, retry_after_s=retry_after_s
        )


class DeadlineError(PipeserveError):
    """The request did not finish within its deadline."""

    default_reason = Reason.TIMEOUT


class ServiceUnavailableError(PipeserveError):
    """A service (the coordinator, the tokenizer) cannot be reached at all."""

    default_reason = Reason.SERVICE_UNAVAILABLE


# The class an error with a given reason is rebuilt as (from gRPC status details); others: base.
ERROR_CLASS: dict[Reason, type[PipeserveError]] = {
    Reason.INVALID_PARAMETER: InvalidInputError,
    Reason.CONTEXT_LENGTH_EXCEEDED: ContextLengthError,
    Reason.MODEL_REFUSED: ModelRefusedError,
    Reason.UNKNOWN_REQUEST: UnknownRequestError,
    Reason.CACHE_EXHAUSTED: CacheBudgetError,
    Reason.STAGE_UNAVAILABLE: StageUnavailableError,
    Reason.QUEUE_FULL: QueueFullError,
    Reason.TIMEOUT: DeadlineError,
    Reason.SERVICE_UNAVAILABLE: ServiceUnavailableError,
}


def make_error(
    reason: Reason,
    message: str,
    *,
    param: str | None = None,
    part: int | None = None,
    node: str | None = None,
    retry_after_s: float | None = None,
) -> PipeserveError:
    """The domain exception for `reason` with its fields (how a client rebuilds a remote error)."""
    cls = ERROR_CLASS.get(reason, PipeserveError)
    return cls(message, reason=reason, param=param, part=part, node=node, retry_after_s=retry_after_s)
