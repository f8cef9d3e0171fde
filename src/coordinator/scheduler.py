"""The coordinator's core: continuous batching through the pipeline, with micro-batches in flight.

Requests wait in a bounded FIFO queue, are admitted when the batch and the nodes' cache budgets
have room, and are spread over `micro_batches` groups. Each group runs its own step loop: one
forward per stage for all its requests (prefill chunks and decode tokens mixed), so with N
groups up to N stages compute at once on different groups. A failed node is marked down and the
affected requests are replayed on a healthy replica (their tokens so far are prefilled again;
sampling depends only on seed and position, so the output does not change).

This module runs the loops and applies the policies of its neighbours, each a plain module:
`requests` (the data), `admission` (checks, the queue's bound and Retry-After, routes with room),
`planner` (which tokens a step computes), `failover` (what a failed step's error means) and
`output` (stop conditions and stop-string hold-back) and `drafts` (speculative decoding: which
guessed tokens a decode carries, verified in the same pass). Steps reach the stages through a
`StagePath` (stage_path.py: the chain in production) that takes a plan and gives back each
request's outcome in domain types, so this module imports no gRPC or protobuf;
`tests/test_scheduler_units.py` drives it over plain-Python fake stages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque

from pipeserve.common.config import Config
from pipeserve.common.errors import (
    CacheBudgetError,
    InvalidInputError,
    PipeserveError,
    QueueFullError,
    StageUnavailableError,
    make_error,
)
from pipeserve.common.kvblocks import BLOCK_SIZE
from pipeserve.common.kvblocks import prefix_hashes as prompt_block_hashes
from pipeserve.common.sampling_params import SamplingParams
from pipeserve.common.tokenizer_client import DecodeItem
from pipeserve.coordinator import admission, output
from pipeserve.coordinator.cluster import Cluster, NodeHandle
from pipeserve.coordinator.drafts import MAX_ROWS, Candidate, NgramDrafts, StepCost, allocate
from pipeserve.coordinator.failover import Failure, classify, failovers_exhausted, preemption_victim
from pipeserve.coordinator.planner import plan_step
from pipeserve.coordinator.requests import (
    ErrorEvent,
    FinalEvent,
    Group,
    PlanItem,
    Request,
    SpecStats,
    StageStats,
    TokenEvent,
)
from pipeserve.coordinator.stage_path import Outcome, Sampled, StagePath

log = logging.getLogger(__name__)


class Scheduler:
    def __init__(self, cfg: Config, cluster: Cluster, path: StagePath) -> None:
        """`path` takes each step to the stages: the chain (chain.ChainPath) in production."""
        self.cfg, self.cluster, self.path = cfg, cluster, path
        c = cfg.coordinator
        self.max_running, self.max_waiting = c.max_running, c.max_waiting
        self.max_batch_tokens = c.max_batch_tokens
        self.prefill_chunk_tokens = c.prefill_chunk_tokens
        # as many loops as micro_batches can ask for; admission uses the first n_groups
        self.groups = [Group(i) for i in range(c.micro_batches or cluster.n_parts)]
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.running = 0
        self.eos_ids: set[int] = set()
        self.max_context = cfg.max_context or 0
        self.rate = admission.RateMeter()
        self._bg: set[asyncio.Task] = set()
        self.prefix_cache = cfg.coordinator.prefix_cache
        self.cache_full_backoff = False
        self.prefix_hit_tokens = 0  # prompt positions skipped thanks to cached prefix blocks
        self.prefix_lookup_tokens = 0
        self.preemptions = 0
        spec = c.speculative
        self.max_draft = spec.max_draft if spec.method != "off" else 0
        self.step_cost = StepCost()
        self.spec = SpecStats()  # every request's, since start-up
        cluster.known_requests = lambda: self.requests

    @property
    def n_groups(self) -> int:
        """Groups that take new requests: coordinator.micro_batches, or what the Cluster chose for
        0 from where the nodes run (it may change as nodes report; a request stays in its group)."""
        return max(1, min(len(self.groups), self.cluster.micro_batches))

    def start(self) -> None:
        for g in self.groups:
            g.task = asyncio.create_task(self._group_loop(g), name=f"group-{g.index}")

    async def stop(self) -> None:
        for g in self.groups:
            if g.task:
                g.task.cancel()
        await asyncio.gather(*(g.task for g in self.groups if g.task), return_exceptions=True)
        await self.path.close()

    def after_refresh(self) -> None:
        """After a health check: connect the path to nodes that became healthy."""
        self.path.ensure_streams()

    # ---- admission ----------------------------------------------------------------------------
    def context_limit(self) -> int:
        infos = [n.info for n in self.cluster.nodes if n.info]
        model_ctx = min((i.max_context for i in infos), default=0)
        if self.max_context and model_ctx:
            return min(self.max_context, model_ctx)
        return model_ctx or self.max_context or 2048

    def submit(
        self,
        rid: str,
        prompt_ids: list[int],
        max_tokens: int,
        sampling: SamplingParams,
        stop: list[str],
        stop_ids: list[int],
        ignore_eos: bool,
        speculative: bool | None = None,
    ) -> Request:
        """Queue a request (raises for bad input or a full queue; never blocks). `speculative`
        False keeps it from drafting (None: the coordinator's setting)."""
        if not self.cluster.ready:
            down = self.cluster.down_part()
            raise StageUnavailableError(
                "the cluster is not ready: " + "; ".join(self.cluster.problems),
                part=down,
                node=", ".join(n.id for n in self.cluster.nodes if n.part == down) or None,
            )
        if rid in self.requests:
            raise InvalidInputError(f"request id {rid!r} is already in use")
        sampling.validate()
        vocab = self.cluster.tokenizer_info.vocab_size if self.cluster.tokenizer_info else 0
        budgets = [self.cluster.max_budget(p) for p in range(self.cluster.n_parts)]
        max_tokens = admission.check_request(prompt_ids, max_tokens, self.context_limit(), vocab, budgets)
        req = Request(rid, list(prompt_ids), max_tokens, sampling, [s for s in stop if s], set(stop_ids))
        req.tokens = list(prompt_ids)
        if self.max_draft and speculative is not False:
            req.drafts, req.draft_reserve = NgramDrafts(), self.max_draft
        if not ignore_eos:
            req.stop_ids |= self.eos_ids
        self.requests[rid] = req
        self.waiting.append(req)
        self._admit()
        if req.group < 0 and len(self.waiting) > self.max_waiting:
            # not admitted now and the queue is at its bound (whatever blocks admission: the
            # batch size or the nodes' KV blocks): refuse rather than let clients wait for a 504
            self.waiting.remove(req)
            del self.requests[rid]
            raise QueueFullError(
                f"the queue is full ({self.running} running, {len(self.waiting)} waiting); retry later",
                retry_after_s=self.retry_after(),
            )
        return req

    def retry_after(self) -> float:
        """Seconds until a queue slot likely frees: queued work over the recent finish rate."""
        pending = sum(r.max_tokens - len(r.generated) for r in self.requests.values())
        return admission.retry_after(self.rate.rate(), pending, len(self.requests), self.running)

    def tokens_per_second(self, window_s: float = 5.0) -> float:
        return self.rate.rate(window_s)

    def _admit(self) -> None:
        """Move requests from the queue into groups, first come first served (the head waits
        rather than being overtaken, so nobody starves)."""
        if self.waiting:
            admission.count_held(self.cluster.nodes, self.requests)
        while self.waiting and self.running < self.max_running:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            prefix = prompt_block_hashes(req.tokens) if self.prefix_cache else None
            route = admission.pick_route(self.cluster, req, prefix)
            if route is None:
                return  # a part is down or full now: wait (stalls are timed out by the loops)
            self.waiting.popleft()
            for part, node in route.items():
                self._route(req, part, node)
                if prefix:
                    node.remember(prefix)
            req.admitted_at = time.monotonic()
            g = min(self.groups[: self.n_groups], key=lambda g: len(g.requests))
            req.group = g.index
            g.requests.append(req)
            self.running += 1
            g.wake.set()

    def _route(self, req: Request, part: int, node: NodeHandle) -> None:
        old = req.route.get(part)
        if old is node:
            return
        if old is not None:
            old.running.discard(req.id)
            old.reserved_tokens -= old.holds(req.reserve_tokens)
        req.route[part] = node
        req.visited.add(node)
        node.running.add(req.id)
        node.reserved_tokens += node.holds(req.reserve_tokens)

    def cancel(self, rid: str) -> bool:
        req = self.requests.get(rid)
        if req is None or req.finish_reason is not None:
            return False
        req.cancelled = True
        if req.group < 0:  # still queued
            with contextlib.suppress(ValueError):
                self.waiting.remove(req)
            self._finish(req, "cancelled")
        else:
            self.groups[req.group].wake.set()
        return True

    async def expire_waiting(self) -> None:
        """Fail queued requests that waited past recovery_wait_s for a dead part."""
        now = time.monotonic()
        for req in list(self.waiting):
            part = self.cluster.down_part()
            if part is not None and now - req.arrival > self.cfg.coordinator.recovery_wait_s:
                self.waiting.remove(req)
                nodes = ", ".join(n.id for n in self.cluster.nodes if n.part == part)
                self._fail(
                    req, StageUnavailableError(self.cluster.part_down_message(part), part=part, node=nodes)
                )
        self._admit()

    # ---- the step loop ------------------------------------------------------------------------
    async def _group_loop(self, g: Group) -> None:
        while True:
            if not g.requests:
                g.wake.clear()
                await g.wake.wait()
                continue
            try:
                await self._step(g)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a bug in a step must not kill the loop: fail its requests
                log.exception("step of group %d crashed", g.index)
                for req in list(g.requests):
                    self._fail(
                        req, PipeserveError(f"internal error in the coordinator: {type(exc).__name__}: {exc}")
                    )

    def _plan(self, g: Group) -> list[PlanItem]:
        """This step's chunks (planner.py), after giving each candidate a healthy route; a request
        with no route waits, and fails after recovery_wait_s."""
        for req in [r for r in g.requests if r.cancelled]:
            self._finish(req, "cancelled")
        now = time.monotonic()

        def routable(req: Request) -> bool:
            needs_route = len(req.route) < self.cluster.n_parts or any(
                not n.healthy for n in req.route.values()
            )
            if needs_route and not self._reroute(req):
                req.stalled_since = req.stalled_since or now
                if now - req.stalled_since > self.cfg.coordinator.recovery_wait_s:
                    part = self.cluster.down_part() or 0
                    nodes = ", ".join(n.id for n in self.cluster.nodes if n.part == part)
                    self._fail(
                        req,
                        StageUnavailableError(self.cluster.part_down_message(part), part=part, node=nodes),
                    )
                return False
            req.stalled_since = None
            return True

        plan = plan_step(g.requests, self.max_batch_tokens, self.prefill_chunk_tokens, routable)
        self._draft(plan)
        return plan

    def _draft(self, plan: list[PlanItem]) -> None:
        """Give this step's decodes their drafts (drafts.py): none once the step has MAX_ROWS rows,
        and each within what its max_tokens and the context leave."""
        rows = sum(n for _, _, n in plan)
        for req, _, _ in plan:
            req.draft, req.shadow = [], -1
        if not self.max_draft or rows >= MAX_ROWS:
            return
        limit = self.context_limit()
        cands: list[tuple[Request, Candidate]] = []
        sampling = 0
        for req, start, n in plan:
            if start + n != len(req.tokens):
                continue  # a prefill chunk that does not end the prompt: no token comes out
            sampling += 1
            if n != 1 or req.drafts is None or req.suspect:
                continue
            room = min(self.max_draft, req.max_tokens - len(req.generated) - 1, limit - len(req.tokens))
            proposal = req.drafts.propose(req.tokens, room)
            if proposal:
                cands.append((req, Candidate(proposal, req.acceptance.rate)))
        if not cands:
            return
        allocate([c for _, c in cands], rows, self.step_cost, sampling)
        for req, c in cands:
            req.draft = c.proposal[: c.k]
            if c.k < len(c.proposal):  # the first draft not sent: still learn whether it was right
                req.shadow = c.proposal[c.k]

    def _reroute(self, req: Request) -> bool:
        """Give the request a healthy node for every part; a changed node means a full replay."""
        for part in range(self.cluster.n_parts):
            cur = req.route.get(part)
            if cur is not None and cur.healthy:
                continue
            node = self.cluster.pick(part, req.reserve_tokens)
            if node is None:
                return False
            self._route(req, part, node)
            req.n_computed = 0
        return True

    async def _lookup_prefixes(self, g: Group) -> bool:
        """Requests about to prefill from scratch start on the prefix blocks every stage of their
        route has cached (LookupPrefix shares them); the prefill then skips those positions.
        Returns whether it awaited lookups (requests admitted meanwhile have not been looked up)."""
        if not self.prefix_cache:
            return False
        todo = [
            r
            for r in g.requests
            if r.needs_lookup and r.n_computed == 0 and len(r.route) == self.cluster.n_parts
        ]
        if not todo:
            return False
        for r in todo:
            r.needs_lookup = False
        # The routes as asked: while the lookups are in flight another group's step may preempt or
        # reroute one of these requests (its route then changes or empties).
        routes = [dict(r.route) for r in todo]
        results = await asyncio.gather(
            *(
                n.client.lookup_prefix(r.id, r.tokens)
                for r, route in zip(todo, routes, strict=True)
                for n in route.values()
            ),
            return_exceptions=True,
        )
        it = iter(results)
        for r, route in zip(todo, routes, strict=True):
            hits = [next(it) for _ in route]
            if r.route != route or r.n_computed != 0:
                continue  # moved meanwhile: it prefills from 0 (or looks up again once re-admitted)
            good = [h for h in hits if isinstance(h, int)]
            # a stage that failed the lookup holds nothing: start at 0 (the others truncate)
            r.n_computed = min(good) if good and len(good) == len(hits) else 0
            r.cached_tokens = r.n_computed
            self.prefix_hit_tokens += r.n_computed
            self.prefix_lookup_tokens += len(r.tokens)
        return True

    async def _step(self, g: Group) -> None:
        # Until a pass finds nothing to look up: a request admitted while lookups were awaited
        # would otherwise be planned from position 0 (a burst's latecomers recomputing a cached
        # prompt). The last pass awaits nothing, so nothing joins between it and the plan.
        while await self._lookup_prefixes(g):
            pass
        plan = self._plan(g)
        if not plan:
            if g.emitting is not None and not g.emitting.done():
                await g.emitting  # only finishing requests are left: let them finish
            elif g.requests:  # everything stalled: wait for a node to come back (or the timeout)
                self.cluster.changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.cluster.changed.wait(), timeout=0.2)
            return
        for req, _, _ in plan:
            req.in_step = True
        try:
            await self._run_step(g, plan)
            if self.cache_full_backoff:  # a stage was out of blocks: give releases a moment to land
                self.cache_full_backoff = False
                await asyncio.sleep(0.05)
        finally:
            for req, _, _ in plan:
                req.in_step = False
                if req.release_after_step:
                    self._release_soon(req.id, req.release_after_step)
                    req.release_after_step = []

    async def _run_step(self, g: Group, plan: list[PlanItem]) -> None:
        """One step through the path (the chain): the outcome of every request comes back naming
        the part and node of a failure; the failover policy (failover.py) decides what it means."""
        plan = [item for item in plan if item[0].finish_reason is None and item[0].group == g.index]
        if not plan:
            return
        route_nodes = {n for req, _, _ in plan for n in req.route.values()}
        if not await self.path.wait_live(route_nodes, 2.0):
            return  # a node cannot take part yet: the next step tries again (or reroutes)
        timeout = self.cfg.coordinator.forward_timeout_s
        t0 = time.monotonic()
        outcomes = await self.path.run(plan, timeout)
        if all(o.ok for o in outcomes.values()) and len(outcomes) == len(plan):
            rows = sum(n + len(req.draft) for req, _, n in plan)
            self.step_cost.add(rows, (time.monotonic() - t0) * 1e3)
        ok: list[PlanItem] = []
        sampled: dict[str, list[Sampled]] = {}
        failed: dict[tuple[NodeHandle, int, int], tuple[PipeserveError, list[PlanItem]]] = {}
        timed_out: list[PlanItem] = []
        for item in plan:
            req = item[0]
            o = outcomes.get(req.id)
            if o is None:
                timed_out.append(item)
            elif o.ok:
                ok.append(item)
                if o.tokens:
                    sampled[req.id] = o.tokens
                _add_timings(req, o)
            else:
                assert o.error is not None
                node = o.node or req.route[o.part]
                failed.setdefault((node, o.part, id(o.error)), (o.error, []))[1].append(item)
        for (node, part, _), (err, items) in failed.items():
            self._on_forward_error(node, part, items, err)
        if timed_out:
            await self._on_step_timeout(timed_out, timeout)
        self._apply_step(g, ok, sampled)

    async def _on_step_timeout(self, items: list[PlanItem], timeout: float) -> None:
        """No report within the deadline: find the route nodes that no longer answer and mark them
        down (their requests replay elsewhere); with all answering, the step is simply retried."""
        nodes = {n for req, _, _ in items for n in req.route.values()}
        answers = await asyncio.gather(*(n.client.info() for n in nodes), return_exceptions=True)
        dead = {n for n, a in zip(nodes, answers, strict=True) if isinstance(a, BaseException)}
        for n in dead:
            n.mark_down(f"a step through it got no result in {timeout:.0f} s and it does not answer")
        for req, _, _ in items:
            req.failovers += 1
            if failovers_exhausted(req, self.cfg.coordinator.max_retries, self.cluster.n_parts):
                route = ", ".join(f"{p}: {n.id}" for p, n in sorted(req.route.items()))
                self._fail(
                    req,
                    StageUnavailableError(
                        f"steps through the route ({route}) timed out after {timeout:.0f} s"
                    ),
                )
            elif dead & set(req.route.values()):
                req.n_computed = 0  # replay on a new route

    def _apply_step(self, g: Group, plan: list[PlanItem], sampled: dict[str, list[Sampled]]) -> None:
        """Requests whose chunk went through every stage: advance them, append sampled tokens (with
        drafts, the accepted ones and the one after; never past a stop), and stream the text while
        the next step already computes."""
        new_tokens: list[tuple[Request, int, list[Sampled]]] = []
        n_new = 0
        for req, start, n in plan:
            if req.group != g.index:  # preempted while this step ran: it recomputes from scratch
                continue
            toks = sampled.get(req.id, [])
            drafted, accepted = len(req.draft), max(0, len(toks) - 1)
            shadow, req.draft, req.shadow = req.shadow, [], -1
            # positions with valid k/v on every stage: the chunk and the accepted drafts (the
            # stages before the last truncate the rejected ones when the next step starts here)
            req.n_computed = start + n + accepted
            req.suspect, req.cache_wait_since = False, None  # it ran through every stage
            if not toks or req.finish_reason is not None:
                continue
            if shadow >= 0 and accepted == drafted:
                # every draft sent was accepted, so the token after them tells whether the first
                # draft not sent would have been too: one draft's more evidence, at no cost
                req.acceptance.update(drafted + 1, accepted + int(toks[drafted].token_id == shadow))
            elif drafted:
                req.acceptance.update(drafted, accepted)
            kept: list[Sampled] = []
            for tok in toks:
                req.tokens.append(tok.token_id)
                kept.append(tok)
                req.stopping = output.stop_reason(req, len(req.tokens)) is not None
                if req.stopping:
                    break
            for stats in (req.spec, self.spec):
                stats.add(drafted, accepted, len(kept))
            new_tokens.append((req, len(req.tokens), kept))
            n_new += len(kept)
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
        self.rate.add(n_new)
        if new_tokens:  # detokenize and stream while the next step already computes
            g.emitting = asyncio.create_task(self._emit_in_order(g.emitting, new_tokens))

    def _on_forward_error(
        self, node: NodeHandle, part: int, items: list[PlanItem], err: PipeserveError
    ) -> None:
        """Apply the failover policy (failover.py) to a step that failed on `node`."""
        text = f"{err.reason.value}: {err.message}"
        kind = classify(err)
        if kind is Failure.LOST_CACHE:  # the node restarted and lost our caches: replay
            for req, _, _ in items:
                req.n_computed = 0
        elif kind is Failure.CACHE_FULL:  # out of KV blocks: preempt, never fail
            self._on_cache_full(node, part, items, err.message)
        elif kind is Failure.BUG and len(items) == 1:  # alone and still failing: the culprit
            req = items[0][0]
            log.warning("node %s failed request %s alone (%s): failing it only", node.id, req.id, text)
            self._fail(
                req,
                PipeserveError(
                    f"node {node.id} (part {part}) failed this request: {err.message}",
                    part=part,
                    node=node.id,
                ),
            )
        elif kind is Failure.BUG:
            log.warning(
                "node %s failed a batch of %d (%s): running them one at a time", node.id, len(items), text
            )
            for req, _, _ in items:
                req.suspect = True
        elif kind is Failure.NODE_DOWN:
            node.mark_down(f"forward failed: {err.message}")
            for req, _, _ in items:
                req.failovers += 1
                if failovers_exhausted(req, self.cfg.coordinator.max_retries, self.cluster.n_parts):
                    msg = f"{self.cluster.part_down_message(part)} (last error: {err.message})"
                    self._fail(req, StageUnavailableError(msg, part=part, node=node.id))
                    continue
                req.n_computed = 0  # replay prompt + generated tokens on the new route
            log.warning(
                "node %s failed a forward (%s); %d requests will fail over", node.id, text, len(items)
            )
        else:  # REJECTED: the node refused the batch
            rejected = make_error(
                err.reason,
                f"node {node.id} (part {part}) rejected the batch: {err.message}",
                param=err.param,
                part=part,
                node=node.id,
                retry_after_s=err.retry_after_s,
            )
            for req, _, _ in items:
                self._fail(req, rejected)

    def _on_cache_full(self, node: NodeHandle, part: int, items: list[PlanItem], text: str) -> None:
        """A stage ran out of KV blocks: preempt the youngest request routed to it (its blocks are
        freed, it goes back to the head of the queue and recomputes later; its stream pauses).
        The others retry the same chunk next step. With nobody to preempt (the blocks are held by
        requests whose release is still on its way, or by another coordinator's), the step waits
        and retries; only after `recovery_wait_s` of that does the request fail."""
        self.cache_full_backoff = True
        victim = preemption_victim(r for rid in node.running if (r := self.requests.get(rid)))
        if victim is None:
            now = time.monotonic()
            for req, _, _ in items:
                req.cache_wait_since = req.cache_wait_since or now
                if now - req.cache_wait_since > self.cfg.coordinator.recovery_wait_s:
                    self._fail(
                        req,
                        CacheBudgetError(f"node {node.id} (part {part}): {text}", part=part, node=node.id),
                    )
            return
        admission.count_held(self.cluster.nodes, self.requests)
        node.soft_budget = max(BLOCK_SIZE, node.reserved_tokens - node.holds(victim.reserve_tokens))
        log.info("node %s is out of KV blocks (%s): preempting %s", node.id, text, victim.id)
        self._preempt(victim)

    def _unroute(self, req: Request) -> None:
        """Take a request out of its group and its nodes, and free its caches on every node it
        used (after the step, if a forward for it is in flight and may still create one)."""
        if req.group >= 0:
            g = self.groups[req.group]
            if req in g.requests:
                g.requests.remove(req)
                self.running -= 1
        for node in req.route.values():
            node.running.discard(req.id)
            node.soft_budget = None  # room was made: the full pool may be tried again
        req.route, req.group = {}, -1
        nodes, req.visited = list(req.visited), set()
        if req.in_step:
            req.release_after_step = nodes
        elif nodes:
            self._release_soon(req.id, nodes)

    def _preempt(self, req: Request) -> None:
        soft = {n: n.soft_budget for n in req.route.values()}
        self._unroute(req)
        for n, b in soft.items():  # still short of blocks there until a request finishes
            n.soft_budget = b
        req.n_computed, req.needs_lookup, req.suspect = 0, True, False
        req.preemptions += 1
        self.preemptions += 1
        self.waiting.appendleft(req)

    # ---- output -------------------------------------------------------------------------------
    async def _emit_in_order(
        self, prev: asyncio.Task | None, reqs: list[tuple[Request, int, list[Sampled]]]
    ) -> None:
        """Emit one step's tokens after the previous step's (text must stay in order)."""
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        try:
            await self._emit(reqs)
        except Exception as exc:  # a bug while emitting must not leave requests hanging
            log.exception("emitting tokens failed")
            for req, _, _ in reqs:
                self._fail(
                    req, PipeserveError(f"internal error in the coordinator: {type(exc).__name__}: {exc}")
                )

    async def _emit(self, reqs: list[tuple[Request, int, list[Sampled]]]) -> None:
        """Detokenize each request's tokens up to `upto` (its length after that step) and stream
        them, one event per token as one-token steps would (a stop string inside a step's tokens
        ends the stream at the token that completes it)."""
        reqs = [(r, upto, toks) for r, upto, toks in reqs if r.finish_reason is None]
        if not reqs:
            return
        items = []
        for req, upto, toks in reqs:
            gen = req.tokens[len(req.prompt_ids) : upto]
            items.append(
                DecodeItem(
                    request_id=req.id,
                    token_ids=gen[req.prefix_offset :],
                    prefix_offset=req.prefix_offset,
                    read_offset=req.read_offset,
                    skip_special_tokens=True,
                    final=output.stop_reason(req, upto) is not None,
                    steps=len(toks),
                )
            )
        try:
            results = await self.cluster.tokenizer.decode_stream(items)
        except PipeserveError as exc:
            self.cluster.tokenizer_healthy = False
            err = StageUnavailableError(
                f"tokenizer at {self.cluster.tokenizer.address} is unavailable: {exc.message}"
            )
            for req, _, _ in reqs:
                self._fail(req, err)
            return
        for (req, upto, toks), res in zip(reqs, results, strict=True):
            if res.error is not None:  # in-process decoding: only this request's ids are bad
                self._fail(
                    req,
                    PipeserveError(
                        f"the model generated a token the tokenizer cannot decode: {res.error.message}"
                    ),
                )
                continue
            req.prefix_offset, req.read_offset = res.prefix_offset, res.read_offset
            for j, (tok, text) in enumerate(zip(toks, res.pieces, strict=True)):
                piece, reason = output.take_text(req, text, upto - len(toks) + 1 + j)
                ev = TokenEvent([tok.token_id], piece)
                if tok.logprob is not None:
                    ev.logprobs = [(tok.token_id, tok.logprob)]
                    ev.top_logprobs = [list(tok.top_logprobs)]
                req.events.put_nowait(ev)
                if reason is not None:
                    self._finish(req, reason)
                    break

    def _finish(self, req: Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        req.events.put_nowait(FinalEvent(reason, output.final_tail(req, reason)))
        self._retire(req)

    def _fail(self, req: Request, err: PipeserveError) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = "error"
        req.finished_at = time.monotonic()
        req.events.put_nowait(ErrorEvent(err))
        self._retire(req)

    def _retire(self, req: Request) -> None:
        """Take a finished request out of its group and free its caches on every node it used."""
        self._unroute(req)
        self.requests.pop(req.id, None)
        self._admit()

    def _release_soon(self, rid: str, nodes: list[NodeHandle]) -> None:
        task = asyncio.create_task(self._release(rid, nodes))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _release(self, rid: str, nodes: list[NodeHandle]) -> None:
        results = await asyncio.gather(*(n.client.release([rid]) for n in nodes), return_exceptions=True)
        for n, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                log.info("release of %s on %s failed (%s); its TTL will evict it", rid, n.id, res)

    def new_request_id(self) -> str:
        return "req-" + uuid.uuid4().hex[:16]


def _add_timings(req: Request, o: Outcome) -> None:
    """Add a step's per-part times to the request's stage stats (the API's per-token figures)."""
    for t in o.timings:
        st = req.stage_stats.setdefault(t.part, StageStats())
        st.node_id = t.node_id
        st.forward_ms += t.forward_ms
        st.hop_ms += t.hop_ms
        st.bytes_sent += t.bytes_sent
