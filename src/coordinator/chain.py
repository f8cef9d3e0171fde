"""The coordinator's end of the chain, the data path (a `StagePath`, stage_path.py).

A step goes out once, to the first part's node(s), down a Relay link kept open to each; the nodes
pass the hidden states along each request's route themselves, and the last part's nodes report
the sampled tokens on the Subscribe stream the coordinator keeps open to every node. So per token
the network carries (parts + 1) one-way hops, and hidden states never reach the coordinator. Any
node reports a failure it meets on its own stream, as data (a StepError: reason, message, part,
node); a node whose stream closes is gone, and every pending step through it fails over. The
outcome of each request in a step is the first report about it; later ones (a retry's, a broken
link's) are ignored. This module owns every wire message of a step: the scheduler sees domain
types only.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc

from pipeserve.common import wire
from pipeserve.common.errors import PipeserveError, Reason, StageUnavailableError, make_error
from pipeserve.common.sampling_params import SamplingParams
from pipeserve.coordinator.cluster import Cluster, NodeHandle
from pipeserve.coordinator.requests import PlanItem, Request
from pipeserve.coordinator.stage_path import Outcome, Sampled, StageTime
from pipeserve.proto import model_service_pb2 as pb

log = logging.getLogger(__name__)


def step_failure(err: pb.StepError, part: int, node: str) -> PipeserveError:
    """A failure a node reported, as the domain error (an unknown reason from a newer peer is an
    upstream error: say what we can)."""
    try:
        reason = Reason(err.reason)
    except ValueError:
        reason = Reason.UPSTREAM_ERROR
    return make_error(
        reason,
        err.message or f"node {node} failed",
        param=err.param or None,
        part=part,
        node=node,
        retry_after_s=err.retry_after_s or None,
    )


def sampled(t: pb.SampledToken) -> Sampled:
    return Sampled(
        t.token_id,
        t.logprob if t.HasField("logprob") else None,
        [(x.token_id, x.logprob) for x in t.top_logprobs],
    )


@functools.lru_cache(maxsize=4096)
def _sampling_pb(p: SamplingParams) -> pb.SamplingParams:
    """A request's sampling parameters on the wire, made once (not at every step)."""
    return wire.sampling_to_pb(p)


def chunk(req: Request, start: int, n: int, sample: bool) -> pb.SequenceChunk:
    """Tokens start..start+n-1 of a request for a stage, then its drafts when it has any (a decode);
    the last stage samples after them when asked."""
    draft = req.draft if sample else []
    return pb.SequenceChunk(
        request_id=req.id,
        start_pos=start,
        token_ids=req.tokens[start : start + n] + draft,
        sample=sample,
        sampling=_sampling_pb(req.sampling) if sample else None,
        n_draft=len(draft),
    )


@dataclass
class PendingStep:
    routes: dict[str, set[NodeHandle]]  # request id -> every node of its route
    outcomes: dict[str, Outcome] = field(default_factory=dict)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def settle(self, rid: str, outcome: Outcome) -> None:
        if rid in self.routes and rid not in self.outcomes:
            self.outcomes[rid] = outcome
            if len(self.outcomes) == len(self.routes):
                self.done.set()


class _Link:
    """A Relay call kept open to one first-part node; steps are queued on it."""

    def __init__(self, node: NodeHandle) -> None:
        self.node = node
        self.queue: asyncio.Queue[pb.ChainStep | None] = asyncio.Queue()
        self.call = node.client.stub.Relay(self._messages())  # type: ignore[attr-defined]
        self.task = asyncio.ensure_future(self.call)

    async def _messages(self):  # type: ignore[no-untyped-def]
        while (m := await self.queue.get()) is not None:
            yield m

    @property
    def open(self) -> bool:
        return not self.task.done()

    def close(self) -> None:
        self.queue.put_nowait(None)
        self.call.cancel()


