"""Starts a real cluster inside the test process: tokenizer, nodes and coordinator gRPC servers
on loopback ports chosen by the OS. Node and tokenizer servers run on their own thread pools;
the asyncio coordinator runs on an event loop in a background thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pipeserve.common.config import Config, parse_config
from pipeserve.coordinator.coordinator_server import CoordinatorServer
from pipeserve.coordinator.drafts import MAX_ROWS, PRIOR_ROW_COST, StepCost
from pipeserve.node.node_server import NodeServer
from pipeserve.tokenizer.tokenizer_server import TokenizerServer


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def cluster_config(
    model: str, parts: int, replicas: dict[int, int] | None = None, **overrides: Any
) -> Config:
    """A config on loopback: `parts` parts, replicas[part] nodes for a part (default 1)."""
    nodes = []
    hosts = iter(f"127.0.0.{i}" for i in range(2, 250))
    for part in range(parts):
        for r in range((replicas or {}).get(part, 1)):
            host = next(hosts)
            nodes.append(
                {
                    "id": f"node{part + 1}" + ("" if r == 0 else chr(ord("a") + r)),
                    "address": f"{host}:{free_port(host)}",
                    "model_part": part,
                }
            )
    raw: dict[str, Any] = {
        "model_name": model,
        "nodes": nodes,
        "coordinator": {
            "address": f"127.0.0.1:{free_port()}",
            "health_interval_s": 0.3,
            "recovery_wait_s": 2.0,
        },
        "tokenizer": {"address": f"127.0.0.1:{free_port()}"},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return parse_config(raw)


@dataclass
class InProcessCluster:
    cfg: Config
    tokenizer: TokenizerServer
    nodes: list[NodeServer]
    coordinator: CoordinatorServer | None = None
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    thread: threading.Thread | None = None

    def start(self, timeout_s: float = 120, wait_ready: bool = True) -> InProcessCluster:
        self.tokenizer.start()
        for n in self.nodes:
            n.start()
        for srv in [self.tokenizer, *self.nodes]:
            srv.loaded_event.wait(timeout_s)
            if srv.error:
                raise RuntimeError(f"failed to load: {srv.error}")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.coordinator = self.call(self._start_coordinator())
        deadline = time.monotonic() + timeout_s
        while wait_ready and not self.coordinator.cluster.ready:
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ready: {self.coordinator.cluster.problems}")
            time.sleep(0.1)
        return self

    async def _start_coordinator(self) -> CoordinatorServer:
        co = CoordinatorServer(self.cfg)
        await co.start()
        return co

    def call(self, coro: Any, timeout: float = 60) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def cache_used(self) -> dict[str, int]:
        return {n.node_id: (n.runner.cache_used_tokens if n.runner else 0) for n in self.nodes}

    def stop(self) -> None:
        if self.coordinator:
            self.call(self.coordinator.stop(0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        for n in self.nodes:
            n.stop(0)
        self.tokenizer.stop(0)


@contextlib.contextmanager
def _forward_wrapped(node: NodeServer, before: Any) -> Iterator[None]:
    """While inside: every forward of `node` calls before() first (on the node's thread)."""
    runner = node.runner
    assert runner is not None
    real = runner.forward

    def forward(*args: Any, **kw: Any) -> Any:
        before()
        return real(*args, **kw)

    runner.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        runner.forward = real  # type: ignore[method-assign]


@contextlib.contextmanager
def held(node: NodeServer, after_steps: int = 1, timeout_s: float = 30.0) -> Iterator[None]:
    """While inside: `node` runs `after_steps` forwards (1: a request's prefill, which gives its
    first token) and every later forward waits until the block exits, so running requests keep
    their slots for as long as a test needs them, however fast the machine (a request that merely
    runs long races the test: it finished first on fast machines). The wait is bounded by
    timeout_s."""
    release, lock = threading.Event(), threading.Lock()
    passed = 0

    def wait_past_the_first() -> None:
        nonlocal passed
        with lock:
            wait = passed >= after_steps
            passed += 1
        if wait:
            release.wait(timeout_s)

    try:
        with _forward_wrapped(node, wait_past_the_first):
            yield
    finally:
        release.set()


@contextlib.contextmanager
def paced(node: NodeServer, step_s: float = 0.05) -> Iterator[None]:
    """While inside: every forward of `node` first sleeps step_s, so a request of N steps takes
    at least N x step_s however fast the engine is. Tests that need a request still running at
    some moment (a deadline, a disconnect, a newcomer arriving) count steps this way, and a bound
    like "freed within 5 s, where generating would take 20" stays one that can fail."""
    with _forward_wrapped(node, lambda: time.sleep(step_s)):
        yield


def start_cluster(model: str, parts: int = 3, **kw: Any) -> InProcessCluster:
    cfg = cluster_config(model, parts, **kw)
    nodes = [NodeServer(cfg, n.id) for n in cfg.nodes]
    return InProcessCluster(cfg, TokenizerServer(cfg), nodes).start()


class PinnedStepCost(StepCost):
    """A step cost that does not learn from this host's timing: one row costs 1, each further row
    `per_row` (drafts.PRIOR_ROW_COST by default). Tests that assert drafting happens use it, so
    that whether drafts pay off does not depend on how fast the test machine runs the steps; the
    measured cost model itself is tested in test_drafts."""

    def __init__(self, per_row: float = PRIOR_ROW_COST) -> None:
        super().__init__({r: 1.0 + per_row * (r - 1) for r in range(1, MAX_ROWS + 1)})

    def add(self, rows: int, ms: float) -> None:
        pass


def pin_step_cost(c: InProcessCluster, per_row: float = PRIOR_ROW_COST) -> InProcessCluster:
    assert c.coordinator is not None
    c.coordinator.scheduler.step_cost = PinnedStepCost(per_row)
    return c


def greedy_through(
    c: InProcessCluster, prompts: list[list[int]], max_tokens: int
) -> tuple[list[list[int]], list[Any]]:
    """Each prompt's greedy tokens through the cluster's coordinator (EOS ignored, no drafts), and
    the coordinator's view of the nodes after them (ClusterStatus nodes)."""
    import grpc

    from pipeserve.proto import model_service_pb2 as pb
    from pipeserve.proto import model_service_pb2_grpc as pb_grpc

    with grpc.insecure_channel(c.cfg.coordinator.address) as ch:
        stub = pb_grpc.CoordinatorStub(ch)
        got = []
        for p in prompts:
            req = pb.GenerateRequest(
                max_tokens=max_tokens, sampling=pb.SamplingParams(temperature=0), ignore_eos=True
            )
            req.prompt_token_ids.extend(p)
            req.speculative = False
            got.append([t for m in stub.Generate(req, timeout=120) for t in m.token_ids])
        return got, list(stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10).nodes)
