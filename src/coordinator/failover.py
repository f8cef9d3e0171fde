"""Failover policy: what a failed step means, and who pays for it. Pure decisions over the
error's reason (common/errors.py); the scheduler applies them (marks nodes down, fails or replays
requests, preempts).

- the node lost our caches (it restarted: `unknown_request`): replay the requests from position 0;
- `cache_exhausted` (the stage is out of KV blocks): never the request's fault: preempt the
  youngest request routed to that node, or wait when there is nobody to preempt;
- `internal` / `upstream_error` (a bug the batch triggered): run the batch's requests one at a
  time; a request that fails alone is the culprit and fails alone; the node stays up;
- the node gone or stuck (`stage_unavailable`, `service_unavailable`, `timeout`, `client_closed`:
  a stream or link closed, a node unreachable or overloaded): mark it down (with backoff) and replay
  its requests on a replica;
- anything else (`invalid_parameter` ...): the node refused the batch: its requests fail with that
  error, which names the node and the part.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable

from pipeserve.common.errors import PipeserveError, Reason
from pipeserve.coordinator.requests import Request

NODE_DOWN_REASONS = {
    Reason.STAGE_UNAVAILABLE,
    Reason.SERVICE_UNAVAILABLE,
    Reason.TIMEOUT,
    Reason.CLIENT_CLOSED,
}
BUG_REASONS = {Reason.INTERNAL, Reason.UPSTREAM_ERROR}


class Failure(enum.Enum):
    LOST_CACHE = "lost_cache"
    CACHE_FULL = "cache_full"
    BUG = "bug"
    NODE_DOWN = "node_down"
    REJECTED = "rejected"


def classify(err: PipeserveError) -> Failure:
    """What a failed step's error means (see the module docstring)."""
    if err.reason == Reason.UNKNOWN_REQUEST:
        return Failure.LOST_CACHE
    if err.reason == Reason.CACHE_EXHAUSTED:
        return Failure.CACHE_FULL
    if err.reason in BUG_REASONS:
        return Failure.BUG
    if err.reason in NODE_DOWN_REASONS:
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
