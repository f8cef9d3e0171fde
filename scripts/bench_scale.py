"""Scale benchmark (issue 24): a model larger than any node, on nodes under hard memory limits.

`make bench-scale` writes the synthetic Llama-3.1-8B-shape Q4_K_M (`pipeserve synth`, ~4.9 GB,
random weights in real blocks, cached in ~/.cache/pipeserve/models) and then, one system after the
other on the same file and the same streaming client as `scripts/bench_serving.py`:

- 1 node under the limit (default 2.5 GiB, a memory cgroup of its own): it must refuse its share
  with the numbers, before mapping anything;
- 3 node processes, each in a memory cgroup of its own with the same limit (`memory_limit: auto`
  reads it), `layers: auto`: load time per node, RSS and the cgroup's peak per node against the
  limit, OOM kills (must be 0), then K streaming clients through the API;
- llama.cpp over RPC: 3 `ggml-rpc-server`s (2 threads each, not capped: ggml's RPC backend copies
  the tensors into each server's memory) under one llama-server;
- llama-server in one unlimited process (`-t 2 -np 16`).

Prefix caching is off in every system (`coordinator.prefix_cache: false`, `cache_prompt: false`):
the clients repeat the warm-up's prompts, and the caches keep different amounts of them.

Needs root and a memory cgroup (v1 `memory` or v2 with the memory controller); writes
bench/scale.json and bench/scale.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "scripts"), str(ROOT / "tests")]
import bench_serving as bs  # noqa: E402 - the same client, summaries and llama.cpp runner
from memcg import MemoryCgroup  # noqa: E402 - the memory cgroups of the budget tests

GIB = 2**30


# ---- pipeserve systems ------------------------------------------------------------------------------
def cluster_view(base: str) -> dict[str, Any]:
    import httpx

    return dict(httpx.get(base + "/api/cluster", timeout=5.0, trust_env=False).json())


def run_capped(name: str, parts: int, limit: int, args: argparse.Namespace) -> dict[str, Any]:
    """`parts` node processes, each in its own cgroup under `limit`, `layers: auto`. With one part
    the node must refuse; with more the cluster serves K clients."""
    import psutil

    from pipeserve.common.config import parse_config
    from pipeserve.launcher.procs import ProcessCluster

    cfg = bs.cluster_config(parts)
    raw = cfg.model_dump(mode="json")
    # prefix caching off (llama-server's prompt cache too): every timed prompt is prefilled in full
    # (the clients repeat the warm-up's prompts, and the two caches keep different amounts of them)
    raw["coordinator"]["prefix_cache"] = False
    if args.lossy_int8:  # the opt-in lossy mode on every node (a study; the default is exact)
        raw["node_defaults"] = {**raw.get("node_defaults", {}), "lossy_int8": True}
    cfg = parse_config({**raw, "layers": "auto"}, "bench config")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-scale-{name}-"))
    groups = {n.id: MemoryCgroup.create(limit, f"pipeserve-bench-{n.id}") for n in cfg.nodes}
    cluster = ProcessCluster(cfg, workdir, with_api=True, node_prefix=lambda nid: groups[nid].prefix())
    base = f"http://127.0.0.1:{cfg.api.port}"
    out: dict[str, Any] = {"kind": "pipeserve", "parts": parts, "limit_bytes": limit, "runs": {}}
    print(f"[{name}] {parts} node(s) under {limit / GIB:.2f} GiB each, in {workdir}", file=sys.stderr)
    if args.drop_caches:
        # a cold page cache: each node's first touch of its share's file pages is charged to its
        # own cgroup (pages cached earlier stay charged to whoever read them first)
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
    t0 = time.perf_counter()
    try:
        cluster.start(timeout_s=bs.READY_TIMEOUT_S, wait=parts > 1)
        if parts == 1:
            out["refusal"] = wait_refusal(cluster, cfg.nodes[0].id, base)
            print(f"[{name}] refused: {out['refusal']}", file=sys.stderr)
            return out
        bs.wait_http_ready(base + "/ready", 900.0)
        out["ready_s"] = time.perf_counter() - t0
        view = cluster_view(base)
        out["nodes_at_start"] = view.get("nodes", [])
        for k in (max(args.concurrency), 1):  # warm-up, not timed
            recs, _ = asyncio.run(bs.run_clients(base, k, 1, 4))
            if errs := [r.error for r in recs if r.error]:
                raise RuntimeError(f"warm-up failed: {errs[:3]}")
        for k in args.concurrency:
            recs, wall = asyncio.run(bs.run_clients(base, k, args.requests_per_client, args.max_tokens))
            summary = bs.summarize(recs, wall)
            out["runs"][str(k)] = {"summary": summary}
            print(f"[{name}] K={k}: {bs._brief(summary)}", file=sys.stderr)
        view = cluster_view(base)
        out["nodes"] = view.get("nodes", [])
        live = {n: p for n, p in cluster.procs.items() if p.poll() is None}
        out["rss_mib"] = {n: psutil.Process(p.pid).memory_info().rss / 2**20 for n, p in live.items()}
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {out['error']}", file=sys.stderr)
        for n in cfg.nodes:
            print(f"--- {n.id}\n{cluster.log(n.id, 15)}", file=sys.stderr)
    finally:
        dead = {n: p.returncode for n, p in cluster.procs.items() if p.poll() is not None}
        out["exited"] = dead
        out["cgroups"] = {
            nid: {"peak_bytes": g.peak(), "oom_kills": g.oom_kills(), "limit_bytes": g.limit}
            for nid, g in groups.items()
        }
        cluster.stop()
        for g in groups.values():
            g.remove()
    return out


def wait_refusal(cluster: Any, node_id: str, base: str, timeout_s: float = 300.0) -> str:
    """The node's refusal: with `layers: auto` the coordinator's placement refuses the budgets and
    the node exits 1 with the reason (an OOM kill would exit -9 instead, and fail the benchmark)."""
    deadline = time.monotonic() + timeout_s
    proc = cluster.procs[node_id]
    while proc.poll() is None and time.monotonic() < deadline:
        if "serving layers" in cluster.log(node_id, 400):
            raise RuntimeError(f"{node_id} accepted the whole model under the limit: nothing to refuse")
        time.sleep(0.5)
    text = cluster.log(node_id, 400)
    if proc.returncode is None:
        raise RuntimeError(f"{node_id} neither refused nor failed in {timeout_s:.0f} s: {text[-2000:]}")
    if proc.returncode != 1:
        raise RuntimeError(f"{node_id} exited {proc.returncode} (1 is a refusal): {text[-2000:]}")
    lines = [ln.strip() for ln in text.splitlines() if "refus" in ln or ("needs" in ln and "limit" in ln)]
    return lines[-1] if lines else text.strip().splitlines()[-1]


# ---- report -------------------------------------------------------------------------------------------
def agg(res: dict[str, Any], system: str, k: int) -> float | None:
    run = res.get(system, {}).get("runs", {}).get(str(k))
    return None if run is None else run["summary"].get("agg_tok_s")


def table(res: dict[str, Any], ks: list[int]) -> str:
    lines = [
        "| K | 3 capped nodes | llama.cpp over RPC | llama-server (unlimited) | 3 nodes / RPC | 3 nodes / llama-server |",
        "|---|---|---|---|---|---|",
    ]
    for k in ks:
        a, r, s = agg(res, "three", k), agg(res, "llama-rpc", k), agg(res, "llama-server", k)
        f = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
        q = lambda x, y: "-" if x is None or not y else f"{x / y:.2f}"  # noqa: E731
        lines.append(f"| {k} | {f(a)} | {f(r)} | {f(s)} | {q(a, r)} | {q(a, s)} |")
    three = res.get("three", {})
    if three.get("nodes"):
        lines += [
            "",
            "| node | layers | limit (GiB) | load (s) | RSS after (MiB) | cgroup peak (MiB) | OOM kills |",
        ]
        lines.append("|---|---|---|---|---|---|---|")
        for n in three["nodes"]:
            nid = n.get("id")
            cg = three.get("cgroups", {}).get(nid, {})
            peak = cg.get("peak_bytes")
            lines.append(
                f"| {nid} | {n.get('layers')} | {cg.get('limit_bytes', 0) / GIB:.2f} | "
                f"{n.get('load_s', '-')} | {three.get('rss_mib', {}).get(nid, 0):.0f} | "
                f"{'-' if peak is None else f'{peak / 2**20:.0f}'} | {cg.get('oom_kills')} |"
            )
    return "\n".join(lines)


def main() -> None:
    from pipeserve.common.memory import parse_bytes
    from pipeserve.modeling import synth

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default="llama-3.1-8b", help="synthetic model spec (pipeserve synth)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--limit", default="2.5GiB", help="memory limit of every capped node")
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=1)
    ap.add_argument("--systems", default="one,three,llama-rpc,llama-server")
    ap.add_argument("--out", type=Path, default=Path("bench/scale.json"))
    ap.add_argument("--lossy-int8", action="store_true", help="run the nodes in the opt-in lossy int8 mode")
    ap.add_argument(
        "--no-drop-caches",
        dest="drop_caches",
        action="store_false",
        help="keep the page cache before each capped system (default: drop it, so file pages are charged to the nodes)",
    )
    args = ap.parse_args()
    args.concurrency = [int(k) for k in args.concurrency.split(",")]
    args.quiet_wait = 0.0
    args.llama_extra = {"cache_prompt": False}
    limit = parse_bytes(args.limit)
    models = Path(os.environ.get("PIPESERVE_MODELS_DIR", Path.home() / ".cache/pipeserve/models"))
    path = models / f"synth-{args.spec}-s{args.seed}.gguf"
    t = time.perf_counter()
    if not path.exists():
        synth.write(args.spec, path, seed=args.seed)
    res: dict[str, Any] = {
        "model": {"spec": args.spec, "seed": args.seed, "path": str(path), "bytes": path.stat().st_size},
        "synth_s": time.perf_counter() - t,
        "limit_bytes": limit,
        "lossy_int8": args.lossy_int8,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "machine": bs.machine_info(),
    }
    bs.MODEL = str(path)
    for system in args.systems.split(","):
        if system == "one":
            res["one"] = run_capped("one", 1, limit, args)
        elif system == "three":
            res["three"] = run_capped("three", 3, limit, args)
        elif system in ("llama-rpc", "llama-server"):
            res[system] = bs.bench_llamacpp(system, system == "llama-rpc", args)
        else:
            ap.error(f"unknown system {system}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
    md = table(res, args.concurrency)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
