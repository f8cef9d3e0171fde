"""Admission: what a request may ask for, when it may start, and what the queue tells a client
that must wait. Requests are checked at submit (context, max_tokens, vocabulary, the largest KV
budget of every part), queue FIFO with a bound, and start when every part has a healthy replica
with room for what the request holds *now* (prompt + one token, rounded to whole KV blocks);
they grow as tokens come and a full stage preempts (failover.py), so nothing is reserved for
the worst case."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from pipeserve.common.errors import ContextLengthError, InvalidInputError
from pipeserve.common.kvblocks import BLOCK_SIZE
from pipeserve.coordinator.requests import Request

if TYPE_CHECKING:
    from pipeserve.coordinator.cluster import Cluster, NodeHandle


def blocks(tokens: int, bs: int = BLOCK_SIZE) -> int:
    """Tokens rounded up to whole KV blocks (what a node really holds), in tokens."""
    return -(-tokens // bs) * bs


def check_request(
    prompt_ids: Sequence[int], max_tokens: int, context: int, vocab: int, part_budgets: Sequence[int]
) -> int:
    """Validate a request's size; returns its max_tokens (0 means "up to the context")."""
    if not prompt_ids:
        raise InvalidInputError("the prompt is empty: it must contain at least one token", param="prompt")
    bad = next((t for t in prompt_ids if t < 0 or (vocab and t >= vocab)), None)
    if bad is not None:
        raise InvalidInputError(
            f"prompt token id {bad} is outside the vocabulary [0, {vocab})", param="prompt"
        )
    n = len(prompt_ids)
    if n >= context:
        raise ContextLengthError(
            f"the prompt has {n} tokens but the context length is {context} "
            f"(prompt + generated tokens must fit)",
            param="prompt",
        )
    left = context - n
    if max_tokens > left:
        raise InvalidInputError(
            f"max_tokens={max_tokens} is more than the {left} tokens the context leaves after the "
            f"{n}-token prompt (context length {context})",
            param="max_tokens",
        )
    max_tokens = max_tokens or left
    for part, budget in enumerate(part_budgets):
        if budget and n + max_tokens > budget:
            raise ContextLengthError(
                f"prompt ({n}) + max_tokens ({max_tokens}) = {n + max_tokens} tokens can never "
                f"fit part {part}'s KV-cache budget of {budget} tokens; lower max_tokens",
                param="max_tokens",
                part=part,
            )
    return max_tokens


class RateMeter:
    """Generated tokens per second over a recent window (for Retry-After)."""

    def __init__(self, maxlen: int = 256) -> None:
        self._events: deque[tuple[float, int]] = deque(maxlen=maxlen)

    def add(self, n_tokens: int, now: float | None = None) -> None:
        self._events.append((time.monotonic() if now is None else now, n_tokens))

    def rate(self, window_s: float = 5.0, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        recent = [(t, n) for t, n in self._events if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-3)


def retry_after(rate: float, pending_tokens: int, n_requests: int, running: int) -> float:
    """Seconds until a queue slot likely frees: the average request's remaining tokens at the
    per-request share of the measured rate (1..60 s; 2 s before anything was measured)."""
    if rate <= 0:
        return 2.0
    per_req = pending_tokens / max(1, n_requests)
    return max(1.0, min(60.0, per_req / max(rate / max(1, running), 1e-3)))


def count_held(nodes: Sequence[NodeHandle], requests: Mapping[str, Request]) -> None:
    """Set each node's reserved_tokens to the KV positions its routed requests hold now."""
    for n in nodes:
        n.reserved_tokens = sum(n.holds(r.reserve_tokens) for rid in n.running if (r := requests.get(rid)))


def pick_route(cluster: Cluster, req: Request, prefix: list[bytes] | None) -> dict[int, NodeHandle] | None:
    """A node per part with room for the request now (preferring replicas holding its prefix),
    or None when some part is down or full (the request waits at the head of the queue)."""
    route = {}
    for part in range(cluster.n_parts):
        node = cluster.pick(part, req.reserve_tokens, prefix)
        if node is None or node.reserved_tokens + node.holds(req.reserve_tokens) > node.budget:
            return None
        route[part] = node
    return route
