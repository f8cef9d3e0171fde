"""The models table and the Gemma 3 270M serving figures (`make bench-models`).

1. Every architecture kind of tests/tiny_models.py, from its safetensors folder and its GGUF twin
   (written in llama.cpp's layout): does it load, the max logit difference from transformers over
   every position of a 40-token prompt, and whether 16 greedy tokens equal transformers' generate.
2. Gemma 3 270M (`gemma3-270m`, Q4_K_M) on a real 3-node loopback cluster (processes, 1 kernel thread each): each node's
   RSS and resident weight bytes, and streamed decode tok/s through /v1/completions (1 and 4
   concurrent greedy streams of 64 tokens), with llama.cpp's llama-bench tg64 on the same file
   and thread count beside it when llama.cpp is built (scripts/build_llamacpp.sh), run before and
   after the cluster.
3. Gemma 3 270M in our engine alone (one process) at 1 and 2 kernel threads: decode at batch 1 and
   4 and a 256-token prefill, beside llama-bench's tg64 and pp256 at the same thread count.
`--skip tiny|engine|gemma` leaves a part out and keeps its figures from the last file.
Writes bench/models.json and prints markdown tables (the README's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

PROMPT = torch.randint(3, 320, (40,), generator=torch.Generator().manual_seed(12)).tolist()
GEMMA_PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]


def tiny_table(root: Path) -> list[dict[str, Any]]:
    import transformers

    from pipeserve.modeling.engine import SeqChunk, StageEngine
    from pipeserve.modeling.generate import GREEDY, generate, run_stages
    from pipeserve.modeling.loader import load_stage
    from tests.tiny_models import KINDS, make_tiny, write_gguf

    rows = []
    for kind in [k for k in KINDS if k != "gemma3_gguf"]:
        folder = make_tiny(kind, root / kind)
        ref_src = {"safetensors": folder}
        try:  # a Gemma GGUF cannot say query_pre_attn_scalar != head_dim: its twin has 256-style scaling
            src = make_tiny("gemma3_gguf", root / "gemma3_gguf") if kind == "gemma3" else folder
            ref_src["gguf"] = src
            gguf = write_gguf(src, root / f"{kind}.gguf")
        except ValueError as exc:  # e.g. a llama GGUF cannot say hidden_act=gelu
            gguf, why = None, str(exc)
        for fmt, path in (("safetensors", folder), ("gguf", gguf)):
            row: dict[str, Any] = {"kind": kind, "format": fmt}
            if path is None:
                rows.append(row | {"loads": False, "note": f"no GGUF form: {why}"})
                continue
            ref = transformers.AutoModelForCausalLM.from_pretrained(ref_src[fmt], dtype=torch.float32).eval()
            with torch.inference_mode():
                ref_logits = ref(torch.tensor([PROMPT])).logits[0]
                ref_greedy = ref.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, 40:]
            try:
                ld = load_stage(str(path))
            except Exception as exc:  # a refusal is a row of the table too
                rows.append(row | {"loads": False, "note": f"{type(exc).__name__}: {exc}"[:200]})
                continue
            eng = StageEngine(ld)
            chunks = [SeqChunk(f"p{k}", 0, PROMPT[: k + 1], GREEDY) for k in range(len(PROMPT))]
            ours = run_stages([eng], chunks)
            greedy = generate([StageEngine(ld)], [PROMPT], 16)[0]
            rows.append(
                row
                | {
                    "loads": True,
                    "model_type": ld.cfg.model_type,
                    "max_logit_diff": float((torch.from_numpy(ours) - ref_logits).abs().max()),
                    "greedy_equal": greedy == ref_greedy.tolist(),
                }
            )
            print(f"{kind:18s} {fmt:11s} {rows[-1]}", file=sys.stderr, flush=True)
    return rows


async def stream_completion(client: Any, prompt: str, max_tokens: int) -> dict[str, Any]:
    body = {
        "model": "gemma3-270m",
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    t0, first, n = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:300]!r}")
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(str(event["error"]))
            if any(c.get("text") for c in event.get("choices", [])):
                first = first or time.perf_counter()
            if usage := event.get("usage"):
                n = usage["completion_tokens"]
    end = time.perf_counter()
    return {"ttft_s": (first or end) - t0, "tokens": n, "decode_tok_s": (n - 1) / (end - (first or end))}


async def run_streams(base: str, k: int, max_tokens: int) -> dict[str, Any]:
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=300, trust_env=False) as client:
        t0 = time.perf_counter()
        recs = await asyncio.gather(
            *(stream_completion(client, GEMMA_PROMPTS[i % 3], max_tokens) for i in range(k))
        )
        wall = time.perf_counter() - t0
    return {
        "streams": k,
        "per_stream_decode_tok_s": sum(r["decode_tok_s"] for r in recs) / k,
        "aggregate_tok_s": sum(r["tokens"] for r in recs) / wall,
        "ttft_s": sum(r["ttft_s"] for r in recs) / k,
    }


def gemma_cluster(threads: int, max_tokens: int) -> dict[str, Any]:
    import httpx
    import psutil

    from pipeserve.launcher.procs import ProcessCluster
    from scripts.bench_serving import cluster_config, wait_http_ready

    cfg = cluster_config(3, threads).model_copy(update={"model_name": "gemma3-270m"})
    base = f"http://127.0.0.1:{cfg.api.port}"
    cluster = ProcessCluster(cfg, Path(tempfile.mkdtemp(prefix="bench-gemma-")), with_api=True)
    out: dict[str, Any] = {"threads_per_node": threads, "max_tokens": max_tokens}
    t = time.perf_counter()
    try:
        cluster.start(timeout_s=600)
        wait_http_ready(base + "/ready", 600)
        out["startup_s"] = time.perf_counter() - t
        out["rss_before_traffic_mib"] = {
            n: psutil.Process(p.pid).memory_info().rss / 2**20 for n, p in cluster.procs.items()
        }
        asyncio.run(run_streams(base, 1, 8))  # warm-up
        out["runs"] = [asyncio.run(run_streams(base, k, max_tokens)) for k in (1, 4)]
        out["rss_after_traffic_mib"] = {
            n: psutil.Process(p.pid).memory_info().rss / 2**20 for n, p in cluster.procs.items()
        }
        view = httpx.get(base + "/api/cluster", timeout=5, trust_env=False).json()
        out["nodes"] = [
            {k: n.get(k) for k in ("id", "part", "layers", "weights_bytes", "weight_types")}
            for n in view["nodes"]
        ]
    finally:
        cluster.stop()
    return out


def gemma_engine(threads: int, runs: int = 3, tokens: int = 32) -> dict[str, Any]:
    """Our engine alone on the whole Gemma 3 270M (one process, `threads` kernel threads): decode
    steps after a 64-token prompt at batch 1 and 4, and a 256-token prefill; medians of `runs`."""
    import statistics

    import numpy as np

    from pipeserve import kernels
    from pipeserve.modeling.engine import SeqChunk, StageEngine
    from pipeserve.modeling.generate import GREEDY
    from pipeserve.modeling.loader import load_stage

    kernels.set_threads(threads)
    eng = StageEngine(load_stage("gemma3-270m"))
    rng = np.random.default_rng(0)
    n_run = 0

    def decode(batch: int) -> float:
        nonlocal n_run
        n_run += 1
        rids = [f"r{n_run}-{i}" for i in range(batch)]
        out = eng.forward([SeqChunk(r, 0, rng.integers(100, 40000, 64).tolist(), GREEDY) for r in rids])
        nxt = [s.token_id for s in out.samples]
        t = time.perf_counter()
        for step in range(tokens):
            chunks = [SeqChunk(r, 64 + step, [k], GREEDY) for r, k in zip(rids, nxt, strict=True)]
            nxt = [s.token_id for s in eng.forward(chunks).samples]
        dt = time.perf_counter() - t
        eng.release(rids)
        return dt

    def prefill() -> float:
        ids = rng.integers(100, 40000, 256).tolist()
        t = time.perf_counter()
        eng.forward([SeqChunk("pf", 0, ids, GREEDY)])
        dt = time.perf_counter() - t
        eng.release(["pf"])
        return dt

    def med(fn: Any) -> float:
        fn()  # warm-up
        return statistics.median(fn() for _ in range(runs))

    return {
        "threads": threads,
        "kernel_isa": kernels.get_isa(),
        "decode_b1_tok_s": tokens / med(lambda: decode(1)),
        "decode_b4_tok_s": 4 * tokens / med(lambda: decode(4)),
        "prefill256_tok_s": 256 / med(prefill),
    }


def llama_bench(gguf: Path, threads: int, prefill: int = 0) -> dict[str, Any]:
    build = Path(__file__).with_name("build_llamacpp.sh")
    found = subprocess.run(["bash", str(build)], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        return {"skipped": "llama.cpp is not built (scripts/build_llamacpp.sh)"}
    bin_dir = Path(found.stdout.strip().splitlines()[-1])
    run = subprocess.run(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            str(gguf),
            "-t",
            str(threads),
            "-p",
            str(prefill),
            "-n",
            "64",
            "-r",
            "3",
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if run.returncode != 0:
        return {"skipped": f"llama-bench failed: {run.stderr[-300:]}"}
    rows = json.loads(run.stdout)
    out = {"tg64_tok_s": next(r["avg_ts"] for r in rows if r["n_gen"] == 64)}
    if prefill:
        out[f"pp{prefill}_tok_s"] = next(r["avg_ts"] for r in rows if r["n_prompt"] == prefill)
    return out


def engine_markdown(res: dict[str, Any]) -> list[str]:
    lines = [
        "| Gemma 3 270M, one process | threads | ours | llama.cpp (llama-bench) | ratio |",
        "|---|---|---|---|---|",
    ]
    for row in res.get("engine", []):
        ours, lb = row["ours"], row["llama_bench"]
        for label, key, lkey in (
            ("decode, batch 1 (tok/s)", "decode_b1_tok_s", "tg64_tok_s"),
            ("prefill 256 (tok/s)", "prefill256_tok_s", "pp256_tok_s"),
            ("decode, batch 4, aggregate (tok/s)", "decode_b4_tok_s", None),
        ):
            theirs = lb.get(lkey) if lkey else None
            ratio = f"{ours[key] / theirs:.2f}x" if theirs else ""
            lines.append(
                f"| {label} | {ours['threads']} | {ours[key]:.1f} | {f'{theirs:.1f}' if theirs else ''} | {ratio} |"
            )
    return lines


def markdown(res: dict[str, Any]) -> str:
    lines = ["| kind | format | loads | max logit diff | greedy 16 equal |", "|---|---|---|---|---|"]
    for r in res.get("tiny", []):
        if r.get("loads"):
            lines.append(
                f"| {r['kind']} | {r['format']} | yes | {r['max_logit_diff']:.1e} | {'yes' if r['greedy_equal'] else 'NO'} |"
            )
        else:
            lines.append(f"| {r['kind']} | {r['format']} | no | {r.get('note', '')} | |")
    g = res.get("gemma")
    if g and "runs" in g:
        lines += ["", "| Gemma 3 270M, 3 nodes | value |", "|---|---|"]
        for n in g["nodes"]:
            rss = g["rss_after_traffic_mib"].get(n["id"], float("nan"))
            lines.append(
                f"| {n['id']} layers {n['layers']}: weights / RSS after traffic | "
                f"{n['weights_bytes'] / 2**20:.1f} MiB / {rss:.0f} MiB |"
            )
        for run in g["runs"]:
            lines.append(
                f"| {run['streams']} stream(s): decode tok/s per stream / aggregate | "
                f"{run['per_stream_decode_tok_s']:.1f} / {run['aggregate_tok_s']:.1f} |"
            )
        lb = res.get("llama_bench", {})
        runs = [lb[k]["tg64_tok_s"] for k in ("before", "after") if "tg64_tok_s" in lb.get(k, {})]
        if runs:
            lines.append(
                "| llama-bench tg64, same file and threads (one process; before / after the cluster) | "
                + " / ".join(f"{r:.1f}" for r in runs)
                + " |"
            )
    if res.get("engine"):
        lines += ["", *engine_markdown(res)]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("bench/models.json"))
    # 3 nodes share this box's 2 cores: 1 kernel thread each (as bench_serving.py's 3-node system)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--skip", choices=["tiny", "engine", "gemma"], action="append", default=[])
    args = ap.parse_args()
    torch.set_num_threads(2)
    # a part skipped keeps its figures from the last run's file
    res: dict[str, Any] = json.loads(args.out.read_text()) if args.skip and args.out.exists() else {}
    if "tiny" not in args.skip:
        res["tiny"] = tiny_table(Path(tempfile.mkdtemp(prefix="bench-models-")))
    if "engine" not in args.skip:
        from pipeserve.common.model_files import resolve_model

        gguf = resolve_model("gemma3-270m").path
        res["engine"] = [
            {"ours": gemma_engine(t), "llama_bench": llama_bench(gguf, t, prefill=256)} for t in (1, 2)
        ]
    if "gemma" not in args.skip:
        from pipeserve.common.model_files import resolve_model

        # llama-bench before and after the cluster: on a shared 2-core VM one run of it moved by
        # 2x between minutes, so both are kept and the table shows the range
        gguf = resolve_model("gemma3-270m").path
        before = llama_bench(gguf, args.threads)
        res["gemma"] = gemma_cluster(args.threads, args.max_tokens)
        after = llama_bench(gguf, args.threads)
        res["llama_bench"] = {"before": before, "after": after}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(markdown(res))


if __name__ == "__main__":
    main()
