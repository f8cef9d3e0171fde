"""Errors as data, end to end. Over real gRPC servers on loopback (no model): every domain error
leaves a servicer as a status with `google.rpc` details (ErrorInfo, RetryInfo, BadRequest) and a
client rebuilds the same exception with the same fields. Against a real cluster running the
embedded SmolLM2 (tokenizer, node, coordinator, API under uvicorn): each reason that can be
provoked gives its HTTP status and body, and the bodies are written to the frontend's fixture
(src/frontend/src/__fixtures__/api_errors.json) that the UI's vitest suite renders, so the two sides
cannot drift apart: this test fails when the committed fixture differs from what the API returns
now (PIPESERVE_UPDATE_FIXTURES=1 rewrites it).
"""

from __future__ import annotations

import asyncio
import difflib
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from pipeserve.api.errors import HTTP_STATUS
from pipeserve.common.errors import (
    CacheBudgetError,
    ContextLengthError,
    PipeserveError,
    Reason,
    StageUnavailableError,
    UnknownRequestError,
    make_error,
)
from pipeserve.common.grpc_util import (
    DOMAIN,
    GRPC_CODE,
    abort_with_details,
    error_from_rpc,
    error_reason,
    sync_server,
)
from tests.harness import InProcessCluster, free_port, held, paced, start_cluster
from tests.test_api import EMBEDDED, ApiServer, sse_events, with_api

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "src" / "frontend" / "src" / "__fixtures__" / "api_errors.json"
UPDATE = os.environ.get("PIPESERVE_UPDATE_FIXTURES") == "1"
METHOD = "/pipeserve.test.Raiser/Raise"


# ---- the reason set ------------------------------------------------------------------------------
def test_every_reason_has_an_http_status_and_a_grpc_code() -> None:
    assert set(HTTP_STATUS) == set(Reason) and set(GRPC_CODE) == set(Reason)
    assert all(r.value == r.value.lower() and " " not in r.value for r in Reason)


# ---- gRPC: a status with details, and back -------------------------------------------------------
class Raiser:
    """A sync server with the error interceptor whose one method raises what the test asks for
    (the request is the reason's value); `errors` maps it to the exception."""

    def __init__(self, errors: dict[str, BaseException]) -> None:
        self.errors = errors
        self.server = sync_server(2, "raiser")

        def raise_it(request: bytes, context: grpc.ServicerContext) -> bytes:
            raise self.errors[request.decode()]

        handler = grpc.unary_unary_rpc_method_handler(raise_it)
        self.server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("pipeserve.test.Raiser", {"Raise": handler}),)
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def call(self, key: str) -> grpc.RpcError:
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as ch, pytest.raises(grpc.RpcError) as err:
            ch.unary_unary(METHOD)(key.encode(), timeout=10)
        return err.value

    def stop(self) -> None:
        self.server.stop(0)


@pytest.fixture(scope="module")
def raiser() -> Iterator[Raiser]:
    errors: dict[str, BaseException] = {
        r.value: make_error(
            r, f"{r.value} happened", param="max_tokens", part=2, node="node3", retry_after_s=2.5
        )
        for r in Reason
    }
    server = Raiser(errors)
    yield server
    server.stop()


@pytest.mark.parametrize("reason", list(Reason))
def test_every_reason_round_trips_through_grpc_status_details(raiser: Raiser, reason: Reason) -> None:
    rpc = raiser.call(reason.value)
    assert rpc.code() == GRPC_CODE[reason] and rpc.details() == f"{reason.value} happened"
    err = error_from_rpc(rpc)
    assert type(err) is type(make_error(reason, "")) and err.reason == reason
    assert (err.message, err.param, err.part, err.node, err.retry_after_s) == (
        f"{reason.value} happened",
        "max_tokens",
        2,
        "node3",
        2.5,
    )
    assert error_reason(rpc) == reason


