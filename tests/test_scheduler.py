"""The KV cache and the scheduler through real clusters on loopback (issue 13).

Prefix caching hits on every stage and changes no token; admission never over-commits and
preempts instead of failing; the queue is bounded (RESOURCE_EXHAUSTED = HTTP 429); a request that
makes a node fail fails alone; a soak of cancelled and dropped streams leaves no cache behind;
caches nobody owns are reclaimed; max_tokens past the context is refused with both numbers.
"""

from __future__ import annotations

import asyncio
import gc
import random
import threading
import time
from collections.abc import Callable

import grpc
import psutil
import pytest
import torch

from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.modeling.loader import load_stage
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.harness import InProcessCluster, held, start_cluster

EMBEDDED = "smollm2-135m-instruct"


def gen(address: str, req: pb.GenerateRequest, timeout: float = 120) -> list[pb.GenerateResponse]:
    with grpc.insecure_channel(address) as ch:
        return list(pb_grpc.CoordinatorStub(ch).Generate(req, timeout=timeout))


def greedy(ids: list[int], n: int, rid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid,
        prompt_token_ids=ids,
        max_tokens=n,
        sampling=pb.SamplingParams(temperature=0),
        ignore_eos=True,
    )


def tokens_of(msgs: list[pb.GenerateResponse]) -> list[int]:
    return [t for m in msgs for t in m.token_ids]


def wait_for(cond: Callable[[], bool], what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for: {what}"
        time.sleep(0.01)


def wait_idle(c: InProcessCluster, timeout: float = 10.0) -> None:
    """Every node holds no block and no request (the coordinator's releases are asynchronous)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pools = [n.runner.engine.cache for n in c.nodes if n.runner]
        if all(p.used_blocks == 0 and not p.seqs for p in pools):
            for p in pools:
                p.check()
            return
        time.sleep(0.05)
    raise AssertionError(f"caches still held after {timeout} s: {c.cache_used()}")


def node_info(c: InProcessCluster) -> dict[str, pb.NodeInfo]:
    from pipeserve.node.node_server import node_info as info

    return {n.node_id: info(n.runner) for n in c.nodes if n.runner}


# ------------------------------------------------------------------------------ prefix caching


@pytest.fixture(scope="module")
def smol3():
    c = start_cluster(EMBEDDED, parts=3)
    yield c
    c.stop()


def test_shared_prefix_hits_every_stage_and_changes_no_token(smol3, smol_full):
    rng = random.Random(13)
    shared = [rng.randrange(100, 40000) for _ in range(520)]
    first, second = [*shared, 11, 12, 13], [*shared, 21, 22, 23, 24]
    cold = generate([StageEngine(smol_full)], [second], 16)[0]
    before = node_info(smol3)
    t0 = time.perf_counter()
    gen(smol3.cfg.coordinator.address, greedy(first, 4))
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    msgs = gen(smol3.cfg.coordinator.address, greedy(second, 16))
    t_second = time.perf_counter() - t0
    assert tokens_of(msgs) == cold  # cached and uncached: the same greedy text
    after = node_info(smol3)
    for nid, info in after.items():  # every stage served the shared 512 positions from cache
        assert info.prefix_hit_tokens - before[nid].prefix_hit_tokens >= 512, nid
        assert info.prefix_cached_blocks >= 32
    assert smol3.coordinator.scheduler.prefix_hit_tokens >= 512
    assert t_second < t_first  # the second skipped the 512-token prefill on every stage
    wait_idle(smol3)  # blocks unreferenced (prefix blocks stay cached, free for reuse)


def test_a_next_turn_reuses_the_previous_one_to_the_token(smol3, smol_full):
    """A chat's next turn resends the previous prompt and its answer. Neither ends on a block
    boundary, yet every stage serves all of it from cache but the answer's last token (its KV was
    never computed), and the text equals a cold run's."""
    rng = random.Random(29)
    p1 = [rng.randrange(100, 40000) for _ in range(45)]
    addr = smol3.cfg.coordinator.address
    a1 = tokens_of(gen(addr, greedy(p1, 10)))
    p2 = [*p1, *a1, 5, 6, 7]
    cold = generate([StageEngine(smol_full)], [p2], 8)[0]
    wait_idle(smol3)  # released: its last, partly filled block is published
    before = node_info(smol3)
    assert tokens_of(gen(addr, greedy(p2, 8))) == cold
    after = node_info(smol3)
    for nid, info in after.items():  # 3 whole blocks shared, 6 positions of the fourth copied
        assert info.prefix_hit_tokens - before[nid].prefix_hit_tokens >= len(p1) + len(a1) - 1, nid
    wait_idle(smol3)


# ------------------------------------------------------------------------------ admission


