"""Serves the built React bundle (src/frontend/dist) on the frontend port and proxies `/api`,
`/v1`, `/health`, `/ready` and `/metrics` to the API, streaming (SSE passes through unbuffered).
`pipeserve up` and `pipeserve frontend` run it; in Docker, nginx does the same job.

With `api.api_key` set, the proxy adds `Authorization: Bearer <key>` to what it forwards: the key
stays on the server (never in the bundle or the browser), and the UI port becomes the way in, so
expose it only where the API itself could be.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from pipeserve.common.config import Config

DIST = Path(__file__).resolve().parent.parent / "frontend" / "dist"
PROXIED = ("/api", "/v1", "/health", "/ready", "/metrics")
HOP_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


def create_frontend_app(api_url: str, dist: Path = DIST, api_key: str | None = None) -> Starlette:
    client = httpx.AsyncClient(base_url=api_url, timeout=httpx.Timeout(None, connect=5.0))

    async def proxy(request: Request) -> Response:
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_HEADERS}
        if api_key:
            headers = {k: v for k, v in headers.items() if k.lower() != "authorization"}
            headers["authorization"] = f"Bearer {api_key}"
        upstream = client.build_request(
            request.method,
            request.url.path,
            params=request.query_params,
            headers=headers,
            content=await request.body(),
        )
        try:
            resp = await client.send(upstream, stream=True)
        except httpx.HTTPError as exc:
            body = {
                "error": {
                    "message": f"the API at {api_url} is unreachable: {exc}",
                    "type": "unavailable",
                    "code": 502,
                }
            }
            return JSONResponse(body, status_code=502)

        async def body_iter() -> AsyncIterator[bytes]:
            async for chunk in resp.aiter_raw():
                yield chunk

        out_headers = {k: v for k, v in resp.headers.items() if k.lower() not in HOP_HEADERS}
        return StreamingResponse(
            body_iter(),
            status_code=resp.status_code,
            headers=out_headers,
            background=BackgroundTask(resp.aclose),
        )

    methods = ["GET", "POST", "PUT", "DELETE", "OPTIONS"]
    routes: list = []
    for prefix in PROXIED:
        routes += [
            Route(prefix, proxy, methods=methods),
            Route(prefix + "/{rest:path}", proxy, methods=methods),
        ]
    if dist.is_dir():
        routes.append(Mount("/", StaticFiles(directory=dist, html=True)))
    else:

        async def missing(request: Request) -> Response:
            return Response(
                f"The UI is not built: run `make frontend` ({dist} is missing).\n", status_code=503
            )

        routes.append(Route("/{rest:path}", missing))
    return Starlette(routes=routes)


def serve_frontend(cfg: Config, host: str = "0.0.0.0") -> None:
    api_url = f"http://127.0.0.1:{cfg.api.port}"
    app = create_frontend_app(api_url, api_key=cfg.api.api_key)
    uvicorn.run(app, host=host, port=cfg.frontend.port, log_level="warning")
