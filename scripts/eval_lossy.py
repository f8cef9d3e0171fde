"""Quality and speed of the opt-in lossy int8 mode (`lossy_int8`) against the exact path, one process.

For each model: 20 prompts (10 code, 10 prose) are scored by both modes in one prefill each; at
every position the exact and lossy next-token distributions are compared: top-1 agreement (argmax
equal) and KL(exact || lossy), in float64. Then prefill speed, both modes in turn on the same engine
(a 256-token prompt, --runs runs each after a warm-up, alternating so a slow minute of the shared
machine hits both alike) and decode at batch 1 (16 steps after a 64-token prompt), and llama-bench
pp256 and tg16 on the same GGUF and threads when scripts/build_llamacpp.sh has built it (the same
run's ratios). Writes bench/lossy.json.

    .venv/bin/python scripts/eval_lossy.py            # Qwen2.5-Coder-1.5B (make models) and SmolLM2
    .venv/bin/python scripts/eval_lossy.py --models qwen2.5-coder-1.5b-instruct --threads 2 --runs 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("qwen2.5-coder-1.5b-instruct", "smollm2-135m-instruct")
PREFILL_LEN = 256
DECODE_STEPS = 16  # decode steps timed at batch 1 (and llama-bench tg16)

CODE = [
    "def quicksort(arr):\n",
    'def is_palindrome(s: str) -> bool:\n    """Return True if s reads the same backwards."""\n',
    "import numpy as np\n\n# the mean of each row of a matrix\ndef row_means(m):\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, x):\n",
    "SELECT name, COUNT(*) AS orders\nFROM customers JOIN orders ON customers.id = orders.customer_id\n",
    "#include <stdio.h>\n\nint main(void) {\n    for (int i = 0; i < 10; ++i) {\n",
    "function debounce(fn, ms) {\n  let timer;\n  return (...args) => {\n",
    "fn fibonacci(n: u64) -> u64 {\n    match n {\n",
    "# Read a CSV file and print the sum of the second column\nimport csv\n\nwith open('data.csv') as f:\n",
    "def binary_search(xs, target):\n    lo, hi = 0, len(xs) - 1\n    while lo <= hi:\n",
]
PROSE = [
    "The three laws of thermodynamics are",
    "The capital of France is Paris. The capital of Italy is Rome. The capital of Spain is",
    "Photosynthesis is the process by which plants",
    "Once upon a time, in a small village at the edge of a forest, there lived",
    "The main causes of the First World War were",
    "To make a good cup of coffee, first",
    "In machine learning, overfitting happens when a model",
    "The water cycle describes how water moves between the oceans, the atmosphere and the land:",
    "Dear hiring manager, I am writing to apply for the position of",
    "A healthy breakfast should include",
]


def position_logits(eng: Any, ids: list[int], rid: str) -> np.ndarray:
    """Next-token logits at every position of one prefill [len(ids), V] (the engine's forward
    samples only the last row of a chunk, so the stage model is called with every row asked)."""
    from pipeserve.modeling.layers import BatchMeta, SeqSlot

    (seq,) = eng.cache.reserve([(rid, 0, len(ids))])
    try:
        meta = BatchMeta.build([SeqSlot(0, len(ids), 0, seq, eng.cache)], list(range(len(ids))))
        return np.asarray(eng.model(np.asarray(ids, np.int64), meta))
    finally:
        eng.release([rid])


def kl_rows(p_logits: np.ndarray, q_logits: np.ndarray) -> np.ndarray:
    """KL(p || q) per row, float64, from logits [n, V]."""
    lp = p_logits.astype(np.float64)
    lq = q_logits.astype(np.float64)
    lp -= lp.max(-1, keepdims=True)
    lq -= lq.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    lq -= np.log(np.exp(lq).sum(-1, keepdims=True))
    return np.asarray((np.exp(lp) * (lp - lq)).sum(-1))


def quality(eng: Any, tok: Any) -> dict[str, Any]:
    from pipeserve.modeling.layers import set_lossy_int8

    agree: list[bool] = []
    kls: list[float] = []
    first: list[float] = []
    rest: list[float] = []
    for i, text in enumerate(CODE + PROSE):
        ids = tok.encode(text)
        set_lossy_int8(eng.model, False)
        exact = position_logits(eng, ids, f"exact{i}")
        set_lossy_int8(eng.model, True)
        lossy = position_logits(eng, ids, f"lossy{i}")
        agree += (exact.argmax(-1) == lossy.argmax(-1)).tolist()
        kl = kl_rows(exact, lossy)
        kls += kl.tolist()
        first.append(float(kl[0]))
        rest += kl[1:].tolist()
    set_lossy_int8(eng.model, False)
    return {
        "prompts": len(CODE) + len(PROSE),
        "positions": len(agree),
        "top1_agreement": float(np.mean(agree)),
        "mean_kl": float(np.mean(kls)),
        "median_kl": float(np.median(kls)),
        "max_kl": float(np.max(kls)),
        "mean_kl_first_position": float(np.mean(first)),
        "mean_kl_other_positions": float(np.mean(rest)),
    }


def prefill_speed(eng: Any, runs: int) -> dict[str, Any]:
    from pipeserve.modeling.engine import SeqChunk
    from pipeserve.modeling.generate import GREEDY
    from pipeserve.modeling.layers import set_lossy_int8

    ids = np.random.default_rng(0).integers(100, 30000, PREFILL_LEN).tolist()
    times: dict[str, list[float]] = {"exact": [], "int8": []}
    for r in range(runs + 1):  # run 0 warms both up
        for mode in times:
            set_lossy_int8(eng.model, mode == "int8")
            t = time.perf_counter()
            eng.forward([SeqChunk(f"p{r}{mode}", 0, ids, GREEDY)])
            dt = time.perf_counter() - t
            eng.release([f"p{r}{mode}"])
            if r:
                times[mode].append(dt)
    set_lossy_int8(eng.model, False)
    res: dict[str, Any] = {"tokens": PREFILL_LEN, "runs": runs}
    for mode, ts in times.items():
        res[f"{mode}_tok_s"] = PREFILL_LEN / statistics.median(ts)
    res["int8_over_exact"] = res["int8_tok_s"] / res["exact_tok_s"]
    return res


def decode_speed(eng: Any, runs: int, steps: int = DECODE_STEPS) -> dict[str, Any]:
    """Decode at batch 1 after a 64-token prompt, both modes in turn: tok/s of the steps alone."""
    from pipeserve.modeling.engine import SeqChunk
    from pipeserve.modeling.generate import GREEDY
    from pipeserve.modeling.layers import set_lossy_int8

    ids = np.random.default_rng(1).integers(100, 30000, 64).tolist()
    times: dict[str, list[float]] = {"exact": [], "int8": []}
    for r in range(runs + 1):
        for mode in times:
            set_lossy_int8(eng.model, mode == "int8")
            rid = f"d{r}{mode}"
            tok = eng.forward([SeqChunk(rid, 0, ids, GREEDY)]).samples[0].token_id
            t = time.perf_counter()
            for i in range(steps):
                tok = eng.forward([SeqChunk(rid, len(ids) + i, [tok], GREEDY)]).samples[0].token_id
            dt = time.perf_counter() - t
            eng.release([rid])
            if r:
                times[mode].append(dt)
    set_lossy_int8(eng.model, False)
    res: dict[str, Any] = {"steps": steps, "runs": runs}
    for mode, ts in times.items():
        res[f"{mode}_tok_s"] = steps / statistics.median(ts)
    res["int8_over_exact"] = res["int8_tok_s"] / res["exact_tok_s"]
    return res


def llama_bench(model: str, threads: int, runs: int) -> dict[str, Any]:
    """llama-bench pp256 and tg16 (decode at batch 1, as many steps as decode_speed times) on the
    same GGUF and threads (skipped when llama.cpp is not built)."""
    from pipeserve.common.model_files import resolve_model

    found = subprocess.run(
        ["bash", str(ROOT / "scripts" / "build_llamacpp.sh")], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        return {"skipped": "llama.cpp is not built (scripts/build_llamacpp.sh)"}
    bench = Path(found.stdout.strip().splitlines()[-1]) / "llama-bench"
    cmd = [str(bench), "-m", str(resolve_model(model).path), "-t", str(threads), "-p", str(PREFILL_LEN)]
    out = subprocess.run(
        [*cmd, "-n", str(DECODE_STEPS), "-r", str(runs), "-o", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    pp = next(r for r in rows if r["n_prompt"] == PREFILL_LEN and r["n_gen"] == 0)
    tg = next(r for r in rows if r["n_prompt"] == 0 and r["n_gen"] == DECODE_STEPS)
    return {
        "pp_tok_s": float(pp["avg_ts"]),
        "tool": f"llama-bench pp{PREFILL_LEN}",
        "tg_tok_s": float(tg["avg_ts"]),
        "tg_tool": f"llama-bench tg{DECODE_STEPS}",
    }


def evaluate(model: str, threads: int, runs: int, with_llama: bool) -> dict[str, Any]:
    from pipeserve import kernels
    from pipeserve.modeling.engine import StageEngine
    from pipeserve.modeling.layers import set_lossy_int8
    from pipeserve.modeling.loader import load_stage
    from pipeserve.tokenizer.core import TokenizerCore

    kernels.set_threads(threads)
    eng = StageEngine(load_stage(model))
    on, total = set_lossy_int8(eng.model, True)
    set_lossy_int8(eng.model, False)
    res: dict[str, Any] = {
        "weight_types": eng.loaded.tensor_types,
        "int8_layers": on,
        "linear_layers": total,
        "int8_path": kernels.int8_path(),
    }
    if on == 0:
        res["note"] = "no weight type of this model has int8 kernels (Q4_K, Q6_K): the mode leaves it exact"
        return res
    res["quality"] = quality(eng, TokenizerCore.from_model(model))
    res["prefill"] = prefill_speed(eng, runs)
    res["decode_b1"] = decode_speed(eng, runs)
    if with_llama:
        res["llama_bench"] = lb = llama_bench(model, threads, runs)
        if "pp_tok_s" in lb:
            for part, key in (("prefill", "pp_tok_s"), ("decode_b1", "tg_tok_s")):
                res[part]["int8_over_llama_bench"] = res[part]["int8_tok_s"] / lb[key]
                res[part]["exact_over_llama_bench"] = res[part]["exact_tok_s"] / lb[key]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3, help="timed prefills per mode (after one warm-up)")
    ap.add_argument("--no-llama-bench", action="store_true", help="skip llama-bench")
    ap.add_argument("--out", default=str(ROOT / "bench" / "lossy.json"))
    args = ap.parse_args()
    out: dict[str, Any] = {
        "command": f"python scripts/eval_lossy.py --models {args.models} --threads {args.threads} --runs {args.runs}",
        "machine": platform.machine(),
        "threads": args.threads,
        "prompts": {"code": CODE, "prose": PROSE},
        "models": {},
    }
    for model in args.models.split(","):
        print(f"{model} ...", flush=True)
        out["models"][model] = r = evaluate(model, args.threads, args.runs, not args.no_llama_bench)
        print(json.dumps({k: v for k, v in r.items() if k != "weight_types"}, indent=1), flush=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
