"""KV cache and prefix cache benchmark (`make bench-kv`): a 3-node loopback cluster of the embedded
model (real processes, 1 kernel thread per node), driven through the OpenAI streaming API.

1. Decode tok/s per stream at 128 / 1024 / 4096 tokens of context, with 4 and 16 streams. The
   streams share one long prefix (primed once, so the prefix cache spares 16 prefills of 4096
   tokens), then differ; each decodes 32 tokens over its own blocks plus the shared ones. Target:
   at 4096 tokens >= 0.7x the speed at 128.
2. Time to first token of a request whose 1000-token prefix an earlier request left cached,
   divided by the first one's (target <= 0.2).
3. Chat TTFT p50 at 16 concurrent chat streams (the model's template puts the same system turn
   first), with the prefix cache off and on (`coordinator.prefix_cache`).
Writes bench/kv.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scripts.bench_serving import cluster_config, wait_http_ready

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about rain.",
    "How many legs does a spider have?",
]


async def stream(client: Any, body: dict[str, Any], path: str) -> dict[str, float]:
    """One streamed request: its time to first token and decode tok/s after it."""
    t0 = time.perf_counter()
    first, n = None, 0
    async with client.stream("POST", path, json=body | {"stream": True}) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            if first is None and event.get("choices"):
                first = time.perf_counter()
            if usage := event.get("usage"):
                n = usage["completion_tokens"]
    end = time.perf_counter()
    first = first or end
    return {"ttft_s": first - t0, "decode_tok_s": (n - 1) / (end - first) if end > first else 0.0}


def completion(ids: list[int], max_tokens: int) -> dict[str, Any]:
    return {"model": "m", "prompt": ids, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}


async def context_scaling(base: str, contexts: list[int], streams: list[int]) -> list[dict[str, Any]]:
    import httpx

    rng = random.Random(1)
    rows = []
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        for ctx in contexts:
            shared = [rng.randrange(100, 40000) for _ in range(ctx - 8)]
            await stream(client, completion([*shared, 1, 2, 3], 1), "/v1/completions")  # prime the prefix
            for k in streams:
                bodies = [
                    completion([*shared, *(rng.randrange(100, 40000) for _ in range(8))], 32)
                    for _ in range(k)
                ]
                recs = await asyncio.gather(*(stream(client, b, "/v1/completions") for b in bodies))
                rows.append(
                    {
                        "context": ctx,
                        "streams": k,
                        "decode_tok_s_per_stream": statistics.mean(r["decode_tok_s"] for r in recs),
                    }
                )
                print(f"context {ctx}, {k} streams: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


async def shared_prefix_ttft(base: str, prefix_len: int, trials: int) -> dict[str, Any]:
    import httpx

    rng = random.Random(2)
    ratios, firsts, seconds = [], [], []
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        for _ in range(trials):
            prefix = [rng.randrange(100, 40000) for _ in range(prefix_len)]
            a = await stream(client, completion([*prefix, 5, 6, 7], 4), "/v1/completions")
            b = await stream(client, completion([*prefix, 8, 9, 10, 11], 4), "/v1/completions")
            firsts.append(a["ttft_s"])
            seconds.append(b["ttft_s"])
            ratios.append(b["ttft_s"] / a["ttft_s"])
    return {
        "prefix_tokens": prefix_len,
        "first_ttft_s": statistics.median(firsts),
        "second_ttft_s": statistics.median(seconds),
        "ratio_median": statistics.median(ratios),
        "trials": trials,
    }


async def chat_ttft(base: str, k: int, rounds: int) -> dict[str, Any]:
    import httpx

    ttfts = []
    async with httpx.AsyncClient(base_url=base, timeout=600, trust_env=False) as client:
        for r in range(rounds):
            bodies = [
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": f"{QUESTIONS[i % 4]} (#{r * k + i})"}],
                    "max_tokens": 8,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                for i in range(k)
            ]
            recs = await asyncio.gather(*(stream(client, b, "/v1/chat/completions") for b in bodies))
            ttfts += [x["ttft_s"] for x in recs]
    return {"streams": k, "requests": len(ttfts), "ttft_p50_s": statistics.median(ttfts)}


def run_cluster(prefix_cache: bool, budget: int, threads: int, work: Any) -> Any:
    from pipeserve.launcher.procs import ProcessCluster

    cfg = cluster_config(3, threads)
    cfg = cfg.model_copy(
        update={
            "coordinator": cfg.coordinator.model_copy(update={"prefix_cache": prefix_cache}),
            "node_defaults": cfg.node_defaults.model_copy(update={"cache_budget_tokens": budget}),
        }
    )
    base = f"http://127.0.0.1:{cfg.api.port}"
    cluster = ProcessCluster(cfg, Path(tempfile.mkdtemp(prefix="bench-kv-")), with_api=True)
    try:
        cluster.start(timeout_s=300)
        wait_http_ready(base + "/ready", 300)
        return asyncio.run(work(base))
    finally:
        cluster.stop()


def markdown(res: dict[str, Any]) -> str:
    lines = ["| context (tokens) | streams | decode tok/s per stream | vs 128 |", "|---|---|---|---|"]
    base = {
        r["streams"]: r["decode_tok_s_per_stream"]
        for r in res["context"]
        if r["context"] == min(res["contexts"])
    }
    for r in res["context"]:
        lines.append(
            f"| {r['context']} | {r['streams']} | {r['decode_tok_s_per_stream']:.1f} | "
            f"{r['decode_tok_s_per_stream'] / base[r['streams']]:.2f}x |"
        )
    p = res["prefix"]
    lines += [
        "",
        "| figure | value |",
        "|---|---|",
        f"| TTFT, {p['prefix_tokens']}-token prefix: first / second (cached) | "
        f"{p['first_ttft_s'] * 1e3:.0f} / {p['second_ttft_s'] * 1e3:.0f} ms (ratio {p['ratio_median']:.2f}, "
        f"median of {p['trials']}) |",
        f"| chat TTFT p50, {res['chat_off']['streams']} streams: prefix cache off / on | "
        f"{res['chat_off']['ttft_p50_s'] * 1e3:.0f} / {res['chat_on']['ttft_p50_s'] * 1e3:.0f} ms |",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/kv.json"))
    # 3 nodes share this box's 2 cores: 1 kernel thread each (as bench_serving.py's 3-node system)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--contexts", default="128,1024,4096")
    ap.add_argument("--streams", default="4,16")
    ap.add_argument("--trials", type=int, default=5)
    args = ap.parse_args()
    contexts = [int(x) for x in args.contexts.split(",")]
    streams = [int(x) for x in args.streams.split(",")]
    budget = max(streams) * (max(contexts) + 64) + 4096

    async def on(base: str) -> dict[str, Any]:
        return {
            "context": await context_scaling(base, contexts, streams),
            "prefix": await shared_prefix_ttft(base, 1000, args.trials),
            "chat_on": await chat_ttft(base, 16, 3),
        }

    res: dict[str, Any] = {
        "contexts": contexts,
        "threads_per_node": args.threads,
        "cache_budget_tokens": budget,
    }
    res |= run_cluster(True, budget, args.threads, on)
    res["chat_off"] = run_cluster(False, budget, args.threads, lambda base: chat_ttft(base, 16, 3))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
