"""The coordinator's core: continuous batching through the pipeline, with micro-batches in flight.

Requests wait in a bounded FIFO queue, are admitted when the batch and the nodes' cache budgets
have room, and are spread over `micro_batches` groups. Each group runs its own step loop: one
forward per stage for all its requests (prefill chunks and decode tokens mixed), so with N
groups up to N stages compute at once on different groups. A failed node is marked down and the
affected requests are replayed on a healthy replica (their tokens so far are prefilled again;
sampling depends only on seed and position, so the output does not change).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import grpc
import torch

from pipeserve.common import codec
from pipeserve.common.config import Config
from pipeserve.common.errors import (
    ContextLengthError,
    InvalidInputError,
    PipeserveError,
    QueueFullError,
    StageUnavailableError,
)
from pipeserve.common.grpc_util import error_kind
from pipeserve.coordinator.cluster import Cluster, NodeHandle, _rpc_error_text
from pipeserve.modeling.sampling import SamplingParams
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import tokenizer_service_pb2 as tpb

log = logging.getLogger(__name__)

# gRPC codes that mean "this node is gone or stuck": fail over to a replica.
NODE_FAILURE_CODES = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
}


@dataclass
class TokenEvent:
    token_ids: list[int]
    text: str
    logprobs: list[tuple[int, float]] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class FinalEvent:
    finish_reason: str  # "stop" | "length" | "cancelled"
    text: str  # held-back text flushed at the end


@dataclass
class ErrorEvent:
    error: PipeserveError


@dataclass
class StageStats:
    node_id: str = ""
    forward_ms: float = 0.0
    hop_ms: float = 0.0
    bytes_sent: int = 0


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    stop: list[str]
    stop_ids: set[int]
    tokens: list[int] = field(default_factory=list)  # prompt + generated
    n_computed: int = 0  # tokens whose KV is cached on every stage of the route
    route: dict[int, NodeHandle] = field(default_factory=dict)
    visited: set[NodeHandle] = field(default_factory=set)  # every node that may hold a cache for it
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    group: int = -1
    arrival: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    finish_reason: str | None = None
    cancelled: bool = False
    stopping: bool = False  # its last token ends it (EOS or length); the emit task finishes it
    in_step: bool = False  # a forward for it is in flight: releasing its caches must wait for the step
    release_after_step: list[NodeHandle] = field(default_factory=list)
    failovers: int = 0
    stalled_since: float | None = None
    stage_stats: dict[int, StageStats] = field(default_factory=dict)
    # incremental detokenization state (offsets into the generated ids) and stop-string hold-back
    prefix_offset: int = 0
    read_offset: int = 0
    text: str = ""
    emitted: int = 0

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.prompt_ids) :]

    @property
    def reserve_tokens(self) -> int:
        return len(self.prompt_ids) + self.max_tokens


@dataclass
class Group:
    index: int
    requests: list[Request] = field(default_factory=list)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None
    emitting: asyncio.Task | None = None  # detokenize + stream of the previous step, overlapping this one


class Scheduler:
    def __init__(self, cfg: Config, cluster: Cluster) -> None:
        self.cfg, self.cluster = cfg, cluster
        c = cfg.coordinator
        self.max_running, self.max_waiting = c.max_running, c.max_waiting
        self.max_batch_tokens = c.max_batch_tokens
        self.prefill_chunk_tokens = c.prefill_chunk_tokens
        self.n_groups = c.micro_batches or cluster.n_parts
        self.groups = [Group(i) for i in range(self.n_groups)]
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.running = 0
        self.eos_ids: set[int] = set()
        self.max_context = cfg.max_context or 0
        self._rate: deque[tuple[float, int]] = deque(maxlen=256)  # (time, tokens) for tokens/s
        self._bg: set[asyncio.Task] = set()

    def start(self) -> None:
        for g in self.groups:
            g.task = asyncio.create_task(self._group_loop(g), name=f"group-{g.index}")

    async def stop(self) -> None:
        for g in self.groups:
            if g.task:
                g.task.cancel()
        await asyncio.gather(*(g.task for g in self.groups if g.task), return_exceptions=True)

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
    ) -> Request:
        """Queue a request (raises for bad input or a full queue; never blocks)."""
        if not self.cluster.ready:
            raise StageUnavailableError("the cluster is not ready: " + "; ".join(self.cluster.problems))
        if rid in self.requests:
            raise InvalidInputError(f"request id {rid!r} is already in use")
        sampling.validate()
        if not prompt_ids:
            raise InvalidInputError("the prompt is empty: it must contain at least one token")
        vocab = self.cluster.tokenizer_info.vocab_size if self.cluster.tokenizer_info else 0
        bad = next((t for t in prompt_ids if t < 0 or (vocab and t >= vocab)), None)
        if bad is not None:
            raise InvalidInputError(f"prompt token id {bad} is outside the vocabulary [0, {vocab})")
        ctx = self.context_limit()
        if len(prompt_ids) >= ctx:
            raise ContextLengthError(
                f"the prompt has {len(prompt_ids)} tokens but the context length is {ctx} "
                f"(prompt + generated tokens must fit)"
            )
        max_tokens = min(max_tokens or ctx, ctx - len(prompt_ids))
        req = Request(rid, list(prompt_ids), max_tokens, sampling, [s for s in stop if s], set(stop_ids))
        req.tokens = list(prompt_ids)
        if not ignore_eos:
            req.stop_ids |= self.eos_ids
        for part in range(self.cluster.n_parts):
            budget = self.cluster.max_budget(part)
            if budget and req.reserve_tokens > budget:
                raise ContextLengthError(
                    f"prompt ({len(prompt_ids)}) + max_tokens ({max_tokens}) = {req.reserve_tokens} tokens can never "
                    f"fit part {part}'s KV-cache budget of {budget} tokens; lower max_tokens"
                )
        if len(self.waiting) >= self.max_waiting and self.running >= self.max_running:
            raise QueueFullError(
                f"the queue is full ({self.running} running, {len(self.waiting)} waiting); retry later",
                retry_after_s=self.retry_after(),
            )
        self.requests[rid] = req
        self.waiting.append(req)
        self._admit()
        return req

    def retry_after(self) -> float:
        """Seconds until a queue slot likely frees: queued work over the recent finish rate."""
        rate = self.tokens_per_second()
        if rate <= 0:
            return 2.0
        pending = sum(r.max_tokens - len(r.generated) for r in self.requests.values())
        per_req = pending / max(1, len(self.requests))
        return max(1.0, min(60.0, per_req / max(rate / max(1, self.running), 1e-3)))

    def tokens_per_second(self, window_s: float = 5.0) -> float:
        now = time.monotonic()
        recent = [(t, n) for t, n in self._rate if now - t <= window_s]
        if len(recent) < 2:
            return 0.0
        return sum(n for _, n in recent) / max(now - recent[0][0], 1e-3)

    def _admit(self) -> None:
        """Move requests from the queue into groups, first come first served (the head waits
        rather than being overtaken, so nobody starves)."""
        while self.waiting and self.running < self.max_running:
            req = self.waiting[0]
            if req.cancelled:
                self.waiting.popleft()
                continue
            route = {}
            for part in range(self.cluster.n_parts):
                node = self.cluster.pick(part, req.reserve_tokens)
                if node is None or node.reserved_tokens + req.reserve_tokens > node.budget:
                    return  # a part is down or full now: wait (stalls are timed out by the loops)
                route[part] = node
            self.waiting.popleft()
            for part, node in route.items():
                self._route(req, part, node)
            req.admitted_at = time.monotonic()
            g = min(self.groups, key=lambda g: len(g.requests))
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
            old.reserved_tokens -= req.reserve_tokens
        req.route[part] = node
        req.visited.add(node)
        node.running.add(req.id)
        node.reserved_tokens += req.reserve_tokens

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
                self._fail(req, StageUnavailableError(self.cluster.part_down_message(part)))
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

    def _plan(self, g: Group) -> list[tuple[Request, int, int]]:
        """(request, start, n_tokens) for this step: decodes first, then prefill chunks FCFS."""
        for req in [r for r in g.requests if r.cancelled]:
            self._finish(req, "cancelled")
        budget = self.max_batch_tokens
        prefill_budget = self.max_batch_tokens  # cut to prefill_chunk_tokens once decodes ride along
        plan = []
        now = time.monotonic()
        for req in sorted(g.requests, key=lambda r: (len(r.tokens) - r.n_computed > 1, r.arrival)):
            if req.stopping:
                continue
            needs_route = len(req.route) < self.cluster.n_parts or any(
                not n.healthy for n in req.route.values()
            )
            if needs_route and not self._reroute(req):
                req.stalled_since = req.stalled_since or now
                if now - req.stalled_since > self.cfg.coordinator.recovery_wait_s:
                    part = self.cluster.down_part()
                    self._fail(req, StageUnavailableError(self.cluster.part_down_message(part or 0)))
                continue
            req.stalled_since = None
            todo = len(req.tokens) - req.n_computed
            n = min(todo, budget) if todo == 1 else min(todo, budget, prefill_budget)
            if n <= 0:
                continue
            plan.append((req, req.n_computed, n))
            budget -= n
            if todo == 1:  # a decode token: long prefills must not stall it (inter-token latency)
                prefill_budget = min(prefill_budget, self.prefill_chunk_tokens)
            else:
                prefill_budget -= n
            if budget <= 0:
                break
        return plan

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

    async def _step(self, g: Group) -> None:
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
        finally:
            for req, _, _ in plan:
                req.in_step = False
                if req.release_after_step:
                    self._release_soon(req.id, req.release_after_step)
                    req.release_after_step = []

    async def _run_step(self, g: Group, plan: list[tuple[Request, int, int]]) -> None:
        step_id = uuid.uuid4().hex[:12]
        hidden: dict[str, torch.Tensor] = {}
        sampled: dict[str, pb.SampledToken] = {}
        last = self.cluster.n_parts - 1
        for part in range(self.cluster.n_parts):
            plan = [item for item in plan if item[0].finish_reason is None]  # finished meanwhile
            if not plan:
                return
            by_node: dict[NodeHandle, list[tuple[Request, int, int]]] = {}
            for item in plan:
                by_node.setdefault(item[0].route[part], []).append(item)
            results = await asyncio.gather(
                *(
                    self._forward(step_id, part, node, items, hidden, part == last)
                    for node, items in by_node.items()
                ),
                return_exceptions=True,
            )
            failed = False
            for (node, items), res in zip(by_node.items(), results, strict=True):
                if isinstance(res, BaseException):
                    failed = True
                    self._on_forward_error(node, part, items, res)
                    continue
                resp, rpc_ms, nbytes = res
                for req, _, _ in items:
                    st = req.stage_stats.setdefault(part, StageStats())
                    st.node_id = node.id
                    st.forward_ms += resp.forward_ms
                    st.hop_ms += max(0.0, rpc_ms - resp.forward_ms)
                    st.bytes_sent += nbytes
                if part == last:
                    sampled.update((t.request_id, t) for t in resp.tokens)
                else:
                    out = codec.decode_tensor(resp.hidden)
                    off = 0
                    for req, _, n in items:
                        hidden[req.id] = out[off : off + n]
                        off += n
            if failed:
                return  # the loop retries next step: survivors resend the same chunk (idempotent)
        new_tokens: list[tuple[Request, int]] = []
        for req, start, n in plan:
            req.n_computed = start + n
            tok = sampled.get(req.id)
            if tok is None or req.finish_reason is not None:
                continue
            req.tokens.append(tok.token_id)
            new_tokens.append((req, len(req.tokens)))
            req.stopping = self._stop_reason(req, len(req.tokens)) is not None
            if req.first_token_at is None:
                req.first_token_at = time.monotonic()
        self._rate.append((time.monotonic(), len(new_tokens)))
        if new_tokens:  # detokenize and stream while the next step already computes
            g.emitting = asyncio.create_task(self._emit_in_order(g.emitting, new_tokens, sampled))

    async def _forward(
        self,
        step_id: str,
        part: int,
        node: NodeHandle,
        items: list[tuple[Request, int, int]],
        hidden: dict[str, torch.Tensor],
        is_last: bool,
    ) -> tuple[pb.ForwardResponse, float, int]:
        chunks = []
        for req, start, n in items:
            sample = is_last and start + n == len(req.tokens)
            chunks.append(
                pb.SequenceChunk(
                    request_id=req.id,
                    start_pos=start,
                    token_ids=req.tokens[start : start + n],
                    sample=sample,
                    sampling=codec.sampling_to_pb(req.sampling) if sample else None,
                )
            )
        msg = pb.ForwardRequest(request_id=step_id, chunks=chunks)
        if part > 0:
            msg.hidden.CopyFrom(codec.encode_tensor(torch.cat([hidden[req.id] for req, _, _ in items])))
        t0 = time.perf_counter()
        resp = await node.client.forward(msg)
        return resp, (time.perf_counter() - t0) * 1e3, msg.ByteSize()

    def _on_forward_error(
        self, node: NodeHandle, part: int, items: list[tuple[Request, int, int]], exc: BaseException
    ) -> None:
        code = exc.code() if isinstance(exc, grpc.aio.AioRpcError) else None
        text = _rpc_error_text(exc)
        if error_kind(exc) == "UnknownRequestError":  # the node restarted and lost our caches: replay there
            for req, _, _ in items:
                req.n_computed = 0
            return
        if code in NODE_FAILURE_CODES or code is None:
            node.mark_down(f"forward failed: {text}")
            for req, _, _ in items:
                req.failovers += 1
                if req.failovers > self.cfg.coordinator.max_retries + self.cluster.n_parts:
                    self._fail(
                        req,
                        StageUnavailableError(f"{self.cluster.part_down_message(part)} (last error: {text})"),
                    )
                    continue
                req.n_computed = 0  # replay prompt + generated tokens on the new route
            log.warning(
                "node %s failed a forward (%s); %d requests will fail over", node.id, text, len(items)
            )
            return
        err: PipeserveError = (
            InvalidInputError(f"node {node.id} (part {part}) rejected the batch: {exc.details()}")
            if code == grpc.StatusCode.INVALID_ARGUMENT and isinstance(exc, grpc.aio.AioRpcError)
            else PipeserveError(f"node {node.id} (part {part}): {text}")
        )
        for req, _, _ in items:
            self._fail(req, err)

    # ---- output -------------------------------------------------------------------------------
    async def _emit_in_order(
        self, prev: asyncio.Task | None, reqs: list[tuple[Request, int]], sampled: dict[str, pb.SampledToken]
    ) -> None:
        """Emit one step's tokens after the previous step's (text must stay in order)."""
        if prev is not None:
            await asyncio.gather(prev, return_exceptions=True)
        try:
            await self._emit(reqs, sampled)
        except Exception as exc:  # a bug while emitting must not leave requests hanging
            log.exception("emitting tokens failed")
            for req, _ in reqs:
                self._fail(
                    req, PipeserveError(f"internal error in the coordinator: {type(exc).__name__}: {exc}")
                )

    async def _emit(self, reqs: list[tuple[Request, int]], sampled: dict[str, pb.SampledToken]) -> None:
        """Detokenize each request's tokens up to `upto` (its length after that step) and stream them."""
        reqs = [(r, upto) for r, upto in reqs if r.finish_reason is None]
        if not reqs:
            return
        items = []
        for req, upto in reqs:
            gen = req.tokens[len(req.prompt_ids) : upto]
            items.append(
                tpb.DecodeStreamItem(
                    request_id=req.id,
                    token_ids=gen[req.prefix_offset :],
                    prefix_offset=req.prefix_offset,
                    read_offset=req.read_offset,
                    skip_special_tokens=True,
                    final=self._stop_reason(req, upto) is not None,
                )
            )
        try:
            results = await self.cluster.tokenizer.decode_stream(items)
        except grpc.RpcError as exc:
            self.cluster.tokenizer_healthy = False
            err = StageUnavailableError(
                f"tokenizer at {self.cluster.tokenizer.address} is unavailable: {_rpc_error_text(exc)}"
            )
            for req, _ in reqs:
                self._fail(req, err)
            return
        for (req, upto), res in zip(reqs, results, strict=True):
            req.prefix_offset, req.read_offset = res.prefix_offset, res.read_offset
            req.text += res.text
            tok = sampled[req.id]
            reason = self._stop_reason(req, upto)
            cut = self._find_stop(req)
            if cut is not None:
                reason = "stop"
                end = cut
            elif reason is not None:
                end = len(req.text)
            else:
                end = len(req.text) - self._holdback(req)
            piece = req.text[req.emitted : max(req.emitted, end)]
            req.emitted = max(req.emitted, end)
            ev = TokenEvent([tok.token_id], piece)
            if tok.HasField("logprob"):
                ev.logprobs = [(tok.token_id, tok.logprob)]
                ev.top_logprobs = [[(t.token_id, t.logprob) for t in tok.top_logprobs]]
            req.events.put_nowait(ev)
            if reason is not None:
                self._finish(req, reason)

    def _stop_reason(self, req: Request, upto: int) -> str | None:
        """Why the request ends with its token at upto-1 (EOS/stop id or length), if it does."""
        n_gen = upto - len(req.prompt_ids)
        if n_gen > 0 and req.tokens[upto - 1] in req.stop_ids:
            return "stop"
        if n_gen >= req.max_tokens:
            return "length"
        return None

    def _find_stop(self, req: Request) -> int | None:
        if not req.stop:
            return None
        longest = max(map(len, req.stop))
        window_start = max(0, req.emitted - longest)
        hits = [i for s in req.stop if (i := req.text.find(s, window_start)) >= 0]
        return min(hits) if hits else None

    def _holdback(self, req: Request) -> int:
        """Length of the text's tail that could still become a stop string."""
        best = 0
        for s in req.stop:
            for k in range(min(len(s) - 1, len(req.text)), best, -1):
                if req.text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _finish(self, req: Request, reason: str) -> None:
        if req.finish_reason is not None:
            return
        req.finish_reason = reason
        req.finished_at = time.monotonic()
        tail = ""
        if reason != "cancelled" and req.emitted < len(req.text):
            cut = self._find_stop(req)
            tail = req.text[req.emitted : cut if cut is not None else len(req.text)]
        req.events.put_nowait(FinalEvent(reason, tail))
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
        if req.group >= 0:
            g = self.groups[req.group]
            if req in g.requests:
                g.requests.remove(req)
                self.running -= 1
        for node in req.route.values():
            node.running.discard(req.id)
            node.reserved_tokens -= req.reserve_tokens
        req.route = {}
        self.requests.pop(req.id, None)
        nodes = list(req.visited)
        req.visited = set()
        if req.in_step:  # a forward may still create a cache for it: release once the step is over
            req.release_after_step = nodes
        elif nodes:
            self._release_soon(req.id, nodes)
        self._admit()

    def _release_soon(self, rid: str, nodes: list[NodeHandle]) -> None:
        task = asyncio.create_task(self._release(rid, nodes))
        self._bg.add(task)
        task.add_done_callback(self._bg.discard)

    async def _release(self, rid: str, nodes: list[NodeHandle]) -> None:
        results = await asyncio.gather(*(n.client.release([rid]) for n in nodes), return_exceptions=True)
        for n, res in zip(nodes, results, strict=True):
            if isinstance(res, BaseException):
                log.info(
                    "release of %s on %s failed (%s); its TTL will evict it", rid, n.id, _rpc_error_text(res)
                )

    def new_request_id(self) -> str:
        return "req-" + uuid.uuid4().hex[:16]
