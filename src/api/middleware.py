"""The API's gate, a pure ASGI middleware in front of every route: the optional API key
(`Authorization: Bearer`, everything but the open paths) and the request body limit (413, from
Content-Length up front and by counting a streamed body). Rejections use the one error body.
"""

from __future__ import annotations

import hmac

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeserve.api.errors import error_response
from pipeserve.common.errors import PipeserveError, Reason

OPEN_PATHS = frozenset({"/health", "/ready"})  # probes (Kubernetes, Docker) cannot send a key


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_key: str | None, max_body_bytes: int) -> None:
        self.app, self.api_key, self.max_body_bytes = app, api_key, max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        if (
            self.api_key
            and scope["path"] not in OPEN_PATHS
            and not self._authorized(headers.get("authorization"))
        ):
            response = error_response(
                PipeserveError(
                    "a valid API key is required: send `Authorization: Bearer <key>`",
                    reason=Reason.UNAUTHORIZED,
                ),
                {"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body_bytes:
            too_large = PipeserveError(
                self._too_large(f"{int(length)} bytes"), reason=Reason.REQUEST_TOO_LARGE
            )
            await error_response(too_large)(scope, receive, send)
            return
        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    # Raised inside the route's body read; FastAPI re-raises HTTPExceptions as they are.
                    raise HTTPException(413, self._too_large(f"more than {self.max_body_bytes} bytes"))
            return message

        await self.app(scope, limited_receive, send)

    def _authorized(self, header: str | None) -> bool:
        scheme, _, token = (header or "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), str(self.api_key).encode()
        )

    def _too_large(self, size: str) -> str:
        return f"the request body is {size}; the limit is {self.max_body_bytes} bytes (api.max_body_bytes)"
