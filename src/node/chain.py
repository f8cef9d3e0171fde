"""A node's share of the chain data path, without gRPC servers (node_server.py wires it up).

Steps arrive on Relay links (from the coordinator for the first part, from the previous part's
nodes otherwise) and wait in one FIFO queue; one worker thread runs them in order on the runner
(micro-batches of different groups interleave exactly as they arrive). After a step, the worker
cuts its hidden states into the rows of each next node (a request's route names the node of every
part), and sends each its share down a link kept open to it; the last part instead reports the
sampled tokens. Every failure is reported too, as data, naming the part and node where it
happened: the step's own error (a bad batch, a full cache, a bug) with its reason, or the next
node unreachable (stage_unavailable, naming that node). Reports go to the coordinator's
Subscribe stream.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import grpc

from pipeserve.common import wire
from pipeserve.common.errors import PipeserveError, StageUnavailableError
from pipeserve.node import codec
from pipeserve.node.runner import StageRunner
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

MAX_QUEUED_STEPS = 1024  # the coordinator keeps one step per micro-batch group in flight; this is a guard
MAX_LINKS = 64  # open links to next nodes (one per replica of the next part, in practice)


def step_error(exc: BaseException) -> pb.StepError:
    """A failure as data: a domain error's fields; anything else is a bug (internal)."""
    err = exc if isinstance(exc, PipeserveError) else PipeserveError(f"{type(exc).__name__}: {exc}")
    return pb.StepError(
        reason=err.reason.value,
        message=err.message,
        param=err.param or "",
        retry_after_s=err.retry_after_s or 0.0,
    )


class Link:
    """A Relay call kept open to one next node; `send` queues a step on it. When the call ends with
    an error, `on_broken(step_ids)` hears which recent steps may not have arrived."""

    def __init__(
        self, hop: pb.RouteHop, channel: grpc.Channel, on_broken: Callable[[Link, list[Any]], None]
    ) -> None:
        self.hop, self.channel, self.on_broken = hop, channel, on_broken
        self.broken = False
        self._q: queue.SimpleQueue[pb.ChainStep | None] = queue.SimpleQueue()
        self._sent: deque[Any] = deque(maxlen=256)  # (step_id, coordinator_id, request_ids) lately sent
        self._lock = threading.Lock()
        self._call = pb_grpc.ModelNodeStub(channel).Relay.future(self._messages())
        self._call.add_done_callback(self._done)

    def _messages(self) -> Any:
        while (m := self._q.get()) is not None:
            yield m

    def send(self, msg: pb.ChainStep) -> None:
        with self._lock:
            if self.broken:
                raise ConnectionError(f"the link to {self.hop.node_id} at {self.hop.address} is closed")
            self._sent.append((msg.step_id, msg.coordinator_id, [c.request_id for c in msg.chunks]))
            self._q.put(msg)

    def _done(self, call: grpc.Future) -> None:
        with self._lock:
            self.broken = True
            lost = list(self._sent)
        if call.cancelled():
            return
        exc = call.exception()
        if exc is not None:
            log.warning("link to %s at %s closed: %s", self.hop.node_id, self.hop.address, exc)
            self.on_broken(self, lost)

    def close(self) -> None:
        self._q.put(None)
        self.channel.close()


