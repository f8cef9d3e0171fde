"""Long-context benchmark (`make bench-kv`, issue 27): our engine in one process against llama.cpp's
llama-bench on the same GGUF, same threads, same run.

1. Decode tok/s per stream at 128 .. 32768 tokens of context, 1 and 4 streams, with the KV cache in
   f32, f16 and q8_0. The context's K/V rows are written directly into each stream's blocks (values of
   a normal distribution's scale, the same block repeated), not prefilled: a decode step's work
   depends on the context's length, not on its values, and a prefill of 4 x 32k tokens per figure
   would take hours here. The timed steps are real decode steps of the model (weights, attention
   over every cached position, sampling). llama-bench's figure at the same depth (`-d`) prefills
   the depth first (not timed) and times `-n 16` decode tokens; its KV cache is f16 (its default).
2. Prefill time of a 4096-token prompt (and 16384 with --prefill 4096,16384), in the engine's
   coordinator-sized chunks (256 tokens), against llama-bench `-p N`.
3. Quality of f16, bf16 and q8_0 caches against f32: top-1 agreement and mean KL along f32's greedy
   continuations of long real prompts (this repository's docs and code); `--quality-only` adds it
   to an existing JSON.

Writes bench/context-<model>.json and prints a markdown table. Targets (issue 27): SmolLM2 decode at
4096 >= 0.7x its speed at 128 (f32); Qwen at 16384 >= 0.5x of 128; a 16k prefill <= 1.2x
llama.cpp's time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

THREADS = 2
STEPS = 16  # timed decode steps per figure (after 2 untimed)
CHUNK = 256  # prefill tokens per forward (coordinator.max_batch_tokens)
KV_TYPES = ("f32", "f16", "q8_0")  # decode figures per KV type (bf16 reads as many bytes as f16)
CONTEXTS = {
    "smollm2-135m-instruct": [128, 1024, 4096],
    "qwen2.5-coder-1.5b-instruct": [128, 1024, 4096, 16384, 32000],
}


def fill(eng: Any, rid: str, n: int, rng: np.random.Generator) -> None:
    """A stream whose cache holds n positions: blocks reserved and written with K/V values."""
    from pipeserve import kernels
    from pipeserve.kernels import KV_DTYPES

    (seq,) = eng.cache.reserve([(rid, 0, n)])
    eng.cache.commit(seq, 0, rng.integers(100, 20000, n).tolist())
    k, v = eng.cache.k, eng.cache.v
    hd = kernels.kv_head_dim(k)
    block = rng.standard_normal((*k.shape[1:-1], hd), dtype=np.float32)
    if eng.cache.kv_dtype == "bf16":
        block_t = (block.view(np.uint32) >> 16).astype(np.uint16)  # truncated: any bf16 values do
    elif eng.cache.kv_dtype == "q8_0":
        block_t = kernels.quantize(block.reshape(-1, hd), "Q8_0").reshape(k.shape[1:])
    else:
        block_t = block.astype(KV_DTYPES[eng.cache.kv_dtype][0])
    block_k = kernels.kv_pack_k(block_t, eng.cache.kv_dtype)  # K is stored transposed in its blocks
    for b in seq.blocks:
        k[b] = block_k
        v[b] = block_t


def decode_figure(eng: Any, ctx: int, streams: int, rng: np.random.Generator) -> tuple[float, float]:
    """Per-stream decode tok/s of `streams` streams at `ctx` tokens of context: over the STEPS timed
    steps (the headline), and from their median step (a shared VM's stalls move the mean; the
    median shows the step itself)."""
    from pipeserve.modeling.engine import SeqChunk
    from pipeserve.modeling.generate import GREEDY

    rids = [f"c{ctx}-s{streams}-{i}" for i in range(streams)]
    for r in rids:
        fill(eng, r, ctx, rng)
    toks = [int(t) for t in rng.integers(100, 20000, streams)]
    pos = ctx
    steps = []
    for step in range(STEPS + 2):
        t0 = time.perf_counter()
        out = eng.forward([SeqChunk(r, pos, [t], GREEDY) for r, t in zip(rids, toks, strict=True)])
        toks = [s.token_id for s in out.samples]
        pos += 1
        if step >= 2:
            steps.append(time.perf_counter() - t0)
    eng.release(rids)
    return STEPS / sum(steps), 1.0 / float(np.median(steps))


def prefill_figure(eng: Any, n: int, rng: np.random.Generator) -> float:
    """Seconds to prefill an n-token prompt in CHUNK-token forwards."""
    from pipeserve.modeling.engine import SeqChunk
    from pipeserve.modeling.generate import GREEDY

    prompt = rng.integers(100, 20000, n).tolist()
    t0 = time.perf_counter()
    for s in range(0, n, CHUNK):
        eng.forward([SeqChunk("prefill", s, prompt[s : s + CHUNK], GREEDY)])
    dt = time.perf_counter() - t0
    eng.release(["prefill"])
    return dt


def bench_ours(model: str, contexts: list[int], prefills: list[int], rounds: int = 1) -> dict[str, Any]:
    """Decode figures for every KV type, context and stream count, the whole sweep `rounds` times
    (each figure is the median of its rounds: on a shared VM a slow minute lands on one round, not
    on one context), then the prefills once."""
    from pipeserve import kernels
    from pipeserve.modeling.engine import StageEngine
    from pipeserve.modeling.loader import load_stage

    kernels.set_threads(THREADS)
    stage = load_stage(model)
    rng = np.random.default_rng(0)
    res: dict[str, Any] = {
        "kernel_isa": kernels.get_isa(),
        "threads": THREADS,
        "rounds": rounds,
        "decode": [],
        "prefill": [],
    }
    budget = 4 * (max(contexts) + 64) + 64
    runs: dict[tuple[str, int, int], list[tuple[float, float]]] = {}
    for rnd in range(rounds):
        for kv_dtype in KV_TYPES:
            eng = StageEngine(
                stage, cache_budget_tokens=budget, max_context=stage.cfg.max_position, kv_dtype=kv_dtype
            )
            for ctx in contexts:
                for streams in (1, 4):
                    tps, tps_median = decode_figure(eng, ctx, streams, rng)
                    runs.setdefault((kv_dtype, ctx, streams), []).append((tps, tps_median))
                    print(
                        f"round {rnd + 1}/{rounds}: ours {kv_dtype} ctx {ctx} x{streams}: {tps:.2f} tok/s per stream"
                        f" ({tps_median:.2f} from the median step)",
                        flush=True,
                    )
            if kv_dtype == "f32" and rnd == rounds - 1:
                for n in prefills:
                    s = prefill_figure(eng, n, rng)
                    res["prefill"].append({"kv_dtype": kv_dtype, "tokens": n, "seconds": s})
                    print(f"ours prefill {n}: {s:.1f} s", flush=True)
            del eng
    for (kv_dtype, ctx, streams), figs in runs.items():
        res["decode"].append(
            {
                "kv_dtype": kv_dtype,
                "context": ctx,
                "streams": streams,
                "tok_s_per_stream": float(np.median([f[0] for f in figs])),
                "tok_s_per_stream_median_step": float(np.median([f[1] for f in figs])),
                "rounds": [round(f[0], 3) for f in figs],
            }
        )
    return res


QUALITY_TEXTS = ["docs/architecture.md", "docs/engine.md", "README.md", "src/coordinator/scheduler.py"]


def quality(model: str, prompt_tokens: int, gen: int = 32) -> dict[str, Any]:
    """f16 and bf16 caches against f32 on long real prompts (this repository's docs and code, the
    first `prompt_tokens` tokens of each): f32's greedy continuation of `gen` tokens, then each type
    teacher-forced along it; per position, whether its argmax equals f32's token, and KL(f32 || it)."""
    from pipeserve.modeling.engine import SeqChunk, StageEngine
    from pipeserve.modeling.generate import GREEDY, run_stages
    from pipeserve.modeling.loader import load_stage
    from pipeserve.tokenizer.core import _load

    tok, stage = _load(model), load_stage(model)
    root = Path(__file__).resolve().parents[1]
    prompts = [tok.encode((root / f).read_text())[:prompt_tokens] for f in QUALITY_TEXTS]

    def logsoftmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64)
        m = x.max()
        return x - m - np.log(np.exp(x - m).sum())

    def run(kv_dtype: str, forced: list[list[int]] | None) -> tuple[list[list[int]], list[list[np.ndarray]]]:
        eng = StageEngine(stage, cache_budget_tokens=prompt_tokens + gen + 64, kv_dtype=kv_dtype)
        toks_all, lps_all = [], []
        for i, p in enumerate(prompts):
            rid, toks, lps = f"q{i}", [], []
            logits = run_stages([eng], [SeqChunk(rid, 0, p, GREEDY)])[0]
            for j in range(gen):
                lps.append(logsoftmax(logits))
                t = int(logits.argmax()) if forced is None else forced[i][j]
                toks.append(t)
                logits = run_stages([eng], [SeqChunk(rid, len(p) + j, [t], GREEDY)])[0]
            eng.release([rid])
            toks_all.append(toks)
            lps_all.append(lps)
        return toks_all, lps_all

    ref_toks, ref_lps = run("f32", None)
    out: dict[str, Any] = {
        "prompts": QUALITY_TEXTS,
        "prompt_tokens": prompt_tokens,
        "positions": gen * len(prompts),
    }
    for kv_dtype in ("f16", "bf16", "q8_0"):
        _, lps = run(kv_dtype, ref_toks)
        agree, kls = [], []
        for i in range(len(prompts)):
            for j in range(gen):
                agree.append(int(lps[i][j].argmax()) == ref_toks[i][j])
                p = np.exp(ref_lps[i][j])
                kls.append(float((p * (ref_lps[i][j] - lps[i][j])).sum()))
        out[kv_dtype] = {"top1_agreement": float(np.mean(agree)), "mean_kl": float(np.mean(kls))}
        print(f"quality {kv_dtype}: top-1 {np.mean(agree):.4f}, mean KL {np.mean(kls):.2e}", flush=True)
    return out


