"""How far speculative decoding can go on this machine (issue 26), from the greedy answers and the
measured cost of verification rows: the code-editing and open-chat prompts of `bench_spec.py` are
answered greedily in one process (the exact engine), and each answer is replayed through the
coordinator's draft source (prompt lookup, `coordinator/drafts.py`) with the cost of a pass of T
rows taken from a `bench_verify_rows.py` file plus a fixed per-pass overhead (hops, scheduling):

- `shipped`: the coordinator's own choice of drafts per pass (`drafts.allocate`, its acceptance
  estimate, updated as the scheduler updates it: from the drafts it sent and, when all of them
  were accepted, from whether the first proposed token it did not send came out), as `make
  bench-spec` runs it;
- `oracle`: every pass drafts exactly the proposal's tokens that will be accepted (the best any
  policy can do with these proposals, up to 7 drafts);
- `copy_ceiling`: every pass verifies 7 drafts and all are accepted (an answer that only copies).

Speed-up = the time of one-token steps / the time of the passes. No serving: a bound, not a run.

    .venv/bin/python scripts/spec_bound.py --rows bench/spec-rows-zen4-prefetch.json --out bench/spec-bound.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeserve import kernels
from pipeserve.common.model_files import resolve_model
from pipeserve.common.threads import choose_threads, usable_cores
from pipeserve.coordinator import drafts as D
from pipeserve.modeling.engine import StageEngine
from pipeserve.modeling.generate import generate
from pipeserve.modeling.loader import load_stage
from pipeserve.tokenizer.core import TokenizerCore

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_spec

OVERHEADS_MS = (0.0, 5.0, 25.0)


def answers(model: str) -> dict[str, list[tuple[list[int], list[int]]]]:
    tok = TokenizerCore.from_model(model)
    eos = set(tok.eos_token_ids)
    eng = StageEngine(load_stage(resolve_model(model)), 4096)
    out: dict[str, list[tuple[list[int], list[int]]]] = {}
    for name, prompts, max_tokens in (
        ("code", bench_spec.CODE_PROMPTS, 192),
        ("chat", bench_spec.CHAT_PROMPTS, 96),
    ):
        out[name] = []
        for p in prompts:  # one at a time: each answer as one stream decodes it
            ids = tok.encode(
                tok.apply_chat_template([{"role": "user", "content": p}]), add_special_tokens=False
            )
            out[name].append((ids, generate([eng], [ids], max_tokens, stop_ids=tuple(eos))[0]))
    return out


def replay(prompt: list[int], gen: list[int], policy: str, cost: list[float]) -> tuple[float, int, int]:
    """(time of the passes, passes, tokens) for the answer after its first token."""
    src, acc, sc = D.NgramDrafts(), D.Acceptance(), D.StepCost()
    for T in range(1, len(cost) + 1):
        sc.add(T, cost[T - 1])
    t, passes, n = 0.0, 0, 1
    while n < len(gen):
        room = min(D.MAX_ROWS - 1, len(gen) - n - 1)
        prop = src.propose(prompt + gen[:n], room) if room > 0 else []
        agree = 0
        while agree < len(prop) and prop[agree] == gen[n + agree]:
            agree += 1
        if policy == "oracle":
            k = agree
        elif policy == "copy_ceiling":
            k = agree = room
        else:
            c = D.Candidate(prop, acc.rate)
            D.allocate([c], 1, sc, 1)
            k = c.k
        a = min(agree, k)
        if policy == "shipped":  # as Scheduler._apply_step learns from a step
            if a == k and k < len(prop):  # the first draft not sent against the token that came out
                acc.update(k + 1, a + int(agree > k))
            elif k:
                acc.update(k, a)
        t += cost[k]
        passes += 1
        n += a + 1
    return t, passes, len(gen) - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=bench_spec.MODEL)
    ap.add_argument("--rows", type=Path, default=Path("bench/spec-rows-zen4-prefetch.json"))
    ap.add_argument("--out", type=Path, default=Path("bench/spec-bound.json"))
    args = ap.parse_args()
    cores, why = usable_cores()
    kernels.set_threads(choose_threads(cores, 1, "auto", why)[0])
    rows = json.loads(args.rows.read_text())["rows"]
    step_ms = [rows[str(T)]["step_ms"] for T in range(1, D.MAX_ROWS + 1)]
    sets = answers(args.model)
    res: dict = {
        "model": args.model,
        "command": " ".join(["python", *sys.argv]),
        "rows_file": str(args.rows),
        "step_ms": step_ms,
        "max_rows": D.MAX_ROWS,
        "sets": {},
    }
    for name, items in sets.items():
        res["sets"][name] = {
            "answers": len(items),
            "tokens": sum(len(g) for _, g in items),
            "by_overhead": [],
        }
        for o in OVERHEADS_MS:
            cost = [o + s for s in step_ms]
            entry: dict = {"overhead_ms": o}
            for policy in ("shipped", "oracle", "copy_ceiling"):
                t = passes = n = 0
                for prompt, gen in items:
                    dt, dp, dn = replay(prompt, gen, policy, cost)
                    t, passes, n = t + dt, passes + dp, n + dn
                entry[policy] = {
                    "speedup": round(n * cost[0] / t, 3),
                    "tokens_per_pass": round(n / passes, 3),
                }
            res["sets"][name]["by_overhead"].append(entry)
        print(name, json.dumps(res["sets"][name]["by_overhead"]))
    args.out.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
