"""The REST API against a real cluster (tokenizer, 3 nodes, coordinator in this process) running the
embedded SmolLM2: the spec endpoint, the OpenAI endpoints through the official `openai` client,
every error status, metrics, the cluster view, a client that hangs up, and schemathesis fuzzing
of the OpenAPI schema. The API runs under uvicorn on a loopback port, as in production.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import schemathesis
import uvicorn
from hypothesis import HealthCheck, Phase, given, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from pipeserve.api.api import create_app
from pipeserve.api.errors import HTTP_STATUS
from pipeserve.common.config import Config
from pipeserve.common.errors import Reason
from pipeserve.coordinator.coordinator_server import CoordinatorServer
from tests.harness import InProcessCluster, free_port, held, paced, pin_step_cost, start_cluster

pytestmark = pytest.mark.slow

EMBEDDED = "smollm2-135m-instruct"
FRANCE = "What is the capital of France?"


class ApiServer:
    """create_app(cfg) under uvicorn in a background thread on 127.0.0.1:<free port>."""

    def __init__(self, cfg: Config) -> None:
        self.port = free_port()
        config = uvicorn.Config(
            create_app(cfg), host="127.0.0.1", port=self.port, log_level="warning", lifespan="on"
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ApiServer:
        self.thread.start()
        deadline = time.monotonic() + 15
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def with_api(cfg: Config, **api: Any) -> Config:
    return cfg.model_copy(update={"api": cfg.api.model_copy(update=api)})


def sse_events(resp: httpx.Response) -> Iterator[Any]:
    for line in resp.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def wait_idle(cluster: InProcessCluster, timeout_s: float = 5.0) -> float:
    """Seconds until every node's KV cache is empty (fails past timeout_s)."""
    t0 = time.monotonic()
    while any(cluster.cache_used().values()):
        if time.monotonic() - t0 > timeout_s:
            pytest.fail(f"caches not freed within {timeout_s} s: {cluster.cache_used()}")
        time.sleep(0.05)
    return time.monotonic() - t0


ERROR_KEYS = {"message", "type", "code", "param", "status", "part", "node", "retry_after_s"}


def assert_error(
    resp: httpx.Response,
    status: int,
    reason: str,
    *needles: str,
    param: str | None = None,
    part: int | None = None,
    node: str | None = None,
) -> str:
    """The one error body with this status and reason, these fields, and a message naming `needles`."""
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    err = body["error"]
    assert (err["status"], err["code"], err["param"], err["part"], err["node"]) == (
        status,
        reason,
        param,
        part,
        node,
    ), body
    retry = resp.headers.get("retry-after")
    assert err["retry_after_s"] == (int(retry) if retry is not None else None), (retry, body)
    message = err["message"]
    for needle in needles:
        assert needle in message, message
    return message


# ---- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster() -> Iterator[InProcessCluster]:
    c = pin_step_cost(start_cluster(EMBEDDED, parts=3))
    yield c
    c.stop()


@pytest.fixture(scope="module")
def api(cluster: InProcessCluster) -> Iterator[ApiServer]:
    with ApiServer(cluster.cfg) as server:
        yield server


