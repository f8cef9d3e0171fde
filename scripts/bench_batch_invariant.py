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
import sys
from pathlib import Path

import numpy as np

from pipeserve import kernels
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY, run_stages

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_tail_rows import fastest, run, step_timers

PREFILL = (16, 64, 256)
STREAMS = (1, 4, 8, 9, 16, 32)


def same_bits(eng: StageEngine) -> bool:
    """A 40-token prompt's last logits prefilled beside a 23-token prompt equal those alone."""
    p, q = list(range(1000, 1040)), list(range(2000, 2023))
    alone = run_stages([eng], [SeqChunk("a", 0, p, GREEDY)])[0].copy()
    eng.release(["a"])
    beside = run_stages([eng], [SeqChunk("q", 0, q, GREEDY), SeqChunk("b", 0, p, GREEDY)])[1].copy()
    eng.release(["q", "b"])
    return bool(np.array_equal(alone, beside))


def measure(eng: StageEngine, rounds: int) -> dict[str, object]:
    prefill, decode, ids = step_timers(eng, max(STREAMS))
    for on in (False, True):  # warm-up: first touches of the weights and scratch, untimed
        kernels.set_batch_invariant(on)
        prefill(PREFILL[-1])
        decode(STREAMS[-1])
    best = fastest(rounds, kernels.set_batch_invariant, (False, True), prefill, decode, PREFILL, STREAMS)
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
    run("batch-invariant mode: off against on, same process, turns per round", ap.parse_args(), measure)


if __name__ == "__main__":
    main()
