"""What the batch-invariant mode (`node_defaults.batch_invariant`, kernels.set_batch_invariant)
costs: one prefill chunk of L prompt tokens and one batched decode step of B streams, with the
mode off and on in the same process, taking turns round by round (the fastest of `--rounds` per
figure), on the whole model in one process (`threads: auto`). Also checks what the mode is for:
the logits of a prompt's last position prefilled beside another prompt equal the logits of the
prompt prefilled alone, bit for bit, with the mode on (and whether they do with it off).

    .venv/bin/python scripts/bench_batch_invariant.py --out bench/batch-invariant.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from pipeserve import kernels
from pipeserve.common.model_files import resolve_model
from pipeserve.common.threads import choose_threads, usable_cores
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, run_stages
from pipeserve.modeling.loader import load_stage

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serving import machine_info

PREFILL = (16, 64, 256)
STREAMS = (1, 4, 8, 9, 16, 32)
CONTEXT = 32  # each decoding stream's prompt


def same_bits(eng: StageEngine) -> bool:
    """A 40-token prompt's last logits prefilled beside a 23-token prompt equal those alone."""
    p, q = list(range(1000, 1040)), list(range(2000, 2023))
    alone = run_stages([eng], [SeqChunk("a", 0, p, GREEDY)])[0].copy()
    eng.release(["a"])
    beside = run_stages([eng], [SeqChunk("q", 0, q, GREEDY), SeqChunk("b", 0, p, GREEDY)])[1].copy()
    eng.release(["q", "b"])
    return bool(np.array_equal(alone, beside))


def measure(eng: StageEngine, rounds: int) -> dict[str, object]:
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
        return time.perf_counter() - t0

    best: dict[tuple[str, int, bool], float] = {}
    for on in (False, True):  # warm-up: first touches of the weights and scratch, untimed
        kernels.set_batch_invariant(on)
        prefill(PREFILL[-1])
        decode(STREAMS[-1])
    for _ in range(rounds):
        for on in (False, True):
            kernels.set_batch_invariant(on)
            for L in PREFILL:
                k = ("prefill", L, on)
                best[k] = min(best.get(k, 1e9), prefill(L))
            for B in STREAMS:
                k = ("decode", B, on)
                best[k] = min(best.get(k, 1e9), decode(B))
    eng.release(ids)
    bits = {}
    for on in (False, True):
        kernels.set_batch_invariant(on)
        bits["on" if on else "off"] = same_bits(eng)
    kernels.set_batch_invariant(False)
    out: dict[str, object] = {"prefill": [], "decode": [], "same_bits_beside_another_prompt": bits}
    for kind, sizes, label in (("prefill", PREFILL, "tokens"), ("decode", STREAMS, "streams")):
        rows = []
        for n in sizes:
            off, on = best[(kind, n, False)] * 1e3, best[(kind, n, True)] * 1e3
            rows.append(
                {
                    label: n,
                    "off_ms": round(off, 2),
                    "on_ms": round(on, 2),
                    "on_over_off": round(on / off, 3),
                    "tok_s_off": round(n / off * 1e3, 1),
                    "tok_s_on": round(n / on * 1e3, 1),
                }
            )
        out[kind] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="qwen2.5-coder-1.5b-instruct,smollm2-135m-instruct")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path("bench/batch-invariant.json"))
    args = ap.parse_args()
    cores, why = usable_cores()
    threads, reason = choose_threads(cores, 1, "auto", why)
    kernels.set_threads(threads)
    res = {
        "benchmark": "batch-invariant mode: off against on, same process, turns per round",
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