@pytest.fixture(scope="module")
def http(api: ApiServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=api.url, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def oai(api: ApiServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{api.url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def small() -> Iterator[tuple[InProcessCluster, httpx.Client]]:
    """One node with a 64-token context and room for one running request and none waiting,
    behind the API: for 400, 429 and a part down."""
    c = start_cluster(EMBEDDED, parts=1, max_context=64, coordinator={"max_running": 1, "max_waiting": 0})
    try:
        with ApiServer(c.cfg) as server, httpx.Client(base_url=server.url, timeout=60) as client:
            yield c, client
    finally:
        c.stop()


# ---- the spec endpoint ---------------------------------------------------------------------------
def test_process_matches_the_spec(http: httpx.Client) -> None:
    body = {
        "text": "The sky is",
        "metadata": {"timestamp": "2024-02-17T12:00:00Z", "type": "text_generation"},
    }
    resp = http.post("/api/model/process", json={**body, "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert set(out) == {"text", "processingTime", "nodeCount"}
    assert isinstance(out["text"], str) and out["text"]
    assert isinstance(out["processingTime"], float) and out["processingTime"] > 0
    assert isinstance(out["nodeCount"], int) and out["nodeCount"] == 3
    # The spec's body alone (no extras, no max_tokens) is accepted too.
    assert http.post("/api/model/process", json={**body, "max_tokens": 2}).status_code == 200


def test_process_chat_and_stream(http: httpx.Client) -> None:
    body = {"text": FRANCE, "metadata": {"type": "chat"}, "temperature": 0, "max_tokens": 12}
    plain = http.post("/api/model/process", json=body).json()
    assert "Paris" in plain["text"]
    with http.stream("POST", "/api/model/process", json={**body, "stream": True}) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(resp))
    *pieces, final = events
    assert pieces and all(set(e) == {"text"} for e in pieces)
    assert set(final) == {"text", "processingTime", "nodeCount", "finishReason"}
    assert final["text"] == "".join(e["text"] for e in pieces) == plain["text"]
    assert final["nodeCount"] == 3 and final["finishReason"] == "stop"  # greedy: the answer ends in 12


# ---- OpenAI-compatible ---------------------------------------------------------------------------
def test_models(oai: openai.OpenAI) -> None:
    assert [m.id for m in oai.models.list()] == [EMBEDDED]


def test_chat_mentions_paris(oai: openai.OpenAI) -> None:
    r = oai.chat.completions.create(
        model=EMBEDDED, messages=[{"role": "user", "content": FRANCE}], temperature=0, max_tokens=16
    )
    assert "Paris" in r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop"  # greedy: the answer ends within 16 tokens
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    stopped = oai.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": FRANCE}],
        temperature=0,
        max_tokens=16,
        stop=[" Paris"],
    )
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    ext = r.model_extra["pipeserve"]
    assert [hop["part"] for hop in ext["route"]] == [0, 1, 2]
    assert ext["ttft_ms"] > 0 and ext["total_ms"] >= ext["ttft_ms"] and len(ext["stage_timings"]) == 3


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_equals_non_stream(oai: openai.OpenAI, endpoint: str) -> None:
    kw: dict[str, Any] = {"model": EMBEDDED, "temperature": 0.8, "seed": 7, "max_tokens": 20}
    if endpoint == "chat":
        kw["messages"] = [{"role": "user", "content": "Write a short line about the sea."}]
        full = oai.chat.completions.create(**kw)
        text, reason = full.choices[0].message.content, full.choices[0].finish_reason
        chunks = list(oai.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert chunks[0].choices[0].delta.role == "assistant"
    else:
        kw["prompt"] = "Once upon a time"
        full = oai.completions.create(**kw)
        text, reason = full.choices[0].text, full.choices[0].finish_reason
        chunks = list(oai.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
        streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == text and text
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == reason
    assert (
        finals[0].model_extra["pipeserve"]["route"]
        and finals[0].usage.completion_tokens == full.usage.completion_tokens
    )
    assert (
        chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens
    )  # include_usage


def test_logprobs(oai: openai.OpenAI) -> None:
    chat = oai.chat.completions.create(
        model=EMBEDDED,
        messages=[{"role": "user", "content": FRANCE}],
        temperature=0,
        max_tokens=6,
        logprobs=True,
        top_logprobs=2,
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 and t.logprob <= 0 for t in content)
    assert content[0].top_logprobs[0].token == content[0].token  # greedy picks the most likely
    assert "".join(t.token for t in content).startswith(chat.choices[0].message.content[:5])
    comp = oai.completions.create(
        model=EMBEDDED, prompt="The capital of France is", temperature=0, max_tokens=4, logprobs=3
    )
    lp = comp.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 4
    assert all(len(alts) >= 1 for alts in lp.top_logprobs) and lp.text_offset[0] == 0
    assert "".join(lp.tokens) == comp.choices[0].text


# ---- errors --------------------------------------------------------------------------------------
def test_validation_errors_name_the_field(http: httpx.Client) -> None:
    schema = "schema_violation"
    assert_error(
        http.post("/api/model/process", json={"metadata": {"type": "text_generation"}}),
        422,
        schema,
        "text",
        param="text",
    )
    msg = assert_error(
        http.post("/api/model/process", json={"text": "hi", "metadata": {"type": "summarize"}}),
        422,
        schema,
        param="metadata.type",
    )
    assert "metadata.type" in msg and "text_generation" in msg and "chat" in msg
    assert_error(
        http.post("/api/model/process", json={"text": "hi", "temperature": -1}),
        422,
        schema,
        "temperature",
        param="temperature",
    )
    assert_error(http.post("/v1/completions", json={"prompt": "hi", "n": 2}), 422, schema, "n:", param="n")
    assert_error(
        http.post("/v1/chat/completions", json={"messages": []}), 422, schema, "messages", param="messages"
    )
    assert_error(
        http.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"}),
        422,
        schema,
        "JSON",
    )
    assert_error(
        http.post("/v1/completions", json={"prompt": ["a", "b"]}),
        400,
        "invalid_parameter",
        "one prompt",
        param="prompt",
    )
    msgs = [{"role": "user", "content": "hi"}]
    assert_error(
        http.post("/v1/chat/completions", json={"messages": msgs, "top_logprobs": 2}),
        400,
        "invalid_parameter",
        "logprobs",
        param="top_logprobs",
    )
    assert_error(http.get("/nope"), 404, "not_found", "/nope")
    assert_error(http.get("/v1/completions"), 405, "method_not_allowed", "POST")
    assert http.get("/health").json() == {"status": "ok"}


def test_body_too_large(http: httpx.Client, api: ApiServer, cluster: InProcessCluster) -> None:
    limit = cluster.cfg.api.max_body_bytes
    big = json.dumps({"text": "x" * (limit + 10)}).encode()
    assert_error(
        http.post("/api/model/process", content=big, headers={"content-type": "application/json"}),
        413,
        "request_too_large",
        str(limit),
    )
    # Without Content-Length (chunked) the body is counted as it arrives.
    chunks = iter([big[i : i + 65536] for i in range(0, len(big), 65536)])
    resp = http.post("/api/model/process", content=chunks, headers={"content-type": "application/json"})
    assert_error(resp, 413, "request_too_large", str(limit))
    assert http.post("/api/model/process", json={"text": "hi", "max_tokens": 1}).status_code == 200


def test_prompt_longer_than_context(small: tuple[InProcessCluster, httpx.Client]) -> None:
    _, http = small
    msg = assert_error(
        http.post("/api/model/process", json={"text": "hello world " * 60}),
        400,
        "context_length_exceeded",
        param="text",  # the coordinator's "prompt", named as this endpoint's body calls it
    )
    m = re.search(r"(\d+) tokens but the context length is 64", msg)
    assert m and int(m.group(1)) > 64, msg


def test_queue_full_is_429_with_retry_after(small: tuple[InProcessCluster, httpx.Client]) -> None:
    cluster, http = small
    long = {"prompt": "Count:", "max_tokens": 50, "ignore_eos": True, "stream": True}
    # The running request must not finish before the second one arrives: its steps after the
    # first wait (merely asking for many tokens raced the test and lost on fast machines).
    with held(cluster.nodes[0]), http.stream("POST", "/v1/completions", json=long) as resp:
        assert resp.status_code == 200
        next(sse_events(resp))  # running now: the one slot is taken and nothing may wait
        busy = http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
        assert_error(busy, 429, "queue_full", "queue is full")
        assert int(busy.headers["retry-after"]) >= 1
    wait_idle(cluster)
    deadline = time.monotonic() + 5
    while (resp2 := http.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})).status_code == 429:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.1)
    assert resp2.status_code == 200, resp2.text


def test_api_key(cluster: InProcessCluster) -> None:
    with (
        ApiServer(with_api(cluster.cfg, api_key="sekrit")) as server,
        httpx.Client(base_url=server.url) as http,
    ):
        assert http.get("/health").status_code == 200
        resp = http.get("/v1/models")
        assert_error(resp, 401, "unauthorized", "API key")
        assert resp.headers["www-authenticate"] == "Bearer"
        # A browser's preflight carries no key; the frontend's origin is allowed.
        origin = "http://localhost:5173"
        preflight = http.options(
            "/v1/chat/completions",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization",
            },
        )
        assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == origin
        denied = http.get("/v1/models", headers={"Origin": origin})
        assert denied.status_code == 401 and denied.headers["access-control-allow-origin"] == origin
        assert_error(
            http.post("/api/model/process", json={"text": "hi"}, headers={"Authorization": "Bearer nope"}),
            401,
            "unauthorized",
        )
        assert_error(http.get("/metrics"), 401, "unauthorized")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sekrit", max_retries=0)
        assert [m.id for m in client.models.list()] == [EMBEDDED]
        schema = http.get("/openapi.json", headers={"Authorization": "Bearer sekrit"}).json()
        assert "bearerAuth" in schema["components"]["securitySchemes"]


def test_deadline_is_504_and_frees_caches(cluster: InProcessCluster, http: httpx.Client) -> None:
    with (
        paced(cluster.nodes[0]),  # 300 tokens take >= 15 s: the deadline comes first on any machine
        ApiServer(with_api(cluster.cfg, request_timeout_s=0.3)) as server,
        httpx.Client(base_url=server.url) as fast,
    ):
        body = {"prompt": "Once", "max_tokens": 300, "ignore_eos": True}
        assert_error(fast.post("/v1/completions", json=body, timeout=30), 504, "timeout", "0.3 s")
    wait_idle(cluster)
    assert http.post("/api/model/process", json={"text": "hi", "max_tokens": 2}).status_code == 200


def test_error_mid_stream_is_an_event(cluster: InProcessCluster) -> None:
    with (
        paced(cluster.nodes[0]),  # >= 15 s for 300 tokens, ~20 of them before the 1.5 s deadline
        ApiServer(with_api(cluster.cfg, request_timeout_s=1.5)) as server,
        httpx.Client(base_url=server.url, timeout=30) as http,
    ):
        body = {"prompt": "Once", "max_tokens": 300, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as resp:
            assert resp.status_code == 200, (
                f"the first token did not arrive within api.request_timeout_s = 1.5 s, so the error "
                f"could not be tested mid-stream: {resp.read()!r}"
            )
            events = list(sse_events(resp))
    assert events[-1] == "[DONE]", events[-3:]
    assert set(events[-2]) == {"error"} and set(events[-2]["error"]) == ERROR_KEYS, events[-2]
    assert (events[-2]["error"]["status"], events[-2]["error"]["code"]) == (504, "timeout"), events[-2]
    assert len(events) > 3 and all("choices" in e for e in events[:-2]), events[:3]
    wait_idle(cluster)


def test_coordinator_down_is_503_not_500(cluster: InProcessCluster) -> None:
    dead = f"127.0.0.1:{free_port()}"
    cfg = cluster.cfg.model_copy(
        update={"coordinator": cluster.cfg.coordinator.model_copy(update={"address": dead})}
    )
    with ApiServer(cfg) as server, httpx.Client(base_url=server.url, timeout=30) as http:
        assert_error(
            http.post("/api/model/process", json={"text": "hi"}),
            503,
            "service_unavailable",
            "coordinator",
            dead,
        )
        assert_error(http.get("/ready"), 503, "service_unavailable", "coordinator", "unreachable")
        view = http.get("/api/cluster")
        assert view.status_code == 200
        assert view.json()["coordinator"]["healthy"] is False and view.json()["ready"] is False
        assert view.json()["tokenizer"]["healthy"] is True  # asked directly
        assert http.get("/v1/models").json()["data"][0]["id"] == EMBEDDED
        assert http.get("/metrics").status_code == 200
        assert http.get("/health").status_code == 200


# ---- cancellation --------------------------------------------------------------------------------
def test_client_disconnect_mid_stream_frees_caches(cluster: InProcessCluster, api: ApiServer) -> None:
    body = {
        "model": EMBEDDED,
        "prompt": "Count to a thousand:",
        "max_tokens": 400,
        "ignore_eos": True,
        "stream": True,
    }
    with paced(cluster.nodes[0]):  # 400 tokens take >= 20 s, so freeing in < 5 s is the cancel's doing
        with (
            httpx.Client(base_url=api.url, timeout=30) as http,
            http.stream("POST", "/v1/completions", json=body) as resp,
        ):
            events = sse_events(resp)
            for _ in range(3):
                next(events)
            assert any(cluster.cache_used().values())
        t_disconnect = time.monotonic()
        freed_in = wait_idle(cluster, timeout_s=5)
        assert time.monotonic() - t_disconnect < 5 and freed_in < 5


def test_client_disconnect_non_streamed_frees_caches(cluster: InProcessCluster, api: ApiServer) -> None:
    body = {"text": "Count to a thousand:", "max_tokens": 400, "ignore_eos": True}
    with paced(cluster.nodes[0]):  # >= 20 s: the client gives up first, and only a cancel frees in 5 s
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=api.url, timeout=1.5) as http:
            http.post("/api/model/process", json=body)
        wait_idle(cluster, timeout_s=5)


# ---- ops: readiness, cluster view, metrics, OpenAPI ----------------------------------------------
def test_ready_and_cluster_view(http: httpx.Client, cluster: InProcessCluster) -> None:
    assert http.get("/ready").json() == {"ready": True}
    view = http.get("/api/cluster").json()
    assert set(view) == {"ready", "problems", "model", "coordinator", "tokenizer", "nodes"}
    assert view["ready"] is True and view["problems"] == []
    assert set(view["model"]) == {"name", "checksum", "arch", "n_layers"}
    assert (
        view["model"]["name"] == EMBEDDED
        and view["model"]["arch"] == "llama"
        and view["model"]["n_layers"] == 30
    )
    assert set(view["coordinator"]) == {
        "address",
        "healthy",
        "running",
        "waiting",
        "max_running",
        "max_waiting",
        "micro_batches",
        "micro_batches_reason",
        "speculative_method",
        "speculative_max_draft",
        "speculative",
    }
    assert (view["coordinator"]["speculative_method"], view["coordinator"]["speculative_max_draft"]) == (
        "ngram",
        7,
    )
    assert set(view["coordinator"]["speculative"]) == {
        "drafted",
        "accepted",
        "acceptance_rate",
        "passes",
        "tokens_per_pass",
    }
    assert (
        view["coordinator"]["healthy"] is True
        and view["coordinator"]["address"] == cluster.cfg.coordinator.address
    )
    assert set(view["tokenizer"]) == {"address", "healthy", "vocab_size", "error"}
    assert view["tokenizer"]["healthy"] is True and view["tokenizer"]["vocab_size"] > 0
    keys = {
        "id",
        "address",
        "part",
        "layers",
        "healthy",
        "error",
        "requests_in_flight",
        "cache_used_tokens",
        "cache_budget_tokens",
        "cache_block_size",
        "kv_dtype",
        "kv_window",
        "cache_blocks_total",
        "cache_blocks_free",
        "prefix_cached_blocks",
        "prefix_hit_tokens",
        "backoff_s",
        "rss_bytes",
        "cache_resident_bytes",
        "weights_bytes",
        "weight_types",
        "kernel",
        "threads_reason",
        "host_id",
        "last_forward_ms",
        "mean_forward_ms",
        "forwards_total",
        "capacity",
        "memory",
        "load_s",
    }
    nodes = sorted(view["nodes"], key=lambda n: n["part"])
    assert [n["part"] for n in nodes] == [0, 1, 2] and all(set(n) == keys for n in nodes)
    assert nodes[0]["layers"][0] == 0 and nodes[-1]["layers"][1] == 30
    assert all(a["layers"][1] == b["layers"][0] for a, b in itertools.pairwise(nodes))
    assert all(n["healthy"] and n["error"] is None and n["rss_bytes"] > 0 for n in nodes)
    # threads: auto on one host (loopback, one process): one group, so each node takes every core
    assert view["coordinator"]["micro_batches"] == 1
    assert "one host (by the host ids the nodes report)" in view["coordinator"]["micro_batches_reason"]
    assert len({n["host_id"] for n in nodes}) == 1 and nodes[0]["host_id"]
    assert all("take turns" in n["threads_reason"] for n in nodes)
    block_bytes = 2 * 16 * 10 * 3 * 64 * 4  # k and v: 16 positions x 10 layers x 3 kv heads x 64 dims fp32
    assert all(n["weights_bytes"] > 0 and n["weight_types"]["Q4_1"] == 70 for n in nodes)  # 10 layers x 7
    # memory: the limit (auto: this machine's available memory / 3 nodes on loopback, or a cgroup's),
    # what each share takes (its weights as loaded, its whole KV pool, the runtime allowance), what is left
    for n in nodes:
        m = n["memory"]
        assert m["limit_source"] in ("machine", "cgroup") and m["limit_reason"].startswith("auto: ")
        assert (
            m["weights_bytes"] == n["weights_bytes"]
            and m["kv_bytes"] == n["cache_blocks_total"] * block_bytes
        )
        assert m["need_bytes"] == m["weights_bytes"] + m["kv_bytes"] + m["runtime_bytes"]
        assert m["left_bytes"] == m["limit_bytes"] - m["need_bytes"] >= 0 and n["load_s"] > 0
    assert all(
        n["cache_block_size"] == 16 and n["cache_blocks_total"] * 16 == n["cache_budget_tokens"]
        for n in nodes
    )
    assert all(n["cache_blocks_free"] <= n["cache_blocks_total"] and n["backoff_s"] == 0 for n in nodes)
    assert all(n["kv_dtype"] == "f32" and n["kv_window"] == 0 for n in nodes)  # SmolLM2: no sliding window
    # KV pages in memory: the blocks written so far, never more than the pool, never more than RSS
    assert all(
        n["cache_resident_bytes"] % block_bytes == 0
        and n["cache_resident_bytes"] <= min(n["cache_blocks_total"] * block_bytes, n["rss_bytes"])
        for n in nodes
    )


def _samples(http: httpx.Client) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    resp = http.get("/metrics")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(resp.text)
        for s in family.samples
    }


