"""Serving benchmark: K concurrent streaming chat clients against the real HTTP API.

`make bench` runs it on the embedded model (bench/serving.json); `make bench MODEL=<named model>`
on another (`--model`, written to bench/serving-<model>.json). Each pipeserve system (3 parts on 3
node processes, 1 part on 1 node) runs the shipped default config (`threads: auto`,
`micro_batches: 0`) as real processes (`ProcessCluster`, loopback only) and is driven through
`/v1/chat/completions` with SSE streaming, greedy, `ignore_eos` and a fixed `max_tokens`, so every
request generates the same number of tokens; the JSON records what each node chose. llama-server
and llama.cpp over RPC get the same client and GGUF. A `transformers` single-process baseline
(embedded model only unless `--systems` names it) runs the same prompts (same token ids) with
static batches of K in a subprocess. Every system is warmed up before timing. Writes raw figures
to JSON, a two-panel plot, and a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODEL = "smollm2-135m-instruct"  # model_name everywhere; main() sets it from --model
HF_THREADS = 2
# Guards against a hung system only (a healthy run never nears them): the 1.5B model at K=16 on
# 2 cores takes ~1-2 minutes per request and a few minutes per run.
REQUEST_TIMEOUT_S = 600.0  # one streamed request, connect to [DONE]
RUN_TIMEOUT_S = 1800.0  # one whole K-client run
READY_TIMEOUT_S = 240.0

# Realistic chat turns of varied length; with the template's system prompt they come to ~35-200
# prompt tokens (the JSON records each one's count).
PROMPTS: list[str] = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves falling in a quiet park.",
    "Explain in simple terms how a refrigerator keeps food cold.",
    "I have eggs, spinach, feta cheese and some leftover rice. Suggest a quick dinner I could make "
    "tonight and explain the steps.",
    "Can you summarize the main causes of the French Revolution? Please cover the economic problems, "
    "the role of the Enlightenment, and the political crisis of 1789, and keep it to a few paragraphs "
    "suitable for a high school student.",
    "My Python script reads a large CSV file line by line, converts each row into a dictionary and "
    "appends it to a list, then sorts the list by a date column. It uses a lot of memory and takes "
    "several minutes on a 2 GB file. What are some practical ways to make it faster and use less "
    "memory? Mention specific libraries or techniques where they help.",
    "I am planning a three-day trip to Rome in early spring with my partner. We like history, good "
    "food and walking, but we don't enjoy crowded tourist traps or long queues. We are staying near "
    "Termini station and have a moderate budget. Could you propose a day-by-day itinerary that "
    "balances the famous sights with quieter neighbourhoods, suggest when to book tickets in advance, "
    "and recommend a few kinds of local dishes we should try?",
    "Here is a short paragraph from my cover letter: 'I am a motivated and hardworking person who "
    "likes to work in teams. In my last job I did many different tasks such as organizing events, "
    "answering emails and helping customers. I think I would be good for this job because I learn "
    "quickly and I am very friendly.' I am applying for a project coordinator role at a software "
    "company. Please rewrite it to sound more professional and specific, keep it under 120 words, and "
    "then explain briefly what you changed and why, so that I can apply the same ideas to the rest "
    "of the letter.",
]


def messages_for(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]


def prompt_index(client: int, round_: int, k: int) -> int:
    """Which prompt client `client` sends in round `round_` of a K-client run (same for every system)."""
    return (round_ * k + client) % len(PROMPTS)


# ---- per-request records and their summary ------------------------------------------------------
@dataclass
class RequestRecord:
    client: int
    prompt: int
    start_s: float  # from the start of the K-client run
    ttft_s: float | None = None  # to the first non-empty content chunk
    gaps_s: list[float] = field(default_factory=list)  # between consecutive content chunks
    end_s: float | None = None
    completion_tokens: int = 0
    prompt_tokens: int = 0
    chunks: int = 0
    error: str | None = None
    pipeserve: dict[str, Any] | None = None  # the final chunk's route and timings (pipeserve only)


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    import numpy as np

    return float(np.percentile(np.asarray(xs), q))


def summarize(records: list[RequestRecord], wall_s: float) -> dict[str, Any]:
    ok = [r for r in records if r.error is None]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    tokens = sum(r.completion_tokens for r in ok)
    tpot = [
        (r.end_s - r.start_s - r.ttft_s) / (r.completion_tokens - 1)
        for r in ok
        if r.ttft_s is not None and r.end_s is not None and r.completion_tokens > 1
    ]
    ms = lambda v: None if v is None else 1e3 * v  # noqa: E731
    out = {
        "requests": len(records),
        "errors": len(records) - len(ok),
        "wall_s": wall_s,
        "completion_tokens": tokens,
        "prompt_tokens": sum(r.prompt_tokens for r in ok),
        "agg_tok_s": tokens / wall_s if wall_s > 0 else 0.0,
        "req_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "ttft_p50_ms": ms(pct(ttft, 50)),
        "ttft_p99_ms": ms(pct(ttft, 99)),
        "itl_p50_ms": ms(pct(gaps, 50)),
        "itl_p99_ms": ms(pct(gaps, 99)),
        "tpot_mean_ms": ms(sum(tpot) / len(tpot)) if tpot else None,
        "tokens_per_chunk": tokens / max(1, sum(r.chunks for r in ok)),
        "error_messages": sorted({r.error for r in records if r.error})[:5],
    }
    # Where a request's time went inside the cluster, per generated token: each stage's compute and
    # RPC overhead (transfer + queueing on the node), as the coordinator measured them.
    infos = [(r.pipeserve, r.completion_tokens) for r in ok if r.pipeserve and r.completion_tokens]
    if infos:
        parts = sorted({st["part"] for info, _ in infos for st in info["stages"]})
        out["coordinator_queue_ms_mean"] = sum(info["queue_ms"] for info, _ in infos) / len(infos)
        out["per_token_ms"] = {
            f"part{p}": {
                key: sum(st[key] / n for info, n in infos for st in info["stages"] if st["part"] == p)
                / len(infos)
                for key in ("forward_ms", "hop_ms")
            }
            for p in parts
        }
    return out


# ---- the HTTP driver ----------------------------------------------------------------------------
async def sse_events(client: Any, body: dict[str, Any], rec: Any) -> Any:
    """The JSON events of one streamed /v1/chat/completions request, up to [DONE]; an HTTP status
    or an error event ends them, written to rec.error."""
    async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            rec.error = f"HTTP {resp.status_code}: {(await resp.aread()).decode(errors='replace')[:300]}"
            return
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                rec.error = f"stream error: {event['error'].get('message', event['error'])}"[:300]
                return
            yield event


def pipeserve_summary(info: dict[str, Any]) -> dict[str, Any]:
    """What a benchmark keeps of a reply's `pipeserve` object: its times and each stage's."""
    return {
        "queue_ms": info["queue_ms"],
        "ttft_ms": info["ttft_ms"],
        "total_ms": info["total_ms"],
        "stages": [
            {k: st[k] for k in ("part", "forward_ms", "hop_ms", "bytes_sent")} for st in info["stage_timings"]
        ],
    }


async def stream_one(
    client: Any, rec: RequestRecord, t0: float, max_tokens: int, extra: dict[str, Any] | None = None
) -> None:
    body = {
        "model": MODEL,
        "messages": messages_for(rec.prompt),
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    } | (extra or {})
    last: float | None = None
    try:
        async for event in sse_events(client, body, rec):
            now = time.perf_counter() - t0
            for choice in event.get("choices", []):
                if choice.get("delta", {}).get("content"):
                    rec.chunks += 1
                    if last is None:
                        rec.ttft_s = now - rec.start_s
                    else:
                        rec.gaps_s.append(now - last)
                    last = now
            if info := event.get("pipeserve"):
                rec.pipeserve = pipeserve_summary(info)
            if usage := event.get("usage"):
                rec.completion_tokens = usage["completion_tokens"]
                rec.prompt_tokens = usage["prompt_tokens"]
        if rec.error:
            return
        rec.end_s = time.perf_counter() - t0
        if rec.completion_tokens == 0:
            rec.error = "the stream ended without usage"
    except Exception as exc:  # a benchmark records every failure and carries on
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


async def run_clients(
    base_url: str, k: int, rounds: int, max_tokens: int, extra: dict[str, Any] | None = None
) -> tuple[list[RequestRecord], float]:
    """K clients, each sending `rounds` requests one after another; returns records and wall time."""
    import httpx

    limits = httpx.Limits(max_connections=k + 4, max_keepalive_connections=k + 4)
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    records: list[RequestRecord] = []
    # trust_env=False: never route loopback traffic through a proxy from the environment.
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=timeout, trust_env=False
    ) as client:
        t0 = time.perf_counter()

        async def one_client(c: int) -> None:
            for r in range(rounds):
                rec = RequestRecord(client=c, prompt=prompt_index(c, r, k), start_s=time.perf_counter() - t0)
                records.append(rec)
                try:
                    await asyncio.wait_for(stream_one(client, rec, t0, max_tokens, extra), REQUEST_TIMEOUT_S)
                except TimeoutError:
                    rec.error = f"timed out after {REQUEST_TIMEOUT_S:.0f} s"

        try:
            await asyncio.wait_for(asyncio.gather(*(one_client(c) for c in range(k))), RUN_TIMEOUT_S)
        except TimeoutError:
            for rec in records:
                if rec.end_s is None and rec.error is None:
                    rec.error = f"run timed out after {RUN_TIMEOUT_S:.0f} s"
        wall = time.perf_counter() - t0
    return records, wall


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def cluster_config(
    parts: int,
    threads: int | str | None = None,
    micro_batches: int | None = None,
    batch_invariant: bool = False,
) -> Any:
    """A loopback config: tokenizer, coordinator and API on 127.0.0.1, node i on 127.0.0.(i+2).
    Besides addresses and the model it sets nothing, so nodes and coordinator run the shipped
    defaults; `threads` (a number or "auto"), `micro_batches` and `batch_invariant` (the opt-in
    node_defaults.batch_invariant) override them for studies."""
    from pipeserve.common.config import parse_config

    nodes = []
    for part in range(parts):
        host = f"127.0.0.{part + 2}"
        nodes.append({"id": f"node{part + 1}", "address": f"{host}:{free_port(host)}", "model_part": part})
    coordinator: dict[str, Any] = {"address": f"127.0.0.1:{free_port('127.0.0.1')}"}
    if micro_batches is not None:
        coordinator["micro_batches"] = micro_batches
    raw = {
        "model_name": MODEL,
        "nodes": nodes,
        "coordinator": coordinator,
        "tokenizer": {"address": f"127.0.0.1:{free_port('127.0.0.1')}"},
        "api": {"host": "127.0.0.1", "port": free_port("127.0.0.1")},
        "log_level": "WARNING",
    }
    node_defaults: dict[str, Any] = {}
    if threads is not None:
        node_defaults["threads"] = threads
    if batch_invariant:
        node_defaults["batch_invariant"] = True
    if node_defaults:
        raw["node_defaults"] = node_defaults
    return parse_config(raw, "bench config")


def chosen(view: dict[str, Any]) -> dict[str, Any]:
    """What the cluster chose for itself, from /api/cluster: the coordinator's micro-batch groups
    and each node's kernel path and threads, each with its reason."""
    coord = view.get("coordinator", {})
    nodes = []
    for n in view.get("nodes", []):
        isa, _, rest = (n.get("kernel") or "").partition(" x")
        threads = rest.split(" ")[0]  # then " int8", " batch-invariant" when those modes are on
        nodes.append(
            {
                "id": n.get("id"),
                "kernel": n.get("kernel"),
                "kernel_isa": isa or None,
                "kernel_threads": int(threads) if threads.isdigit() else None,
                "threads_reason": n.get("threads_reason"),
                "host_id": n.get("host_id"),
            }
        )
    return {
        "micro_batches": coord.get("micro_batches"),
        "micro_batches_reason": coord.get("micro_batches_reason"),
        "nodes": nodes,
    }


