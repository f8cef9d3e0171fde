"""Fault tolerance with real node processes killed by PID: failover to a replica with replay
(identical greedy text), 503-style UNAVAILABLE without a replica and recovery on restart,
run-time join and draining leave, cancellation freeing every stage, a tokenizer restart.
"""

from __future__ import annotations

import asyncio
import threading
import time

import grpc
import pytest

from pipeserve.common import env
from pipeserve.common.grpc_util import probe
from pipeserve.launcher.procs import ProcessCluster
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb
from tests.harness import cluster_config, free_port
from tests.paced_node import PACED_NODE

EMBEDDED = "smollm2-135m-instruct"
pytestmark = pytest.mark.slow


def chat(q: str, max_tokens: int, rid: str = "") -> pb.GenerateRequest:
    return pb.GenerateRequest(
        request_id=rid,
        messages=[tpb.ChatMessage(role="user", content=q)],
        max_tokens=max_tokens,
        sampling=pb.SamplingParams(temperature=0),
        ignore_eos=True,
    )


async def stream(
    stub, req: pb.GenerateRequest, on_token=None
) -> tuple[str, pb.GenerateResponse, list[float]]:
    text, times, final = [], [], None
    async for m in stub.Generate(req, timeout=300):
        text.append(m.text)
        times.append(time.monotonic())
        if m.finished:
            final = m
        elif on_token:
            on_token(len(times))
    return "".join(text), final, times


def generate_once(address: str, req: pb.GenerateRequest) -> pb.GenerateResponse:
    """One request on a fresh channel; returns its final message."""

    async def run() -> pb.GenerateResponse:
        async with grpc.aio.insecure_channel(address) as ch:
            return (await stream(pb_grpc.CoordinatorStub(ch), req))[1]

    return asyncio.run(run())


def status(address: str) -> pb.ClusterStatusResponse:
    with grpc.insecure_channel(address) as ch:
        return pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=5)


@pytest.mark.parametrize(
    "node_defaults",
    [{}, {"kv_dtype": "q8_0", "batch_invariant": True}],
    ids=["default", "q8_0-batch-invariant"],
)
def test_sigkill_with_replica_loses_nothing(tmp_path, node_defaults):
    """8 greedy chat streams; a replica of the middle part is SIGKILLed mid-generation: the streams
    resume within 5 s and their texts equal a run without the kill. With f32 KV (the default) the
    replayed caches differ from the lost ones in the last bits only, and that has kept every text;
    with q8_0 KV a last-bit difference can move a cached value by a whole quantum and flip a token,
    so q8_0 runs with batch_invariant, where the replay's caches are bit-identical and each text
    also equals the request's text served alone."""
    cfg = cluster_config(EMBEDDED, 3, replicas={1: 2}, node_defaults=node_defaults)
    pc = ProcessCluster(cfg, tmp_path, node_module=PACED_NODE).start()
    try:
        questions = [f"Tell me about the number {i}." for i in range(8)]

        async def run(kill: bool) -> tuple[list[str], list[pb.GenerateResponse], float]:
            killed_at: list[float] = []
            started: set[int] = set()

            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)

                def on_token(i: int, n: int) -> None:
                    if n >= 6:
                        started.add(i)
                    if kill and len(started) == 8 and not killed_at:
                        victim = (
                            "node2"
                            if status(cfg.coordinator.address).nodes[1].info.active_requests
                            else "node2b"
                        )
                        pc.kill(victim)
                        killed_at.append(time.monotonic())

                results = await asyncio.gather(
                    *(
                        stream(stub, chat(q, 40), lambda n, i=i: on_token(i, n))
                        for i, q in enumerate(questions)
                    )
                )
            resume = 0.0
            if kill:
                assert killed_at, "the kill did not happen mid-generation"
                resume = max(
                    next(t for t in times if t > killed_at[0]) - killed_at[0] for _, _, times in results
                )
            return [r[0] for r in results], [r[1] for r in results], resume

        baseline, _, _ = asyncio.run(run(kill=False))
        texts, finals, resume_s = asyncio.run(run(kill=True))
        assert texts == baseline
        if node_defaults.get("batch_invariant"):

            async def one_at_a_time() -> list[str]:
                async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                    stub = pb_grpc.CoordinatorStub(ch)
                    return [(await stream(stub, chat(q, 40)))[0] for q in questions]

            assert asyncio.run(one_at_a_time()) == baseline
            info = status(cfg.coordinator.address).nodes[0].info
            assert info.batch_invariant and info.kv_dtype == "q8_0"
        assert all(f.completion_tokens == 40 for f in finals)
        assert sum(f.failovers for f in finals) >= 1
        assert resume_s < 5.0
    finally:
        pc.stop()


def test_sigkill_without_replica_then_restart(tmp_path):
    cfg = cluster_config(EMBEDDED, 3, coordinator={"recovery_wait_s": 2.0})
    pc = ProcessCluster(cfg, tmp_path, node_module=PACED_NODE).start()
    try:

        async def scenario() -> None:
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                killed: list[float] = []

                def on_token(n: int) -> None:
                    if n == 3 and not killed:
                        pc.kill("node2")
                        killed.append(time.monotonic())

                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream(stub, chat("Write a long poem.", 200), on_token)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "part 1" in err.value.details() and "node2" in err.value.details()
                assert time.monotonic() - killed[0] < 5.0
                t0 = time.monotonic()
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream(stub, chat("Hello?", 5))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "part 1" in err.value.details()
                assert time.monotonic() - t0 < 5.0

        asyncio.run(scenario())
        assert not status(cfg.coordinator.address).ready
        pc.start_node("node2")
        pc.wait_ready(30)

        try:
            again = generate_once(cfg.coordinator.address, chat("Hello again.", 5))
        except grpc.RpcError as exc:  # seen once under load (2026-12-02), not reproduced: keep the logs
            logs = "\n".join(f"--- {n}:\n{pc.log(n, 40)}" for n in ("coordinator", "node1", "node2"))
            raise AssertionError(f"after the restart: {exc}\n{logs}") from exc
        assert again.completion_tokens == 5
    finally:
        pc.stop()