def test_the_details_are_the_standard_google_rpc_messages(raiser: Raiser) -> None:
    status = rpc_status.from_call(raiser.call("queue_full"))
    assert status is not None
    info, retry, bad = (
        error_details_pb2.ErrorInfo(),
        error_details_pb2.RetryInfo(),
        error_details_pb2.BadRequest(),
    )
    kinds = []
    for detail in status.details:
        for msg in (info, retry, bad):
            if detail.Is(msg.DESCRIPTOR):
                detail.Unpack(msg)
                kinds.append(type(msg).__name__)
    assert kinds == ["ErrorInfo", "RetryInfo", "BadRequest"]
    assert info.reason == "QUEUE_FULL" and info.domain == DOMAIN == "pipeserve"
    assert dict(info.metadata) == {"param": "max_tokens", "part": "2", "node": "node3"}
    assert retry.retry_delay.seconds == 2 and retry.retry_delay.nanos == 500_000_000
    assert [(v.field, v.description) for v in bad.field_violations] == [("max_tokens", "queue_full happened")]
    # no trailers of our own: only gRPC's details key
    assert [k for k, _ in raiser.call("queue_full").trailing_metadata()] == ["grpc-status-details-bin"]


def test_fields_that_do_not_apply_stay_unset_and_bugs_are_internal() -> None:
    server = Raiser(
        {
            "ctx": ContextLengthError(
                "the prompt has 70 tokens but the context length is 64", param="prompt"
            ),
            "unknown": UnknownRequestError("no cache for request 'x' on this stage"),
            "cache": CacheBudgetError("KV cache budget exceeded: 60 tokens cached + 8 new > budget 64"),
            "bug": RuntimeError("a bug"),
        }
    )
    try:
        ctx = error_from_rpc(server.call("ctx"))
        assert isinstance(ctx, ContextLengthError) and ctx.param == "prompt"
        assert (ctx.part, ctx.node, ctx.retry_after_s) == (None, None, None)
        unknown = server.call("unknown")
        assert unknown.code() == grpc.StatusCode.INVALID_ARGUMENT  # a lost cache is still bad input
        assert isinstance(error_from_rpc(unknown), UnknownRequestError)
        assert error_from_rpc(server.call("cache")).reason == Reason.CACHE_EXHAUSTED
        bug = server.call("bug")
        assert bug.code() == grpc.StatusCode.INTERNAL and bug.details() == "RuntimeError: a bug"
        assert error_reason(bug) == Reason.INTERNAL
    finally:
        server.stop()


def test_asyncio_servicers_abort_with_the_same_details() -> None:
    """The coordinator is an asyncio server: abort_with_details is its twin of the interceptor."""

    async def run() -> PipeserveError:
        async def handler(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            await abort_with_details(context, StageUnavailableError("part 1 is down", part=1, node="node2"))
            return b""

        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(
                    "pipeserve.test.Raiser", {"Raise": grpc.unary_unary_rpc_method_handler(handler)}
                ),
            )
        )
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
                try:
                    await ch.unary_unary(METHOD)(b"", timeout=10)
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() == grpc.StatusCode.UNAVAILABLE
                    return error_from_rpc(exc)
            raise AssertionError("the call did not fail")
        finally:
            await server.stop(0)

    err = asyncio.run(run())
    assert isinstance(err, StageUnavailableError) and (err.part, err.node) == (1, "node2")


def test_a_transport_failure_has_no_details_and_reads_as_service_unavailable() -> None:
    with grpc.insecure_channel(f"127.0.0.1:{free_port()}") as ch, pytest.raises(grpc.RpcError) as exc:
        ch.unary_unary(METHOD)(b"", timeout=5)
    assert error_reason(exc.value) is None
    assert error_from_rpc(exc.value).reason == Reason.SERVICE_UNAVAILABLE


# ---- HTTP: every reason we can provoke, against a real cluster -------------------------------------
# A chat template that refuses system messages, as some models' templates do (raise_exception).
REFUSING_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}"
    "{{ raise_exception('this model takes no system messages') }}{% endif %}"
    "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n"
)

