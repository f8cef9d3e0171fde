"""One generation as the routes see it, and its Server-Sent Events.

`Generation` drives a Generate call: it times tokens for the metrics, keeps the final summary and
always ends the call (a client that goes away cancels the request in the coordinator, which frees
every stage's cache). The `*_events` generators turn its messages into the SSE formats of the spec
endpoint and of the OpenAI endpoints; an error after the stream began becomes a `data:` event with
the one error body. `until_disconnect` cancels non-streamed work when the client hangs up.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

from pipeserve.api import convert
from pipeserve.api import schemas as s
from pipeserve.api.clients import GenerateCall
from pipeserve.api.errors import error_body, in_body_terms
from pipeserve.api.metrics import ApiMetrics
from pipeserve.common.errors import PipeserveError, Reason
from pipeserve.proto import model_service_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
TokenTexts = Callable[[list[int]], Awaitable[dict[int, str]]]

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class Generation:
    def __init__(self, call: GenerateCall, metrics: ApiMetrics, endpoint: str) -> None:
        self.call, self.metrics, self.endpoint = call, metrics, endpoint
        self.t0 = time.perf_counter()
        self.final: pb.GenerateResponse | None = None
        self._first: pb.GenerateResponse | None = None
        self._last_token_at: float | None = None
        self._closed = False
        metrics.in_flight.inc()

    async def start(self) -> None:
        """Wait for the first message, so that what the coordinator rejects up front (bad input,
        a full queue, a part down) becomes an HTTP status before any byte of a stream is sent."""
        try:
            self._first = await self._next()
        except BaseException:
            self.close("error")
            raise

    async def messages(self) -> AsyncIterator[pb.GenerateResponse]:
        """Every message; the last one has `finished` set (its text is held-back text to append)."""
        outcome = "cancelled"  # unless it finishes or fails: the client went away
        try:
            while True:
                if self._first is not None:
                    msg, self._first = self._first, None
                else:
                    msg = await self._next()
                yield msg
                if msg.finished:
                    outcome = convert.finish_reason(msg)
                    return
        except Exception:
            outcome = "error"
            raise
        finally:
            self.close(outcome)

    async def collect(self) -> list[pb.GenerateResponse]:
        """Run to the end; every message, the final one last."""
        return [m async for m in self.messages()]

    async def _next(self) -> pb.GenerateResponse:
        try:
            msg = await anext(self.call)
        except StopAsyncIteration:
            raise PipeserveError(
                "the coordinator ended the stream without a final message", reason=Reason.UPSTREAM_ERROR
            ) from None
        except PipeserveError as exc:
            raise in_body_terms(exc, self.endpoint) from None
        now = time.perf_counter()
        if msg.token_ids:
            if self._last_token_at is None:
                self.metrics.ttft.labels(self.endpoint).observe(now - self.t0)
            else:
                self.metrics.itl.labels(self.endpoint).observe(now - self._last_token_at)
            self._last_token_at = now
        if msg.finished:
            self.final = msg
            self.metrics.observe_final(msg)
        return msg

    def close(self, outcome: str) -> None:
        if self._closed:
            return
        self._closed = True
        self.call.cancel()  # a no-op once the call has ended; otherwise the coordinator cancels it
        self.metrics.in_flight.dec()
        self.metrics.e2e.labels(self.endpoint, outcome).observe(time.perf_counter() - self.t0)
        f = self.final
        log.info(
            "request %s",
            outcome,
            extra={
                "request_id": f.request_id if f else "",
                "endpoint": self.endpoint,
                "ms": round(self.elapsed_ms(), 1),
                "completion_tokens": f.completion_tokens if f else 0,
            },
        )

    def elapsed_ms(self) -> float:
        return (time.perf_counter() - self.t0) * 1e3


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it when the client disconnects first (the body was read already,
    so the next ASGI receive returns only at a disconnect)."""
    task = asyncio.ensure_future(work)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.create_task(watch())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if task.cancelled():
        raise PipeserveError(
            "the client closed the connection; the request was cancelled", reason=Reason.CLIENT_CLOSED
        )
    return task.result()


