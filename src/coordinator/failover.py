"""Failover policy: what a failed forward means, and who pays for it. Pure decisions; the
scheduler applies them (marks nodes down, fails or replays requests, preempts).

- the node lost our caches (it restarted: `unknown_request`): replay the requests from position 0;
- RESOURCE_EXHAUSTED (the stage is out of KV blocks): never the request's fault: preempt the
  youngest request routed to that node, or wait when there is nobody to preempt;
- INTERNAL / UNKNOWN (a bug the batch triggered): run the batch's requests one at a time; a
  request that fails alone is the culprit and fails alone; the node stays up;
- transport failures and deadlines (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, or no gRPC status):
  the node is gone or stuck: mark it down (with backoff) and replay its requests on a replica;
- anything else (INVALID_ARGUMENT ...): the node refused the batch: its requests fail with that
  error, which names the node and the part.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

import grpc

from pipeserve.common.errors import Reason
from pipeserve.common.grpc_util import error_reason
from pipeserve.coordinator.requests import Request

NODE_FAILURE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
}
BUG_CODES = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}


class Failure(enum.Enum):
    LOST_CACHE = "lost_cache"
    CACHE_FULL = "cache_full"
    BUG = "bug"
    NODE_DOWN = "node_down"
    REJECTED = "rejected"


def classify(exc: BaseException) -> Failure:
    """What a forward's exception means (see the module docstring)."""
    code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
    if error_reason(exc) == Reason.UNKNOWN_REQUEST:
        return Failure.LOST_CACHE
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return Failure.CACHE_FULL
    if code in BUG_CODES:
        return Failure.BUG
    if code in NODE_FAILURE_CODES or code is None:
        return Failure.NODE_DOWN
    return Failure.REJECTED


def preemption_victim(candidates: Iterable[Request]) -> Request | None:
    """The youngest live request (last admitted) among those holding blocks on the full node; None
    when fewer than two are live (preempting the only one would make no room for anybody)."""
    live = [r for r in candidates if r.finish_reason is None and not r.stopping]
    if len(live) <= 1:
        return None
    return max(live, key=lambda r: (r.admitted_at or 0.0, r.arrival))


def failovers_exhausted(req: Request, max_retries: int, n_parts: int) -> bool:
    """A request that failed over this often fails: every part may lose a node once, plus retries."""
    return req.failovers > max_retries + n_parts
