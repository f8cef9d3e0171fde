"""What a verification step costs by its rows (issue 26): one stream's decode step carrying its
next token and T - 1 drafts, T = 1..8, in one process on the whole model (`threads: auto`), after
a 40-token prompt; the fastest of 9 rounds over T = 1..8 in turn. Also checks that each row's logits equal, bit for
bit, those of one-token decoding (the kernels' guarantee up to 8 rows). Speculation pays when the
tokens a pass gives exceed the cost ratio T / 1.

    .venv/bin/python scripts/bench_verify_rows.py --model qwen2.5-coder-1.5b-instruct --out bench/spec-rows.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from pipeserve import kernels
from pipeserve.common.model_files import resolve_model
from pipeserve.common.threads import choose_threads, usable_cores
from pipeserve.modeling.engine import SeqChunk, StageEngine
from pipeserve.modeling.generate import GREEDY
from pipeserve.modeling.layers import set_lossy_int8
from pipeserve.modeling.loader import load_stage


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b-instruct")
    ap.add_argument("--out", type=Path, default=Path("bench/spec-rows.json"))
    ap.add_argument(
        "--rounds", type=int, default=9, help="rounds over T = 1..8; the fastest run per T counts"
    )
    ap.add_argument(
        "--threads", default="auto", help="the kernels' threads: auto (a lone node's choice) or a number"
    )
    ap.add_argument(
        "--lossy-int8",
        action="store_true",
        help="the opt-in int8 mode on every linear layer (a node's lossy_int8; not the default)",
    )
    args = ap.parse_args()
    cores, why = usable_cores()
    threads, reason = choose_threads(cores, 1, "auto" if args.threads == "auto" else int(args.threads), why)
    kernels.set_threads(threads)
    loaded = load_stage(resolve_model(args.model))
    lossy = set_lossy_int8(loaded.model, True) if args.lossy_int8 else None
    eng = StageEngine(loaded, 4096)
    prompt = list(range(100, 140))
    out = eng.forward([SeqChunk("a", 0, prompt, GREEDY)])
    toks, alone = [out.samples[0].token_id], []
    for i in range(8):  # one-token decoding: the reference logits
        out = eng.forward([SeqChunk("a", len(prompt) + i, [toks[-1]], GREEDY)])
        toks.append(out.samples[0].token_id)
        alone.append(out.logits[0].copy())
    # rounds over T = 1..8 in turn (a noisy host slows a round, not one T), the fastest per T
    times: dict[int, list[float]] = {T: [] for T in range(1, 9)}
    same: dict[int, bool] = {}
    for _ in range(args.rounds):
        for T in range(1, 9):
            eng.forward([SeqChunk("t", 0, prompt, GREEDY)])
            t0 = time.perf_counter()
            o = eng.forward([SeqChunk("t", len(prompt), toks[:T], GREEDY, n_draft=T - 1)])
            times[T].append((time.perf_counter() - t0) * 1e3)
            eng.release(["t"])
            same[T] = same.get(T, True) and bool(np.array_equal(o.logits, np.stack(alone[:T])))
    rows = {str(T): {"step_ms": round(min(times[T]), 2), "same_bits_as_alone": same[T]} for T in range(1, 9)}
    base = rows["1"]["step_ms"]
    for r in rows.values():
        r["cost_ratio"] = round(r["step_ms"] / base, 3)
    res = {
        "model": args.model,
        "prompt_tokens": len(prompt),
        "rounds": args.rounds,
        "kernel_isa": kernels.get_isa(),
        "lossy_int8_layers": None if lossy is None else {"int8": lossy[0], "linear": lossy[1]},
        "threads": threads,
        "threads_reason": reason,
        "rows": rows,
    }
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
