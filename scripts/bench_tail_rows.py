"""What a batched call's last, partial chunk of activation rows costs (kernels: rows past the last
whole chunk of 16 run in the decode loops, `set_tail_rows`): one prefill chunk of L prompt tokens,
and one batched decode step of B streams, with the split on and off in the same process, taking
turns round by round (the fastest of `--rounds` per figure), on the whole model in one process
(`threads: auto`).

    .venv/bin/python scripts/bench_tail_rows.py --out bench/tail-rows.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from pipeserve import kernels
from pipeserve.common.model_files import resolve_model
from pipeserve.common.threads import choose_threads, usable_cores
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY
from pipeserve.modeling.loader import load_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import machine_info

PREFILL = (9, 10, 12, 16, 17, 18, 20, 24, 32, 33, 36, 40, 64)
STREAMS = (9, 12, 16, 17, 18, 20, 24)
CONTEXT = 32  # each decoding stream's prompt


def measure(eng: StageEngine, rounds: int) -> dict[str, list[dict[str, float]]]:
    def prefill(L: int) -> float:
        t0 = time.perf_counter()
        eng.forward([SeqChunk("p", 0, list(range(100, 100 + L)), GREEDY)])
        dt = time.perf_counter() - t0
        eng.release(["p"])
        return dt

    ids = [f"s{i}" for i in range(max(STREAMS))]
    for i, sid in enumerate(ids):  # the streams' contexts, once
        eng.forward([SeqChunk(sid, 0, list(range(200 + i, 200 + i + CONTEXT)), GREEDY)])

    def decode(B: int) -> float:
        t0 = time.perf_counter()
        eng.forward([SeqChunk(sid, CONTEXT, [300 + i], GREEDY) for i, sid in enumerate(ids[:B])])
        dt = time.perf_counter() - t0
        return dt

    best: dict[tuple[str, int, bool], float] = {}
    for _ in range(rounds):
        for on in (True, False):
            kernels.set_tail_rows(on)
            for L in PREFILL:
                k = ("prefill", L, on)
                best[k] = min(best.get(k, 1e9), prefill(L))
            for B in STREAMS:
                k = ("decode", B, on)
                best[k] = min(best.get(k, 1e9), decode(B))
    kernels.set_tail_rows(True)
    eng.release(ids)
    out: dict[str, list[dict[str, float]]] = {"prefill": [], "decode": []}
    for kind, sizes, label in (("prefill", PREFILL, "tokens"), ("decode", STREAMS, "streams")):
        for n in sizes:
            on, off = best[(kind, n, True)] * 1e3, best[(kind, n, False)] * 1e3
            out[kind].append(
                {
                    label: n,
                    "rows": n,
                    "tail_rows": n % 16,
                    "split_ms": round(on, 2),
                    "chunk_ms": round(off, 2),
                    "speedup": round(off / on, 3),
                }
            )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument(
        "--isa", default=None, help="force a kernel path (avx2, avx512): default the best this CPU runs"
    )
    ap.add_argument("--out", type=Path, default=Path("bench/tail-rows.json"))
    args = ap.parse_args()
    cores, why = usable_cores()
    threads, reason = choose_threads(cores, 1, "auto", why)
    kernels.set_threads(threads)
    if args.isa:
        kernels.set_isa(args.isa)
    res = {
        "benchmark": "partial last chunk: decode loops (split) against a whole chunk",
        "command": " ".join(["python", *sys.argv]),
        "machine": machine_info(),
        "kernel_isa": kernels.get_isa(),
        "threads": threads,
        "threads_reason": reason,
        "rounds": args.rounds,
        "decode_context_tokens": CONTEXT,
        "models": {},
    }
    for name in args.models.split(","):
        eng = StageEngine(load_stage(resolve_model(name)), 4096)
        res["models"][name] = measure(eng, args.rounds)
        print(name, json.dumps(res["models"][name], indent=1))
        del eng
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