def wait_http_ready(url: str, timeout_s: float) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(url, timeout=2.0, trust_env=False)
            if r.status_code == 200:
                return
            last = f"HTTP {r.status_code}: {r.text[:300]}"
        except httpx.HTTPError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout_s:.0f} s: {last}")


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds used so far by each process, and by the whole machine (`machine`): the difference
    between the machine's and ours is load from other work during a run (this box is shared)."""
    import psutil

    m = psutil.cpu_times()
    out = {"machine": m.user + m.system + m.nice + getattr(m, "irq", 0) + getattr(m, "softirq", 0)}
    for name, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
            out[name] = t.user + t.system
        except psutil.Error:
            out[name] = float("nan")
    return out


def wait_quiet(
    max_wait_s: float, pids: dict[str, int], threshold_cores: float = 0.3, window_s: float = 3.0
) -> float:
    """Wait (at most max_wait_s) until processes outside the benchmark (`pids`) use under
    threshold_cores of CPU over a window: this box is shared. Returns the last load seen, in cores."""
    deadline = time.monotonic() + max_wait_s
    while True:
        c0 = cpu_seconds(pids)
        time.sleep(window_s)
        c1 = cpu_seconds(pids)
        ours = sum(c1[n] - c0[n] for n in pids)
        load = (c1["machine"] - c0["machine"] - ours) / window_s
        if load < threshold_cores or time.monotonic() > deadline:
            return load
        print(
            f"waiting for a quiet machine: other processes use {load:.2f} cores", file=sys.stderr, flush=True
        )


