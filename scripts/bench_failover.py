"""Failover figures for the fault-tolerance issue, on real processes (embedded model, loopback).

With a replica for part 1: N trials of SIGKILL of the part-1 node serving 4 greedy streams
mid-generation; per trial the longest gap between a stream's tokens from the kill on (the stall),
and whether every stream finished with the text of a no-fault run. Without a replica: time from
SIGKILL to the UNAVAILABLE error naming the part, and time for the restarted node to serve again.
Writes JSON and prints a table.  Run: .venv/bin/python scripts/bench_failover.py --trials 10
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import grpc

from pipeserve.common.config import parse_config
from pipeserve.launcher.procs import ProcessCluster
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from pipeserve.proto import tokenizer_service_pb2 as tpb

MODEL = "smollm2-135m-instruct"


def config(parts: int, replicas_part1: int, base_port: int) -> dict:
    nodes, port = [], base_port
    for part in range(parts):
        for r in range(replicas_part1 if part == 1 else 1):
            nodes.append(
                {
                    "id": f"node{part + 1}" + "abc"[r] * (r > 0),
                    "address": f"127.0.0.{2 + len(nodes)}:{port}",
                    "model_part": part,
                }
            )
            port += 1
    return {
        "model_name": MODEL,
        "nodes": nodes,
        "coordinator": {"address": f"127.0.0.1:{port}", "health_interval_s": 0.3, "recovery_wait_s": 2.0},
        "tokenizer": {"address": f"127.0.0.1:{port + 1}"},
    }


def chat(q: str, n: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        messages=[tpb.ChatMessage(role="user", content=q)],
        max_tokens=n,
        sampling=pb.SamplingParams(temperature=0),
        ignore_eos=True,
    )


async def run_streams(
    addr: str, prompts: list[str], n: int, on_token=None
) -> list[tuple[str, list[float], str]]:
    async with grpc.aio.insecure_channel(addr) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        async def one(i: int, q: str) -> tuple[str, list[float], str]:
            text, times, err = [], [], ""
            try:
                async for m in stub.Generate(chat(q, n), timeout=120):
                    text.append(m.text)
                    times.append(time.monotonic())
                    if on_token and not m.finished:
                        on_token(i, len(times))
            except grpc.aio.AioRpcError as exc:
                err = f"{exc.code().name}: {exc.details()}"
            return "".join(text), times, err

        return await asyncio.gather(*(one(i, q) for i, q in enumerate(prompts)))


def wait_all_healthy(addr: str, timeout_s: float = 120.0) -> float:
    """Seconds until every node of the cluster is healthy in the coordinator's view. A node killed
    3 times within a minute is banned for 60 s as flapping (cluster.py), so back-to-back trials
    must wait for it, or the next trial would kill the only healthy replica of its part."""
    t0 = time.monotonic()
    while True:
        with grpc.insecure_channel(addr) as ch:
            st = pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
        if all(n.healthy for n in st.nodes):
            return time.monotonic() - t0
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(
                f"nodes not healthy after {timeout_s} s: {[(n.id, n.error) for n in st.nodes]}"
            )
        time.sleep(0.2)


def with_replica(trials: int, workdir: Path) -> dict:
    cfg = parse_config(config(3, 2, 43100))
    pc = ProcessCluster(cfg, workdir / "replica").start()
    prompts = [f"Tell me about the number {i}." for i in range(4)]
    gaps, lost, identical, errors, waits = [], 0, 0, [], []
    try:
        baseline = [t for t, _, _ in asyncio.run(run_streams(cfg.coordinator.address, prompts, 32))]
        for trial in range(trials):
            waits.append(wait_all_healthy(cfg.coordinator.address))
            killed: dict[str, float] = {}

            def on_token(i: int, n: int, killed: dict[str, float] = killed) -> None:
                if n == 8 and not killed:
                    with grpc.insecure_channel(cfg.coordinator.address) as ch:
                        st = pb_grpc.CoordinatorStub(ch).ClusterStatus(pb.ClusterStatusRequest(), timeout=5)
                    busy = max(
                        (s for s in st.nodes if s.model_part == 1 and s.healthy),
                        key=lambda s: s.info.active_requests,
                    )
                    pc.kill(busy.id)
                    killed[busy.id] = time.monotonic()

            res = asyncio.run(run_streams(cfg.coordinator.address, prompts, 32, on_token))
            ((victim, t_kill),) = killed.items()
            # the longest stall a stream shows after the kill: tokens generated before it may still
            # arrive first (they were in flight), so the gap is the largest one between arrivals
            # from the kill on, not only the first
            gaps.append(
                max(
                    max(
                        (b - max(a, t_kill) for a, b in itertools.pairwise([t_kill, *times]) if b > t_kill),
                        default=0.0,
                    )
                    for _, times, _ in res
                )
                * 1e3
            )
            lost += sum(1 for _, _, err in res if err)
            errors += [err for _, _, err in res if err]
            identical += sum(1 for (t, _, _), b in zip(res, baseline, strict=True) if t == b)
            pc.start_node(victim)
            pc.wait_ready(60)
            print(f"trial {trial}: killed {victim}, resumed after {gaps[-1]:.0f} ms", flush=True)
    finally:
        pc.stop()
    # a p99 needs >= 100 trials (statistics.quantiles extrapolates past the largest one below that)
    q = statistics.quantiles(gaps, n=100) if len(gaps) >= 100 else None
    return {
        "trials": trials,
        "resume_ms": gaps,
        "resume_ms_p50": statistics.median(gaps),
        "resume_ms_p99": q[98] if q else None,
        "resume_ms_max": max(gaps),
        "requests_lost": lost,
        "errors": errors,
        "wait_for_healthy_s": waits,
        "streams_identical": identical,
        "streams": trials * len(prompts),
    }


def without_replica(workdir: Path) -> dict:
    cfg = parse_config(config(3, 1, 43200))
    pc = ProcessCluster(cfg, workdir / "single").start()
    try:
        killed: list[float] = []

        def on_token(i: int, n: int) -> None:
            if n == 4 and not killed:
                pc.kill("node2")
                killed.append(time.monotonic())

        res = asyncio.run(run_streams(cfg.coordinator.address, ["Write a long poem."], 200, on_token))
        err_at = time.monotonic()
        t_new = time.monotonic()
        res_new = asyncio.run(run_streams(cfg.coordinator.address, ["Hello"], 4))
        new_s = time.monotonic() - t_new
        restart_s = pc.start_node("node2")
        t0 = time.monotonic()
        while True:
            ok = asyncio.run(run_streams(cfg.coordinator.address, ["Hello"], 4))
            if not ok[0][2]:
                break
            time.sleep(0.2)
        serve_again_s = restart_s + (time.monotonic() - t0)
    finally:
        pc.stop()
    return {
        "in_flight_error": res[0][2],
        "in_flight_error_s": err_at - killed[0],
        "new_request_error": res_new[0][2],
        "new_request_error_s": new_s,
        "restart_to_serving_s": serve_again_s,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=10)
    ap.add_argument("--out", default="bench/failover.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = {
            "with_replica": with_replica(args.trials, Path(tmp)),
            "without_replica": without_replica(Path(tmp)),
        }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    r, s = out["with_replica"], out["without_replica"]
    print("| figure | value |\n|---|---|")
    print(
        f"| SIGKILL -> affected streams resume, p50 / {'p99' if r['resume_ms_p99'] else 'max'} ({r['trials']} trials) | "
        f"{r['resume_ms_p50']:.0f} / {(r['resume_ms_p99'] or r['resume_ms_max']):.0f} ms |"
    )
    print(f"| requests lost with a replica | {r['requests_lost']} of {r['streams']} |")
    print(f"| streams identical to a no-fault run | {r['streams_identical']} of {r['streams']} |")
    print(
        f"| no replica: in-flight request fails after | {s['in_flight_error_s']:.2f} s ({s['in_flight_error'][:80]}) |"
    )
    print(f"| no replica: a new request fails after | {s['new_request_error_s']:.2f} s |")
    print(f"| restarted node serves again after | {s['restart_to_serving_s']:.1f} s (process start + load) |")


if __name__ == "__main__":
    main()