def sse(payload: dict[str, Any] | str) -> bytes:
    data = (
        payload
        if isinstance(payload, str)
        else json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    )
    return f"data: {data}\n\n".encode()


def sse_response(events: AsyncIterator[bytes]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)


async def _errors_as_events(events: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    try:
        async for event in events:
            yield event
    except PipeserveError as exc:
        yield sse(error_body(exc))
    except Exception as exc:  # the status line is out: the error can only travel as an event
        log.exception("stream failed")
        yield sse(error_body(PipeserveError(f"internal error in the API: {type(exc).__name__}: {exc}")))


async def process_events(gen: Generation) -> AsyncIterator[bytes]:
    """The spec endpoint's stream: `{"text": piece}` events, then the summary event."""

    async def events() -> AsyncIterator[bytes]:
        text = []
        async for m in gen.messages():
            if m.text:
                text.append(m.text)
                yield sse({"text": m.text})
            if m.finished:
                yield sse(
                    {
                        "text": "".join(text),
                        "processingTime": gen.elapsed_ms(),
                        "nodeCount": len(m.route),
                        "finishReason": convert.finish_reason(m),
                    }
                )

    async for event in _errors_as_events(events()):
        yield event


def _dump(model: s.BaseModel) -> bytes:
    return sse(model.model_dump(mode="json", exclude_none=True))


async def completion_events(
    gen: Generation, rid: str, model: str, logprobs: bool, include_usage: bool, token_texts: TokenTexts
) -> AsyncIterator[bytes]:
    """OpenAI text_completion chunks, the final one with finish_reason, usage and `pipeserve`."""
    created = int(time.time())

    def chunk(choice: s.CompletionChoice, **extra: Any) -> bytes:
        return _dump(s.CompletionResponse(id=rid, created=created, model=model, choices=[choice], **extra))

    async def events() -> AsyncIterator[bytes]:
        offset = 0
        async for m in gen.messages():
            if m.text or m.logprobs:
                lp = None
                if logprobs and m.logprobs:
                    lp = convert.completion_logprobs([m], await token_texts(convert.logprob_ids([m])), offset)
                    offset += sum(map(len, lp.tokens))
                yield chunk(s.CompletionChoice(text=m.text, finish_reason=None, logprobs=lp))
            if m.finished:
                usage = convert.usage(m)
                choice = s.CompletionChoice(text="", finish_reason=convert.finish_reason(m))
                yield chunk(choice, usage=usage, pipeserve=convert.pipeserve_info(m))
                if include_usage:
                    yield _dump(
                        s.CompletionResponse(id=rid, created=created, model=model, choices=[], usage=usage)
                    )

    async for event in _errors_as_events(events()):
        yield event
    yield sse("[DONE]")


async def chat_events(
    gen: Generation, rid: str, model: str, logprobs: bool, include_usage: bool, token_texts: TokenTexts
) -> AsyncIterator[bytes]:
    """OpenAI chat.completion.chunk events: the role first, then content deltas, then the final
    chunk with finish_reason, usage and `pipeserve`."""
    created = int(time.time())

    def chunk(choices: list[s.ChatChunkChoice], **extra: Any) -> bytes:
        return _dump(s.ChatCompletionChunk(id=rid, created=created, model=model, choices=choices, **extra))

    async def events() -> AsyncIterator[bytes]:
        yield chunk([s.ChatChunkChoice(delta=s.ChatDelta(role="assistant", content=""))])
        async for m in gen.messages():
            if m.text or m.logprobs:
                lp = None
                if logprobs and m.logprobs:
                    lp = convert.chat_logprobs([m], await token_texts(convert.logprob_ids([m])))
                yield chunk([s.ChatChunkChoice(delta=s.ChatDelta(content=m.text), logprobs=lp)])
            if m.finished:
                usage = convert.usage(m)
                final = s.ChatChunkChoice(delta=s.ChatDelta(), finish_reason=convert.finish_reason(m))
                yield chunk([final], usage=usage, pipeserve=convert.pipeserve_info(m))
                if include_usage:
                    yield chunk([], usage=usage)

    async for event in _errors_as_events(events()):
        yield event
    yield sse("[DONE]")