class ChainWorker:
    def __init__(
        self,
        runner: StageRunner,
        node_id: str,
        channel_to: Callable[[pb.RouteHop], grpc.Channel] | None,
        report: Callable[[str, pb.StepResult], None],
        link_to: Callable[[pb.RouteHop, Callable[[Link, list[Any]], None]], Link] | None = None,
    ) -> None:
        """`channel_to(hop)` gives the channel a Link to that next node runs on; tests pass
        `link_to(hop, on_broken)` instead, which makes the link itself (no gRPC)."""
        self.runner, self.node_id, self.part = runner, node_id, runner.part
        self.channel_to, self.report, self.link_to = channel_to, report, link_to
        self.is_last = runner.loaded.shard.is_last
        self.steps = 0  # steps run (tests read it)
        self._q: queue.Queue[tuple[pb.ChainStep, float, int] | None] = queue.Queue(MAX_QUEUED_STEPS)
        self._links: dict[tuple[str, str], Link] = {}
        self._links_lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="chain-worker", daemon=True)
        self._thread.start()

    def submit(self, msg: pb.ChainStep) -> None:
        """Queue a step received on a link (never blocks the link for long: the queue is bounded
        only as a guard)."""
        arrived = time.time() * 1e3
        try:
            self._q.put((msg, arrived, msg.ByteSize()), timeout=5)
        except queue.Full:
            self._fail(
                msg, self.part, self.node_id, StageUnavailableError(f"node {self.node_id} is overloaded")
            )

    def stop(self) -> None:
        self._q.put(None)
        with self._links_lock:
            for link in self._links.values():
                link.close()
            self._links.clear()

    # ---- the worker ------------------------------------------------------------------------------
    def _loop(self) -> None:
        while (item := self._q.get()) is not None:
            msg, arrived, nbytes = item
            try:
                self._run(msg, arrived, nbytes)
            except Exception as exc:  # a bug here must not stop the worker: report it as ours
                log.exception("chain step %s failed", msg.step_id)
                self._fail(msg, self.part, self.node_id, exc)

    def _run(self, msg: pb.ChainStep, arrived: float, nbytes: int) -> None:
        self.steps += 1
        chunks = codec.chunks_from_pb(msg.chunks, self.is_last)
        try:
            hidden = codec.decode_tensor(msg.hidden) if msg.HasField("hidden") else None
            out = self.runner.forward(chunks, hidden)
        except Exception as exc:
            self._fail(msg, self.part, self.node_id, exc)
            return
        timing = pb.StageTiming(
            part=self.part,
            node_id=self.node_id,
            forward_ms=out.forward_ms,
            hop_ms=max(0.0, arrived - msg.sent_unix_ms) if msg.sent_unix_ms else 0.0,
            bytes_sent=nbytes,
        )
        timings = [*msg.timings, timing]
        if self.is_last:
            tokens = codec.samples_to_pb(out.samples)
            result = pb.StepResult(
                step_id=msg.step_id,
                request_ids=[c.request_id for c in msg.chunks],
                tokens=tokens,
                timings=timings,
            )
            self.report(msg.coordinator_id, result)
            return
        assert out.hidden is not None
        encoded = codec.encode_tensor(out.hidden, codec.wire_dtype(msg.output_dtype))
        routes = {r.request_id: r for r in msg.routes}
        by_next: dict[tuple[str, str], list[int]] = {}
        hops: dict[tuple[str, str], pb.RouteHop] = {}
        for i, c in enumerate(msg.chunks):
            hop = routes[c.request_id].hops[self.part + 1]
            key = (hop.node_id, hop.address)
            by_next.setdefault(key, []).append(i)
            hops[key] = hop
        # one next node (no replicas in play): the whole output goes on as it is, without cutting
        rows = None if len(by_next) == 1 else wire.split_rows(encoded, [len(c.token_ids) for c in msg.chunks])
        for key, idx in by_next.items():
            nxt = pb.ChainStep(
                step_id=msg.step_id,
                coordinator_id=msg.coordinator_id,
                part=self.part + 1,
                chunks=[msg.chunks[i] for i in idx],
                hidden=encoded if rows is None else wire.join_rows([rows[i] for i in idx]),
                output_dtype=msg.output_dtype,
                routes=[routes[msg.chunks[i].request_id] for i in idx],
                timings=timings,
                sent_unix_ms=time.time() * 1e3,
            )
            try:
                self._link(hops[key]).send(nxt)
            except Exception as exc:
                self._fail(
                    nxt,
                    self.part + 1,
                    key[0],
                    StageUnavailableError(f"node {key[0]} at {key[1]} is unreachable: {exc}"),
                )

    def _link(self, hop: pb.RouteHop) -> Link:
        key = (hop.node_id, hop.address)
        with self._links_lock:
            link = self._links.get(key)
            if link is None or link.broken:
                if link is not None:
                    link.close()
                if len(self._links) >= MAX_LINKS:  # drop the oldest link (to a node gone or replaced)
                    self._links.pop(next(iter(self._links))).close()
                if self.link_to is not None:
                    link = self.link_to(hop, self._link_broken)
                else:
                    assert self.channel_to is not None
                    link = Link(hop, self.channel_to(hop), self._link_broken)
                self._links[key] = link
            return link

    def _link_broken(self, link: Link, lost: list[Any]) -> None:
        """The next node may not have received these steps: say so (the coordinator keeps the first
        outcome of each request's step and ignores later ones)."""
        err = StageUnavailableError(f"the link to node {link.hop.node_id} at {link.hop.address} broke")
        for step_id, coordinator_id, rids in lost:
            self.report(
                coordinator_id,
                pb.StepResult(
                    step_id=step_id,
                    request_ids=rids,
                    failed=True,
                    failed_part=link.hop.part,
                    failed_node=link.hop.node_id,
                    error=step_error(err),
                ),
            )

    def _fail(self, msg: pb.ChainStep, part: int, node: str, exc: BaseException) -> None:
        if not isinstance(exc, PipeserveError):
            log.warning("step %s failed on %s: %s", msg.step_id, node, exc)
        self.report(
            msg.coordinator_id,
            pb.StepResult(
                step_id=msg.step_id,
                request_ids=[c.request_id for c in msg.chunks],
                timings=list(msg.timings),
                failed=True,
                failed_part=part,
                failed_node=node,
                error=step_error(exc),
            ),
        )
