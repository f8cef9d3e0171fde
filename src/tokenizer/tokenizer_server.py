"""The tokenizer's gRPC server: a thin servicer over TokenizerCore (`pipeserve tokenizer`).

Loads the model's tokenizer once at start-up (health NOT_SERVING until then) and answers
Encode, Decode, batched incremental DecodeStream, ApplyChatTemplate, Info and Pieces.
"""

from __future__ import annotations

import logging
import threading

import grpc

from pipeserve.common.config import Config
from pipeserve.common.detok import decode_steps
from pipeserve.common.errors import StageUnavailableError
from pipeserve.common.grpc_util import listen, set_serving, sync_server
from pipeserve.common.model_files import release_file_caches
from pipeserve.proto import tokenizer_service_pb2 as pb
from pipeserve.proto import tokenizer_service_pb2_grpc as pb_grpc
from pipeserve.tokenizer.core import TokenizerCore

log = logging.getLogger(__name__)
SERVICE = "pipeserve.v1.Tokenizer"


class TokenizerServicer(pb_grpc.TokenizerServicer):
    def __init__(self) -> None:
        self._core: TokenizerCore | None = None

    @property
    def core(self) -> TokenizerCore:
        if self._core is None:
            raise StageUnavailableError("the tokenizer is still loading")
        return self._core

    def Encode(self, request: pb.EncodeRequest, context: grpc.ServicerContext) -> pb.EncodeResponse:
        return pb.EncodeResponse(token_ids=self.core.encode(request.text, request.add_special_tokens))

    def Decode(self, request: pb.DecodeRequest, context: grpc.ServicerContext) -> pb.DecodeResponse:
        return pb.DecodeResponse(text=self.core.decode(list(request.token_ids), request.skip_special_tokens))

    def DecodeStream(
        self, request: pb.DecodeStreamRequest, context: grpc.ServicerContext
    ) -> pb.DecodeStreamResponse:
        results = []
        for it in request.items:
            # token_ids start at prefix_offset (decode_steps shifts the offsets); with steps > 1 the
            # new ids are decoded one at a time, each piece as if it came alone.
            pieces, p, r = decode_steps(
                self.core.decode_incremental,
                it.token_ids,
                it.prefix_offset,
                it.read_offset,
                it.steps,
                it.skip_special_tokens,
                it.final,
            )
            results.append(
                pb.DecodeStreamResult(
                    request_id=it.request_id,
                    text="".join(pieces),
                    prefix_offset=p,
                    read_offset=r,
                    pieces=pieces if it.steps > 1 else [],
                )
            )
        return pb.DecodeStreamResponse(results=results)

    def ApplyChatTemplate(
        self, request: pb.ChatTemplateRequest, context: grpc.ServicerContext
    ) -> pb.ChatTemplateResponse:
        messages = [{"role": m.role, "content": m.content} for m in request.messages]
        text = self.core.apply_chat_template(messages, request.add_generation_prompt)
        return pb.ChatTemplateResponse(text=text, token_ids=self.core.encode(text, add_special_tokens=False))

    def Info(self, request: pb.TokenizerInfoRequest, context: grpc.ServicerContext) -> pb.TokenizerInfo:
        c = self.core
        return pb.TokenizerInfo(
            model_name=c.model_name,
            model_checksum=c.model_checksum,
            checksum=c.checksum,
            vocab_size=c.vocab_size,
            bos_token_id=c.bos_token_id if c.bos_token_id is not None else -1,
            eos_token_ids=c.eos_token_ids,
            special_tokens=c.special_tokens,
            has_chat_template=c.chat_template is not None,
        )

    def Pieces(self, request: pb.PiecesRequest, context: grpc.ServicerContext) -> pb.PiecesResponse:
        c = self.core
        table = c.piece_table
        if table is None:
            return pb.PiecesResponse(checksum=c.checksum, available=False)
        return pb.PiecesResponse(
            checksum=c.checksum,
            available=True,
            pieces=table.pieces,
            special_ids=sorted(table.special),
            strip_leading_space=table.strip_space,
        )


class TokenizerServer:
    def __init__(self, cfg: Config, address: str | None = None) -> None:
        self.cfg = cfg
        self.address = address or cfg.tokenizer.address
        self.server = sync_server(8, "tok-rpc")
        self.servicer = TokenizerServicer()
        pb_grpc.add_TokenizerServicer_to_server(self.servicer, self.server)
        self.health, self.port = listen(self.server, SERVICE, self.address, "tokenizer", cfg, "tokenizer")
        self.error: BaseException | None = None
        self.loaded_event = threading.Event()

    def start(self, background_load: bool = True) -> TokenizerServer:
        self.server.start()
        log.info("tokenizer listening on %s; loading %s", self.address, self.cfg.model_name)
        if background_load:
            threading.Thread(target=self._load, daemon=True).start()
        else:
            self._load()
        return self

    def _load(self) -> None:
        try:
            core = TokenizerCore.from_model(
                self.cfg.model_name, chat_template=self.cfg.tokenizer.chat_template
            )
            _ = core.piece_table  # built (and checked) now, not in the coordinator's first call
            self.servicer._core = core
            release_file_caches()
            set_serving(self.health, [SERVICE], True)
            log.info("tokenizer serving %s (vocab %d)", self.cfg.model_name, self.servicer._core.vocab_size)
        except BaseException as exc:  # keep the reason; health stays NOT_SERVING
            self.error = exc
            log.exception("tokenizer failed to load")
        finally:
            self.loaded_event.set()

    def stop(self, grace: float = 1.0) -> None:
        self.server.stop(grace).wait()


def serve_tokenizer(cfg: Config) -> None:
    srv = TokenizerServer(cfg).start(background_load=False)
    if srv.error:
        srv.stop(0)
        raise SystemExit(f"tokenizer: {srv.error}")
    srv.server.wait_for_termination()
