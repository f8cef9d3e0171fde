"""The one client of the tokenizer service, for the coordinator and the API.

Every call carries a deadline and every failure leaves as the domain exception its status carries
(grpc_util.remote_error: an error raised by the tokenizer arrives with its reason and fields; a
transport failure is service_unavailable or timeout, naming the address), so callers never see a
gRPC error. Streaming detokenization takes and gives plain `DecodeItem` / `DecodeResult`; where the
tokenizer offers its vocabulary's piece table (the Pieces RPC, fetched by `info()` whenever the
tokenizer's checksum changes) it runs in this process (common/detok.py), with no call per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from pipeserve.common import env, tls
from pipeserve.common.config import Config
from pipeserve.common.detok import PieceTable, decode_steps
from pipeserve.common.errors import ConfigError, PipeserveError
from pipeserve.common.grpc_util import channel_options, remote_error
from pipeserve.proto import tokenizer_service_pb2 as tpb
from pipeserve.proto import tokenizer_service_pb2_grpc as tpb_grpc

log = logging.getLogger(__name__)

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
    # In-process decoding only: this item's ids could not be decoded (an id outside the
    # vocabulary); the other items' results stand. (The service fails the whole call instead.)
    error: PipeserveError | None = None


PIECES_RETRY_S = 30.0  # after a failed Pieces call, info() asks again no sooner than this
DETOKENIZE_MODES = ("coordinator", "service")


class TokenizerClient:
    def __init__(
        self, address: str, rpc_timeout_s: float, cfg: Config | None, me: str, max_message_mb: int = 64
    ) -> None:
        """A client for service `me` ("coordinator" or "api"; the name it connects as with mTLS)."""
        self.address = address
        self.timeout = rpc_timeout_s
        # at least 64 MiB: the Pieces answer of a 262k-token vocabulary is ~2.5 MiB
        opts = channel_options(max(max_message_mb, 64))
        self.channel = (
            tls.aio_channel(cfg, me, "tokenizer", address, opts)
            if cfg is not None
            else grpc.aio.insecure_channel(address, options=opts)
        )
        self.stub = tpb_grpc.TokenizerStub(self.channel)
        self._texts: dict[int, str] = {}
        # The vocabulary's piece table, when the tokenizer has one; `local_decode = False` (or
        # PIPESERVE_DETOKENIZE=service) sends every decode to the service: the same results, which
        # tests and benchmarks compare.
        mode = env.get("PIPESERVE_DETOKENIZE", "coordinator")
        if mode not in DETOKENIZE_MODES:
            raise ConfigError(
                f"PIPESERVE_DETOKENIZE must be one of {', '.join(DETOKENIZE_MODES)}, got {mode!r}"
            )
        self.local_decode = mode == "coordinator"
        self.pieces: PieceTable | None = None
        self._checksum: str | None = None  # the tokenizer's checksum, as its last Info gave it
        self._pieces_of: str | None = None  # the checksum whose Pieces answer `pieces` holds
        self._pieces_retry_at = 0.0  # monotonic time before which a failed Pieces call is not retried
        self._pieces_lock = asyncio.Lock()

    async def _call(self, method: str, request: object) -> object:
        try:
            return await getattr(self.stub, method)(request, timeout=self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise remote_error(exc, "tokenizer", self.address, timeout_s=self.timeout) from None

    async def info(self) -> tpb.TokenizerInfo:
        """The tokenizer's Info; a tokenizer with another checksum than the last one seen (a first
        contact, a restart on another model) is asked for its piece table again."""
        info: tpb.TokenizerInfo = await self._call("Info", tpb.TokenizerInfoRequest())  # type: ignore[assignment]
        if info.checksum != self._checksum:  # another vocabulary: nothing decoded before holds
            self._checksum, self.pieces, self._pieces_of, self._texts = info.checksum, None, None, {}
            self._pieces_retry_at = 0.0
        if self._pieces_of != info.checksum and time.monotonic() >= self._pieces_retry_at:
            # one fetch at a time (the coordinator's refresh and Join, the API's probes call info())
            async with self._pieces_lock:
                if self._pieces_of != info.checksum:
                    await self._load_pieces(info.checksum)
        return info

    async def _load_pieces(self, checksum: str) -> None:
        try:
            resp: tpb.PiecesResponse = await self._call("Pieces", tpb.PiecesRequest())  # type: ignore[assignment]
        except PipeserveError as exc:  # an older tokenizer, a message-size limit, a failure:
            if self._pieces_retry_at == 0.0:  # decode through the service, ask again later
                log.warning(
                    "tokenizer at %s gave no piece table (%s): it decodes every step",
                    self.address,
                    exc.message,
                )
            self._pieces_retry_at = time.monotonic() + PIECES_RETRY_S
            return
        if resp.checksum != checksum or checksum != self._checksum:
            return  # the tokenizer changed in between: the next info() asks again
        self._pieces_of = checksum
        if resp.available:
            self.pieces = PieceTable(
                tuple(resp.pieces), frozenset(resp.special_ids), resp.strip_leading_space, resp.checksum
            )

    async def encode(self, text: str, request_id: str) -> list[int]:
        req = tpb.EncodeRequest(request_id=request_id, text=text, add_special_tokens=True)
        return list((await self._call("Encode", req)).token_ids)  # type: ignore[attr-defined]

    async def chat(self, messages: Sequence[tpb.ChatMessage], request_id: str) -> list[int]:
        req = tpb.ChatTemplateRequest(request_id=request_id, messages=messages, add_generation_prompt=True)
        return list((await self._call("ApplyChatTemplate", req)).token_ids)  # type: ignore[attr-defined]

    async def decode_stream(self, items: Sequence[DecodeItem]) -> list[DecodeResult]:
        if self.pieces is not None and self.local_decode:
            return [self._decode_local(self.pieces, i) for i in items]
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

    @staticmethod
    def _decode_local(table: PieceTable, i: DecodeItem) -> DecodeResult:
        try:
            pieces, p, r = decode_steps(
                table.decode_incremental, i.token_ids, i.prefix_offset, i.read_offset, i.steps,
                i.skip_special_tokens, i.final,
            )  # fmt: skip
        except PipeserveError as exc:
            return DecodeResult("", i.prefix_offset, i.read_offset, [], exc)
        return DecodeResult("".join(pieces), p, r, pieces)

    async def token_texts(self, token_ids: list[int]) -> dict[int, str]:
        """Each id's own text (special tokens included), for logprobs: every id not cached yet is
        decoded as a sequence of its own (one DecodeStream call, or in-process), so a byte-level
        token keeps its leading space (a SentencePiece one with the space prefix drops it)."""
        if self.local_decode and self._pieces_of is None and time.monotonic() >= self._pieces_retry_at:
            with contextlib.suppress(PipeserveError):  # the API's client: fetch the table on first use
                await self.info()
        if len(self._texts) > TOKEN_TEXT_CACHE:
            self._texts.clear()
        missing = sorted({t for t in token_ids if t not in self._texts})
        if missing:
            items = [DecodeItem(str(t), [t], skip_special_tokens=False, final=True) for t in missing]
            results = await self.decode_stream(items)
            if err := next((r.error for r in results if r.error is not None), None):
                raise err
            self._texts.update(zip(missing, (r.text for r in results), strict=True))
        return {t: self._texts[t] for t in token_ids}

    async def close(self) -> None:
        await self.channel.close(grace=None)
