"""Speculative-decoding benchmark (issue 26, `make bench-spec`): tokens/s with and without drafts.

Two chat-templated prompt sets through `/v1/chat/completions` with SSE streaming, greedy, ending at
EOS or a fixed `max_tokens` (no `ignore_eos`): code editing (a 25-50 line Python snippet and an edit
whose answer repeats most of it: prompt lookup's best case) and open chat (bench_serving's
questions: little to look up). Systems (`--systems`):

- `loopback`: pipeserve, 3 node processes on 127.0.0.x (ProcessCluster), the shipped default config
  (bench_serving.cluster_config(3): `coordinator.speculative` = ngram, max_draft 7).
- `hosts-5ms`: the same 3 nodes in network namespaces ("hosts", tests/netns.py) with a delay proxy
  adding +5 ms one way to every link, as bench_hosts does; needs root (skipped with the reason).
- `llama-server`: the same GGUF, `-t 2`, `-np K`, once without speculation and once with its
  n-gram self-speculation (`--spec-type ngram-simple`, lookup of the last 3 tokens, drafts of up
  to 7: the closest match to pipeserve's prompt lookup); llama-server has no per-request switch,
  so each is its own server process.

Every pipeserve row runs WITH and WITHOUT speculation on the same warm cluster (`"speculative":
false` on the request opts one out): at 1 stream each prompt once per mode, one after another
(modes alternating, so drift hits both alike), per-stream tok/s = completion tokens / (last
content chunk - first content chunk) and end to end; at 16 concurrent streams (each client cycles
the set's prompts) aggregate tok/s = all completion tokens / wall time. The greedy text with
speculation is checked against the text without, per prompt and per row; tokens per pass and
acceptance come from the final chunk's `pipeserve.speculative`. Writes the raw figures to
bench/spec.json and a markdown table generated from them to bench/spec.md (`--out`).

`--quick`: SmolLM2-135M, 2 prompts per set, short answers, K = 1 and 4, no namespaces (smoke test).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
sys.path.insert(0, str(SCRIPTS))  # bench_serving
sys.path.insert(0, str(REPO))  # tests.netns
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Children started in the namespaces (`python -m tests.netns proxy`) must find the repository.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

import bench_serving as bs  # noqa: E402

MODEL = "qwen2.5-coder-1.5b-instruct"
QUICK_MODEL = "smollm2-135m-instruct"
SYSTEMS = ("loopback", "hosts-5ms", "llama-server")
# llama-server's prompt-lookup speculation in the vendored version (common/arg.cpp, --spec-type
# and --spec-ngram-simple-*; common/ngram-map.cpp, common_ngram_simple_draft): the last N tokens
# are looked up in the slot's history and the M tokens that followed are drafted.
LLAMA_SPEC_ARGS = "--spec-type ngram-simple --spec-ngram-simple-size-n 3 --spec-ngram-simple-size-m 7"
HOSTS_PORT = 8000
CLIENT_TIMEOUT_S = 4 * 3600.0  # the whole client run inside the namespaces (guards a hang only)

# ---- the prompt sets ----------------------------------------------------------------------------
_ORDERS = '''from dataclasses import dataclass


@dataclass
class LineItem:
    sku: str
    quantity: int
    unit_price: float
    discount: float = 0.0


def calc(items, tax_rate=0.2):
    """Return the total of an order; calc applies each item's discount before tax."""
    subtotal = 0.0
    for item in items:
        price = item.unit_price * (1 - item.discount)
        subtotal += price * item.quantity
    return round(subtotal * (1 + tax_rate), 2)


def cheapest_item(items):
    return min(items, key=lambda item: item.unit_price)


def summarize_order(order_id, items):
    total = calc(items)
    untaxed = calc(items, tax_rate=0.0)
    lines = [f"Order {order_id}: {len(items)} items"]
    for item in items:
        lines.append(f"  {item.sku} x{item.quantity} @ {item.unit_price:.2f}")
    lines.append(f"Total before tax: {untaxed:.2f}")
    lines.append(f"Total: {total:.2f}")
    return "\\n".join(lines)


if __name__ == "__main__":
    order = [LineItem("A-100", 2, 9.99), LineItem("B-220", 1, 24.50, discount=0.1)]
    print(summarize_order(42, order))
    print("Cheapest:", cheapest_item(order).sku, "for", calc([cheapest_item(order)]))
