"""What the kernels' pool loses to a descheduled worker: decode steps (1 and 16 streams) on the
whole model in one process, with a call ending when its items are done (now) against a call that
also waits for every worker to check in (`kernels.set_pool_wait_all`, the pool before), taking
turns round by round in the same process. Three conditions:

- quiet: nothing else runs;
- side load: another process busies one core in bursts of 0.3-1.5 ms for a share of the time
  (`--duty`), as the coordinator, tokenizer and API do beside a node on a small host (at one
  stream of SmolLM2 they took 2-3 ms of CPU per token between them on the Zen 4 VM, about a
  third of a core);
- oversubscribed: twice as many kernel threads as usable cores.

    .venv/bin/python scripts/bench_pool.py --out bench/pool-zen4.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import psutil

from pipeserve import kernels
from pipeserve.common.model_files import resolve_model
from pipeserve.common.threads import choose_threads, usable_cores
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY
from pipeserve.modeling.loader import load_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import machine_info

CONTEXT = 32  # each stream's prompt
STREAMS = (1, 16)
BURNER = """import random, sys, time
duty = float(sys.argv[1])
rng = random.Random(0)
while True:
    burst = rng.uniform(3e-4, 1.5e-3)
    t = time.perf_counter()
    while time.perf_counter() - t < burst:
        pass
    time.sleep(burst * (1 - duty) / duty)
"""


def steps_for(model: str, streams: int) -> int:
    """Decode steps per timed run: about a second of work on this kind of VM."""
    small = "smollm2" in model
    return {(True, 1): 150, (True, 16): 40, (False, 1): 25, (False, 16): 6}[(small, streams)]


def measure(eng: StageEngine, model: str, rounds: int) -> dict[tuple[int, bool], list[float]]:
    """Per (streams, wait_all): each round's median step (ms). Every timed run starts from the same
    prompts (prefilled untimed, released after), so later runs do not decode at longer contexts."""

    def run(B: int, n: int) -> float:
        ids = [f"s{i}" for i in range(B)]
        for i, sid in enumerate(ids):
            eng.forward([SeqChunk(sid, 0, list(range(200 + i, 200 + i + CONTEXT)), GREEDY)])
        ts = []
        for step in range(n):
            t0 = time.perf_counter()
            eng.forward([SeqChunk(sid, CONTEXT + step, [300 + i], GREEDY) for i, sid in enumerate(ids)])
            ts.append(time.perf_counter() - t0)
        eng.release(ids)
        return statistics.median(ts) * 1e3

    for B in STREAMS:  # warm-up
        run(B, 3)
    out: dict[tuple[int, bool], list[float]] = {}
    for _ in range(rounds):
        for wait_all in (True, False):
            kernels.set_pool_wait_all(wait_all)
            for B in STREAMS:
                out.setdefault((B, wait_all), []).append(run(B, steps_for(model, B)))
    kernels.set_pool_wait_all(False)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2-135m-instruct,qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--duty", type=float, default=0.3, help="the side load's share of one core")
    ap.add_argument("--out", type=Path, default=Path("bench/pool.json"))
    args = ap.parse_args()
    cores, why = usable_cores()
    threads, reason = choose_threads(cores, 1, "auto", why)
    res = {
        "benchmark": "kernel pool: a call ends when its items are done (now) / waits for every worker (before)",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(),
        "kernel_isa": kernels.get_isa(),
        "threads_auto": threads,
        "threads_reason": reason,
        "rounds": args.rounds,
        "decode_context_tokens": CONTEXT,
        "side_load_duty": args.duty,
        "rows": [],
    }
    conditions = (
        ("quiet", threads, 0.0),
        ("side load", threads, args.duty),
        ("oversubscribed", 2 * cores, 0.0),
    )
    for name in args.models.split(","):
        eng = StageEngine(load_stage(resolve_model(name)), 4096)
        for cond, n_threads, duty in conditions:
            kernels.set_threads(n_threads)
            burner = None
            if duty > 0:
                burner = subprocess.Popen([sys.executable, "-c", BURNER, str(duty)])
                time.sleep(0.5)
                proc = psutil.Process(burner.pid)
                cpu0, t0 = sum(proc.cpu_times()[:2]), time.perf_counter()
            try:
                got = measure(eng, name, args.rounds)
            finally:
                load = None
                if burner is not None:
                    load = (sum(proc.cpu_times()[:2]) - cpu0) / (time.perf_counter() - t0)
                    burner.kill()
                    burner.wait()
            for B in STREAMS:
                before, now = got[(B, True)], got[(B, False)]
                row = {
                    "model": name,
                    "condition": cond,
                    "threads": n_threads,
                    "side_load_cores": None if load is None else round(load, 3),
                    "streams": B,
                    "before_ms": round(statistics.median(before), 3),
                    "now_ms": round(statistics.median(now), 3),
                    "before_rounds_ms": [round(v, 3) for v in before],
                    "now_rounds_ms": [round(v, 3) for v in now],
                }
                row["before_over_now"] = round(row["before_ms"] / row["now_ms"], 3)
                res["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if "rounds" not in k}), flush=True)
        kernels.set_threads(threads)
        del eng
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