def test_metrics_move(http: httpx.Client) -> None:
    before = _samples(http)
    assert http.post("/api/model/process", json={"text": "hi", "max_tokens": 3}).status_code == 200
    after = _samples(http)

    def delta(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    ok = {"endpoint": "/api/model/process", "method": "POST", "status": "200"}
    assert delta("pipeserve_api_requests_total", **ok) == 1
    assert delta("pipeserve_generation_tokens_total") >= 1 and delta("pipeserve_prompt_tokens_total") >= 1
    assert delta("pipeserve_time_to_first_token_seconds_count", endpoint="/api/model/process") == 1
    assert (
        delta("pipeserve_e2e_request_latency_seconds_count", endpoint="/api/model/process", outcome="length")
        == 1
    )
    assert delta("pipeserve_stage_forward_seconds_count", part="2", node="node3") == 1
    assert delta("pipeserve_hop_bytes_total", part="1", node="node2") > 0
    assert ("pipeserve_requests_running", ()) in after and ("pipeserve_requests_waiting", ()) in after


def test_openapi_describes_everything(http: httpx.Client) -> None:
    schema = http.get("/openapi.json").json()
    assert {
        "/api/model/process",
        "/v1/completions",
        "/v1/chat/completions",
        "/v1/models",
        "/health",
        "/ready",
        "/metrics",
        "/api/cluster",
    } <= set(schema["paths"])
    process = schema["paths"]["/api/model/process"]["post"]
    assert "text/event-stream" in process["responses"]["200"]["content"]
    assert process["responses"]["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "[DONE]" in schema["paths"]["/v1/completions"]["post"]["responses"]["200"]["description"]
    # The error body: OpenAI's fields and ours, every one documented and always present.
    detail = schema["components"]["schemas"]["ErrorDetail"]
    assert set(detail["properties"]) == set(detail["required"]) == ERROR_KEYS
    assert all(p.get("description") for p in detail["properties"].values()), detail
    assert detail["properties"]["code"]["$ref"].endswith("/Reason")
    assert set(schema["components"]["schemas"]["Reason"]["enum"]) == {r.value for r in Reason}
    # Every status a generation can answer is documented (not 404/405: routing; 499: nobody reads it).
    statuses = {str(s) for s in HTTP_STATUS.values() if s not in (404, 405, 499)}
    assert statuses <= set(process["responses"]), sorted(process["responses"])


# ---- the small cluster's services go away (last: they break it) ---------------------------------
def test_coordinator_restart(small: tuple[InProcessCluster, httpx.Client]) -> None:
    cluster, http = small
    assert cluster.coordinator is not None
    cluster.call(cluster.coordinator.stop(0))
    t0 = time.monotonic()
    assert_error(
        http.post("/api/model/process", json={"text": "hi", "max_tokens": 2}),
        503,
        "service_unavailable",
        "coordinator",
    )
    assert_error(http.get("/ready"), 503, "service_unavailable", "coordinator")
    assert http.get("/api/cluster").json()["coordinator"]["healthy"] is False
    assert time.monotonic() - t0 < 10  # answered, not hung

    async def restart() -> CoordinatorServer:
        co = CoordinatorServer(cluster.cfg)
        await co.start()
        return co

    cluster.coordinator = cluster.call(restart())
    deadline = time.monotonic() + 15
    while http.get("/ready").status_code != 200:  # the API's channel reconnects by itself
        assert time.monotonic() < deadline, http.get("/ready").text
        time.sleep(0.2)
    assert http.post("/api/model/process", json={"text": "hi", "max_tokens": 2}).status_code == 200


def test_part_down_is_503_naming_it(small: tuple[InProcessCluster, httpx.Client]) -> None:
    cluster, http = small
    cluster.nodes[0].stop(0)
    deadline = time.monotonic() + 10
    while (resp := http.post("/api/model/process", json={"text": "hi", "max_tokens": 2})).status_code != 503:
        assert time.monotonic() < deadline, resp.text
        time.sleep(0.2)
    assert_error(resp, 503, "stage_unavailable", "part 0", part=0, node="node1")
    assert_error(http.get("/ready"), 503, "stage_unavailable", "part 0", part=0, node="node1")
    view = http.get("/api/cluster").json()
    assert (
        view["ready"] is False and view["coordinator"]["healthy"] is True and not view["nodes"][0]["healthy"]
    )


# ---- fuzzing -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_api(cluster: InProcessCluster) -> Iterator[ApiServer]:
    with ApiServer(with_api(cluster.cfg, default_max_tokens=4)) as server:
        yield server


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_api: ApiServer) -> Any:
    return schemathesis.openapi.from_url(f"{fuzz_api.url}/openapi.json")


FUZZED = [
    ("POST", "/api/model/process"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/models"),
    ("GET", "/health"),
    ("GET", "/ready"),
    ("GET", "/metrics"),
    ("GET", "/api/cluster"),
]


def test_fuzz_covers_every_operation(fuzz_schema: Any) -> None:
    ops = {(r.ok().method.upper(), r.ok().path) for r in fuzz_schema.get_all_operations()}
    assert ops == set(FUZZED)


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    [  # GETs take no input: there is nothing to make invalid
        (m, p, mode)
        for m, p in FUZZED
        for mode in GenerationMode
        if m == "POST" or mode == GenerationMode.POSITIVE
    ],
    ids=lambda v: v.value if isinstance(v, GenerationMode) else v,
)
def test_fuzz_no_server_errors(fuzz_schema: Any, method: str, path: str, mode: GenerationMode) -> None:
    """schemathesis-generated requests (valid and invalid) never get a 5xx or an undocumented body."""
    op = fuzz_schema[path][method]
    examples = 20 if method == "POST" else 3

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
        phases=[Phase.generate],  # report a failure as found: shrinking through real generations is slow
    )
    def check(case: Any) -> None:
        if isinstance(
            case.body, dict
        ):  # keep generations short (4.0 is an int too): the point is input handling
            for key in ("max_tokens", "max_completion_tokens"):
                value = case.body.get(key)
                if isinstance(value, int | float) and not isinstance(value, bool) and value > 4:
                    case.body[key] = 4
        case.call_and_validate(checks=[not_a_server_error, response_schema_conformance], timeout=30)

    check()


