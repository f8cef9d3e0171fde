"""Step planning: which tokens of which requests one forward through the pipeline computes.

Decode tokens go first (one per request: inter-token latency), then prefill chunks first come
first served, within `max_batch_tokens`; once a decode rides along, prefill is cut to
`prefill_chunk_tokens` so a long prompt cannot stall the streams. After a node failed a batch
with INTERNAL, the suspects run one at a time so that only the culprit fails. Pure: routing and
stall handling are the caller's (`routable`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from pipeserve.coordinator.requests import PlanItem, Request


def plan_step(
    requests: Iterable[Request],
    max_batch_tokens: int,
    prefill_chunk_tokens: int,
    routable: Callable[[Request], bool] = lambda r: True,
) -> list[PlanItem]:
    """(request, start, n_tokens) for this step. `routable(req)` is asked once per candidate, in
    plan order, and may give it a route; a request it refuses sits this step out."""
    budget = max_batch_tokens
    prefill_budget = max_batch_tokens  # cut to prefill_chunk_tokens once decodes ride along
    candidates = sorted(requests, key=lambda r: (len(r.tokens) - r.n_computed > 1, r.arrival))
    suspects = [r for r in candidates if r.suspect and not r.stopping]
    if suspects:  # after an INTERNAL error: one suspect at a time finds the culprit
        candidates = suspects[-1:]
    plan: list[PlanItem] = []
    for req in candidates:
        if req.stopping or req.finish_reason is not None or not routable(req):
            continue
        todo = len(req.tokens) - req.n_computed
        n = min(todo, budget) if todo == 1 else min(todo, budget, prefill_budget)
        if n <= 0:
            continue
        plan.append((req, req.n_computed, n))
        budget -= n
        if todo == 1:  # a decode token: long prefills must not stall it (inter-token latency)
            prefill_budget = min(prefill_budget, prefill_chunk_tokens)
        else:
            prefill_budget -= n
        if budget <= 0:
            break
    return plan