@pytest.fixture(scope="module")
def reference(tiny_llama):
    ld = load_stage(str(tiny_llama))
    return lambda prompts, n: generate([StageEngine(ld)], prompts, n)


def test_preemption_instead_of_failure(tiny_llama, reference):
    """Eight 40-token generations on nodes holding 8 blocks of 16 (128 tokens): they cannot all be
    cached at once; the youngest are preempted and recomputed, none fails, and each one's
    greedy tokens equal its run alone."""
    c = start_cluster(str(tiny_llama), parts=2, node_defaults={"cache_budget_tokens": 128})
    try:
        prompts = [[3 + i, 7, 1 + i, 9, 4, 4 + i, 2, 8, 5, 6] for i in range(8)]
        want = reference(prompts, 30)
        results: list[list[int] | BaseException] = [[] for _ in prompts]

        def run(i: int) -> None:
            try:
                results[i] = tokens_of(gen(c.cfg.coordinator.address, greedy(prompts[i], 30)))
            except grpc.RpcError as exc:
                results[i] = exc

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        # every forward waits until all eight are in the scheduler: they overlap on any machine
        # (otherwise a fast one could finish before the next arrives, and nobody be preempted)
        with held(c.nodes[0], after_steps=0):
            for t in threads:
                t.start()
            wait_for(lambda: len(c.coordinator.scheduler.requests) == len(prompts), "all 8 submitted")
        for t in threads:
            t.join(120)
        assert results == want
        assert c.coordinator.scheduler.preemptions > 0
        wait_idle(c)
    finally:
        c.stop()


def burst(c: InProcessCluster, n: int, max_tokens: int) -> list[grpc.StatusCode | int]:
    """n concurrent streams; each gives its token count, or its error code. The first node's
    forwards wait until a client has been refused: nothing can finish before that, so the batch
    and the queue are full when the refusals come, however fast the machine."""
    codes: list[grpc.StatusCode | int] = []
    with held(c.nodes[0], after_steps=0):
        runner = threading.Thread(target=_burst, args=(c, n, max_tokens, codes))
        runner.start()
        wait_for(lambda: len(codes) > 0, "a client refused while the batch is held")
    runner.join(180)
    assert not runner.is_alive()
    return codes