def bench_cluster(
    name: str, parts: int, threads: int | str | None, args: argparse.Namespace
) -> dict[str, Any]:
    """One pipeserve system: `parts` node processes on loopback, the shipped defaults unless
    `threads` or --micro-batches override them."""
    import httpx
    import psutil

    from pipeserve.launcher.procs import ProcessCluster

    micro_batches = getattr(args, "micro_batches_by_system", {}).get(name)
    cfg = cluster_config(parts, threads, micro_batches, args.batch_invariant)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    base = f"http://127.0.0.1:{cfg.api.port}"
    out: dict[str, Any] = {
        "kind": "pipeserve",
        "parts": parts,
        # The config as given ("auto" / 0 are the shipped defaults); what the cluster made of it
        # is `chosen` (after the warm-up, before timing) and `chosen_after` (after the runs).
        "threads_setting": cfg.node_defaults.threads,
        "micro_batches_setting": cfg.coordinator.micro_batches,
        "overrides": {
            k: v
            for k, v in (
                ("threads", threads),
                ("micro_batches", micro_batches),
                ("batch_invariant", args.batch_invariant or None),
            )
            if v is not None
        },
        "runs": {},
    }
    print(
        f"[{name}] starting {parts}-part cluster (threads {cfg.node_defaults.threads}, micro_batches "
        f"{cfg.coordinator.micro_batches or 'auto'}) in {workdir}",
        file=sys.stderr,
    )
    t = time.perf_counter()
    cluster = ProcessCluster(cfg, workdir, with_api=True)
    try:
        cluster.start(timeout_s=READY_TIMEOUT_S)
        wait_http_ready(base + "/ready", READY_TIMEOUT_S)
        out["startup_s"] = time.perf_counter() - t
        pids = {n: p.pid for n, p in cluster.procs.items()} | {"bench_client": os.getpid()}
        # Warm-up: the largest batch, then one alone, short answers (not timed).
        kmax = max(args.concurrency)
        for k in (kmax, 1):
            recs, _ = asyncio.run(run_clients(base, k, 1, 8))
            if errs := [r.error for r in recs if r.error]:
                raise RuntimeError(f"warm-up failed: {errs[:3]}\n{cluster.log('coordinator')}")
        out["chosen"] = chosen(httpx.get(base + "/api/cluster", timeout=5.0, trust_env=False).json())
        print(f"[{name}] chose {describe_choice(out['chosen'])}", file=sys.stderr)
        for k in args.concurrency:
            load_before = wait_quiet(args.quiet_wait, pids)
            cpu0 = cpu_seconds(pids)
            recs, wall = asyncio.run(run_clients(base, k, args.requests_per_client, args.max_tokens))
            cpu1 = cpu_seconds(pids)
            summary = summarize(recs, wall)
            summary["other_load_before"] = load_before
            summary["cpu_s"] = {n: cpu1[n] - cpu0[n] for n in cpu0}
            summary["cpu_s"]["other_processes"] = summary["cpu_s"]["machine"] - sum(
                v for n, v in summary["cpu_s"].items() if n != "machine"
            )
            out["runs"][str(k)] = {"summary": summary, "requests": [asdict(r) for r in recs]}
            print(f"[{name}] K={k}: {_brief(summary)}", file=sys.stderr)
        live = {n: p for n, p in cluster.procs.items() if p.poll() is None}
        out["rss_mib"] = {n: psutil.Process(p.pid).memory_info().rss / 2**20 for n, p in live.items()}
        # PSS splits pages shared between processes (libtorch's code, mapped files) among them.
        out["pss_mib"] = {n: psutil.Process(p.pid).memory_full_info().pss / 2**20 for n, p in live.items()}
        view = httpx.get(base + "/api/cluster", timeout=5.0, trust_env=False).json()
        keys: tuple[str, ...] = ("id", "part", "layers", "mean_forward_ms", "forwards_total")
        keys += ("weights_bytes", "cache_resident_bytes", "kernel", "threads_reason")
        out["nodes"] = [{k: n.get(k) for k in keys} for n in view.get("nodes", [])]
        out["chosen_after"] = chosen(view)
        out["micro_batches"] = out["chosen_after"]["micro_batches"]
        if out["chosen_after"] != out["chosen"]:
            print(
                f"[{name}] the choice changed during the runs: now {describe_choice(out['chosen_after'])}",
                file=sys.stderr,
            )
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {out['error']}", file=sys.stderr)
    finally:
        cluster.stop()
    return out


