"""Continuous batching under load, through a real in-process cluster (embedded model, 3 parts):
16 concurrent greedy requests equal running each alone; a newcomer starts while 8 decode; a full
queue answers RESOURCE_EXHAUSTED with RetryInfo and the accepted requests are unaffected; every
stage's cache is empty after a burst."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest

from pipeserve.common.errors import Reason
from pipeserve.common.grpc_util import error_from_rpc
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb
from tests.harness import held, paced, start_cluster

pytestmark = pytest.mark.slow
TOPICS = [
    "cats",
    "the sea",
    "Rome",
    "music",
    "rain",
    "chess",
    "bread",
    "stars",
    "trains",
    "snow",
    "maps",
    "bees",
    "clocks",
    "tea",
    "wolves",
    "paper",
]


def req(topic: str, n: int = 24) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[tpb.ChatMessage(role="user", content=f"Write two sentences about {topic}.")],
        max_tokens=n,
        sampling=pb.SamplingParams(temperature=0),
        ignore_eos=True,
    )


async def collect(stub, r: pb.GenerateRequest) -> tuple[list[int], list[float], pb.GenerateResponse]:
    ids, times, final = [], [], None
    async for m in stub.Generate(r, timeout=300):
        ids += m.token_ids
        times.append(time.monotonic())
        final = m
    return ids, times, final


@pytest.fixture(scope="module")
def cluster():
    c = start_cluster("smollm2-135m-instruct", 3, coordinator={"max_running": 16, "max_waiting": 4})
    yield c
    c.stop()


def test_sixteen_concurrent_equal_alone_and_caches_empty(cluster):
    async def run() -> tuple[list[list[int]], list[list[int]]]:
        async with grpc.aio.insecure_channel(cluster.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            alone = [(await collect(stub, req(t)))[0] for t in TOPICS]
            together = [r[0] for r in await asyncio.gather(*(collect(stub, req(t)) for t in TOPICS))]
            return alone, together

    alone, together = asyncio.run(run())
    assert together == alone
    deadline = time.monotonic() + 5
    while any(cluster.cache_used().values()):
        assert time.monotonic() < deadline, cluster.cache_used()
        time.sleep(0.05)


def test_newcomer_is_not_blocked_by_running_requests(cluster):
    async def run() -> tuple[float, float]:
        async with grpc.aio.insecure_channel(cluster.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            long = [asyncio.create_task(collect(stub, req(t, 64))) for t in TOPICS[:8]]
            await asyncio.sleep(1.5)
            _, times, _ = await collect(stub, req("owls", 4))
            first_token_of_newcomer = times[0]
            results = await asyncio.gather(*long)
            return first_token_of_newcomer, min(r[1][-1] for r in results)

    # paced: the 8 take >= 3.2 s (64 steps), so they still decode when the newcomer comes at 1.5 s
    with paced(cluster.nodes[0]):
        newcomer_first, long_done = asyncio.run(run())
    assert newcomer_first < long_done


def test_full_queue_is_resource_exhausted_and_accepted_requests_finish(cluster):
    async def run() -> tuple[list, list]:
        async with grpc.aio.insecure_channel(cluster.cfg.coordinator.address) as ch:
            stub = pb_grpc.CoordinatorStub(ch)
            rejected = []
            # node1's steps wait (after the first) until the 3 extra requests are answered, so
            # none of the 16 running can finish and free a slot first, however fast the engine
            with held(cluster.nodes[0]):
                accepted = [
                    asyncio.create_task(collect(stub, req(t, 16))) for t in TOPICS + TOPICS[:4]
                ]  # 16 run + 4 wait
                sch = cluster.coordinator.scheduler
                deadline = time.monotonic() + 30
                while (sch.running, len(sch.waiting)) != (16, 4):
                    assert time.monotonic() < deadline, (sch.running, len(sch.waiting))
                    await asyncio.sleep(0.02)
                for t in TOPICS[:3]:
                    try:
                        await collect(stub, req(t, 4))
                    except grpc.aio.AioRpcError as exc:
                        rejected.append(exc)
            return await asyncio.gather(*accepted), rejected

    done, rejected = asyncio.run(run())
    assert len(rejected) == 3
    for exc in rejected:
        assert exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue is full" in exc.details()
        err = error_from_rpc(exc)  # the wait comes as google.rpc.RetryInfo in the status details
        assert err.reason == Reason.QUEUE_FULL and err.retry_after_s is not None and err.retry_after_s >= 1
    assert all(final.completion_tokens == 16 for _, _, final in done)
