"""The one client of the tokenizer service, for the coordinator and the API.

Every call carries a deadline and every failure leaves as the domain exception its status carries
(grpc_util.remote_error: an error raised by the tokenizer arrives with its reason and fields; a
transport failure is service_unavailable or timeout, naming the address), so callers never see a
gRPC error. Streaming detokenization takes and gives plain `DecodeItem` / `DecodeResult`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pipeserve.common import tls
from pipeserve.common.config import Config
from pipeserve.common.grpc_util import channel_options, remote_error
from pipeserve.proto import tokenizer_service_pb2 as tpb
from pipeserve.proto import tokenizer_service_pb2_grpc as tpb_grpc

TOKEN_TEXT_CACHE = 65536  # token id -> text entries kept (a vocabulary's worth for small models)


@dataclass
class DecodeItem:
    """A request's generated ids from `prefix_offset` on, with the offsets of its last call."""

    request_id: str
    token_ids: list[int]
    prefix_offset: int = 0
    read_offset: int = 0
    skip_special_tokens: bool = True
    final: bool = False
    steps: int = 1  # the last `steps` ids are new: their texts come one per id (DecodeResult.pieces)


@dataclass
class DecodeResult:
    text: str  # the new text since the last call
    prefix_offset: int
    read_offset: int
    pieces: list[str]  # one text per new id (they join into `text`)


class TokenizerClient:
    def __init__(
        self, address: str, rpc_timeout_s: float, cfg: Config | None, me: str, max_message_mb: int = 64
    ) -> None:
        """A client for service `me` ("coordinator" or "api"; the name it connects as with mTLS)."""
        self.address = address
        self.timeout = rpc_timeout_s
        opts = channel_options(max_message_mb)
        self.channel = (
            tls.aio_channel(cfg, me, "tokenizer", address, opts)
            if cfg is not None
            else grpc.aio.insecure_channel(address, options=opts)
        )
        self.stub = tpb_grpc.TokenizerStub(self.channel)
        self._texts: dict[int, str] = {}

    async def _call(self, method: str, request: object) -> object:
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise remote_error(exc, "tokenizer", self.address, timeout_s=self.timeout) from None

    async def info(self) -> tpb.TokenizerInfo:
        return await self._call("Info", tpb.TokenizerInfoRequest())  # type: ignore[return-value]

    async def encode(self, text: str, request_id: str) -> list[int]:
        req = tpb.EncodeRequest(request_id=request_id, text=text, add_special_tokens=True)
        return list((await self._call("Encode", req)).token_ids)  # type: ignore[attr-defined]

    async def chat(self, messages: Sequence[tpb.ChatMessage], request_id: str) -> list[int]:
        req = tpb.ChatTemplateRequest(request_id=request_id, messages=messages, add_generation_prompt=True)
        return list((await self._call("ApplyChatTemplate", req)).token_ids)  # type: ignore[attr-defined]

    async def decode_stream(self, items: Sequence[DecodeItem]) -> list[DecodeResult]:
        req = tpb.DecodeStreamRequest(
            items=[
                tpb.DecodeStreamItem(
                    request_id=i.request_id,
                    token_ids=i.token_ids,
                    prefix_offset=i.prefix_offset,
                    read_offset=i.read_offset,
                    skip_special_tokens=i.skip_special_tokens,
                    final=i.final,
                    steps=i.steps,
                )
                for i in items
            ]
        )
        resp = await self._call("DecodeStream", req)
        return [
            DecodeResult(r.text, r.prefix_offset, r.read_offset, list(r.pieces) or [r.text])
            for r in resp.results  # type: ignore[attr-defined]
        ]

    async def token_texts(self, token_ids: list[int]) -> dict[int, str]:
        """Each id's own text (special tokens included), for logprobs. One DecodeStream call decodes
        every id not cached yet, each as a sequence of its own (so a leading space is kept)."""
        if len(self._texts) > TOKEN_TEXT_CACHE:
            self._texts.clear()
        missing = sorted({t for t in token_ids if t not in self._texts})
        if missing:
            items = [DecodeItem(str(t), [t], skip_special_tokens=False, final=True) for t in missing]
            results = await self.decode_stream(items)
            self._texts.update(zip(missing, (r.text for r in results), strict=True))
        return {t: self._texts[t] for t in token_ids}

    async def close(self) -> None:
        await self.channel.close(grace=None)