def test_join_takes_load_and_leave_drains(tmp_path):
    cfg = cluster_config(
        EMBEDDED, 2, coordinator={"join_token": "a-shared-secret"}
    )  # no TLS: the token admits
    pc = ProcessCluster(cfg, tmp_path).start()
    try:
        addr = f"127.0.0.99:{free_port('127.0.0.99')}"
        pc._spawn(
            "joiner",
            "node",
            "--id",
            "node2j",
            "--join",
            cfg.coordinator.address,
            "--part",
            "1",
            "--address",
            addr,
        )
        deadline = time.monotonic() + 90
        while not any(n.id == "node2j" and n.healthy for n in status(cfg.coordinator.address).nodes):
            assert time.monotonic() < deadline, pc.log("joiner")
            time.sleep(0.2)

        async def many() -> list[pb.GenerateResponse]:
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                return [
                    r[1]
                    for r in await asyncio.gather(*(stream(stub, chat(f"Say {i}.", 8)) for i in range(4)))
                ]

        finals = asyncio.run(many())
        served = {r.node_id for f in finals for r in f.route if r.part == 1}
        assert served == {"node2", "node2j"}  # least-loaded routing spreads over both replicas

        async def drain() -> pb.GenerateResponse:
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                sent = False

                def on_token(n: int) -> None:
                    nonlocal sent
                    if n == 2 and not sent:
                        sent = True
                        pc.procs["joiner"].terminate()  # SIGTERM: leave after draining

                outs = await asyncio.gather(
                    *(stream(stub, chat(f"Count to {i}.", 30), on_token) for i in (5, 6))
                )
                return next(o[1] for o in outs if any(r.node_id == "node2j" for r in o[1].route))

        drained = asyncio.run(drain())
        assert drained.completion_tokens == 30 and drained.failovers == 0
        pc.procs["joiner"].wait(30)
        assert "node2j" not in {n.id for n in status(cfg.coordinator.address).nodes}
    finally:
        pc.stop()


def test_cancel_frees_every_stage_and_tokenizer_restart(tmp_path):
    cfg = cluster_config(EMBEDDED, 3)
    pc = ProcessCluster(cfg, tmp_path, node_module=PACED_NODE).start()
    try:

        async def cancel_mid_stream() -> None:
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                done = threading.Event()

                def on_token(n: int) -> None:
                    if n == 4:
                        done.set()

                task = asyncio.create_task(
                    stream(stub, chat("Tell me a long story.", 200, rid="c1"), on_token)
                )
                while not done.is_set():
                    await asyncio.sleep(0.01)
                assert (await stub.Cancel(pb.CancelRequest(request_id="c1"))).found
                _, final, _ = await task
                assert final.finish_reason == pb.FINISH_REASON_CANCELLED

        asyncio.run(cancel_mid_stream())
        deadline = time.monotonic() + 5
        while any(n.info.cache_used_tokens for n in status(cfg.coordinator.address).nodes):
            assert time.monotonic() < deadline, [
                n.info.cache_used_tokens for n in status(cfg.coordinator.address).nodes
            ]
            time.sleep(0.1)

        async def tokenizer_dies() -> None:
            async with grpc.aio.insecure_channel(cfg.coordinator.address) as ch:
                stub = pb_grpc.CoordinatorStub(ch)
                killed: list[bool] = []

                def on_token(n: int) -> None:
                    if n == 3 and not killed:
                        pc.kill("tokenizer")
                        killed.append(True)

                # the coordinator detokenizes in-process (its copy of the tokenizer's piece
                # table), so a stream already admitted finishes; a new request needs the tokenizer.
                # With PIPESERVE_DETOKENIZE=service every step needs it: the stream fails.
                if env.get("PIPESERVE_DETOKENIZE") == "service":
                    with pytest.raises(grpc.aio.AioRpcError) as err:
                        await stream(stub, chat("Tell me a long story.", 100), on_token)
                    assert (
                        err.value.code() == grpc.StatusCode.UNAVAILABLE and "tokenizer" in err.value.details()
                    )
                else:
                    text, final, _ = await stream(stub, chat("Tell me a long story.", 100), on_token)
                    assert killed and final is not None and final.completion_tokens > 3 and text
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stream(stub, chat("Hi", 3))
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "tokenizer" in err.value.details()

        asyncio.run(tokenizer_dies())
        pc._spawn("tokenizer", "tokenizer")
        deadline = time.monotonic() + 60
        while not (probe(cfg.tokenizer.address, 0.5) and status(cfg.coordinator.address).tokenizer_healthy):
            assert time.monotonic() < deadline, pc.log("tokenizer")
            time.sleep(0.1)

        assert generate_once(cfg.coordinator.address, chat("Hi", 3)).completion_tokens == 3
    finally:
        pc.stop()