# What each case must say, whatever the fixture holds: status, code, param, part, node, Retry-After.
EXPECTED: dict[str, tuple[int, str, str | None, int | None, str | None, bool]] = {
    "invalid_parameter": (400, "invalid_parameter", "prompt", None, None, False),
    "schema_violation": (422, "schema_violation", "metadata.type", None, None, False),
    "context_length_exceeded": (400, "context_length_exceeded", "messages", None, None, False),
    "model_refused": (400, "model_refused", "messages", None, None, False),
    "unauthorized": (401, "unauthorized", None, None, None, False),
    "not_found": (404, "not_found", None, None, None, False),
    "method_not_allowed": (405, "method_not_allowed", None, None, None, False),
    "request_too_large": (413, "request_too_large", None, None, None, False),
    "queue_full": (429, "queue_full", None, None, None, True),
    "timeout": (504, "timeout", None, None, None, False),
    "timeout_mid_stream": (504, "timeout", None, None, None, False),
    "cache_exhausted": (503, "cache_exhausted", None, 0, "node1", True),
    "stage_unavailable": (503, "stage_unavailable", None, 0, "node1", False),
    "service_unavailable": (503, "service_unavailable", None, None, None, False),
}
# Reasons no request from outside can provoke: bugs, lost caches (the coordinator replays), a client
# that is gone (nobody reads its 499), protocol breaks. The UI tests cover them with built bodies.
NOT_PROVOKED = {"internal", "unknown_request", "client_closed", "upstream_error"}


@pytest.fixture(scope="module")
def small() -> Iterator[InProcessCluster]:
    """One node with the whole model, room for one request and none waiting, a 256-token context."""
    c = start_cluster(
        EMBEDDED,
        parts=1,
        max_context=256,
        coordinator={"max_running": 1, "max_waiting": 0},
        tokenizer={"chat_template": REFUSING_TEMPLATE},
    )
    yield c
    c.stop()


def case(resp: httpx.Response, request: str, how: str) -> dict[str, Any]:
    return {
        "request": request,
        "how": how,
        "status": resp.status_code,
        "retry_after": resp.headers.get("retry-after"),
        "body": resp.json(),
    }


def wait_until(predicate: Any, what: str, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} did not happen within {timeout_s} s")
        time.sleep(0.05)