def llama_server_cmd(server: Path, port: int, parallel: int, ctx: int) -> list[str]:
    """llama-server on loopback with the model's GGUF, 2 threads, `parallel` slots sharing `ctx`."""
    from pipeserve.common.model_files import resolve_model

    return [
        str(server), "-m", str(resolve_model(MODEL).path), "--host", "127.0.0.1", "--port", str(port),
        "-t", "2", "-np", str(parallel), "-c", str(ctx), "--no-webui",
    ]  # fmt: skip


def bench_llamacpp(name: str, rpc: bool, args: argparse.Namespace) -> dict[str, Any]:
    """llama-server on the same GGUF through the same streaming client: one process with 16 slots,
    or (rpc) its layers over 3 ggml-rpc-servers on loopback (`--rpc ... -ngl 99`), 2 threads each."""
    import psutil

    found = subprocess.run(
        ["bash", str(Path(__file__).with_name("build_llamacpp.sh"))],
        capture_output=True,
        text=True,
        check=False,
    )
    if found.returncode != 0:
        return {"error": f"llama.cpp could not be built: {found.stderr[-300:]}", "runs": {}}
    bin_dir = Path(found.stdout.strip().splitlines()[-1])
    kmax = max(args.concurrency)
    port = free_port("127.0.0.1")
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    procs: dict[str, subprocess.Popen] = {}
    out: dict[str, Any] = {"kind": "llama.cpp", "rpc_servers": 3 if rpc else 0, "slots": kmax, "runs": {}}

    def spawn(label: str, cmd: list[str]) -> None:
        log = open(workdir / f"{label}.log", "wb")  # noqa: SIM115 - the process owns it until the end
        procs[label] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)

    try:
        cmd = llama_server_cmd(bin_dir / "llama-server", port, kmax, kmax * 512)
        if rpc:
            rpc_ports = [free_port("127.0.0.1") for _ in range(3)]
            for i, p in enumerate(rpc_ports):
                spawn(
                    f"rpc{i}", [str(bin_dir / "ggml-rpc-server"), "-H", "127.0.0.1", "-p", str(p), "-t", "2"]
                )
            time.sleep(2.0)
            cmd += ["--rpc", ",".join(f"127.0.0.1:{p}" for p in rpc_ports), "-ngl", "99"]
        spawn("server", cmd)
        base = f"http://127.0.0.1:{port}"
        wait_http_ready(base + "/health", READY_TIMEOUT_S)
        pids = {n: p.pid for n, p in procs.items()} | {"bench_client": os.getpid()}
        # `llama_extra`: request fields a caller adds (bench_scale turns llama-server's prompt cache off)
        extra = {"stream_options": {"include_usage": True}, **getattr(args, "llama_extra", {})}
        for k in (kmax, 1):
            recs, _ = asyncio.run(run_clients(base, k, 1, 8, extra))
            if errs := [r.error for r in recs if r.error]:
                raise RuntimeError(f"warm-up failed: {errs[:3]}")
        for k in args.concurrency:
            load_before = wait_quiet(args.quiet_wait, pids)
            recs, wall = asyncio.run(run_clients(base, k, args.requests_per_client, args.max_tokens, extra))
            summary = summarize(recs, wall)
            summary["other_load_before"] = load_before
            out["runs"][str(k)] = {"summary": summary, "requests": [asdict(r) for r in recs]}
            print(f"[{name}] K={k}: {_brief(summary)}", file=sys.stderr)
        out["rss_mib"] = {n: psutil.Process(p.pid).memory_info().rss / 2**20 for n, p in procs.items()}
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[{name}] FAILED: {out['error']}", file=sys.stderr)
    finally:
        for proc in procs.values():
            proc.terminate()
        for proc in procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
    return out


def thread_study(args: argparse.Namespace) -> dict[str, Any]:
    """The 1-node cluster with 1 and 2 kernel threads: short runs (1 request per client, 32 tokens)."""
    study = argparse.Namespace(**vars(args))
    study.concurrency = sorted({min(args.concurrency), max(args.concurrency)})
    study.requests_per_client, study.max_tokens = 1, 32
    out = {}
    for threads in (1, 2):
        r = bench_cluster(f"one-{threads}t", 1, threads, study)
        out[str(threads)] = {
            k: {key: run["summary"][key] for key in ("agg_tok_s", "ttft_p50_ms", "itl_p50_ms", "itl_p99_ms")}
            for k, run in r.get("runs", {}).items()
        } | ({"error": r["error"]} if "error" in r else {})
    return out