def test_speculative_decoding_through_the_api(http: httpx.Client) -> None:
    """A prompt whose answer copies it: the same text with and without drafts (`speculative:
    false` opts a request out), fewer passes with them, and the counters in /metrics and
    /api/cluster move."""
    code = (
        "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n\n\n"
        "# The same two functions, with type hints:\n"
    )
    body = {"prompt": code, "max_tokens": 40, "temperature": 0, "ignore_eos": True}
    before = _samples(http)
    plain = http.post("/v1/completions", json={**body, "speculative": False}).json()
    spec = http.post("/v1/completions", json=body).json()
    after = _samples(http)
    assert spec["choices"][0]["text"] == plain["choices"][0]["text"]
    assert plain["pipeserve"]["speculative"]["drafted"] == 0
    assert plain["pipeserve"]["speculative"]["tokens_per_pass"] == 1.0
    sp = spec["pipeserve"]["speculative"]
    assert sp["accepted"] > 0 and sp["tokens_per_pass"] > 1.0 and 0 < sp["acceptance_rate"] <= 1
    assert sp["passes"] < 40
    drafted = after[("pipeserve_spec_draft_tokens", ())] - before.get(("pipeserve_spec_draft_tokens", ()), 0)
    assert drafted >= sp["drafted"]
    assert after[("pipeserve_spec_tokens_per_pass", ())] >= 1.0
    view = http.get("/api/cluster").json()["coordinator"]["speculative"]
    assert view["accepted"] >= sp["accepted"]
    bad = http.post("/v1/completions", json={**body, "speculative": "sometimes"})
    assert bad.status_code == 422 and "speculative" in bad.text
