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
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def step_timers(
    eng: StageEngine, streams: int
) -> tuple[Callable[[int], float], Callable[[int], float], list[str]]:
    """Timers of one forward: prefill(L) of an L-token prompt (released after), and decode(B), one
    step of the first B of `streams` streams, each holding a CONTEXT-token prompt (prefilled here,
    once; release the returned ids after)."""

    def prefill(L: int) -> float:
        t0 = time.perf_counter()
        eng.forward([SeqChunk("p", 0, list(range(100, 100 + L)), GREEDY)])
        dt = time.perf_counter() - t0
        eng.release(["p"])
        return dt

    ids = [f"s{i}" for i in range(streams)]
    for i, sid in enumerate(ids):  # the streams' contexts, once
        eng.forward([SeqChunk(sid, 0, list(range(200 + i, 200 + i + CONTEXT)), GREEDY)])

    def decode(B: int) -> float:
        t0 = time.perf_counter()
        eng.forward([SeqChunk(sid, CONTEXT, [300 + i], GREEDY) for i, sid in enumerate(ids[:B])])
        return time.perf_counter() - t0

    return prefill, decode, ids


def fastest(
    rounds: int,
    switch: Callable[[bool], None],
    order: tuple[bool, bool],
    prefill: Callable[[int], float],
    decode: Callable[[int], float],
    prefills: tuple[int, ...],
    streams: tuple[int, ...],
) -> dict[tuple[str, int, bool], float]:
    """The fastest of `rounds` of every prefill and decode size, with switch(on) for each `on` of
    `order` in turn within a round: {("prefill" | "decode", size, on): seconds}."""
    best: dict[tuple[str, int, bool], float] = {}
    for _ in range(rounds):
        for on in order:
            switch(on)
            for L in prefills:
                k = ("prefill", L, on)
                best[k] = min(best.get(k, 1e9), prefill(L))
            for B in streams:
                k = ("decode", B, on)
                best[k] = min(best.get(k, 1e9), decode(B))
    return best


def measure(eng: StageEngine, rounds: int) -> dict[str, list[dict[str, float]]]:
    prefill, decode, ids = step_timers(eng, max(STREAMS))

    best = fastest(rounds, kernels.set_tail_rows, (True, False), prefill, decode, PREFILL, STREAMS)
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
    run("partial last chunk: decode loops (split) against a whole chunk", ap.parse_args(), measure)


def run(benchmark: str, args: argparse.Namespace, measure: Callable[[StageEngine, int], object]) -> None:
    """A script's main (this one's, bench_batch_invariant's): kernel threads as `threads: auto`
    chooses them (and args.isa, if any), each of args.models whole in one process, measured by
    `measure(engine, args.rounds)`, all written to args.out."""
    cores, why = usable_cores()
    threads, reason = choose_threads(cores, 1, "auto", why)
    kernels.set_threads(threads)
    if getattr(args, "isa", None):
        kernels.set_isa(args.isa)
    res: dict[str, Any] = {
        "benchmark": benchmark,
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
        print(name, json.dumps(res["models"][name], indent=1), flush=True)
        del eng
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