def describe_choice(c: dict[str, Any]) -> str:
    """One line: micro_batches and each node's kernel, with the reasons the cluster gave (nodes
    that chose alike share one entry)."""
    same: dict[tuple[str, str], list[str]] = {}
    for n in c["nodes"]:
        same.setdefault((n["kernel"] or "?", n["threads_reason"] or "?"), []).append(n["id"])
    nodes = "; ".join(f"{', '.join(ids)}: {kernel} ({why})" for (kernel, why), ids in same.items())
    return f"micro_batches {c['micro_batches']} ({c['micro_batches_reason'] or '?'}); {nodes}"


def _brief(s: dict[str, Any]) -> str:
    f = lambda v: "-" if v is None else f"{v:.0f}"  # noqa: E731
    return (
        f"{s['agg_tok_s']:.1f} tok/s, {s['req_s']:.2f} req/s, TTFT p50 {f(s['ttft_p50_ms'])} ms, "
        f"ITL p50/p99 {f(s['itl_p50_ms'])}/{f(s['itl_p99_ms'])} ms, errors {s['errors']}, wall {s['wall_s']:.1f} s, "
        f"other load {other_load(s):.2f} cores"
    )


def other_load(s: dict[str, Any]) -> float:
    """Cores' worth of CPU that processes outside the benchmark used during the run."""
    return float(s.get("cpu_s", {}).get("other_processes", 0.0)) / s["wall_s"] if s["wall_s"] else 0.0


