"""Typed gRPC clients the API's routes call: the coordinator (Generate, Cancel, ClusterStatus) here,
the tokenizer (Info, token texts for logprobs) in common/tokenizer_client.py, shared with the
coordinator. Every call carries a deadline; every failure leaves
as the domain exception its status details carry (errors.from_rpc: reason, param, part, node,
retry-after), so a route never sees a raw gRPC error. Channels reconnect by themselves when a
service restarts; while it is away calls fail fast (service_unavailable -> 503).
"""

from __future__ import annotations

import grpc

from pipeserve.common import tls
from pipeserve.common.config import Config
from pipeserve.common.errors import PipeserveError
from pipeserve.common.grpc_util import channel_options, remote_error
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc


class _Client:
    service = "service"

    def __init__(
        self, address: str, rpc_timeout_s: float, max_message_mb: int = 64, cfg: Config | None = None
    ) -> None:
        self.address = address
        self.rpc_timeout_s = rpc_timeout_s
        opts = channel_options(max_message_mb)
        self.channel = (  # as service "api" to the coordinator or the tokenizer, mTLS when enabled
            tls.aio_channel(cfg, "api", self.service, address, opts)
            if cfg is not None
            else grpc.aio.insecure_channel(address, options=opts)
        )

    def error(self, exc: grpc.aio.AioRpcError, timeout_s: float | None = None) -> PipeserveError:
        return remote_error(exc, self.service, self.address, timeout_s=timeout_s)

    async def close(self) -> None:
        await self.channel.close(grace=None)


class GenerateCall:
    """One server-streaming Generate call. Iterating yields its messages (the last has `finished`);
    `cancel()` ends the call, which makes the coordinator cancel the request and free its caches."""

    def __init__(self, client: CoordinatorClient, call: grpc.aio.UnaryStreamCall, timeout_s: float) -> None:
        self._client, self._call, self._timeout_s = client, call, timeout_s

    def __aiter__(self) -> GenerateCall:
        return self

    async def __anext__(self) -> pb.GenerateResponse:
        try:
            msg = await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise self._client.error(exc, self._timeout_s) from None
        if msg is grpc.aio.EOF:
            raise StopAsyncIteration
        return msg  # type: ignore[return-value]

    def cancel(self) -> None:
        self._call.cancel()


class CoordinatorClient(_Client):
    service = "coordinator"

    def __init__(
        self, address: str, rpc_timeout_s: float, max_message_mb: int = 64, cfg: Config | None = None
    ) -> None:
        super().__init__(address, rpc_timeout_s, max_message_mb, cfg)
        self.stub = pb_grpc.CoordinatorStub(self.channel)

    def generate(self, request: pb.GenerateRequest, timeout_s: float) -> GenerateCall:
        """Start a generation; `timeout_s` bounds the whole request (DEADLINE_EXCEEDED -> 504)."""
        return GenerateCall(self, self.stub.Generate(request, timeout=timeout_s), timeout_s)

    async def cancel(self, request_id: str) -> bool:
        try:
            resp = await self.stub.Cancel(pb.CancelRequest(request_id=request_id), timeout=self.rpc_timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, self.rpc_timeout_s) from None
        return resp.found

    async def cluster_status(self, request_id: str = "") -> pb.ClusterStatusResponse:
        try:
            return await self.stub.ClusterStatus(
                pb.ClusterStatusRequest(request_id=request_id), timeout=self.rpc_timeout_s
            )
        except grpc.aio.AioRpcError as exc:
            raise self.error(exc, self.rpc_timeout_s) from None