'''

_LOGS = """import re
from collections import Counter, defaultdict
from datetime import datetime

LINE_RE = re.compile(r"^(\\S+) (\\S+) \\[(\\w+)\\] (.*)$")


def parse_line(line):
    match = LINE_RE.match(line.strip())
    if match is None:
        return None
    date, time_, level, message = match.groups()
    stamp = datetime.fromisoformat(f"{date}T{time_}")
    return stamp, level, message


def read_log(path):
    entries = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            parsed = parse_line(line)
            if parsed is not None:
                entries.append(parsed)
    return entries


def count_levels(entries):
    return Counter(level for _, level, _ in entries)


def errors_by_hour(entries):
    buckets = defaultdict(list)
    for stamp, level, message in entries:
        if level == "ERROR":
            buckets[stamp.replace(minute=0, second=0, microsecond=0)].append(message)
    return dict(buckets)


def first_error(entries, since=None):
    for stamp, level, message in entries:
        if level == "ERROR" and (since is None or stamp >= since):
            return stamp, message
    return None
"""

_VECTORS = """import math


class Vector:
    def __init__(self, x, y):
        self.x = x
        self.y = y

    def __add__(self, other):
        return Vector(self.x + other.x, self.y + other.y)

    def __sub__(self, other):
        return Vector(self.x - other.x, self.y - other.y)

    def scale(self, factor):
        return Vector(self.x * factor, self.y * factor)

    def length(self):
        return math.hypot(self.x, self.y)

    def normalized(self):
        n = self.length()
        if n == 0:
            raise ValueError("cannot normalize the zero vector")
        return self.scale(1 / n)


def dot(a, b):
    return a.x * b.x + a.y * b.y


def angle_between(a, b):
    cos = dot(a, b) / (a.length() * b.length())
    return math.acos(max(-1.0, min(1.0, cos)))


def centroid(points):
    total = Vector(0, 0)
    for p in points:
        total = total + p
    return total.scale(1 / len(points))
"""

_BACKUP = """import os
import shutil
import sys
import time


def find_files(root, extensions):
    found = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if os.path.splitext(name)[1].lower() in extensions:
                found.append(os.path.join(dirpath, name))
    print(f"Found {len(found)} files under {root}")
    return found


def copy_files(files, root, target):
    copied = 0
    for path in files:
        dest = os.path.join(target, os.path.relpath(path, root))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        try:
            shutil.copy2(path, dest)
            copied += 1
        except OSError as exc:
            print(f"Could not copy {path}: {exc}")
    print(f"Copied {copied} of {len(files)} files to {target}")
    return copied


def main():
    if len(sys.argv) != 3:
        print("usage: backup.py SOURCE TARGET")
        sys.exit(2)
    source, target = sys.argv[1], sys.argv[2]
    start = time.time()
    print(f"Backing up {source} to {target}")
    files = find_files(source, {".txt", ".md", ".py", ".json"})
    if not files:
        print("Nothing to back up")
        return
    copy_files(files, source, target)
    print(f"Done in {time.time() - start:.1f} s")


if __name__ == "__main__":
    main()
"""

CODE_PROMPTS: list[str] = [
    "Rename the function `calc` to `compute_order_total` everywhere in this module: its definition, "
    "every call and its docstring. Change nothing else. Reply with the complete updated module in one "
    f"Python code block.\n\n```python\n{_ORDERS}```",
    "Add type hints to every function in this module (parameters and return types; use `X | None` "
    "where a function can return None). Keep the code otherwise unchanged. Reply with the complete "
    f"updated module in one Python code block.\n\n```python\n{_LOGS}```",
    "Add a short docstring to the class and to each function and method in this module. Do not change "
    "any code. Reply with the complete updated module in one Python code block.\n\n"
    f"```python\n{_VECTORS}```",
    "Replace every print call in this script with the logging module: a module-level "
    "`logger = logging.getLogger(__name__)`, `logger.info` for progress, `logger.warning` for a failed "
    "copy, `logger.error` for the usage message, and `logging.basicConfig(level=logging.INFO)` at the "
    "start of main(). Keep everything else unchanged. Reply with the complete updated script in one "
    f"Python code block.\n\n```python\n{_BACKUP}```",
]
# Open questions from bench_serving (the refrigerator, the dinner, the French Revolution, the CSV script).
CHAT_PROMPTS: list[str] = [bs.PROMPTS[i] for i in (2, 3, 4, 5)]
SET_LABELS = {"code": "code editing", "chat": "open chat"}


# ---- one streamed request -------------------------------------------------------------------------
@dataclass
class SpecRecord(bs.RequestRecord):
    """bench_serving's record plus the text, the mode and the speculative counts."""

    mode: str = ""  # "off" (without speculation) or "on"
    first_s: float | None = None  # first / last non-empty content chunk, from the run's start
    last_s: float | None = None
    text_sha: str | None = None  # the generated text's sha1 (the texts are kept once per system)
    finish_reason: str | None = None
    speculative: dict[str, Any] | None = None  # pipeserve: the final chunk's pipeserve.speculative
    llama_timings: dict[str, Any] | None = None  # llama-server: the final chunk's timings (drafts)

    @property
    def stream_tok_s(self) -> float | None:
        if self.error or self.first_s is None or self.last_s is None or self.last_s <= self.first_s:
            return None
        return self.completion_tokens / (self.last_s - self.first_s)


async def stream_chat(
    client: Any,
    rec: SpecRecord,
    prompt: str,
    max_tokens: int,
    extra: dict[str, Any],
    t0: float,
    texts: dict[str, str],
) -> None:
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
    } | extra
    parts: list[str] = []
    try:
        async for event in bs.sse_events(client, body, rec):
            now = time.perf_counter() - t0
            for choice in event.get("choices", []):
                if content := (choice.get("delta") or {}).get("content"):
                    parts.append(content)
                    rec.chunks += 1
                    if rec.first_s is None:
                        rec.first_s, rec.ttft_s = now, now - rec.start_s
                    else:
                        rec.gaps_s.append(now - (rec.last_s or now))
                    rec.last_s = now
                rec.finish_reason = choice.get("finish_reason") or rec.finish_reason
            if info := event.get("pipeserve"):
                rec.speculative = info.get("speculative")
                rec.pipeserve = bs.pipeserve_summary(info)
            if timings := event.get("timings"):
                keys = ("predicted_n", "predicted_ms", "draft_n", "draft_n_accepted")
                rec.llama_timings = {k: timings[k] for k in keys if k in timings}
            if usage := event.get("usage"):
                rec.completion_tokens = usage["completion_tokens"]
                rec.prompt_tokens = usage["prompt_tokens"]
        if rec.error:
            return
        rec.end_s = time.perf_counter() - t0
        text = "".join(parts)
        rec.text_sha = hashlib.sha1(text.encode()).hexdigest()[:16]
        texts[rec.text_sha] = text
        if rec.completion_tokens == 0:
            rec.error = "the stream ended without usage"
    except Exception as exc:  # a benchmark records every failure and carries on
        rec.error = f"{type(exc).__name__}: {exc}"[:300]


def _client(base_url: str, k: int) -> Any:
    import httpx

    return httpx.AsyncClient(
        base_url=base_url,
        limits=httpx.Limits(max_connections=k + 4, max_keepalive_connections=k + 4),
        timeout=httpx.Timeout(bs.REQUEST_TIMEOUT_S, connect=10.0),
        trust_env=False,  # never route loopback traffic through a proxy from the environment
    )


async def _one(
    client: Any, rec: SpecRecord, prompt: str, max_tokens: int, extra: dict, t0: float, texts: dict
) -> None:
    try:
        await asyncio.wait_for(
            stream_chat(client, rec, prompt, max_tokens, extra, t0, texts), bs.REQUEST_TIMEOUT_S
        )
    except TimeoutError:
        rec.error = f"timed out after {bs.REQUEST_TIMEOUT_S:.0f} s"


async def run_single(
    base_url: str, prompts: list[str], max_tokens: int, modes: dict[str, dict], texts: dict[str, str]
) -> dict[str, tuple[list[SpecRecord], float]]:
    """1 stream: each prompt once per mode, one request at a time, the modes' order alternating
    from prompt to prompt. Each mode's wall time is the sum of its requests' times."""
    out: dict[str, tuple[list[SpecRecord], float]] = {m: ([], 0.0) for m in modes}
    async with _client(base_url, 1) as client:
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            order = list(modes) if i % 2 == 0 else list(reversed(modes))
            for mode in order:
                rec = SpecRecord(client=0, prompt=i, start_s=time.perf_counter() - t0, mode=mode)
                await _one(client, rec, prompt, max_tokens, modes[mode], t0, texts)
                recs, wall = out[mode]
                recs.append(rec)
                out[mode] = (recs, wall + ((rec.end_s or time.perf_counter() - t0) - rec.start_s))
    return out


async def run_concurrent(
    base_url: str,
    prompts: list[str],
    max_tokens: int,
    k: int,
    rounds: int,
    mode: str,
    extra: dict,
    texts: dict,
) -> tuple[list[SpecRecord], float]:
    """K clients; client c sends prompts (c + r) % len(prompts) for r in 0..rounds-1, one after another."""
    records: list[SpecRecord] = []
    async with _client(base_url, k) as client:
        t0 = time.perf_counter()

        async def one_client(c: int) -> None:
            for r in range(rounds):
                i = (c + r) % len(prompts)
                rec = SpecRecord(client=c, prompt=i, start_s=time.perf_counter() - t0, mode=mode)
                records.append(rec)
                await _one(client, rec, prompts[i], max_tokens, extra, t0, texts)

        try:
            await asyncio.wait_for(asyncio.gather(*(one_client(c) for c in range(k))), bs.RUN_TIMEOUT_S)
        except TimeoutError:
            for rec in records:
                if rec.end_s is None and rec.error is None:
                    rec.error = f"run timed out after {bs.RUN_TIMEOUT_S:.0f} s"
        wall = time.perf_counter() - t0
    return records, wall


# ---- one system's measurement (pure HTTP: runs here, or inside the front namespace) ----------------
def spec_totals(recs: list[SpecRecord]) -> dict[str, Any]:
    """The requests' speculative counts summed: pipeserve's from pipeserve.speculative, llama-server's
    from its timings (draft_n, draft_n_accepted, predicted_n; passes derived: tokens - accepted)."""
    ps = [r.speculative for r in recs if r.speculative and not r.error]
    if ps:
        drafted = sum(s["drafted"] for s in ps)
        accepted = sum(s["accepted"] for s in ps)
        passes = sum(s["passes"] for s in ps)
        tokens = sum(s["tokens_per_pass"] * s["passes"] for s in ps)
        return {
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "passes": passes,
            "tokens_per_pass": tokens / passes if passes else None,
        }
    lt = [r.llama_timings for r in recs if r.llama_timings and not r.error]
    if lt:
        drafted = sum(t.get("draft_n", 0) for t in lt)
        accepted = sum(t.get("draft_n_accepted", 0) for t in lt)
        tokens = sum(t.get("predicted_n", 0) for t in lt)
        passes = tokens - accepted  # each step of a slot gives its token and the drafts it accepted
        return {
            "drafted": drafted,
            "accepted": accepted,
            "acceptance_rate": accepted / drafted if drafted else 0.0,
            "passes": passes,
            "tokens_per_pass": tokens / passes if passes > 0 else None,
        }
    return {}


def run_summary(recs: list[SpecRecord], wall: float) -> dict[str, Any]:
    s = bs.summarize(recs, wall)
    ok = [r for r in recs if not r.error]
    span = sum(r.last_s - r.first_s for r in ok if r.first_s is not None and r.last_s is not None)
    e2e = sum(r.end_s - r.start_s for r in ok if r.end_s is not None)
    s["stream_tok_s"] = s["completion_tokens"] / span if span > 0 else None
    s["e2e_tok_s"] = s["completion_tokens"] / e2e if e2e > 0 else None
    s["speculative"] = spec_totals(recs)
    s["finish_reasons"] = sorted({r.finish_reason or "?" for r in ok})
    return s


def measure(job: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then every set at every K in every mode, against one server (`job["base_url"]`).
    job: base_url, sets {name: {prompts, max_tokens}}, concurrency, rounds, modes {mode: request
    fields}, quiet_wait, pids (the system's processes: their CPU is not "other load")."""
    import httpx

    base, modes, pids = job["base_url"], job["modes"], {**job["pids"], "bench_client": os.getpid()}
    texts: dict[str, str] = {}
    out: dict[str, Any] = {"runs": {}, "texts": texts}
    t = time.perf_counter()
    kmax = max(job["concurrency"])
    # Warm-up (not timed): every prompt once in every mode (the prefix cache then holds each prompt
    # for both), then the largest batch, short answers.
    for name, st in job["sets"].items():
        for mode, extra in modes.items():
            res = asyncio.run(run_single(base, st["prompts"], 8, {mode: extra}, {}))
            if errs := [r.error for r in res[mode][0] if r.error]:
                raise RuntimeError(f"warm-up ({name}, {mode}) failed: {errs[:3]}")
        for mode, extra in modes.items():
            recs, _ = asyncio.run(run_concurrent(base, st["prompts"], 8, kmax, 1, mode, extra, {}))
            if errs := [r.error for r in recs if r.error]:
                raise RuntimeError(f"warm-up (K={kmax}, {name}, {mode}) failed: {errs[:3]}")
    out["warmup_s"] = time.perf_counter() - t
    out["cluster_before"] = _cluster_view(base)
    for si, (name, st) in enumerate(job["sets"].items()):
        runs = out["runs"].setdefault(name, {})
        for k in job["concurrency"]:
            load = bs.wait_quiet(job["quiet_wait"], pids)
            cpu0 = bs.cpu_seconds(pids)
            if k == 1:
                by_mode = asyncio.run(run_single(base, st["prompts"], st["max_tokens"], modes, texts))
            else:
                by_mode = {}
                order = list(modes) if si % 2 == 0 else list(reversed(modes))
                for mode in order:
                    by_mode[mode] = asyncio.run(
                        run_concurrent(
                            base, st["prompts"], st["max_tokens"], k, job["rounds"], mode, modes[mode], texts
                        )
                    )
            cpu1 = bs.cpu_seconds(pids)
            wall = sum(w for _, w in by_mode.values())
            other = (cpu1["machine"] - cpu0["machine"]) - sum(cpu1[n] - cpu0[n] for n in pids)
            runs[str(k)] = {"other_load_before": load, "other_load_during": other / wall if wall else None}
            for mode, (recs, w) in by_mode.items():
                summary = run_summary(recs, w)
                runs[str(k)][mode] = {"summary": summary, "requests": [_rec_json(r) for r in recs]}
                sp = summary["speculative"]
                print(
                    f"[{job['label']}] {name} K={k} {mode}: "
                    f"{_f(summary['stream_tok_s'] if k == 1 else summary['agg_tok_s'])} tok/s, "
                    f"tokens/pass {_f(sp.get('tokens_per_pass'), 2)}, acceptance {_f(sp.get('acceptance_rate'), 2)}, "
                    f"errors {summary['errors']}, wall {w:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    out["cluster_after"] = _cluster_view(base)
    if job.get("pipeserve"):
        out["chosen"] = bs.chosen(httpx.get(base + "/api/cluster", timeout=5.0, trust_env=False).json())
    out["measure_s"] = time.perf_counter() - t
    return out


def _rec_json(r: SpecRecord) -> dict[str, Any]:
    """A request's record, times rounded to microseconds (the JSON keeps every gap)."""
    d = asdict(r)
    for key in ("start_s", "ttft_s", "end_s", "first_s", "last_s"):
        if d[key] is not None:
            d[key] = round(d[key], 6)
    d["gaps_s"] = [round(g, 6) for g in d["gaps_s"]]
    d["stream_tok_s"] = r.stream_tok_s
    return d


def _cluster_view(base: str) -> dict[str, Any] | None:
    """pipeserve's coordinator counts from /api/cluster (None for llama-server)."""
    import httpx

    try:
        r = httpx.get(base + "/api/cluster", timeout=5.0, trust_env=False)
        if r.status_code != 200:
            return None
        coord = r.json().get("coordinator", {})
        keys = ("speculative_method", "speculative_max_draft", "speculative", "micro_batches")
        return {k: coord.get(k) for k in keys}
    except (httpx.HTTPError, ValueError):
        return None


def _f(v: float | None, d: int = 1) -> str:
    return "-" if v is None else f"{v:.{d}f}"


# ---- the systems ------------------------------------------------------------------------------
PIPESERVE_MODES = {"off": {"speculative": False}, "on": {}}


def _job(
    args: argparse.Namespace, label: str, base_url: str, pids: dict[str, int], **kw: Any
) -> dict[str, Any]:
    return {
        "label": label,
        "model": MODEL,
        "base_url": base_url,
        "sets": args.sets,
        "concurrency": kw.pop("concurrency", args.concurrency),
        "rounds": args.rounds,
        "modes": PIPESERVE_MODES,
        "quiet_wait": args.quiet_wait,
        "pids": pids,
        "pipeserve": True,
    } | kw


def bench_loopback(args: argparse.Namespace) -> dict[str, Any]:
    """pipeserve, 3 node processes on loopback, the shipped default config."""
    from pipeserve.launcher.procs import ProcessCluster

    cfg = bs.cluster_config(3)
    if args.lossy_int8:  # the opt-in lossy mode on every node (a study; the default is exact)
        nd = cfg.node_defaults.model_copy(update={"lossy_int8": True})
        cfg = cfg.model_copy(update={"node_defaults": nd})
    workdir = Path(tempfile.mkdtemp(prefix="bench-spec-loopback-"))
    base = f"http://127.0.0.1:{cfg.api.port}"
    out: dict[str, Any] = {
        "kind": "pipeserve",
        "nodes": 3,
        "links": "loopback",
        "config": cfg.model_dump(mode="json"),
        "speculative_config": cfg.coordinator.speculative.model_dump(mode="json"),
        "concurrency": args.concurrency,
    }
    print(f"[loopback] starting a 3-part cluster in {workdir}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    cluster = ProcessCluster(cfg, workdir, with_api=True)
    try:
        cluster.start(timeout_s=bs.READY_TIMEOUT_S)
        bs.wait_http_ready(base + "/ready", bs.READY_TIMEOUT_S)
        out["startup_s"] = time.perf_counter() - t
        pids = {n: p.pid for n, p in cluster.procs.items()}
        out |= measure(_job(args, "loopback", base, pids))
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"[loopback] FAILED: {out['error']}\n{cluster.log('coordinator')}", file=sys.stderr)
    finally:
        cluster.stop()
    out["wall_s"] = time.perf_counter() - t
    return out


def bench_hosts(args: argparse.Namespace) -> dict[str, Any]:
    """pipeserve, 3 nodes on namespace hosts with +delay ms one way per link (tests/netns.py, as
    bench_hosts): tokenizer, coordinator, API and the client on `front`, node i on `n<i>`. The client
    runs inside `front` (the test range is unreachable from here): this script with --client."""
    from tests.netns import Hosts, cluster_raw, start_cluster, unavailable_reason

    out: dict[str, Any] = {
        "kind": "pipeserve",
        "nodes": 3,
        "links": f"network namespaces, 1gbit tbf, delay proxy +{args.delay_ms:g} ms one way per link",
        "delay_ms_per_link": args.delay_ms,
        "concurrency": args.hosts_concurrency,
    }
    if reason := unavailable_reason():
        out["skipped"] = reason
        print(f"[hosts-5ms] skipped: {reason}", file=sys.stderr)
        return out
    t = time.perf_counter()
    hosts = None
    workdir = Path(tempfile.mkdtemp(prefix="bench-spec-hosts-"))
    try:
        hosts = Hosts(["front", "n1", "n2", "n3"], rate="1gbit")
        raw = cluster_raw(hosts)
        for n in raw["nodes"]:
            n.pop("threads", None)  # the shipped default (auto), as on loopback
        raw["model_name"] = MODEL
        raw["api"] = {"host": hosts.addr["front"], "port": HOSTS_PORT}
        raw["log_level"] = "WARNING"
        out["config"] = raw
        print(
            f"[hosts-5ms] starting a 3-node cluster on namespace hosts in {workdir}",
            file=sys.stderr,
            flush=True,
        )
        cfg_file = start_cluster(hosts, raw, workdir, args.delay_ms)
        py = [sys.executable, "-m", "pipeserve.cli"]
        hosts.spawn("front", [*py, "api", "--config", str(cfg_file)], workdir / "api.log")
        base = f"http://{hosts.addr['front']}:{HOSTS_PORT}"
        job = _job(
            args,
            "hosts-5ms",
            base,
            {f"p{i}": p.pid for i, p in enumerate(hosts.procs)},
            concurrency=args.hosts_concurrency,
        )
        job["result_file"] = str(workdir / "result.json")
        (workdir / "job.json").write_text(json.dumps(job))
        cmd = [
            "ip",
            "netns",
            "exec",
            "ps-front",
            sys.executable,
            __file__,
            "--client",
            str(workdir / "job.json"),
        ]
        run = subprocess.run(cmd, timeout=CLIENT_TIMEOUT_S, check=False)
        result = json.loads(Path(job["result_file"]).read_text()) if Path(job["result_file"]).exists() else {}
        if run.returncode != 0 and "error" not in result:
            result["error"] = f"the client in the front namespace exited {run.returncode}"
        out |= result
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        if hosts is not None:
            hosts.close()
    if "error" in out:
        log = workdir / "coordinator.log"
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        print(f"[hosts-5ms] FAILED: {out['error']}\n{tail}", file=sys.stderr)
    out["wall_s"] = time.perf_counter() - t
    return out


def client_main(job_file: Path) -> None:
    """Inside the front namespace: wait for the API, measure, write the result file."""
    job = json.loads(job_file.read_text())
    global MODEL
    MODEL = job.get("model", MODEL)
    t = time.perf_counter()
    result: dict[str, Any] = {}
    try:
        bs.wait_http_ready(job["base_url"] + "/ready", bs.READY_TIMEOUT_S)
        result["startup_s"] = time.perf_counter() - t
        result |= measure(job)
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    Path(job["result_file"]).write_text(json.dumps(result))
    if "error" in result:
        sys.exit(1)


def llama_server_bin() -> tuple[Path | None, str]:
    """llama-server from the cache (built by build_llamacpp.sh, ~15 min the first time)."""
    found = subprocess.run(
        ["bash", str(SCRIPTS / "build_llamacpp.sh")], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        return None, f"llama.cpp could not be built: {found.stderr[-300:]}"
    return Path(found.stdout.strip().splitlines()[-1]) / "llama-server", ""


def llama_ngram_support(server: Path, spec_args: list[str]) -> tuple[bool, str, str]:
    """(supported, version, what was found) from the binary's own --version and --help."""
    ver = subprocess.run([str(server), "--version"], capture_output=True, text=True, check=False, timeout=60)
    version = next((ln for ln in (ver.stdout + ver.stderr).splitlines() if ln.startswith("version")), "?")
    help_text = subprocess.run(
        [str(server), "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    text = help_text.stdout + help_text.stderr
    flags = [a for a in spec_args if a.startswith("--")]
    missing = [a for a in flags if a not in text]
    if "--spec-type" in spec_args:
        kind = spec_args[spec_args.index("--spec-type") + 1]
        if kind not in text:
            missing.append(f"--spec-type {kind}")
    if missing:
        return False, version, f"llama-server --help lists no {', '.join(missing)}"
    return True, version, f"llama-server --help lists {', '.join(flags)}"


def bench_llama(args: argparse.Namespace) -> dict[str, Any]:
    """llama-server on the same GGUF: per K a server with -np K, once without speculation and once
    with its n-gram self-speculation (its own process each: no per-request switch)."""
    import psutil

    t = time.perf_counter()
    out: dict[str, Any] = {"kind": "llama.cpp", "concurrency": args.concurrency, "servers": [], "runs": {}}
    server, why = llama_server_bin()
    if server is None:
        out["error"] = why
        return out
    spec_args = shlex.split(args.llama_spec)
    ok, version, found = llama_ngram_support(server, spec_args)
    out["version"] = version
    out["spec_args"] = spec_args if ok else []
    out["ngram"] = (
        f"{args.llama_spec} ({found}; vendored sources: common/arg.cpp --spec-type and "
        "--spec-ngram-simple-size-n/-m, common/ngram-map.cpp common_ngram_simple_draft)"
        if ok
        else f"not supported by llama-server {version}: {found}"
    )
    modes = {"off": [], "on": spec_args} if ok else {"off": []}
    texts: dict[str, str] = {}
    out["texts"] = texts
    for k in args.concurrency:
        for mode, extra_args in modes.items():
            port = bs.free_port("127.0.0.1")
            cmd = [*bs.llama_server_cmd(server, port, k, k * 2048), *extra_args]
            workdir = Path(tempfile.mkdtemp(prefix=f"bench-spec-llama-{k}-{mode}-"))
            log = open(workdir / "server.log", "wb")  # noqa: SIM115 - the process owns it until the end
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
            entry: dict[str, Any] = {"k": k, "mode": mode, "command": cmd, "log": str(workdir / "server.log")}
            out["servers"].append(entry)
            try:
                t0 = time.perf_counter()
                bs.wait_http_ready(f"http://127.0.0.1:{port}/health", bs.READY_TIMEOUT_S)
                entry["startup_s"] = time.perf_counter() - t0
                job = _job(
                    args,
                    f"llama-server -np {k}",
                    f"http://127.0.0.1:{port}",
                    {"server": proc.pid},
                    concurrency=[k],
                    modes={mode: {"stream_options": {"include_usage": True}}},
                    pipeserve=False,
                )
                res = measure(job)
                texts.update(res["texts"])
                for name, by_k in res["runs"].items():
                    run = out["runs"].setdefault(name, {}).setdefault(str(k), {})
                    run[mode] = by_k[str(k)][mode]
                    run[f"other_load_before_{mode}"] = by_k[str(k)]["other_load_before"]
                entry["rss_mib"] = psutil.Process(proc.pid).memory_info().rss / 2**20
                entry["measure_s"] = res["measure_s"]
            except Exception as exc:
                entry["error"] = f"{type(exc).__name__}: {exc}"
                out.setdefault("errors", []).append(f"-np {k} {mode}: {entry['error']}")
                print(f"[llama-server] -np {k} {mode} FAILED: {entry['error']}", file=sys.stderr)
            finally:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                log.close()
    out["wall_s"] = time.perf_counter() - t
    return out


# ---- rows, ratios, targets --------------------------------------------------------------------------
def tok_s(summary: dict[str, Any] | None, k: int) -> float | None:
    """The row's figure: per-stream tok/s at 1 stream, aggregate tok/s at K > 1."""
    if summary is None:
        return None
    return summary.get("stream_tok_s") if k == 1 else summary.get("agg_tok_s")


def identical_by_prompt(run: dict[str, Any], reference: dict[int, str]) -> dict[str, bool | None]:
    """Per prompt: every request's text in both modes is the same (and the same as `reference`,
    the 1-stream text without speculation, where there is one). None: a request failed."""
    out: dict[str, bool | None] = {}
    by_prompt: dict[int, set[str | None]] = {}
    failed: set[int] = set()
    for mode in ("off", "on"):
        for r in run.get(mode, {}).get("requests", []):
            if r["error"]:
                failed.add(r["prompt"])
            by_prompt.setdefault(r["prompt"], set()).add(r["text_sha"])
    for i in sorted(by_prompt):
        shas = by_prompt[i] | ({reference[i]} if i in reference else set())
        out[str(i)] = None if i in failed else len(shas) == 1
    return out


def rows(res: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per system, set and K: both modes' figures, their ratio, and pipeserve with
    speculation against the best llama-server row (same set and K)."""
    out = []
    llama = res["systems"].get("llama-server", {}).get("runs", {})
    for system, sres in res["systems"].items():
        for name, by_k in sres.get("runs", {}).items():
            reference: dict[int, str] = {}
            for r in by_k.get("1", {}).get("off", {}).get("requests", []):
                if not r["error"]:
                    reference[r["prompt"]] = r["text_sha"]
            for k_str, run in by_k.items():
                k = int(k_str)
                off = run.get("off", {}).get("summary")
                on = run.get("on", {}).get("summary")
                ident = identical_by_prompt(run, reference)
                row: dict[str, Any] = {
                    "system": system,
                    "set": name,
                    "k": k,
                    "metric": "per-stream tok/s" if k == 1 else "aggregate tok/s",
                    "tok_s_without": tok_s(off, k),
                    "tok_s_with": tok_s(on, k),
                    "e2e_tok_s_without": off["e2e_tok_s"] if off and k == 1 else None,
                    "e2e_tok_s_with": on["e2e_tok_s"] if on and k == 1 else None,
                    "completion_tokens": [s and s["completion_tokens"] for s in (off, on)],
                    "errors": sum(s["errors"] for s in (off, on) if s),
                    "speculative": on["speculative"] if on else {},
                    "speculative_without": off["speculative"] if off else {},
                    "identical_per_prompt": ident,
                    "identical": None if not ident or None in ident.values() else all(ident.values()),
                }
                row["with_over_without"] = bs.ratio(row["tok_s_with"], row["tok_s_without"])
                row["e2e_with_over_without"] = bs.ratio(row["e2e_tok_s_with"], row["e2e_tok_s_without"])
                if sres.get("kind") == "pipeserve":
                    lrun = llama.get(name, {}).get(k_str, {})
                    best = [v for v in (tok_s(lrun.get(m, {}).get("summary"), k) for m in ("off", "on")) if v]
                    row["llama_server_best_tok_s"] = max(best) if best else None
                    row["with_over_llama_server_best"] = bs.ratio(
                        row["tok_s_with"], row["llama_server_best_tok_s"]
                    )
                out.append(row)
    return out


def targets(res: dict[str, Any]) -> list[dict[str, Any]]:
    """Issue 26's targets, computed (never tuned for): with/without speculation per row."""
    kmax = max(res["concurrency"])
    spec: list[tuple[str, str, str, int, str, float | bool]] = []  # name, system, set, k, op, target
    for row in res["rows"]:
        if res["systems"][row["system"]].get("kind") != "pipeserve":
            continue
        sys_, set_, k = row["system"], row["set"], row["k"]
        where = f"{sys_} {SET_LABELS.get(set_, set_)} K={k}"
        if k == 1 and set_ == "code":
            spec.append(
                (f"{where}: with / without", sys_, set_, k, ">=", 2.5 if sys_ == "hosts-5ms" else 2.0)
            )
        elif k == 1:
            spec.append((f"{where}: with / without", sys_, set_, k, ">=", 1.0))
        elif k == kmax:
            spec.append((f"{where}: with / without", sys_, set_, k, ">=", 0.95))
        spec.append((f"{where}: identical text", sys_, set_, k, "==", True))
    by_key = {(r["system"], r["set"], r["k"]): r for r in res["rows"]}
    out = []
    for name, sys_, set_, k, op, target in spec:
        row = by_key[(sys_, set_, k)]
        value = row["identical"] if op == "==" else row["with_over_without"]
        met = None if value is None else (value is target if op == "==" else value >= target)
        out.append({"name": name, "value": value, "target": f"{op} {target}", "met": met})
    return out


# ---- the markdown ------------------------------------------------------------------------------------
def table(res: dict[str, Any]) -> str:
    f = _f
    sets = ", ".join(
        f"{SET_LABELS.get(n, n)} {len(s['prompts'])} prompts x {s['max_tokens']} max tokens"
        for n, s in res["sets"].items()
    )
    lines = [
        f"Speculative decoding, {res['model']}: {sets}; greedy, chat template, ends at EOS or max_tokens; "
        f"K > 1: {res['rounds_per_client']} request(s) per client. tok/s: per stream (tokens / first to "
        "last token) at K = 1, aggregate (all tokens / wall time) at K > 1; e2e: tokens / request time "
        "at K = 1. pipeserve: with and without `speculative` on the same cluster; llama-server: without, "
        "and with its n-gram speculation (a server each).",
        "",
        "| system | set | K | tok/s without | tok/s with | with / without | e2e without | e2e with | e2e ratio "
        "| tokens/pass | acceptance | identical | with / llama-server best | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        sp = r["speculative"]
        ident = {True: "yes", False: "NO", None: "-"}[r["identical"]]
        lines.append(
            f"| {r['system']} | {SET_LABELS.get(r['set'], r['set'])} | {r['k']} | {f(r['tok_s_without'])} | "
            f"{f(r['tok_s_with'])} | {f(r['with_over_without'], 2)} | {f(r['e2e_tok_s_without'])} | "
            f"{f(r['e2e_tok_s_with'])} | {f(r['e2e_with_over_without'], 2)} | {f(sp.get('tokens_per_pass'), 2)} | "
            f"{f(sp.get('acceptance_rate'), 2)} | {ident} | {f(r.get('with_over_llama_server_best'), 2)} | {r['errors']} |"
        )
    lines += ["", "| target | value | target | met |", "|---|---|---|---|"]
    for t in res["targets"]:
        v = t["value"]
        value = "-" if v is None else (("yes" if v else "no") if isinstance(v, bool) else f"{v:.2f}")
        met = "-" if t["met"] is None else ("yes" if t["met"] else "NO")
        lines.append(f"| {t['name']} | {value} | {t['target']} | {met} |")
    notes = []
    for system, s in res["systems"].items():
        if s.get("skipped"):
            notes.append(f"{system}: skipped: {s['skipped']}")
        if s.get("error"):
            notes.append(f"{system}: FAILED: {s['error'][:300]}")
        for e in s.get("errors", []):
            notes.append(f"{system}: {e[:300]}")
        if c := s.get("chosen"):
            notes.append(f"{system} ran {bs.describe_choice(c)}")
        if (after := s.get("cluster_after")) and after.get("speculative"):
            sp = after["speculative"]
            notes.append(
                f"{system}: coordinator.speculative {after.get('speculative_method')}, max_draft "
                f"{after.get('speculative_max_draft')}; cluster totals {sp['drafted']} drafted, {sp['accepted']} "
                f"accepted, {sp['passes']} passes, {sp['tokens_per_pass']:.2f} tokens/pass"
            )
        if s.get("concurrency") and s.get("runs"):
            notes.append(
                f"{system}: K = {', '.join(map(str, s['concurrency']))}; wall {s.get('wall_s', 0):.0f} s"
            )
        if system == "llama-server" and s.get("ngram"):
            notes.append(f"llama-server {s.get('version', '')}: n-gram speculation {s['ngram']}")
    notes.append(f"total wall {res.get('total_s', 0):.0f} s; git {res['machine']['git_commit'][:12]}")
    lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


# ---- main ------------------------------------------------------------------------------------------
def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help=f"model_name (default {MODEL}; --quick: {QUICK_MODEL})")
    ap.add_argument(
        "--quick", action="store_true", help="smoke test: SmolLM2, 2 prompts per set, K=1,4, no namespaces"
    )
    ap.add_argument("--systems", default=None, help=f"comma-separated, of {','.join(SYSTEMS)} (default: all)")
    ap.add_argument(
        "--out", type=Path, default=Path("bench/spec.json"), help="JSON; the markdown goes next to it (.md)"
    )
    ap.add_argument("--concurrency", default=None, help="K values (default 1,16; --quick 1,4)")
    ap.add_argument(
        "--hosts-concurrency", default=None, help="K values on the namespace hosts (default: --concurrency)"
    )
    ap.add_argument(
        "--rounds", type=int, default=None, help="requests per client at K > 1 (default: prompts per set)"
    )
    ap.add_argument("--code-max-tokens", type=int, default=None, help="default 192 (--quick 64)")
    ap.add_argument("--chat-max-tokens", type=int, default=None, help="default 96 (--quick 32)")
    ap.add_argument(
        "--delay-ms", type=float, default=5.0, help="one-way delay per link on the namespace hosts"
    )
    ap.add_argument(
        "--lossy-int8",
        action="store_true",
        help="loopback only: the opt-in int8 mode on every node (a tuned setting, not the default)",
    )
    ap.add_argument("--llama-spec", default=LLAMA_SPEC_ARGS, help="llama-server's speculation flags")
    ap.add_argument(
        "--quiet-wait", type=float, default=None, help="wait up to this long for a quiet machine (45 s)"
    )
    ap.add_argument("--render", type=Path, default=None, help="only write the markdown of an existing JSON")
    ap.add_argument("--client", type=Path, default=None, help=argparse.SUPPRESS)  # inside the front namespace
    args = ap.parse_args()
    if args.client:
        client_main(args.client)
        return
    if args.render:
        res = json.loads(args.render.read_text())
        args.render.with_suffix(".md").write_text(table(res) + "\n")
        print(table(res))
        return
    quick = args.quick
    MODEL = args.model or (QUICK_MODEL if quick else MODEL)
    bs.MODEL = MODEL
    n_prompts = 2 if quick else 4
    args.sets = {
        "code": {
            "prompts": CODE_PROMPTS[:n_prompts],
            "max_tokens": args.code_max_tokens or (64 if quick else 192),
        },
        "chat": {
            "prompts": CHAT_PROMPTS[:n_prompts],
            "max_tokens": args.chat_max_tokens or (32 if quick else 96),
        },
    }
    args.concurrency = [int(k) for k in (args.concurrency or ("1,4" if quick else "1,16")).split(",")]
    args.hosts_concurrency = (
        [int(k) for k in args.hosts_concurrency.split(",")] if args.hosts_concurrency else args.concurrency
    )
    args.rounds = args.rounds or n_prompts
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else (5.0 if quick else 45.0)
    systems = (
        args.systems or (",".join(s for s in SYSTEMS if s != "hosts-5ms") if quick else ",".join(SYSTEMS))
    ).split(",")
    if unknown := set(systems) - set(SYSTEMS):
        ap.error(f"unknown system(s) {sorted(unknown)}: choose from {','.join(SYSTEMS)}")

    from pipeserve.common.model_files import resolve_model

    source = resolve_model(MODEL)
    res: dict[str, Any] = {
        "benchmark": "speculative decoding (issue 26)",
        "model": MODEL,
        "model_file": str(source.path),
        "model_bytes": source.path.stat().st_size if source.path.is_file() else None,
        "quick": quick,
        "command": [sys.executable, *sys.argv],
        "machine": bs.machine_info(),
        "sets": args.sets,
        "concurrency": args.concurrency,
        "rounds_per_client": args.rounds,
        "request": {
            "endpoint": "/v1/chat/completions",
            "stream": True,
            "temperature": 0,
            "ignore_eos": False,
        },
        "modes": {
            "pipeserve": {"off": PIPESERVE_MODES["off"], "on": "the coordinator's speculative setting"},
            "llama-server": {"off": "no speculation flags", "on": args.llama_spec},
        },
        "definitions": {
            "stream_tok_s": "K=1: completion tokens / (last content chunk - first content chunk), summed over "
            "the set's prompts (token-weighted)",
            "e2e_tok_s": "K=1: completion tokens / (request sent -> stream end), summed over the prompts",
            "agg_tok_s": "K>1: completion tokens of all requests / wall time of the K-client run",
            "identical": "per prompt, every request's text in both modes equals the 1-stream text without "
            "speculation",
            "with_over_llama_server_best": "pipeserve with speculation / the better of llama-server's two "
            "rows (same set, same K, same metric)",
        },
        "prompt_assignment": "K=1: every prompt once per mode, modes alternating first; K>1: client c sends "
        "prompt (c + r) % n in its r-th request",
        "systems": {},
    }
    t_all = time.perf_counter()
    for system in systems:
        if system == "loopback":
            res["systems"][system] = bench_loopback(args)
        elif system == "hosts-5ms":
            res["systems"][system] = bench_hosts(args)
        else:
            res["systems"][system] = bench_llama(args)
    if quick and "hosts-5ms" not in systems:
        res["systems"]["hosts-5ms"] = {"kind": "pipeserve", "skipped": "--quick runs no namespaces"}
    res["total_s"] = time.perf_counter() - t_all
    res["rows"] = rows(res)
    res["ratios"] = {
        f"{r['system']}/{r['set']}/K={r['k']}": {
            key: r.get(key)
            for key in ("with_over_without", "e2e_with_over_without", "with_over_llama_server_best")
        }
        for r in res["rows"]
    }
    res["targets"] = targets(res)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    md = table(res)
    args.out.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