# ---- the transformers baseline (runs in a child process) ----------------------------------------
def bench_transformers(args: argparse.Namespace) -> dict[str, Any]:
    """Static batches of K (left padding), `requests_per_client` rounds per K. TTFT is the time to
    the first token of the batch (tokenization + padded prefill); gaps are the per-step times."""
    import torch
    import transformers

    from pipeserve.common.model_files import resolve_model
    from pipeserve.tokenizer.core import TokenizerCore

    torch.set_num_threads(HF_THREADS)
    t = time.perf_counter()
    tok = TokenizerCore.from_model(MODEL)  # the same token ids the cluster's tokenizer produces
    path = resolve_model(MODEL).path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    startup = time.perf_counter() - t
    pad = tok.eos_token_ids[0]  # <|im_end|> for both chat models; masked out by the attention mask

    class Stamps(transformers.LogitsProcessor):
        """Called once per generated token, right after that step's forward."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    def batch(prompts: list[int], new_tokens: int, t0: float) -> tuple[list[RequestRecord], int]:
        start = time.perf_counter() - t0
        ids = [
            tok.encode(tok.apply_chat_template(messages_for(i)), add_special_tokens=False) for i in prompts
        ]
        n = max(map(len, ids))
        x = torch.tensor([[pad] * (n - len(s)) + s for s in ids])
        mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in ids])
        stamps = Stamps()
        with torch.inference_mode():
            out = model.generate(
                x,
                attention_mask=mask,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,  # as ignore_eos: every request generates new_tokens
                do_sample=False,
                pad_token_id=pad,
                logits_processor=transformers.LogitsProcessorList([stamps]),
            )
        times = [s - t0 for s in stamps.times]
        end = time.perf_counter() - t0
        gaps = [b - a for a, b in itertools.pairwise(times)]
        generated = out.shape[1] - n
        recs = [
            RequestRecord(
                client=c,
                prompt=i,
                start_s=start,
                ttft_s=times[0] - start,
                gaps_s=list(gaps),
                end_s=end,
                completion_tokens=generated,
                prompt_tokens=len(s),
                chunks=generated,
            )
            for c, (i, s) in enumerate(zip(prompts, ids, strict=True))
        ]
        return recs, n

    res: dict[str, Any] = {
        "kind": "transformers",
        "transformers": transformers.__version__,
        "threads": HF_THREADS,
        "startup_s": startup,
        "runs": {},
    }
    kmax = max(args.concurrency)
    for k in (kmax, 1):  # warm-up
        batch([prompt_index(c, 0, k) for c in range(k)], 8, time.perf_counter())
    for k in args.concurrency:
        load_before = wait_quiet(args.quiet_wait, {"transformers": os.getpid()})
        cpu0 = cpu_seconds({"transformers": os.getpid()})
        t0 = time.perf_counter()
        recs: list[RequestRecord] = []
        for r in range(args.requests_per_client):
            recs += batch([prompt_index(c, r, k) for c in range(k)], args.max_tokens, t0)[0]
        wall = time.perf_counter() - t0
        summary = summarize(recs, wall)
        cpu1 = cpu_seconds({"transformers": os.getpid()})
        summary["other_load_before"] = load_before
        summary["cpu_s"] = {n: cpu1[n] - cpu0[n] for n in cpu0}
        summary["cpu_s"]["other_processes"] = summary["cpu_s"]["machine"] - summary["cpu_s"]["transformers"]
        res["runs"][str(k)] = {"summary": summary, "requests": [asdict(r) for r in recs]}
        print(f"[transformers] K={k}: {_brief(summary)}", file=sys.stderr, flush=True)
    res["prompt_tokens"] = [
        len(tok.encode(tok.apply_chat_template(messages_for(i)), add_special_tokens=False))
        for i in range(len(PROMPTS))
    ]
    import resource

    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return res


def run_child(system: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", system, "--model", MODEL, "--max-tokens", str(args.max_tokens)]
    cmd += ["--concurrency", ",".join(map(str, args.concurrency))]
    cmd += ["--requests-per-client", str(args.requests_per_client), "--quiet-wait", str(args.quiet_wait)]
    print(f"[{system}] running in a child process", file=sys.stderr, flush=True)
    limit = 3 * RUN_TIMEOUT_S
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, timeout=limit, check=False)
    except subprocess.TimeoutExpired:
        return {"kind": system, "error": f"timed out after {limit:.0f} s", "runs": {}}
    if proc.returncode != 0:
        return {"kind": system, "error": f"exit {proc.returncode}", "runs": {}}
    return dict(json.loads(proc.stdout.strip().splitlines()[-1]))


# ---- report ---------------------------------------------------------------------------------------
def agg(res: dict[str, Any], system: str, k: int, key: str) -> float | None:
    run = res["systems"].get(system, {}).get("runs", {}).get(str(k))
    return None if run is None else run["summary"].get(key)


LABELS = {
    "one": "pipeserve 1 node",
    "three": "pipeserve 3 nodes",
    "llama-server": "llama-server",
    "llama-rpc": "llama.cpp over RPC",
    "transformers": "transformers",
}
# The per-K ratios of aggregate tok/s the table shows (issue 23's serving targets are at some K).
PAIRS = [("one", "llama-server"), ("three", "one"), ("three", "llama-rpc")]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def ratios(res: dict[str, Any], kmin: int, kmax: int) -> dict[str, Any]:
    def tps(system: str, k: int) -> float | None:
        return agg(res, system, k, "agg_tok_s")

    # Real-size targets (issue 23), through the API, one run: 1 node against llama-server at 1 and
    # 16 streams; 3 nodes as shipped against 1 node at 1 stream and llama.cpp over RPC at 1, 4, 16.
    spec: list[tuple[str, float | None, str, float | None]] = [
        (f"agg tok/s at K={k}: {a} / {b}", ratio(tps(a, k), tps(b, k)), ">=", target)
        for a, b, ks, target in (
            ("one", "llama-server", (1, 16), 1.0),
            ("three", "one", (1,), 0.9),
            ("three", "llama-rpc", (1, 4, 16), 1.2),
        )
        for k in ks
    ]
    spec += [
        (
            f"three: agg tok/s at K={kmax} / at K={kmin}",
            ratio(agg(res, "three", kmax, "agg_tok_s"), agg(res, "three", kmin, "agg_tok_s")),
            ">=",
            8.0,
        ),
        (
            f"agg tok/s at K={kmax}: three / one",
            ratio(agg(res, "three", kmax, "agg_tok_s"), agg(res, "one", kmax, "agg_tok_s")),
            ">=",
            0.9,
        ),
        (
            f"agg tok/s at K={kmax}: three / transformers",
            ratio(agg(res, "three", kmax, "agg_tok_s"), agg(res, "transformers", kmax, "agg_tok_s")),
            ">=",
            3.0,
        ),
        (
            f"agg tok/s at K={kmax}: three / llama-server",
            ratio(agg(res, "three", kmax, "agg_tok_s"), agg(res, "llama-server", kmax, "agg_tok_s")),
            ">=",
            1.0,
        ),
        (
            f"agg tok/s at K={kmax}: three / llama.cpp over RPC",
            ratio(agg(res, "three", kmax, "agg_tok_s"), agg(res, "llama-rpc", kmax, "agg_tok_s")),
            ">=",
            1.0,
        ),
        (
            "three: total node RSS (MiB)",
            sum(
                v
                for n, v in res["systems"].get("three", {}).get("rss_mib", {}).items()
                if n.startswith("node")
            )
            or None,
            "<=",
            1024.0 if res["embedded_model"] else None,  # a target for SmolLM2 only
        ),
        (
            f"three: ITL p99 at K={kmax} / ITL p50 at K={kmin}",
            ratio(agg(res, "three", kmax, "itl_p99_ms"), agg(res, "three", kmin, "itl_p50_ms")),
            "<=",
            3.0,
        ),
        (
            f"one: ITL p99 at K={kmax} / ITL p50 at K={kmin}",
            ratio(agg(res, "one", kmax, "itl_p99_ms"), agg(res, "one", kmin, "itl_p50_ms")),
            "<=",
            3.0,
        ),
    ]
    out = {}
    for name, value, op, target in spec:
        if target is None:
            out[name] = {"value": value, "target": "", "met": None}
            continue
        ok = None if value is None else (value >= target if op == ">=" else value <= target)
        out[name] = {"value": value, "target": f"{op} {target:g}", "met": ok}
    return out


def headline(res: dict[str, Any]) -> list[str]:
    """Aggregate tok/s per K for every system side by side, the ratios issue 23 sets targets for
    (at every K), each system's resident memory after its runs, and what the clusters chose."""
    f = lambda v, d=1: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    systems = [s for s in LABELS if s in res["systems"]]
    pairs = [(a, b) for a, b in PAIRS if a in systems and b in systems]
    short = {"one": "1 node", "three": "3 nodes", "llama-rpc": "llama.cpp RPC"}
    lines = [
        f"Aggregate generated tok/s, {res['model']}, {res['max_tokens']} greedy tokens per request, "
        f"{res['requests_per_client']} request(s) per client:",
        "",
        "| K | "
        + " | ".join(LABELS[s] for s in systems)
        + "".join(f" | {short.get(a, a)} / {short.get(b, b)}" for a, b in pairs)
        + " |",
        "|---" * (1 + len(systems) + len(pairs)) + "|",
    ]
    for k in res["concurrency"]:
        cells = [f(agg(res, s, k, "agg_tok_s")) for s in systems]
        cells += [f(ratio(agg(res, a, k, "agg_tok_s"), agg(res, b, k, "agg_tok_s")), 2) for a, b in pairs]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    # every process of a system after its runs; transformers (one process): its peak
    rss = [
        sum(r["rss_mib"].values()) if r.get("rss_mib") else r.get("peak_rss_mib")
        for r in (res["systems"][s] for s in systems)
    ]
    lines.append(
        "| RSS after the runs, all processes (MiB; transformers: peak) | "
        + " | ".join(f(r, 0) for r in rss)
        + " |" * (len(pairs) + 1)
    )
    for s in ("one", "three"):
        if c := res["systems"].get(s, {}).get("chosen"):
            lines += ["", f"{LABELS[s]} ran {describe_choice(c)}."]
    return lines