def bench_llamacpp(model: str, contexts: list[int], prefills: list[int]) -> dict[str, Any]:
    from pipeserve.common.model_files import resolve_model

    build = Path(__file__).with_name("build_llamacpp.sh")
    found = subprocess.run(["bash", str(build)], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        return {"skipped": f"llama.cpp could not be built: {found.stderr[-500:]}"}
    bench = Path(found.stdout.strip().splitlines()[-1]) / "llama-bench"
    gguf = str(resolve_model(model).path)
    out: dict[str, Any] = {
        "tool": "llama-bench (llama-cpp-python 0.3.36 sources), KV f16",
        "decode": [],
        "prefill": [],
    }
    for ctx in [c for c in contexts if c <= 16384]:  # deeper: its prefill of the depth takes too long here
        cmd = [
            str(bench),
            "-m",
            gguf,
            "-t",
            str(THREADS),
            "-p",
            "0",
            "-n",
            str(STEPS),
            "-d",
            str(ctx),
            "-r",
            "1",
            "-o",
            "json",
        ]
        rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        tps = next(r["avg_ts"] for r in rows if r["n_gen"] == STEPS)
        out["decode"].append({"context": ctx, "streams": 1, "tok_s_per_stream": tps})
        print(f"llama-bench tg{STEPS} @ d{ctx}: {tps:.2f} tok/s", flush=True)
    for n in prefills:
        cmd = [str(bench), "-m", gguf, "-t", str(THREADS), "-p", str(n), "-n", "0", "-r", "1", "-o", "json"]
        rows = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
        tps = next(r["avg_ts"] for r in rows if r["n_prompt"] == n)
        out["prefill"].append({"tokens": n, "seconds": n / tps})
        print(f"llama-bench pp{n}: {n / tps:.1f} s", flush=True)
    return out


def table(res: dict[str, Any]) -> str:
    ours, lc = res["ours"], res["llamacpp"]
    anchor = {d["context"]: d["tok_s_per_stream"] for d in lc.get("decode", [])}
    get = {(d["kv_dtype"], d["context"], d["streams"]): d["tok_s_per_stream"] for d in ours["decode"]}
    ctxs = sorted({d["context"] for d in ours["decode"]})
    base = {kv: get[(kv, ctxs[0], 1)] for kv in KV_TYPES}
    head = " | ".join(f"{kv} 1 stream | {kv} 4 streams" for kv in KV_TYPES)
    rel = " | ".join(f"{kv} vs {ctxs[0]}" for kv in KV_TYPES)
    lines = [
        f"| context | {head} | {rel} | llama-bench (f16 KV) | f16 vs llama.cpp |",
        "|---|" + "---|" * (3 * len(KV_TYPES) + 2),
    ]
    for c in ctxs:
        a = anchor.get(c)
        lines.append(
            f"| {c} | "
            + " | ".join(f"{get[(kv, c, 1)]:.1f} | {get[(kv, c, 4)]:.1f}" for kv in KV_TYPES)
            + " | "
            + " | ".join(f"{get[(kv, c, 1)] / base[kv]:.2f}x" for kv in KV_TYPES)
            + " | "
            + (f"{a:.1f} | {get[('f16', c, 1)] / a:.2f}x |" if a else "not run | |")
        )
    for kv in ("f16", "bf16", "q8_0"):
        if q := res.get("quality", {}).get(kv):
            lines.append(
                f"\n{kv} KV against f32, {res['quality']['positions']} positions after "
                f"{res['quality']['prompt_tokens']}-token prompts: top-1 agreement {q['top1_agreement']:.4f}, "
                f"mean KL {q['mean_kl']:.2e}"
            )
    lc_pre = {p["tokens"]: p["seconds"] for p in lc.get("prefill", [])}
    for p in ours["prefill"]:
        a = lc_pre.get(p["tokens"])
        lines.append(
            f"\nprefill {p['tokens']} tokens: ours {p['seconds']:.1f} s"
            + (f", llama-bench {a:.1f} s ({p['seconds'] / a:.2f}x its time)" if a else "")
        )
    return "\n".join(lines)


def doc_table(res: dict[str, Any], path: str) -> str:
    """The docs' table (docs/benchmarks.md): every figure a link to its key in the committed JSON."""
    dec = res["ours"]["decode"]
    idx = {(d["kv_dtype"], d["context"], d["streams"]): i for i, d in enumerate(dec)}
    lc = {d["context"]: i for i, d in enumerate(res["llamacpp"].get("decode", []))}
    ctxs = sorted({d["context"] for d in dec})

    def ln(text: str, frag: str) -> str:
        return f"[{text}](../{path}#{frag})"

    def tps(kv: str, c: int, st: int) -> str:
        i = idx[(kv, c, st)]
        return ln(f"{dec[i]['tok_s_per_stream']:.1f}", f"ours.decode.{i}.tok_s_per_stream")

    def rel(kv: str, c: int) -> str:
        i, j = idx[(kv, c, 1)], idx[(kv, ctxs[0], 1)]
        v = dec[i]["tok_s_per_stream"] / dec[j]["tok_s_per_stream"]
        return ln(f"{v:.2f}", f"ours.decode.{i}.tok_s_per_stream/ours.decode.{j}.tok_s_per_stream") + "×"

    kinds = [kv for kv in KV_TYPES if (kv, ctxs[0], 1) in idx]  # JSONs written before q8_0 have two
    rows = [
        "| context (tokens) | "
        + " | ".join(f"{kv}, 1 stream | {kv}, 4 streams" for kv in kinds)
        + " | "
        + " | ".join(f"{kv} vs {ctxs[0]}" for kv in kinds)
        + " | llama-bench (f16 KV) | ours f16 / llama.cpp |",
        "|---|" + "---|" * (3 * len(kinds) + 2),
    ]
    for c in ctxs:
        if c in lc:
            k = lc[c]
            a = res["llamacpp"]["decode"][k]["tok_s_per_stream"]
            i = idx[("f16", c, 1)]
            anchor = (
                ln(f"{a:.1f}", f"llamacpp.decode.{k}.tok_s_per_stream")
                + " | "
                + ln(
                    f"{dec[i]['tok_s_per_stream'] / a:.2f}",
                    f"ours.decode.{i}.tok_s_per_stream/llamacpp.decode.{k}.tok_s_per_stream",
                )
                + "×"
            )
        else:
            anchor = "not run | "
        rows.append(
            f"| {c} | "
            + " | ".join(f"{tps(kv, c, 1)} | {tps(kv, c, 4)}" for kv in kinds)
            + " | "
            + " | ".join(rel(kv, c) for kv in kinds)
            + f" | {anchor} |"
        )
    pre = res["llamacpp"].get("prefill", [])
    for i, p in enumerate(res["ours"]["prefill"]):
        j = next((k for k, q in enumerate(pre) if q["tokens"] == p["tokens"]), None)
        line = (
            f"\nPrefill of a {p['tokens']}-token prompt (256-token chunks): ours "
            + ln(f"{p['seconds']:.1f}", f"ours.prefill.{i}.seconds")
            + " s"
        )
        if j is not None:
            line += (
                ", llama-bench "
                + ln(f"{pre[j]['seconds']:.1f}", f"llamacpp.prefill.{j}.seconds")
                + " s ("
                + ln(
                    f"{p['seconds'] / pre[j]['seconds']:.2f}",
                    f"ours.prefill.{i}.seconds/llamacpp.prefill.{j}.seconds",
                )
                + "× its time)."
            )
        rows.append(line)
    q = res.get("quality")
    if q:
        for kv in [kv for kv in ("f16", "bf16", "q8_0") if kv in q]:
            rows.append(
                f"\n{kv} KV against f32 over {q['positions']} positions after {q['prompt_tokens']}-token prompts: "
                "top-1 agreement "
                + ln(f"{100 * q[kv]['top1_agreement']:.1f}", f"quality.{kv}.top1_agreement*100")
                + "%, mean KL "
                + ln(f"{q[kv]['mean_kl']:.1e}", f"quality.{kv}.mean_kl")
                + "."
            )
    return "\n".join(rows)


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else the platform's."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct", choices=sorted(CONTEXTS))
    ap.add_argument("--prefill", default="4096", help="prompt lengths to prefill, comma-separated")
    ap.add_argument("--no-llamacpp", action="store_true")
    ap.add_argument(
        "--rounds", type=int, default=1, help="decode sweeps; each figure is the median of its rounds"
    )
    ap.add_argument(
        "--quality-tokens",
        type=int,
        default=2048,
        help="prompt tokens of the f16/bf16/q8_0 quality check (0: skip)",
    )
    ap.add_argument("--out", default=None)
    ap.add_argument("--quality-only", action="store_true", help="add the quality figures to --out's JSON")
    ap.add_argument("--doc", action="store_true", help="print the docs' table of --out's JSON and exit")
    args = ap.parse_args()
    out = Path(args.out or f"bench/context-{args.model}.json")
    if args.doc:
        print(doc_table(json.loads(out.read_text()), str(out)))
        return
    if args.quality_only:
        res = json.loads(out.read_text())
        res["quality"] = quality(args.model, args.quality_tokens)
        res["command"] += f"; python scripts/bench_context.py --model {args.model} --quality-only"
        out.write_text(json.dumps(res, indent=1) + "\n")
        print(table(res))
        return
    contexts, prefills = CONTEXTS[args.model], [int(x) for x in args.prefill.split(",") if x]
    res: dict[str, Any] = {
        "model": args.model,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count()},
        "command": "python scripts/bench_context.py " + " ".join(sys.argv[1:]),
        "context_fill": "K/V rows written directly (see the script's docstring); decode steps timed",
        "ours": bench_ours(args.model, contexts, prefills, args.rounds),
        "llamacpp": {"skipped": "--no-llamacpp"}
        if args.no_llamacpp
        else bench_llamacpp(args.model, contexts, prefills),
    }
    if args.quality_tokens:
        res["quality"] = quality(args.model, args.quality_tokens)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
