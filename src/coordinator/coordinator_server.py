"""The coordinator's gRPC server (`pipeserve coordinator`): a thin asyncio servicer over the
Scheduler and the Cluster. It checks the cluster at start-up and keeps checking it; health is
SERVING only while every part has a healthy node and the tokenizer serves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections.abc import AsyncIterator

import grpc

from pipeserve.common import tls, wire
from pipeserve.common.config import Config
from pipeserve.common.errors import (
    InvalidInputError,
    ModelRefusedError,
    PipeserveError,
    Reason,
    StageUnavailableError,
    make_error,
)
from pipeserve.common.grpc_util import AsyncErrorInterceptor, channel_options, listen, set_serving
from pipeserve.coordinator.chain import ChainPath
from pipeserve.coordinator.cluster import Cluster
from pipeserve.coordinator.requests import SpecStats
from pipeserve.coordinator.scheduler import ErrorEvent, FinalEvent, Request, Scheduler, TokenEvent
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
SERVICE = "pipeserve.v1.Coordinator"
FINISH = {
    "stop": pb.FINISH_REASON_STOP,
    "length": pb.FINISH_REASON_LENGTH,
    "cancelled": pb.FINISH_REASON_CANCELLED,
}


def spec_pb(s: SpecStats) -> pb.SpeculativeStats:
    return pb.SpeculativeStats(drafted=s.drafted, accepted=s.accepted, passes=s.passes, tokens=s.tokens)


class CoordinatorServicer(pb_grpc.CoordinatorServicer):
    def __init__(self, cluster: Cluster, scheduler: Scheduler) -> None:
        self.cluster, self.scheduler = cluster, scheduler

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        rid = request.request_id or self.scheduler.new_request_id()
        try:
            prompt_ids = await self._prompt_ids(request, rid)
            req = self.scheduler.submit(
                rid,
                prompt_ids,
                request.max_tokens,
                wire.sampling_from_pb(request.sampling),
                list(request.stop),
                list(request.stop_token_ids),
                request.ignore_eos,
                request.speculative if request.HasField("speculative") else None,
            )
        except PipeserveError:
            raise  # the error interceptor sends it as rich status
        log.info("request admitted", extra={"request_id": rid, "prompt_tokens": len(prompt_ids)})
        finished = False
        try:
            while True:
                ev = await req.events.get()
                if isinstance(ev, TokenEvent):
                    yield pb.GenerateResponse(
                        request_id=rid,
                        token_ids=ev.token_ids,
                        text=ev.text,
                        logprobs=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in ev.logprobs],
                        top_logprobs=[
                            pb.TokenLogprobs(
                                alternatives=[pb.TokenLogprob(token_id=t, logprob=lp) for t, lp in alts]
                            )
                            for alts in ev.top_logprobs
                        ],
                    )
                elif isinstance(ev, FinalEvent):
                    finished = True
                    final = self._final(req, ev)
                    log.info(
                        "request finished",
                        extra={
                            "request_id": rid,
                            "finish_reason": ev.finish_reason,
                            "prompt_tokens": final.prompt_tokens,
                            "completion_tokens": final.completion_tokens,
                            "ttft_ms": round(final.ttft_ms, 1),
                            "total_ms": round(final.total_ms, 1),
                            "failovers": final.failovers,
                            "stages": [
                                {
                                    "part": t.part,
                                    "node": t.node_id,
                                    "forward_ms": round(t.forward_ms, 1),
                                    "hop_ms": round(t.hop_ms, 1),
                                }
                                for t in final.stage_timings
                            ],
                        },
                    )
                    yield final
                    return
                elif isinstance(ev, ErrorEvent):
                    finished = True
                    log.warning("request failed: %s", ev.error, extra={"request_id": rid})
                    raise ev.error
        finally:
            if not finished:  # the client went away: free the request everywhere
                self.scheduler.cancel(rid)
                log.info("client disconnected; request cancelled", extra={"request_id": rid})

    async def _prompt_ids(self, request: pb.GenerateRequest, rid: str) -> list[int]:
        given = [bool(request.prompt), bool(request.prompt_token_ids), bool(request.messages)]
        if sum(given) != 1:
            raise InvalidInputError("give exactly one of prompt, prompt_token_ids or messages")
        if request.prompt_token_ids:
            return list(request.prompt_token_ids)
        try:
            if request.messages:
                return await self.cluster.tokenizer.chat(list(request.messages), rid)
            return await self.cluster.tokenizer.encode(request.prompt, rid)
        except InvalidInputError as exc:  # the tokenizer rejected the prompt
            err: PipeserveError = exc
            if request.messages and exc.reason == Reason.INVALID_PARAMETER:
                err = ModelRefusedError(exc.message)  # no chat template, or it rejects the messages
            err.param = err.param or ("messages" if request.messages else "prompt")
            raise err from exc
        except PipeserveError as exc:
            self.cluster.tokenizer_healthy = False
            raise StageUnavailableError(
                f"tokenizer at {self.cluster.tokenizer.address} is unavailable: {exc.message}"
            ) from exc

    def _final(self, req: Request, ev: FinalEvent) -> pb.GenerateResponse:
        now = time.monotonic()
        end = req.finished_at or now
        return pb.GenerateResponse(
            request_id=req.id,
            text=ev.text,
            finished=True,
            finish_reason=FINISH[ev.finish_reason],
            prompt_tokens=len(req.prompt_ids),
            completion_tokens=len(req.generated),
            stage_timings=[
                pb.StageTiming(
                    part=p,
                    node_id=s.node_id,
                    forward_ms=s.forward_ms,
                    hop_ms=s.hop_ms,
                    bytes_sent=s.bytes_sent,
                )
                for p, s in sorted(req.stage_stats.items())
            ],
            route=[
                pb.RouteEntry(part=p, node_id=s.node_id, address=self._address(s.node_id))
                for p, s in sorted(req.stage_stats.items())
            ],
            queue_ms=((req.admitted_at or end) - req.arrival) * 1e3,
            ttft_ms=((req.first_token_at or end) - req.arrival) * 1e3,
            total_ms=(end - req.arrival) * 1e3,
            failovers=req.failovers,
            speculative=spec_pb(req.spec),
        )

    def _address(self, node_id: str) -> str:
        return next((n.address for n in self.cluster.nodes if n.id == node_id), "")

    async def Cancel(self, request: pb.CancelRequest, context: grpc.aio.ServicerContext) -> pb.CancelResponse:
        return pb.CancelResponse(found=self.scheduler.cancel(request.request_id))

    async def ClusterStatus(
        self, request: pb.ClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatusResponse:
        cl, sch = self.cluster, self.scheduler
        nodes = []
        for n in cl.nodes:
            layers = cl.part_layers(n.part)
            st = pb.NodeStatus(
                id=n.id,
                address=n.address,
                model_part=n.part,
                healthy=n.healthy,
                error=n.error,
                joined=n.joined,
                draining=n.draining,
                backoff_s=n.backoff_s,
                failures=n.failures,
            )
            if layers:
                st.layers.CopyFrom(
                    pb.LayerRange(
                        start_layer=layers.start_layer, end_layer=layers.end_layer, n_layers=layers.n_layers
                    )
                )
            if n.info:
                st.info.CopyFrom(n.info)
            nodes.append(st)
        info = next((n.info for n in cl.nodes if n.info and n.healthy), None)
        resp = pb.ClusterStatusResponse(
            ready=cl.ready,
            problems=cl.problems,
            nodes=nodes,
            tokenizer_address=cl.tokenizer.address,
            tokenizer_healthy=cl.tokenizer_healthy,
            tokenizer_error=cl.tokenizer_error,
            running=sch.running,
            waiting=len(sch.waiting),
            max_running=sch.max_running,
            max_waiting=sch.max_waiting,
            micro_batches=sch.n_groups,
            micro_batches_reason=cl.micro_batches_reason,
            model_name=info.model_name if info else self.cluster.cfg.model_name,
            model_checksum=cl.model_checksum,
            arch=info.arch if info else "",
            n_layers=cl.n_layers or 0,
            max_context=sch.context_limit(),
            n_parts=cl.n_parts,
            tokens_per_second=sch.tokens_per_second(),
            prefix_hit_tokens=sch.prefix_hit_tokens,
            prefix_lookup_tokens=sch.prefix_lookup_tokens,
            preemptions=sch.preemptions,
            speculative=spec_pb(sch.spec),
            speculative_method=self.cluster.cfg.coordinator.speculative.method if sch.max_draft else "off",
            speculative_max_draft=sch.max_draft,
        )
        if cl.tokenizer_info:
            resp.tokenizer.CopyFrom(cl.tokenizer_info)
        return resp

    async def _admit_member(self, node_id: str, token: str, context: grpc.aio.ServicerContext) -> None:
        """Only a cluster member may join or make a node leave: with mTLS, a certificate from the
        cluster's CA that names `node_id`; without TLS, the shared join token (Join is refused
        when none is configured). A configured token is checked in both cases."""
        cfg = self.cluster.cfg
        want = cfg.coordinator.join_token
        if cfg.tls.enabled:
            names = [v.decode() for v in context.auth_context().get("x509_subject_alternative_name", [])]
            if node_id not in names:
                await context.abort(
                    grpc.StatusCode.PERMISSION_DENIED,
                    f"node {node_id!r} presented a certificate for {names}: a node joins under its certificate's name",
                )
        elif not want:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                "Join is disabled: set coordinator.join_token (PIPESERVE_JOIN_TOKEN) on the coordinator and "
                "the joining node, or enable TLS (tls.enabled) so that certificates admit nodes",
            )
        if want and not hmac.compare_digest(token.encode(), want.encode()):
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"node {node_id!r} gave a wrong or no join token"
            )

    async def Join(self, request: pb.JoinRequest, context: grpc.aio.ServicerContext) -> pb.JoinResponse:
        await self._admit_member(request.node_id, request.join_token, context)
        try:
            node = self.cluster.add_node(request.node_id, request.address, request.model_part)
        except ValueError as exc:
            return pb.JoinResponse(accepted=False, message=str(exc))
        await self.cluster.refresh()
        return pb.JoinResponse(
            accepted=True,
            message=f"node {node.id} registered for part {node.part}: {node.error or 'healthy'}",
        )

    async def Place(self, request: pb.PlaceRequest, context: grpc.aio.ServicerContext) -> pb.PlaceResponse:
        shard = await self.cluster.place(request)  # a refusal is ConfigError: FAILED_PRECONDITION
        return pb.PlaceResponse(start_layer=shard.start_layer, end_layer=shard.end_layer)

    async def Leave(self, request: pb.LeaveRequest, context: grpc.aio.ServicerContext) -> pb.LeaveResponse:
        await self._admit_member(request.node_id, request.join_token, context)
        node = next((n for n in self.cluster.nodes if n.id == request.node_id), None)
        if node is None:
            raise make_error(Reason.NOT_FOUND, f"no node {request.node_id!r}", param="node_id")
        node.draining = True
        drained = len(node.running)
        deadline = time.monotonic() + self.cluster.cfg.api.request_timeout_s
        while node.running and time.monotonic() < deadline:  # let its requests finish (drain)
            await asyncio.sleep(0.05)
        if node.joined:
            self.cluster.nodes.remove(node)
            await node.client.close()
        log.info("node %s left after draining %d requests", node.id, drained)
        return pb.LeaveResponse(drained_requests=drained)


class CoordinatorServer:
    def __init__(self, cfg: Config, address: str | None = None) -> None:
        if cfg.tls.enabled:  # before any channel: a bad certificate stops it with its name and file
            tls.check_certificate(cfg.tls, "coordinator")
        self.cfg = cfg
        self.address = address or cfg.coordinator.address
        self.cluster = Cluster(cfg)
        self.scheduler = Scheduler(cfg, self.cluster, ChainPath(self.cluster, cfg.wire_dtype))
        self.server = grpc.aio.server(
            interceptors=[AsyncErrorInterceptor()],
            options=[*channel_options(cfg.node_defaults.max_message_mb), ("grpc.so_reuseport", 0)],
        )
        pb_grpc.add_CoordinatorServicer_to_server(
            CoordinatorServicer(self.cluster, self.scheduler), self.server
        )
        self.health, self.port = listen(
            self.server, SERVICE, self.address, "coordinator", self.cfg, "coordinator"
        )
        self._monitor: asyncio.Task | None = None

    async def start(self) -> None:
        await self.server.start()
        self.scheduler.start()
        self._monitor = asyncio.create_task(self._watch())
        log.info(
            "coordinator listening on %s; %d nodes, %d parts",
            self.address,
            len(self.cluster.nodes),
            self.cluster.n_parts,
        )

    async def _watch(self) -> None:
        was_ready = None
        while True:
            try:
                await self.cluster.refresh()
                self.scheduler.after_refresh()
                if self.cluster.tokenizer_info:
                    self.scheduler.eos_ids = set(self.cluster.tokenizer_info.eos_token_ids)
                await self.scheduler.expire_waiting()
            except Exception:  # keep watching whatever happens
                log.exception("cluster check failed")
            ready = self.cluster.ready
            if ready != was_ready:
                set_serving(self.health, [SERVICE], ready)
                if ready:
                    log.info("cluster ready: every part has a healthy node")
                else:
                    log.warning("cluster not ready: %s", "; ".join(self.cluster.problems))
                was_ready = ready
            await asyncio.sleep(self.cfg.coordinator.health_interval_s)

    async def stop(self, grace: float = 1.0) -> None:
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self.scheduler.stop()
        await self.server.stop(grace)
        await self.cluster.close()


async def _serve(cfg: Config) -> None:
    srv = CoordinatorServer(cfg)
    await srv.start()
    try:
        await srv.server.wait_for_termination()
    finally:
        await srv.stop()


def serve_coordinator(cfg: Config) -> None:
    asyncio.run(_serve(cfg))