class ChainPath:
    def __init__(self, cluster: Cluster, wire_dtype: str = "fp32") -> None:
        self.cluster = cluster
        self.wire_dtype = wire.WIRE_DTYPES[wire_dtype]
        self.id = "coord-" + uuid.uuid4().hex[:12]
        self.pending: dict[str, PendingStep] = {}
        self.live: set[NodeHandle] = set()  # nodes whose results stream is open
        self._subs: dict[NodeHandle, asyncio.Task] = {}
        self._links: dict[NodeHandle, _Link] = {}
        self.changed = asyncio.Event()

    # ---- results streams -------------------------------------------------------------------------
    def ensure_streams(self) -> None:
        """Open a results stream to every healthy node that has none (called after health checks)."""
        for node in self.cluster.nodes:
            task = self._subs.get(node)
            if node.healthy and (task is None or task.done()):
                self._subs[node] = asyncio.create_task(self._subscribe(node), name=f"results-{node.id}")

    async def _subscribe(self, node: NodeHandle) -> None:
        call = node.client.stub.Subscribe(pb.SubscribeRequest(coordinator_id=self.id))  # type: ignore[attr-defined]
        reason = "results stream closed"
        try:
            await call.initial_metadata()
            self.live.add(node)
            self.changed.set()
            async for res in call:
                self._on_result(res)
        except asyncio.CancelledError:
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            reason = f"results stream closed: {exc.code().name}: {exc.details()}"
        finally:
            self.live.discard(node)
            self._lost(node, reason)

    def _lost(self, node: NodeHandle, reason: str) -> None:
        """A node's results stream ended: it is gone (or restarting); steps through it fail over."""
        link = self._links.pop(node, None)
        if link is not None:
            link.close()
        err = StageUnavailableError(f"node {node.id}: {reason}", part=node.part, node=node.id)
        for step in self.pending.values():
            for rid, nodes in step.routes.items():
                if node in nodes:
                    step.settle(rid, Outcome(False, node=node, part=node.part, error=err))

    def _on_result(self, res: pb.StepResult) -> None:
        step = self.pending.get(res.step_id)
        if step is None:
            return  # a step already settled (a late report after a failover)
        if res.failed:
            node = next((n for n in self.cluster.nodes if n.id == res.failed_node), None)
            err = step_failure(res.error, res.failed_part, res.failed_node)
            for rid in res.request_ids:
                route_node = next((n for n in step.routes.get(rid, ()) if n.part == res.failed_part), None)
                step.settle(rid, Outcome(False, node=node or route_node, part=res.failed_part, error=err))
            return
        tokens: dict[str, list[Sampled]] = {}
        for t in res.tokens:  # a request with drafts has several, in order
            tokens.setdefault(t.request_id, []).append(sampled(t))
        timings = [StageTime(t.part, t.node_id, t.forward_ms, t.hop_ms, t.bytes_sent) for t in res.timings]
        for rid in res.request_ids:
            step.settle(rid, Outcome(True, tokens=tokens.get(rid, []), timings=timings))

    async def wait_live(self, nodes: Iterable[NodeHandle], timeout_s: float) -> bool:
        """Until every node has its results stream open (a freshly healthy node needs a moment)."""
        needed = set(nodes)
        deadline = time.monotonic() + timeout_s
        while not needed <= self.live:
            self.ensure_streams()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), min(left, 0.05))
        return True

    # ---- steps -----------------------------------------------------------------------------------
    async def run(self, plan: list[PlanItem], timeout_s: float) -> dict[str, Outcome]:
        """Send one step (a message per first-part node, each request's route in it) and wait for
        every request's outcome; requests with none by `timeout_s` are missing from the result."""
        step_id = uuid.uuid4().hex[:12]
        n_parts = self.cluster.n_parts
        msgs: dict[NodeHandle, pb.ChainStep] = {}
        routes: dict[str, set[NodeHandle]] = {}
        for req, start, n in plan:
            first = req.route[0]
            m = msgs.setdefault(first, pb.ChainStep(step_id=step_id, part=0, output_dtype=self.wire_dtype))
            m.chunks.append(chunk(req, start, n, start + n == len(req.tokens)))
            hops = [
                pb.RouteHop(part=p, node_id=req.route[p].id, address=req.route[p].address)
                for p in range(n_parts)
            ]
            m.routes.append(pb.ChainRoute(request_id=req.id, hops=hops))
            routes[req.id] = set(req.route.values())
        step = self.pending[step_id] = PendingStep(routes)
        try:
            for node, msg in msgs.items():
                link = self._links.get(node)
                if link is None or not link.open:
                    link = self._links[node] = _Link(node)
                msg.coordinator_id = self.id
                msg.sent_unix_ms = time.time() * 1e3
                link.queue.put_nowait(msg)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(step.done.wait(), timeout_s)
            return dict(step.outcomes)
        finally:
            del self.pending[step_id]

    async def close(self) -> None:
        for link in self._links.values():
            link.close()
        for task in self._subs.values():
            task.cancel()
        await asyncio.gather(*self._subs.values(), return_exceptions=True)
