"""The coordinator's end of the chain data path (`coordinator.data_path: chain`, the default).

A step goes out once, to the first part's node(s), down a Relay link kept open to each; the nodes
pass the hidden states along each request's route themselves, and the last part's nodes report
the sampled tokens on the Subscribe stream the coordinator keeps open to every node. So per token
the network carries (parts + 1) one-way hops instead of the hub's 2 x parts, and hidden states
never reach the coordinator. Any node reports a failure it meets on its own stream, naming the
part and node where it happened; a node whose stream closes is gone, and every pending step
through it fails over. The outcome of each request in a step is the first report about it; later
ones (a retry's, a broken link's) are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
from google.rpc import status_pb2
from grpc_status import rpc_status

from pipeserve.coordinator.cluster import Cluster, NodeHandle
from pipeserve.proto import model_service_pb2 as pb

log = logging.getLogger(__name__)


def status_error(code: grpc.StatusCode, message: str, status: bytes = b"") -> grpc.aio.AioRpcError:
    """The exception a unary call would have raised for this failure, rich details included (so
    the failover policy classifies chain failures exactly as hub ones)."""
    trailing = grpc.aio.Metadata()
    if status:
        st = status_pb2.Status.FromString(status)
        code = next((c for c in grpc.StatusCode if c.value[0] == st.code), code)
        message = st.message
        trailing = grpc.aio.Metadata((rpc_status.GRPC_DETAILS_METADATA_KEY, status))
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), trailing, details=message)


@dataclass
class Outcome:
    ok: bool
    token: pb.SampledToken | None = None
    timings: list[pb.StageTiming] = field(default_factory=list)
    node: NodeHandle | None = None  # where it failed
    part: int = 0
    error: BaseException | None = None


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
    def __init__(self, cluster: Cluster) -> None:
        self.cluster = cluster
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
        err = status_error(grpc.StatusCode.UNAVAILABLE, f"node {node.id}: {reason}")
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
            err = status_error(grpc.StatusCode.UNKNOWN, f"node {res.failed_node} failed", res.status)
            for rid in res.request_ids:
                route_node = next((n for n in step.routes.get(rid, ()) if n.part == res.failed_part), None)
                step.settle(rid, Outcome(False, node=node or route_node, part=res.failed_part, error=err))
            return
        tokens = {t.request_id: t for t in res.tokens}
        for rid in res.request_ids:
            step.settle(rid, Outcome(True, token=tokens.get(rid), timings=list(res.timings)))

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
    async def run(
        self,
        step_id: str,
        msgs: dict[NodeHandle, pb.ChainStep],
        routes: dict[str, set[NodeHandle]],
        timeout_s: float,
    ) -> dict[str, Outcome]:
        """Send one step (a message per first-part node) and wait for every request's outcome;
        requests with none by `timeout_s` are missing from the result."""
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