def _burst(c: InProcessCluster, n: int, max_tokens: int, codes: list[grpc.StatusCode | int]) -> None:

    async def one(i: int, stub: pb_grpc.CoordinatorStub) -> None:
        try:
            k = 0
            async for m in stub.Generate(greedy([5, 6, 7, i % 50 + 3], max_tokens), timeout=120):
                k += len(m.token_ids)
            codes.append(k)
        except grpc.aio.AioRpcError as exc:
            codes.append(exc.code())
            assert "queue is full" in (exc.details() or "")

    async def run() -> None:
        async with grpc.aio.insecure_channel(c.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            await asyncio.gather(*(one(i, stub) for i in range(n)))

    asyncio.run(run())


@pytest.mark.parametrize(
    "extra",
    [
        {"coordinator": {"max_running": 16, "max_waiting": 16}},
        # the KV budget (4 blocks of 16) blocks admission long before max_running does
        {"coordinator": {"max_running": 32, "max_waiting": 8}, "node_defaults": {"cache_budget_tokens": 64}},
    ],
    ids=["batch-bound", "kv-bound"],
)
def test_queue_is_bounded_with_retry_after(tiny_llama, extra):
    """64 clients at once: beyond the running batch and max_waiting they get RESOURCE_EXHAUSTED
    (HTTP 429, with retry-after); every accepted request finishes."""
    c = start_cluster(str(tiny_llama), parts=2, **extra)
    try:
        codes = burst(c, 64, 24)
        done = [x for x in codes if isinstance(x, int)]
        rejected = [x for x in codes if not isinstance(x, int)]
        assert len(codes) == 64 and rejected and done
        assert set(rejected) == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert all(n == 24 for n in done)
        wait_idle(c)
    finally:
        c.stop()


def test_max_tokens_past_the_context_is_refused_with_both_numbers(tiny_llama):
    c = start_cluster(str(tiny_llama), parts=2, max_context=64)
    try:
        with pytest.raises(grpc.RpcError) as err:
            gen(c.cfg.coordinator.address, greedy(list(range(3, 13)), 60))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "max_tokens=60" in err.value.details() and "54" in err.value.details()
        up_to_context = gen(c.cfg.coordinator.address, greedy(list(range(3, 13)), 0))
        assert up_to_context[-1].completion_tokens == 54  # 0 / absent: up to the context
    finally:
        c.stop()


# ------------------------------------------------------------------------------ failures


def test_a_request_that_breaks_a_node_fails_alone(tiny_llama, reference):
    """A node bug triggered by one request (INTERNAL) fails that request only; the node is not
    marked down and the requests batched with it finish with the right tokens."""
    c = start_cluster(str(tiny_llama), parts=2)
    try:
        node = c.nodes[1]
        real = node.runner.forward

        def buggy(chunks, hidden):
            if any(ch.request_id == "poison" for ch in chunks):
                raise RuntimeError("a bug this request triggers")
            return real(chunks, hidden)

        node.runner.forward = buggy  # type: ignore[method-assign]
        prompts = [[4, 8, 15, 16, 23, 42 - i] for i in range(4)]
        want = reference(prompts, 20)
        out: dict[str, object] = {}

        def run(rid: str, ids: list[int]) -> None:
            try:
                out[rid] = tokens_of(gen(c.cfg.coordinator.address, greedy(ids, 20, rid)))
            except grpc.RpcError as exc:
                out[rid] = exc

        threads = [threading.Thread(target=run, args=(f"ok{i}", p)) for i, p in enumerate(prompts)]
        threads.append(threading.Thread(target=run, args=("poison", [9, 9, 9])))
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert isinstance(out["poison"], grpc.RpcError)
        assert [out[f"ok{i}"] for i in range(4)] == want
        handle = next(n for n in c.coordinator.cluster.nodes if n.id == node.node_id)
        assert handle.healthy and handle.failures == 0
        wait_idle(c)
    finally:
        c.stop()


def test_orphan_caches_are_reclaimed(tiny_llama):
    """A cache no request of the coordinator owns (left by a coordinator that restarted) is
    released at the next health check."""
    c = start_cluster(str(tiny_llama), parts=2)
    try:
        with grpc.insecure_channel(c.cfg.nodes[0].address) as ch:
            pb_grpc.ModelNodeStub(ch).LookupPrefix(
                pb.LookupPrefixRequest(request_id="orphan", token_ids=[1, 2, 3]), timeout=5
            )
        assert "orphan" in c.nodes[0].runner.engine.cache.seqs
        wait_idle(c, timeout=5)
    finally:
        c.stop()


def test_soak_cancelled_and_dropped_streams_leave_nothing(tiny_llama):
    """500 streamed requests, 32 at a time: a third dropped by the client mid-stream, some
    cancelled before their first token. Every cache and block comes back; RSS grows < 5 %."""
    c = start_cluster(str(tiny_llama), parts=3)
    try:
        proc = psutil.Process()
        rng = random.Random(5)

        async def one(i: int, stub: pb_grpc.CoordinatorStub) -> None:
            call = stub.Generate(
                greedy([rng.randrange(3, 300) for _ in range(rng.randrange(2, 40))], 12), timeout=60
            )
            try:
                if i % 3 == 0:  # dropped mid-stream
                    async for _ in call:
                        call.cancel()
                        break
                elif i % 17 == 0:  # cancelled before the first token
                    call.cancel()
                else:
                    async for _ in call:
                        pass
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.CANCELLED

        async def soak(n: int) -> None:
            async with grpc.aio.insecure_channel(c.cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                sem = asyncio.Semaphore(32)

                async def limited(i: int) -> None:
                    async with sem:
                        await one(i, stub)

                await asyncio.gather(*(limited(i) for i in range(n)))

        asyncio.run(soak(100))  # warm-up: allocator pools, gRPC buffers
        wait_idle(c)
        gc.collect()
        rss0 = proc.memory_info().rss
        asyncio.run(soak(500))
        wait_idle(c)
        gc.collect()
        assert proc.memory_info().rss < rss0 * 1.05
        assert not c.coordinator.scheduler.requests and not c.coordinator.scheduler.waiting
        torch.testing.assert_close(torch.tensor(0), torch.tensor(c.coordinator.scheduler.running))
    finally:
        c.stop()


def test_a_request_goes_to_the_replica_holding_its_prefix(tiny_llama):
    """Two replicas of part 0: requests sharing a prefix follow the first one to its replica (and
    hit there); a request with another prefix may go to either."""
    c = start_cluster(str(tiny_llama), parts=2, replicas={0: 2})
    try:
        rng = random.Random(3)
        shared = [rng.randrange(3, 300) for _ in range(100)]
        routes = []
        for i in range(4):
            msgs = gen(c.cfg.coordinator.address, greedy([*shared, 5 + i], 4))
            routes.append(msgs[-1].route[0].node_id)
        assert len(set(routes)) == 1, routes
        holder = next(n for n in c.nodes if n.node_id == routes[0])
        assert holder.runner.engine.cache.hit_tokens >= 3 * 96
        wait_idle(c)
    finally:
        c.stop()
