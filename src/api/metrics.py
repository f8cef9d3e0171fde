"""Prometheus metrics of one API app, in a registry of its own (several apps may share a process):
HTTP requests by endpoint and status (MetricsMiddleware), generation latencies and token counts
(recorded by streaming.Generation), per-stage compute and per-hop transfer from each request's
final message, and the coordinator's queue, refreshed from ClusterStatus when /metrics is scraped.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeserve.proto import model_service_pb2 as pb

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.0)


class ApiMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.http_requests = Counter(
            "pipeserve_api_requests",
            "HTTP requests answered, by endpoint, method and status.",
            ["endpoint", "method", "status"],
            registry=r,
        )
        self.in_flight = Gauge(
            "pipeserve_api_requests_in_flight", "Generations this API is serving now.", registry=r
        )
        self.ttft = Histogram(
            "pipeserve_time_to_first_token_seconds",
            "From the API receiving a request to its first token.",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "pipeserve_inter_token_latency_seconds",
            "Time between consecutive streamed token messages.",
            ["endpoint"],
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "pipeserve_e2e_request_latency_seconds",
            "From the API receiving a generation to its end.",
            ["endpoint", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "pipeserve_prompt_tokens", "Prompt tokens of finished requests.", registry=r
        )
        self.generation_tokens = Counter("pipeserve_generation_tokens", "Tokens generated.", registry=r)
        self.running = Gauge(
            "pipeserve_requests_running", "Requests in the coordinator's batch (at scrape).", registry=r
        )
        self.waiting = Gauge(
            "pipeserve_requests_waiting", "Requests queued at the coordinator (at scrape).", registry=r
        )
        self.tokens_per_second = Gauge(
            "pipeserve_cluster_tokens_per_second",
            "Tokens/s the cluster generated recently (at scrape).",
            registry=r,
        )
        self.coordinator_up = Gauge(
            "pipeserve_coordinator_up", "1 when ClusterStatus answered at scrape.", registry=r
        )
        self.stage_forward = Histogram(
            "pipeserve_stage_forward_seconds",
            "Compute time of one request on one stage (sum over its steps).",
            ["part", "node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.hop_transfer = Histogram(
            "pipeserve_hop_transfer_seconds",
            "RPC time minus compute of one request on one hop (sum over steps).",
            ["part", "node"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prefix_hit_tokens = Gauge(
            "pipeserve_prefix_cache_hit_tokens",
            "Prompt positions a node served from cached prefix blocks since it started.",
            ["part", "node"],
            registry=r,
        )
        self.kv_blocks_free = Gauge(
            "pipeserve_kv_blocks_free", "KV blocks no request holds on a node.", ["part", "node"], registry=r
        )
        self.kv_blocks_total = Gauge(
            "pipeserve_kv_blocks_total", "KV blocks in a node's pool.", ["part", "node"], registry=r
        )
        self.preemptions = Gauge(
            "pipeserve_preemptions", "Requests preempted for lack of KV blocks since start.", registry=r
        )
        self.spec_drafted = Gauge(
            "pipeserve_spec_draft_tokens",
            "Draft tokens sent to be verified (speculative decoding) since the coordinator started.",
            registry=r,
        )
        self.spec_accepted = Gauge(
            "pipeserve_spec_accepted_tokens",
            "Draft tokens the model agreed with since the coordinator started.",
            registry=r,
        )
        self.spec_acceptance = Gauge(
            "pipeserve_spec_acceptance_rate", "Accepted / drafted since the coordinator started.", registry=r
        )
        self.spec_tokens_per_pass = Gauge(
            "pipeserve_spec_tokens_per_pass",
            "Tokens per pass through the pipeline since the coordinator started (1 without drafts).",
            registry=r,
        )
        self.hop_bytes = Counter(
            "pipeserve_hop_bytes", "Bytes of Forward requests sent to a stage.", ["part", "node"], registry=r
        )

    def observe_final(self, final: pb.GenerateResponse) -> None:
        self.prompt_tokens.inc(final.prompt_tokens)
        self.generation_tokens.inc(final.completion_tokens)
        for st in final.stage_timings:
            labels = {"part": str(st.part), "node": st.node_id}
            self.stage_forward.labels(**labels).observe(st.forward_ms / 1e3)
            self.hop_transfer.labels(**labels).observe(st.hop_ms / 1e3)
            self.hop_bytes.labels(**labels).inc(st.bytes_sent)

    def refresh(self, status: pb.ClusterStatusResponse | None) -> None:
        self.coordinator_up.set(status is not None)
        if status is not None:
            self.running.set(status.running)
            self.waiting.set(status.waiting)
            self.tokens_per_second.set(status.tokens_per_second)
            self.preemptions.set(status.preemptions)
            sp = status.speculative
            self.spec_drafted.set(sp.drafted)
            self.spec_accepted.set(sp.accepted)
            self.spec_acceptance.set(sp.accepted / sp.drafted if sp.drafted else 0.0)
            self.spec_tokens_per_pass.set(sp.tokens / sp.passes if sp.passes else 1.0)
            for n in status.nodes:
                if n.HasField("info"):
                    labels = {"part": str(n.model_part), "node": n.id}
                    self.prefix_hit_tokens.labels(**labels).set(n.info.prefix_hit_tokens)
                    self.kv_blocks_free.labels(**labels).set(n.info.cache_blocks_free)
                    self.kv_blocks_total.labels(**labels).set(n.info.cache_blocks_total)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint (the route's path; unknown paths are "other", so
    scanners cannot blow up the label set), method and status, errors from other middleware too."""

    def __init__(self, app: ASGIApp, metrics: ApiMetrics, paths: set[str]) -> None:
        self.app, self.metrics, self.paths = app, metrics, paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            endpoint = scope["path"] if scope["path"] in self.paths else "other"
            self.metrics.http_requests.labels(endpoint, scope["method"], str(status)).inc()