def provoke_all(cluster: InProcessCluster) -> dict[str, dict[str, Any]]:
    """Every case of EXPECTED, provoked for real; stage_unavailable last (it stops the node)."""
    out: dict[str, dict[str, Any]] = {}
    cfg = cluster.cfg
    user = [{"role": "user", "content": "hi"}]
    with ApiServer(cfg) as api, httpx.Client(base_url=api.url, timeout=60) as http:
        out["invalid_parameter"] = case(
            http.post("/v1/completions", json={"prompt": [999999], "max_tokens": 2}),
            "POST /v1/completions",
            "a prompt token id outside the vocabulary (the coordinator rejects it)",
        )
        out["schema_violation"] = case(
            http.post("/api/model/process", json={"text": "hi", "metadata": {"type": "summarize"}}),
            "POST /api/model/process",
            "metadata.type is not one of the schema's values",
        )
        out["context_length_exceeded"] = case(
            http.post(
                "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hello " * 300}]}
            ),
            "POST /v1/chat/completions",
            "a prompt longer than the 256-token context",
        )
        out["model_refused"] = case(
            http.post(
                "/v1/chat/completions",
                json={"messages": [{"role": "system", "content": "Be brief."}, *user], "max_tokens": 2},
            ),
            "POST /v1/chat/completions",
            "a system message the model's chat template refuses (raise_exception)",
        )
        out["not_found"] = case(http.get("/v1/nothing-here"), "GET /v1/nothing-here", "no such route")
        out["method_not_allowed"] = case(
            http.get("/v1/completions"), "GET /v1/completions", "the route takes POST only"
        )
        big = json.dumps({"text": "x" * (cfg.api.max_body_bytes + 10)}).encode()
        out["request_too_large"] = case(
            http.post("/api/model/process", content=big, headers={"content-type": "application/json"}),
            "POST /api/model/process",
            "a body over api.max_body_bytes",
        )
        long = {"prompt": "Count:", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with (
            held(cluster.nodes[0]),
            http.stream("POST", "/v1/completions", json=long) as running,
        ):
            assert running.status_code == 200
            next(sse_events(running))  # it holds the one slot (its next step waits) and nothing may wait
            out["queue_full"] = case(
                http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
                "POST /v1/completions",
                "a second request while one runs (max_running 1, max_waiting 0)",
            )
        wait_until(lambda: not any(cluster.cache_used().values()), "freeing the running request's caches")

        node = cluster.nodes[0]
        assert node.runner is not None
        real_forward = node.runner.forward

        def full_cache(*args: Any, **kw: Any) -> Any:
            raise CacheBudgetError("KV cache budget exceeded: 250 tokens cached + 9 new > budget 256")

        node.runner.forward = full_cache  # type: ignore[method-assign]
        try:
            out["cache_exhausted"] = case(
                http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
                "POST /v1/completions",
                "node1's KV cache is full (its StageRunner raises CacheBudgetError)",
            )
        finally:
            node.runner.forward = real_forward  # type: ignore[method-assign]

    with ApiServer(with_api(cfg, api_key="sekrit")) as api, httpx.Client(base_url=api.url) as http:
        out["unauthorized"] = case(http.get("/v1/models"), "GET /v1/models", "no API key where one is set")

    # paced: 200 tokens take >= 10 s, so the deadlines below come first on any machine
    with (
        paced(cluster.nodes[0]),
        ApiServer(with_api(cfg, request_timeout_s=0.3)) as api,
        httpx.Client(base_url=api.url) as http,
    ):
        body = {"prompt": "Once", "max_tokens": 200, "ignore_eos": True}
        out["timeout"] = case(
            http.post("/v1/completions", json=body, timeout=30),
            "POST /v1/completions",
            "200 tokens with api.request_timeout_s = 0.3",
        )
    wait_until(lambda: not any(cluster.cache_used().values()), "freeing the timed-out request's caches")

    with (
        paced(cluster.nodes[0]),
        ApiServer(with_api(cfg, request_timeout_s=1.0)) as api,
        httpx.Client(base_url=api.url) as http,
    ):
        body = {"prompt": "Once", "max_tokens": 200, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body, timeout=30) as resp:
            assert resp.status_code == 200, (
                f"the first token did not arrive within api.request_timeout_s = 1.0 s: {resp.read()!r}"
            )
            events = list(sse_events(resp))
        assert events[-1] == "[DONE]" and "error" in events[-2], events[-3:]
        assert all("choices" in e for e in events[:-2]) and len(events) > 3, events
        out["timeout_mid_stream"] = {
            "request": "POST /v1/completions (stream)",
            "how": "a stream that outlives api.request_timeout_s = 1.0: the error is the last event",
            "status": 200,
            "retry_after": None,
            "body": events[-2],
        }
    wait_until(lambda: not any(cluster.cache_used().values()), "freeing the timed-out stream's caches")

    dead = cfg.model_copy(
        update={"coordinator": cfg.coordinator.model_copy(update={"address": f"127.0.0.1:{free_port()}"})}
    )
    with ApiServer(dead) as api, httpx.Client(base_url=api.url, timeout=30) as http:
        out["service_unavailable"] = case(
            http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
            "POST /v1/completions",
            "the coordinator's address answers nothing",
        )

    with ApiServer(cfg) as api, httpx.Client(base_url=api.url, timeout=30) as http:
        cluster.nodes[0].stop(0)
        assert cluster.coordinator is not None
        co = cluster.coordinator
        wait_until(lambda: not co.cluster.ready, "the coordinator noticing node1 is down")
        out["stage_unavailable"] = case(
            http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}),
            "POST /v1/completions",
            "node1, the only node of part 0, is stopped",
        )
    return out


