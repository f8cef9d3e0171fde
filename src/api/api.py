"""The REST API (`pipeserve api`, FastAPI on :8000): the spec's `POST /api/model/process`, the
OpenAI-compatible /v1 endpoints, health, readiness, Prometheus metrics and the cluster view the
frontend polls. Routes only map requests to protobuf and back (convert.py) over typed gRPC clients
(clients.py); errors leave through the handlers in errors.py as one JSON body.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST

from pipeserve.api import convert
from pipeserve.api import schemas as s
from pipeserve.api.clients import CoordinatorClient
from pipeserve.api.errors import install_handlers
from pipeserve.api.metrics import ApiMetrics, MetricsMiddleware
from pipeserve.api.middleware import OPEN_PATHS, GuardMiddleware
from pipeserve.api.streaming import (
    Generation,
    chat_events,
    completion_events,
    process_events,
    sse_response,
    until_disconnect,
)
from pipeserve.common.config import Config
from pipeserve.common.errors import PipeserveError, Reason
from pipeserve.common.tokenizer_client import TokenizerClient
from pipeserve.proto import model_service_pb2 as pb

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": s.ErrorBody, "description": text}
    for code, text in {
        400: "`invalid_parameter` (a value `param` names), `context_length_exceeded` (prompt + max_tokens "
        "past the context; both numbers stated) or `model_refused` (e.g. the model's chat template).",
        401: "`unauthorized`: missing or wrong API key (only when api.api_key is set).",
        413: "`request_too_large`: body larger than api.max_body_bytes.",
        422: "`schema_violation`: the body does not match the schema; `param` names the field.",
        429: "`queue_full`: the coordinator's queue is full; retry after `Retry-After` (= `retry_after_s`).",
        500: "`internal`: a bug or a server-side condition; the message says where.",
        502: "`upstream_error`: an upstream service answered something unexpected.",
        503: "`stage_unavailable` (a model part has no healthy node: `part`, `node`), `service_unavailable` "
        "(the coordinator or tokenizer is unreachable) or `cache_exhausted` (a part's KV cache is full; "
        "retry after `Retry-After`).",
        504: "`timeout`: the request did not finish within api.request_timeout_s.",
    }.items()
}

SSE_PROCESS = """With `"stream": true` the answer is `text/event-stream`: one `data: {"text": "<piece>"}`
event per piece of text, then `data: {"text": "<full text>", "processingTime": <ms>, "nodeCount": <stages>,
"finishReason": "stop"|"length"}`. An error after the stream began arrives as `data: {"error": {...}}`."""

SSE_OPENAI = """With `"stream": true` the answer is `text/event-stream`: `data: <chunk JSON>` events, the last
chunk carrying `finish_reason`, `usage` and the `pipeserve` extension (route, ttft_ms, total_ms, stage_timings),
then `data: [DONE]`. With `stream_options.include_usage` one more chunk with empty `choices` and the usage comes
before `[DONE]`. An error after the stream began arrives as `data: {"error": {...}}` followed by `data: [DONE]`."""


SSE_EVENT = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {"type": "string", "description": "A JSON payload (see the description) or [DONE]."}
    },
}


def _stream_doc(description: str) -> dict[int | str, dict[str, Any]]:
    return {
        **ERRORS,
        200: {
            "description": "The result, or Server-Sent Events when `stream` is true. " + description,
            # One event (OpenAPI < 3.2 convention): its `data` line holds a JSON payload or [DONE].
            "content": {"text/event-stream": {"schema": SSE_EVENT}},
        },
    }


@dataclass
class Services:
    cfg: Config
    coordinator: CoordinatorClient
    tokenizer: TokenizerClient
    metrics: ApiMetrics

    def generate(self, request: pb.GenerateRequest, endpoint: str) -> Generation:
        call = self.coordinator.generate(request, self.cfg.api.request_timeout_s)
        return Generation(call, self.metrics, endpoint)

    async def close(self) -> None:
        await asyncio.gather(self.coordinator.close(), self.tokenizer.close())


def services(request: Request) -> Services:
    return request.app.state.services  # type: ignore[no-any-return]


T = TypeVar("T")


async def _or_error(call: Awaitable[T]) -> T | PipeserveError:
    try:
        return await call
    except PipeserveError as exc:
        return exc


def _naming(service: str, message: str) -> str:
    return message if service in message else f"{service}: {message}"


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


router = APIRouter()


@router.post(
    "/api/model/process",
    response_model=s.ProcessResponse,
    responses=_stream_doc(SSE_PROCESS),
    summary="Process text (the spec's endpoint)",
    tags=["spec"],
)
async def process(body: s.ProcessRequest, request: Request, svc: Services = Depends(services)) -> Any:
    """Generate a continuation of `text` (or a chat reply to it when metadata.type is chat)."""
    gen = svc.generate(
        convert.process_request(body, new_id("proc"), svc.cfg.api.default_max_tokens), "/api/model/process"
    )
    if body.stream:
        await until_disconnect(request, gen.start())
        return sse_response(process_events(gen))
    msgs = await until_disconnect(request, gen.collect())
    return s.ProcessResponse(
        text="".join(m.text for m in msgs), processingTime=gen.elapsed_ms(), nodeCount=len(msgs[-1].route)
    )


@router.post(
    "/v1/completions",
    response_model=s.CompletionResponse,
    responses=_stream_doc(SSE_OPENAI),
    summary="Text completion (OpenAI-compatible)",
    tags=["openai"],
)
async def completions(body: s.CompletionRequest, request: Request, svc: Services = Depends(services)) -> Any:
    rid = new_id("cmpl")
    gen = svc.generate(
        convert.completion_request(body, rid, svc.cfg.api.default_max_tokens), "/v1/completions"
    )
    want_logprobs = body.logprobs is not None
    if body.stream:
        await until_disconnect(request, gen.start())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(
            completion_events(
                gen, rid, svc.cfg.model_name, want_logprobs, include_usage, svc.tokenizer.token_texts
            )
        )
    msgs = await until_disconnect(request, gen.collect())
    final, text = msgs[-1], "".join(m.text for m in msgs)
    lp = None
    if want_logprobs:
        lp = convert.completion_logprobs(msgs, await svc.tokenizer.token_texts(convert.logprob_ids(msgs)), 0)
    return s.CompletionResponse(
        id=rid,
        created=int(time.time()),
        model=svc.cfg.model_name,
        choices=[s.CompletionChoice(text=text, finish_reason=convert.finish_reason(final), logprobs=lp)],
        usage=convert.usage(final),
        pipeserve=convert.pipeserve_info(final),
    )


@router.post(
    "/v1/chat/completions",
    response_model=s.ChatCompletionResponse,
    responses=_stream_doc(SSE_OPENAI),
    summary="Chat completion (OpenAI-compatible)",
    tags=["openai"],
)
async def chat_completions(
    body: s.ChatCompletionRequest, request: Request, svc: Services = Depends(services)
) -> Any:
    rid = new_id("chatcmpl")
    gen = svc.generate(
        convert.chat_request(body, rid, svc.cfg.api.default_max_tokens), "/v1/chat/completions"
    )
    if body.stream:
        await until_disconnect(request, gen.start())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return sse_response(
            chat_events(gen, rid, svc.cfg.model_name, body.logprobs, include_usage, svc.tokenizer.token_texts)
        )
    msgs = await until_disconnect(request, gen.collect())
    final = msgs[-1]
    lp = None
    if body.logprobs:
        lp = convert.chat_logprobs(msgs, await svc.tokenizer.token_texts(convert.logprob_ids(msgs)))
    return s.ChatCompletionResponse(
        id=rid,
        created=int(time.time()),
        model=svc.cfg.model_name,
        choices=[
            s.ChatChoice(
                message=s.AssistantMessage(content="".join(m.text for m in msgs)),
                finish_reason=convert.finish_reason(final),
                logprobs=lp,
            )
        ],
        usage=convert.usage(final),
        pipeserve=convert.pipeserve_info(final),
    )


@router.get(
    "/v1/models", response_model=s.ModelList, responses=ERRORS, tags=["openai"], summary="Served model"
)
async def models(svc: Services = Depends(services)) -> s.ModelList:
    try:
        name = (await svc.coordinator.cluster_status()).model_name or svc.cfg.model_name
    except PipeserveError:
        name = svc.cfg.model_name
    return s.ModelList(data=[s.ModelCard(id=name)])


@router.get("/health", response_model=s.Health, tags=["ops"], summary="The API process is up")
async def health() -> s.Health:
    return s.Health()


@router.get(
    "/ready",
    response_model=s.Ready,
    tags=["ops"],
    summary="The cluster can serve",
    responses={503: {"model": s.ErrorBody, "description": "Not ready; the message lists every problem."}},
)
async def ready(svc: Services = Depends(services)) -> s.Ready:
    status, tok = await asyncio.gather(
        _or_error(svc.coordinator.cluster_status()), _or_error(svc.tokenizer.info())
    )
    problems, reason, part, node = [], Reason.STAGE_UNAVAILABLE, None, None
    if isinstance(status, PipeserveError):
        problems.append(_naming("coordinator", status.message))
        reason = status.reason
    elif not status.ready:
        problems += list(status.problems) or ["the coordinator reports the cluster not ready"]
        down = sorted(
            {n.model_part for n in status.nodes} - {n.model_part for n in status.nodes if n.healthy}
        )
        if down:
            part = down[0]
            node = ", ".join(n.id for n in status.nodes if n.model_part == part)
    if isinstance(tok, PipeserveError):
        reason = reason if problems else tok.reason
        problems.append(_naming("tokenizer", tok.message))
    if problems:
        raise PipeserveError("not ready: " + "; ".join(problems), reason=reason, part=part, node=node)
    return s.Ready()


@router.get(
    "/metrics",
    tags=["ops"],
    summary="Prometheus metrics",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}}}},
)
async def metrics(svc: Services = Depends(services)) -> Response:
    try:
        svc.metrics.refresh(await svc.coordinator.cluster_status())
    except PipeserveError:
        svc.metrics.refresh(None)
    return Response(svc.metrics.render(), media_type=CONTENT_TYPE_LATEST)


@router.get(
    "/api/cluster", response_model=s.ClusterView, responses=ERRORS, tags=["ops"], summary="Cluster view"
)
async def cluster(svc: Services = Depends(services)) -> s.ClusterView:
    """Every node's health, layers and load, the tokenizer and the queue. 200 even when the
    coordinator is down (then coordinator.healthy and ready are false)."""
    try:
        status = await svc.coordinator.cluster_status()
    except PipeserveError as exc:
        try:
            info = await svc.tokenizer.info()
            tok = s.TokenizerView(
                address=svc.tokenizer.address, healthy=True, vocab_size=info.vocab_size, error=None
            )
        except PipeserveError as tok_exc:
            tok = s.TokenizerView(
                address=svc.tokenizer.address, healthy=False, vocab_size=0, error=tok_exc.message
            )
        return convert.cluster_view(svc.coordinator.address, svc.cfg.model_name, None, exc.message, tok)
    return convert.cluster_view(svc.coordinator.address, svc.cfg.model_name, status)


def create_app(cfg: Config) -> FastAPI:
    """The API for `cfg`; its gRPC clients are made when the app starts (on the server's loop)."""
    metrics = ApiMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        c = cfg.coordinator
        mb = cfg.node_defaults.max_message_mb
        app.state.services = Services(
            cfg,
            CoordinatorClient(c.address, c.rpc_timeout_s, mb, cfg),
            TokenizerClient(cfg.tokenizer.address, c.rpc_timeout_s, cfg, "api", mb),
            metrics,
        )
        try:
            yield
        finally:
            await app.state.services.close()

    app = FastAPI(
        title="pipeserve API",
        version="0.1.0",
        description="Pipeline-parallel LLM serving: the spec's text processing endpoint, OpenAI-compatible "
        "completions and chat, health, readiness, metrics and the cluster view. Every error has the body "
        '`{"error": {"message", "type", "code", "param", "status", "part", "node", "retry_after_s"}}` '
        "(see ErrorDetail): `code` is the machine-readable reason, the same in SSE error events.",
        lifespan=lifespan,
    )
    app.include_router(router)
    install_handlers(app)
    paths = {path for r in [*app.routes, *router.routes] if isinstance(path := getattr(r, "path", None), str)}
    app.add_middleware(GuardMiddleware, api_key=cfg.api.api_key, max_body_bytes=cfg.api.max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics, paths=paths)
    app.add_middleware(  # outermost: preflights are answered before the key check, errors get CORS headers
        CORSMiddleware,
        allow_origins=cfg.api.cors_origins,
        allow_methods=["GET", "POST", "OPTIONS"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Retry-After"],
    )
    if cfg.api.api_key:
        _document_bearer_auth(app)
    return app


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the API key in the OpenAPI schema (GuardMiddleware enforces it)."""
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = base()  # cached in app.openapi_schema
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearerAuth": {"type": "http", "scheme": "bearer"}
            }
            for path, ops in schema.get("paths", {}).items():
                for op in ops.values():
                    if path not in OPEN_PATHS:
                        op["security"] = [{"bearerAuth": []}]
        return app.openapi_schema  # type: ignore[return-value]

    app.openapi = openapi  # type: ignore[method-assign]


def serve_api(cfg: Config) -> None:
    """Serve the API on cfg.api.host:cfg.api.port until interrupted (logs go to the JSON handler)."""
    uvicorn.run(
        create_app(cfg),
        host=cfg.api.host,
        port=cfg.api.port,
        log_config=None,
        timeout_graceful_shutdown=5,
    )