def table(res: dict[str, Any]) -> str:
    f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"  # noqa: E731
    lines = [
        *headline(res),
        "",
        "| system | K | requests | errors | TTFT p50 (ms) | TTFT p99 (ms) | ITL p50 (ms) | ITL p99 (ms) "
        "| aggregate tok/s | req/s | other load (cores) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for system, r in res["systems"].items():
        if r.get("error") and not r.get("runs"):
            lines.append(f"| {system} | - | - | - | {r['error'][:80]} | | | | | | |")
            continue
        for k, run in r["runs"].items():
            s = run["summary"]
            lines.append(
                f"| {system} | {k} | {s['requests']} | {s['errors']} | {f(s['ttft_p50_ms'])} | "
                f"{f(s['ttft_p99_ms'])} | {f(s['itl_p50_ms'], 1)} | {f(s['itl_p99_ms'], 1)} | "
                f"{f(s['agg_tok_s'], 1)} | {f(s['req_s'], 2)} | {other_load(s):.2f} |"
            )
    mem = [
        f"{system} {sum(r['rss_mib'].values()):.0f} MiB ("
        + ", ".join(f"{n} {v:.0f}" for n, v in r["rss_mib"].items())
        + ")"
        for system, r in res["systems"].items()
        if r.get("rss_mib")
    ]
    if mem:
        lines += ["", "Resident memory after the runs: " + "; ".join(mem)]
    for system, r in res["systems"].items():
        nodes = [n for n in r.get("nodes", []) if n.get("cache_resident_bytes") is not None]
        if nodes and r.get("pss_mib"):
            node_pss = sum(v for n, v in r["pss_mib"].items() if n.startswith("node"))
            lines += [""]
            lines.append(
                f"{system}'s nodes: weights "
                + ", ".join(f"{n['id']} {n['weights_bytes'] / 2**20:.0f}" for n in nodes)
                + " MiB; KV-cache pages "
                + ", ".join(f"{n['id']} {n['cache_resident_bytes'] / 2**20:.0f}" for n in nodes)
                + f" MiB; total node PSS (shared pages split) {node_pss:.0f} MiB"
            )
    lines += ["", "| ratio | value | target | met |", "|---|---|---|---|"]
    for name, v in res["ratios"].items():
        met = "-" if v["met"] is None else ("yes" if v["met"] else "NO")
        lines.append(f"| {name} | {f(v['value'], 2)} | {v['target'] or '-'} | {met} |")
    breakdown = [
        (system, k, run["summary"]["per_token_ms"])
        for system, r in res["systems"].items()
        for k, run in r.get("runs", {}).items()
        if run["summary"].get("per_token_ms")
    ]
    if breakdown:
        lines += [
            "",
            "Per generated token, per stage (mean over requests; includes the prompt's prefill): "
            "compute on the node / RPC overhead (transfer + waiting at the node), ms:",
            "",
            "| system | K | " + " | ".join(f"part {p}" for p in range(3)) + " |",
            "|---|---|---|---|---|",
        ]
        for system, k, per in breakdown:
            cells = [f"{v['forward_ms']:.1f} / {v['hop_ms']:.1f}" for v in per.values()]
            lines.append(f"| {system} | {k} | " + " | ".join(cells + [""] * (3 - len(cells))) + " |")
    if study := res.get("thread_study"):
        lines += ["", "Thread study, 1-node cluster (1 request per client, 32 tokens):", ""]
        lines += [
            "| threads | K | aggregate tok/s | TTFT p50 (ms) | ITL p50 (ms) | ITL p99 (ms) |",
            "|---|---|---|---|---|---|",
        ]
        for threads, runs in study.items():
            for k, v in runs.items():
                if k == "error":
                    lines.append(f"| {threads} | error: {v} | | | | |")
                    continue
                lines.append(
                    f"| {threads} | {k} | {f(v['agg_tok_s'], 1)} | {f(v['ttft_p50_ms'])} | "
                    f"{f(v['itl_p50_ms'], 1)} | {f(v['itl_p99_ms'], 1)} |"
                )
    for note in res.get("notes", []):
        lines.append(f"\n- {note}")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for system, r in res["systems"].items():
        ks = sorted(int(k) for k in r.get("runs", {}))
        if not ks:
            continue
        tps = [r["runs"][str(k)]["summary"]["agg_tok_s"] for k in ks]
        ttft = [r["runs"][str(k)]["summary"]["ttft_p50_ms"] for k in ks]
        a.plot(ks, tps, marker="o", label=system)
        b.plot(ks, ttft, marker="o", label=system)
    for ax, title, ylabel in (
        (a, "Aggregate generated tokens/s", "tok/s"),
        (b, "Time to first token, p50", "ms"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_xticks(res["concurrency"], [str(k) for k in res["concurrency"]])
        ax.set_xlabel("concurrent streaming clients (K)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(
        f"pipeserve serving, {MODEL}, max_tokens={res['max_tokens']}, greedy, {res['machine']['cpus']} CPUs",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def machine_info() -> dict[str, Any]:
    import torch

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "machine": platform.machine(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_at_start": list(os.getloadavg()),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty_files": git("status", "--porcelain", "--untracked-files=no").splitlines(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def parse_overrides(spec: str) -> dict[str, int | str]:
    """`three=2,one=auto` -> {"three": 2, "one": "auto"}."""
    out: dict[str, int | str] = {}
    for item in filter(None, spec.split(",")):
        name, _, n = item.partition("=")
        out[name] = n if n == "auto" else int(n)
    return out


def main() -> None:
    global MODEL
    from pipeserve.common import env
    from pipeserve.common.model_files import EMBEDDED_MODEL, resolve_model

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--model", default=MODEL, help="model_name for every system (default: the embedded model)"
    )
    ap.add_argument(
        "--out", type=Path, default=None, help="default bench/serving.json (bench/serving-<model>.json)"
    )
    ap.add_argument("--plot", type=Path, default=None, help="default: --out with .png")
    ap.add_argument("--md", type=Path, default=None, help="markdown table (default: --out with .md)")
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated K values")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument(
        "--systems",
        default=None,
        help="comma-separated, of three,one,llama-server,llama-rpc,transformers (default: all; "
        "transformers only on the embedded model: the 1.5B model in fp32 needs ~7 GB and is very slow)",
    )
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument(
        "--threads",
        default="",
        help="override node threads per pipeserve system for a study, e.g. three=1,one=2 (default: none, "
        "the shipped node_defaults.threads=auto)",
    )
    ap.add_argument(
        "--micro-batches",
        default="",
        help="override coordinator.micro_batches per system for a study, e.g. three=2 (default: none, the "
        "shipped 0 = auto: one group when every node is on one host, one per part across hosts)",
    )
    ap.add_argument(
        "--quiet-wait",
        type=float,
        default=45.0,
        help="before each timed run, wait up to this many seconds for other processes to go quiet",
    )
    ap.add_argument(
        "--thread-study",
        action="store_true",
        help="first measure the 1-node cluster with 1 and 2 threads (K=1 and the largest K, short runs)",
    )
    ap.add_argument(
        "--batch-invariant",
        action="store_true",
        help="run the pipeserve systems with node_defaults.batch_invariant: true (default: the shipped false)",
    )
    ap.add_argument("--only", choices=["transformers"], help="run one baseline and print its JSON (internal)")
    args = ap.parse_args()
    args.concurrency = [int(k) for k in args.concurrency.split(",")]
    MODEL = args.model
    if args.only:
        print(json.dumps(bench_transformers(args)))
        return

    source = resolve_model(MODEL)
    embedded = source.name == EMBEDDED_MODEL
    out = args.out or Path("bench/serving.json" if embedded else f"bench/serving-{source.name}.json")
    systems = args.systems or "three,one,llama-server,llama-rpc" + (",transformers" if embedded else "")
    if unknown := set(systems.split(",")) - set(LABELS):
        ap.error(f"unknown system(s) {sorted(unknown)}: choose from {','.join(LABELS)}")
    threads = parse_overrides(args.threads)
    args.micro_batches_by_system = parse_overrides(args.micro_batches)
    res: dict[str, Any] = {
        "model": MODEL,
        "model_file": str(source.path),
        "model_bytes": source.path.stat().st_size if source.path.is_file() else None,
        "embedded_model": embedded,
        "command": [sys.executable, *sys.argv],
        "machine": machine_info(),
        # where pipeserve's coordinator detokenizes (PIPESERVE_DETOKENIZE=service: the tokenizer service)
        "detokenize": env.get("PIPESERVE_DETOKENIZE", "coordinator"),
        "concurrency": args.concurrency,
        "max_tokens": args.max_tokens,
        "requests_per_client": args.requests_per_client,
        "request": {"endpoint": "/v1/chat/completions", "stream": True, "temperature": 0, "ignore_eos": True},
        "prompts": PROMPTS,
        "prompt_assignment": "client c in round r of a K-client run sends prompt (r*K + c) % len(prompts)",
        "definitions": {
            "ttft": "request sent -> first non-empty content chunk (transformers: batch start -> first token)",
            "itl": "gap between consecutive content chunks of one request (transformers: decode step times)",
            "agg_tok_s": "completion tokens (usage) of all requests / wall time of the whole K-client run",
            "req_s": "successful requests / wall time of the run",
        },
        "systems": {},
        "notes": [],
    }
    t_all = time.perf_counter()
    if args.thread_study:
        res["thread_study"] = thread_study(args)
    for system in systems.split(","):
        if system in ("three", "one"):
            parts = 3 if system == "three" else 1
            res["systems"][system] = bench_cluster(system, parts, threads.get(system), args)
        elif system == "transformers":
            res["systems"][system] = run_child("transformers", args)
        else:
            res["systems"][system] = bench_llamacpp(system, system == "llama-rpc", args)
    res["total_s"] = time.perf_counter() - t_all
    res["ratios"] = ratios(res, min(args.concurrency), max(args.concurrency))
    if "transformers" in res["systems"]:
        res["prompt_tokens"] = res["systems"]["transformers"].get("prompt_tokens")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    plot(res, args.plot or out.with_suffix(".png"))
    md = table(res)
    (args.md or out.with_suffix(".md")).write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
