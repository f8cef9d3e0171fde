"""What mTLS costs per token (`make bench-tls`).

The embedded model on a 3-node loopback cluster of processes (1 kernel thread per node, the chain
data path), once in plaintext and once with `tls.enabled` (certificates from `pipeserve certs`),
driven through the coordinator's gRPC API with the API's certificate: greedy streams of 48
tokens, 1 stream and 16 streams, 3 rounds each (the median is kept). Reported: ms per token of
one stream (1 / decode rate) and of the 16-stream aggregate, both ways, and the difference.
Writes bench/tls.json and prints the table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pipeserve.common import tls
from pipeserve.common.certs import make_cluster_certs
from pipeserve.common.config import TlsConfig
from pipeserve.launcher.procs import ProcessCluster
from pipeserve.proto import model_service_pb2 as pb
from pipeserve.proto import model_service_pb2_grpc as pb_grpc
from tests.harness import cluster_config

PROMPTS = [[1, 2364, 314, 253, 6134, 288, 2], [1, 504, 3458, 282, 4052, 314], [1, 17, 18, 19, 20, 21, 22, 23]]


async def drive(cfg: Any, streams: int, tokens: int) -> tuple[float, float]:
    """(decode tok/s of one stream averaged over streams, aggregate tok/s)."""
    opts: list[tuple[str, Any]] = []
    async with tls.aio_channel(cfg, "api", "coordinator", cfg.coordinator.address, opts) as ch:
        stub = pb_grpc.CoordinatorStub(ch)

        async def one(ids: list[int]) -> tuple[int, float, float]:
            req = pb.GenerateRequest(
                prompt_token_ids=ids,
                max_tokens=tokens,
                sampling=pb.SamplingParams(temperature=0),
                ignore_eos=True,
            )
            n, first = 0, 0.0
            async for m in stub.Generate(req, timeout=600):
                if m.token_ids and not first:
                    first = time.perf_counter()
                n += len(m.token_ids)
            return n, first, time.perf_counter()

        await one(PROMPTS[0][:3])
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(one(PROMPTS[i % len(PROMPTS)]) for i in range(streams)))
        wall = time.perf_counter() - t0
    per = [(n - 1) / (end - first) for n, first, end in outs]
    return sum(per) / len(per), sum(n for n, _, _ in outs) / wall


def run(with_tls: bool, tokens: int, rounds: int, work: Path) -> dict[str, Any]:
    cfg = cluster_config("smollm2-135m-instruct", 3)
    if with_tls:
        make_cluster_certs(cfg, work / "certs")
        d = work / "certs"
        cfg = cfg.model_copy(
            update={
                "tls": TlsConfig(
                    enabled=True,
                    ca_file=str(d / "ca.crt"),
                    cert_file=str(d / "{name}.crt"),
                    key_file=str(d / "{name}.key"),
                )
            }
        )
    pc = ProcessCluster(cfg, work / ("tls" if with_tls else "plain")).start()
    try:
        one = [asyncio.run(drive(cfg, 1, tokens))[0] for _ in range(rounds)]
        many = [asyncio.run(drive(cfg, 16, tokens))[1] for _ in range(rounds)]
    finally:
        pc.stop()
    return {
        "tls": with_tls,
        "single_stream_tok_s": statistics.median(one),
        "aggregate_tok_s_16": statistics.median(many),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=Path("bench/tls.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain = run(False, args.tokens, args.rounds, Path(tmp))
        secure = run(True, args.tokens, args.rounds, Path(tmp))
    rows = []
    for key, label in (("single_stream_tok_s", "1 stream"), ("aggregate_tok_s_16", "16 streams (aggregate)")):
        a, b = 1e3 / plain[key], 1e3 / secure[key]
        rows.append(
            {"load": label, "plain_ms_per_token": a, "tls_ms_per_token": b, "tls_cost_ms_per_token": b - a}
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"plain": plain, "tls": secure, "rows": rows, "command": "make bench-tls"}, indent=1)
    )
    print("| load | plaintext ms/token | mTLS ms/token | TLS cost ms/token |")
    print("| --- | --- | --- | --- |")
    for r in rows:
        print(
            f"| {r['load']} | {r['plain_ms_per_token']:.1f} | {r['tls_ms_per_token']:.1f} | {r['tls_cost_ms_per_token']:+.1f} |"
        )


if __name__ == "__main__":
    main()