ADDRESS = re.compile(r"\b127\.\d+\.\d+\.\d+:\d+\b")


def scrub(text: str) -> str:
    """Loopback addresses differ on every run (ports from the OS)."""
    return ADDRESS.sub("127.0.0.1:<port>", text)


def comparable(cases: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The cases without what varies between runs: retry-after values (they follow the measured
    token rate) become "<seconds>", and gRPC's own text of a failed connection (in the health
    check's view of a stopped node, and in an unreachable coordinator) is cut off."""
    out = json.loads(json.dumps(cases))
    for c in out.values():
        err = c["body"]["error"]
        if isinstance(err.get("retry_after_s"), int):
            err["retry_after_s"] = "<seconds>"
        if c["retry_after"] is not None:
            c["retry_after"] = "<seconds>"
        if err["code"] == "stage_unavailable":
            err["message"] = re.sub(r"(has no healthy node: [\w, -]+) \(.*", r"\1 (...)", err["message"])
        if err["code"] == "service_unavailable":
            err["message"] = re.sub(r"(is unreachable): .*", r"\1: ...", err["message"])
    return out


@pytest.mark.slow
def test_api_error_bodies_are_the_frontends_fixture(small: InProcessCluster) -> None:
    cases = provoke_all(small)
    assert set(cases) == set(EXPECTED)
    for name, (status, code, param, part, node, retry) in EXPECTED.items():
        c = cases[name]
        err = c["body"]["error"]
        assert set(c["body"]) == {"error"}, c
        assert set(err) == {"message", "type", "code", "param", "status", "part", "node", "retry_after_s"}, c
        assert (c["status"] if name != "timeout_mid_stream" else err["status"]) == status, c
        assert (err["status"], err["code"], err["param"], err["part"], err["node"]) == (
            status,
            code,
            param,
            part,
            node,
        ), c
        assert (c["retry_after"] is not None, err["retry_after_s"] is not None) == (retry, retry), c
        if retry:
            assert int(c["retry_after"]) == err["retry_after_s"] >= 1, c
        assert err["message"], c
    provoked = {c["body"]["error"]["code"] for c in cases.values()}
    assert provoked | NOT_PROVOKED == {r.value for r in Reason} and not provoked & NOT_PROVOKED

    live = {
        name: {**c, "body": json.loads(scrub(json.dumps(c["body"])))} for name, c in sorted(cases.items())
    }
    fixture = {
        "about": "Real error responses of the pipeserve API, one per reason that can be provoked. Written by "
        "tests/test_errors.py against a running cluster (PIPESERVE_UPDATE_FIXTURES=1 rewrites it); "
        "read by the UI's vitest suite. Loopback ports are scrubbed.",
        "not_provoked": sorted(NOT_PROVOKED),
        "cases": live,
    }
    existed = FIXTURE.exists()
    if UPDATE or not existed:
        FIXTURE.parent.mkdir(parents=True, exist_ok=True)
        FIXTURE.write_text(json.dumps(fixture, indent=2, ensure_ascii=False) + "\n")
    assert existed or UPDATE, f"{FIXTURE} did not exist; it was written now: commit it"
    committed = json.loads(FIXTURE.read_text())
    want = json.dumps(comparable(committed["cases"]), indent=2, sort_keys=True).splitlines()
    got = json.dumps(comparable(live), indent=2, sort_keys=True).splitlines()
    diff = "\n".join(difflib.unified_diff(want, got, "committed fixture", "the API now", lineterm=""))
    assert not diff, (
        f"the API's error bodies differ from {FIXTURE.relative_to(ROOT)}; if the change is meant, "
        f"rerun with PIPESERVE_UPDATE_FIXTURES=1 and commit the fixture:\n{diff}"
    )
    assert committed["not_provoked"] == sorted(NOT_PROVOKED)
