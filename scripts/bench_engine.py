"""Engine benchmark: our single-process engine vs llama.cpp (and transformers), same GGUF, same threads.

`make bench-engine` runs it on the embedded model; `make bench-engine MODEL=qwen2.5-coder-1.5b-instruct`
on a named model (written to bench/engine-<model>.json). `--threads 1,2` measures each thread count
in turn (ours, then llama.cpp's tools, per count), with the roofline of that count: the read
bandwidth and FMA peak the machine reaches on that many threads (kernels' `probe`), against the
bytes and flops a decode step and a prefill need. transformers runs on the embedded model only
(`--hf` forces it; the 1.5B model would need ~7 GB in fp32). Each engine is measured in its own subprocess (the script re-invokes
itself with `--only ours|hf|stage|llamacpp`, which prints one JSON line), so every peak RSS is clean.
Load time is kept apart; every figure comes after a warm-up and is the median of `--runs` runs.
Decode figures time only the decode steps, never the prefill. llama.cpp's own tools give its
figures (llama-bench pp/tg, llama-batched-bench at 1 and 16 sequences), built by
scripts/build_llamacpp.sh (cached outside the repository; skipped with a note when absent).
Ours also reports where a decode step's time goes: the step against its native matmuls run alone.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np

MODEL = "smollm2-135m-instruct"
PROMPT_LEN = 64  # tokens cached before decode starts
PREFILL_LEN = 256
BATCH = 16
THREADS = 2  # --threads: the kernels' pool (ours, llama.cpp's -t, transformers' torch threads)
STAGE = (10, 20)  # the middle stage of three


def prompts(n: int, length: int, seed: int = 0) -> list[list[int]]:
    """Deterministic token ids well inside the vocabulary, away from the special tokens."""
    return np.random.default_rng(seed).integers(100, 40000, (n, length)).tolist()


def cpu_flags() -> list[str]:
    """The SIMD extensions of this CPU that matter to the kernels and to llama.cpp."""
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next(line for line in text.splitlines() if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return []
    wanted = (
        "avx2",
        "fma",
        "f16c",
        "avx512f",
        "avx512bw",
        "avx512vl",
        "avx512dq",
        "avx512_vnni",
        "avx512_bf16",
    )
    return [f for f in wanted if f in flags]


def median_time(fn: Callable[[], float], runs: int) -> float:
    """fn runs once to warm up, then `runs` times; each call returns the seconds it measured."""
    fn()
    return statistics.median(fn() for _ in range(runs))


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _engine_timers(tokens: int) -> tuple[Any, Callable[..., float], Callable[[], float]]:
    """Our engine on the whole model, with its decode(batch) and prefill() timers (seconds)."""
    from pipeserve import kernels
    from pipeserve.modeling.engine import SeqChunk, StageEngine
    from pipeserve.modeling.generate import GREEDY
    from pipeserve.modeling.loader import load_stage

    kernels.set_threads(THREADS)  # the node's setting: every op runs on the kernels' pool
    eng = StageEngine(load_stage(MODEL))
    n_run = 0

    def decode(batch: int) -> float:
        nonlocal n_run
        n_run += 1
        rids = [f"r{n_run}-{i}" for i in range(batch)]
        ps = prompts(batch, PROMPT_LEN, seed=n_run)
        out = eng.forward([SeqChunk(r, 0, p, GREEDY) for r, p in zip(rids, ps, strict=True)])
        nxt = [s.token_id for s in out.samples]
        t = time.perf_counter()  # the prompt's prefill is not part of the decode figures
        for step in range(tokens):
            chunks = [SeqChunk(r, PROMPT_LEN + step, [tok], GREEDY) for r, tok in zip(rids, nxt, strict=True)]
            nxt = [s.token_id for s in eng.forward(chunks).samples]
        dt = time.perf_counter() - t
        eng.release(rids)
        return dt

    def prefill() -> float:
        t = time.perf_counter()
        eng.forward([SeqChunk("prefill", 0, prompts(1, PREFILL_LEN)[0], GREEDY)])
        dt = time.perf_counter() - t
        eng.release(["prefill"])
        return dt

    return eng, decode, prefill


def bench_ours(tokens: int, runs: int) -> dict[str, Any]:
    from pipeserve import kernels
    from pipeserve.kernels import QLinear
    from pipeserve.modeling.layers import modules

    t0 = time.perf_counter()
    eng, decode, prefill = _engine_timers(tokens)
    load_s = time.perf_counter() - t0

    res = {
        "kernel_isa": kernels.get_isa(),
        "kernel_threads": kernels.get_threads(),
        "load_s": load_s,
        "decode_b1_tok_s": tokens / median_time(lambda: decode(1), runs),
        f"decode_b{BATCH}_tok_s": BATCH * tokens / median_time(lambda: decode(BATCH), runs),
        "prefill_tok_s": PREFILL_LEN / median_time(prefill, runs),
        "peak_rss_mib": peak_rss_mib(),
    }
    # Where a decode step goes: the step's time (one more run) against the time of the same
    # native matmuls alone (every linear layer of the model at the step's batch size, called in a
    # loop); the rest is attention, norms, RoPE, sampling and Python. (LlamaLayer.forward calls
    # the kernels without the QLinear modules, so they cannot be clocked from inside a step.)
    lins = [m for m in modules(eng.model) if isinstance(m, QLinear)]

    def matmuls(batch: int) -> float:
        rng = np.random.default_rng(0)
        xs = [rng.standard_normal((batch, lin.in_features), np.float32) for lin in lins]
        t = time.perf_counter()
        for lin, x in zip(lins, xs, strict=True):
            lin(x)
        return time.perf_counter() - t

    for batch in (1, BATCH):
        decode(batch)  # warm-up
        res[f"decode_b{batch}_ms_per_step"] = 1e3 * decode(batch) / tokens
        res[f"decode_b{batch}_matmul_ms_per_step"] = 1e3 * median_time(lambda b=batch: matmuls(b), 5)
    return res


def bench_isas(tokens: int, runs: int) -> dict[str, Any]:
    """Every SIMD path of ours that this CPU runs (the portable one excepted), in one process:
    the paths take turns, run by run, so a slow minute of the machine hits them all alike."""
    from pipeserve import kernels

    isas = [i for i in kernels.supported_isas() if i != "generic"]
    _, decode, prefill = _engine_timers(tokens)
    times: dict[str, dict[str, list[float]]] = {i: {"b1": [], "bn": [], "pf": []} for i in isas}
    for rep in range(runs + 1):  # the first round warms up
        for isa in isas:
            kernels.set_isa(isa)
            b1, bn, pf = decode(1), decode(BATCH), prefill()
            if rep:
                times[isa]["b1"].append(b1)
                times[isa]["bn"].append(bn)
                times[isa]["pf"].append(pf)
    med = statistics.median
    return {
        isa: {
            "decode_b1_tok_s": tokens / med(t["b1"]),
            f"decode_b{BATCH}_tok_s": BATCH * tokens / med(t["bn"]),
            "prefill_tok_s": PREFILL_LEN / med(t["pf"]),
        }
        for isa, t in times.items()
    }


def bench_roofline(tokens: int, runs: int) -> dict[str, Any]:
    """What this machine reaches on THREADS threads: read bandwidth over a 1 GiB buffer, FMA peak
    of the widest kernel path; and what a token needs: the bytes of every matrix a decode step
    reads (all linear layers and the head), the flops of a prefill token (2 per weight, head
    excluded: a prefill samples one row)."""
    from pipeserve import kernels
    from pipeserve.kernels import QLinear, _qk
    from pipeserve.modeling.layers import modules
    from pipeserve.modeling.loader import load_stage

    kernels.set_threads(THREADS)
    sec, nbytes = _qk.probe("read", 1 << 30)
    fsec, flops = _qk.probe("fma", 20_000_000)
    lins = [m for m in modules(load_stage(MODEL).model) if isinstance(m, QLinear)]
    head = max(lins, key=lambda m: m.out_features)  # the LM head: the widest matrix
    return {
        "read_gb_s": nbytes / sec / 1e9,
        "fma_gflop_s": flops / fsec / 1e9,
        "decode_bytes_per_token": sum(m.nbytes for m in lins),
        "prefill_flops_per_token": 2 * sum(m.in_features * m.out_features for m in lins if m is not head),
        "isa": kernels.get_isa(),
    }


def bench_llamacpp(tokens: int, runs: int) -> dict[str, Any]:
    """llama.cpp's own benchmark tools on the same GGUF and thread count."""
    from pipeserve.common.model_files import resolve_model

    build = Path(__file__).with_name("build_llamacpp.sh")
    found = subprocess.run(["bash", str(build)], capture_output=True, text=True, check=False)
    if found.returncode != 0:
        return {"skipped": f"llama.cpp could not be built: {found.stderr[-500:]}"}
    bin_dir = Path(found.stdout.strip().splitlines()[-1])
    gguf, threads = str(resolve_model(MODEL).path), str(THREADS)
    out = subprocess.run(
        [
            str(bin_dir / "llama-bench"),
            "-m",
            gguf,
            "-t",
            threads,
            "-p",
            str(PREFILL_LEN),
            "-n",
            "64",
            "-r",
            str(runs),
            "-o",
            "json",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    rows = json.loads(out)
    pp = next(r["avg_ts"] for r in rows if r["n_prompt"] == PREFILL_LEN and r["n_gen"] == 0)
    tg = next(r["avg_ts"] for r in rows if r["n_gen"] == 64)
    bench_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    lines = subprocess.run(
        [
            str(bin_dir / "llama-batched-bench"),
            "-m",
            gguf,
            "-t",
            threads,
            "-c",
            "4096",
            "-npp",
            str(PROMPT_LEN),
            "-ntg",
            str(tokens),
            "-npl",
            f"1,{BATCH}",
            "--output-format",
            "jsonl",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    batched = {
        r["pl"]: r["speed_tg"] for r in (json.loads(x) for x in lines if x.startswith("{")) if "pl" in r
    }
    return {
        "tool": "llama-bench / llama-batched-bench (llama-cpp-python 0.3.36 sources)",
        "prefill_tok_s": pp,
        "decode_b1_tok_s": tg,
        "batched_b1_tok_s": batched[1],
        f"decode_b{BATCH}_tok_s": batched[BATCH],
        "peak_rss_mib": bench_rss,
    }


def bench_hf(tokens: int, runs: int) -> dict[str, Any]:
    import torch  # only here: our engine's processes do not import it (their RSS is the node's)
    import transformers

    torch.set_num_threads(THREADS)

    from pipeserve.common.model_files import resolve_model

    t0 = time.perf_counter()
    path = resolve_model(MODEL).path
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    load_s = time.perf_counter() - t0

    class Stamps(transformers.LogitsProcessor):
        """Called once per generated token, right after that step's forward: decode time is the
        span from the first call (end of prefill) to the last."""

        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            self.times.append(time.perf_counter())
            return scores

    def run(ids: list[list[int]], new_tokens: int) -> tuple[float, list[float]]:
        stamps = Stamps()
        x = torch.tensor(ids)
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                x,
                attention_mask=torch.ones_like(x),  # the prompts hold no padding
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=2,
                logits_processor=transformers.LogitsProcessorList([stamps]),
            )
        return t, stamps.times

    def decode(batch: int) -> float:
        _, times = run(prompts(batch, PROMPT_LEN, seed=batch), tokens + 1)
        return times[-1] - times[0]  # `tokens` decode steps

    def prefill() -> float:
        start, times = run(prompts(1, PREFILL_LEN), 1)
        return times[0] - start

    return {
        "transformers": transformers.__version__,
        "load_s": load_s,
        "decode_b1_tok_s": tokens / median_time(lambda: decode(1), runs),
        f"decode_b{BATCH}_tok_s": BATCH * tokens / median_time(lambda: decode(BATCH), runs),
        "prefill_tok_s": PREFILL_LEN / median_time(prefill, runs),
        "peak_rss_mib": peak_rss_mib(),
    }


def bench_stage(tokens: int, runs: int) -> dict[str, Any]:
    """One middle stage of three: its memory, and its share of a batch-1 decode step."""
    from pipeserve.modeling.engine import SeqChunk, StageEngine
    from pipeserve.modeling.loader import load_stage

    t0 = time.perf_counter()
    loaded = load_stage(MODEL, STAGE)
    load_s = time.perf_counter() - t0
    eng = StageEngine(loaded)
    C = loaded.cfg.hidden_size
    n_run = 0

    def decode() -> float:
        nonlocal n_run
        n_run += 1
        rid = f"s{n_run}"
        rng = np.random.default_rng(n_run)
        eng.forward([SeqChunk(rid, 0, [0] * PROMPT_LEN)], rng.standard_normal((PROMPT_LEN, C), np.float32))
        t = time.perf_counter()
        for step in range(tokens):
            eng.forward([SeqChunk(rid, PROMPT_LEN + step, [0])], rng.standard_normal((1, C), np.float32))
        dt = time.perf_counter() - t
        eng.release([rid])
        return dt

    return {
        "layers": list(STAGE),
        "load_s": load_s,
        "param_mib": loaded.param_bytes / 2**20,
        "decode_b1_ms_per_step": 1e3 * median_time(decode, runs) / tokens,
        "peak_rss_mib": peak_rss_mib(),
    }


BENCHES = {
    "roofline": bench_roofline,
    "ours": bench_ours,
    "isas": bench_isas,
    "hf": bench_hf,
    "stage": bench_stage,
    "llamacpp": bench_llamacpp,
}


def run_child(name: str, args: argparse.Namespace, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--only", name, "--threads", str(threads), "--model", args.model]
    cmd += ["--tokens", str(args.tokens), "--runs", str(args.runs)]
    print(f"running {name} at {threads} threads ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{name} benchmark failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def table(res: dict[str, Any]) -> str:
    """The README's tables: one per thread count (ours against llama.cpp and, where run,
    transformers), the roofline, and where a decode step goes."""
    b = f"decode_b{BATCH}_tok_s"
    out: list[str] = []
    for th, r in res["runs"].items():
        ours, lc, hf, roof = r["ours"], r["llamacpp"], r.get("hf"), r["roofline"]
        have_lc = "skipped" not in lc
        rows = [
            ("decode batch 1 (tok/s)", "decode_b1_tok_s", "llama-bench tg64"),
            (f"decode batch {BATCH}, aggregate (tok/s)", b, f"llama-batched-bench B={BATCH}"),
            (f"prefill {PREFILL_LEN} tokens (tok/s)", "prefill_tok_s", f"llama-bench pp{PREFILL_LEN}"),
            ("peak RSS (MiB)", "peak_rss_mib", "llama-bench"),
        ]
        hf_head = " transformers | ours / transformers |" if hf else ""
        out += [
            f"\n**{th} thread{'s' if th != '1' else ''}** ({res['model']})\n",
            f"| metric | pipeserve | llama.cpp | ours / llama.cpp |{hf_head}",
            "|---|---|---|---|" + ("---|---|" if hf else ""),
        ]
        for label, key, lc_label in rows:
            lc_val = f"{lc[key]:.1f} ({lc_label})" if have_lc else "-"
            hf_cols = f" {hf[key]:.1f} | {ratio(ours[key], hf[key])} |" if hf else ""
            out.append(
                f"| {label} | {ours[key]:.1f} | {lc_val} | {ratio(ours[key], lc[key]) if have_lc else '-'} |{hf_cols}"
            )
        gb = roof["decode_bytes_per_token"] / 1e9
        gf = roof["prefill_flops_per_token"] / 1e9
        lc_bw = f"{gb * lc['decode_b1_tok_s']:.1f}" if have_lc else "-"
        lc_fl = f"{gf * lc['prefill_tok_s']:.0f}" if have_lc else "-"
        out.append(
            f"\nroofline at {th} thread(s): read bandwidth {roof['read_gb_s']:.1f} GB/s, FMA peak "
            f"{roof['fma_gflop_s']:.0f} GFLOP/s ({roof['isa']}); a decode token reads {gb:.3f} GB of "
            f"weights: ours {gb * ours['decode_b1_tok_s']:.1f} GB/s, llama.cpp {lc_bw} GB/s; a prefill "
            f"token is {gf:.2f} GFLOP: ours {gf * ours['prefill_tok_s']:.0f} GFLOP/s, llama.cpp {lc_fl} GFLOP/s "
            "(llama.cpp computes in int8 after rounding the activations)"
        )
        for batch in (1, BATCH):
            step, mm = ours[f"decode_b{batch}_ms_per_step"], ours[f"decode_b{batch}_matmul_ms_per_step"]
            out.append(
                f"\nbatch {batch} decode step: {step:.2f} ms; its native matmuls alone (same shapes, in a loop) "
                f"{mm:.2f} ms ({100 * mm / step:.0f}%), everything else {step - mm:.2f} ms"
            )
        if not have_lc:
            out.append(f"llama.cpp skipped: {lc['skipped']}")
    st = res["stage"]
    out.append(
        f"\none stage [{st['layers'][0]},{st['layers'][1]}) at {res['isas_threads']} threads: weights "
        f"{st['param_mib']:.1f} MiB, RSS {st['peak_rss_mib']:.0f} MiB, {st['decode_b1_ms_per_step']:.2f} ms per batch-1 decode step"
    )
    if len(res["isas"]) > 1:
        out += [
            f"\n| kernel path (taking turns in one process, {res['isas_threads']} threads) | decode batch 1 | "
            f"decode batch {BATCH} | prefill {PREFILL_LEN} |",
            "|---|---|---|---|",
        ]
        for isa, r in res["isas"].items():
            out.append(f"| {isa} | {r['decode_b1_tok_s']:.1f} | {r[b]:.1f} | {r['prefill_tok_s']:.1f} |")
    out.append(f"\nCPU flags: {', '.join(res['cpu_flags'])}")
    return "\n".join(out)


def main() -> None:
    global THREADS, MODEL
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL, help="model_name (default: the embedded model)")
    ap.add_argument(
        "--out", type=Path, default=None, help="default bench/engine.json (bench/engine-<model>.json)"
    )
    ap.add_argument("--threads", default="1,2", help="thread counts, comma-separated")
    ap.add_argument("--tokens", type=int, default=32, help="decode steps timed per run")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per figure (median reported)")
    ap.add_argument("--hf", action="store_true", help="also run transformers (default: embedded model only)")
    ap.add_argument(
        "--only", choices=sorted(BENCHES), help="measure one engine and print its JSON (internal)"
    )
    args = ap.parse_args()
    MODEL = args.model
    if args.only:
        THREADS = int(args.threads)
        print(json.dumps(BENCHES[args.only](args.tokens, args.runs)))
        return
    out = args.out or Path(
        "bench/engine.json" if MODEL == "smollm2-135m-instruct" else f"bench/engine-{MODEL}.json"
    )
    res: dict[str, Any] = {
        "model": MODEL,
        "weights": "GGUF blocks as stored; fp32 activations",
        "decode_tokens": args.tokens,
        "runs": args.runs,
        "prompt_len_for_decode": PROMPT_LEN,
        "prefill_len": PREFILL_LEN,
        "batch": BATCH,
        "cpus": os.cpu_count(),
        "machine": platform.machine(),
        "cpu_flags": cpu_flags(),
        "runs_by_threads": None,
    }
    with_hf = args.hf or MODEL == "smollm2-135m-instruct"
    runs: dict[str, dict[str, Any]] = {}
    for th in (int(t) for t in args.threads.split(",")):
        r = {name: run_child(name, args, th) for name in ("roofline", "ours", "llamacpp")}
        if with_hf:
            r["hf"] = run_child("hf", args, th)
        runs[str(th)] = r
        partial = {k: v for k, v in res.items() if k != "runs_by_threads"} | {"runs": runs, "partial": True}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(partial, indent=2) + "\n")  # what a run stopped later still leaves
    res.pop("runs_by_threads")
    res["runs"] = runs
    last = int(args.threads.split(",")[-1])  # the kernel paths in turn, and one stage, at the last count
    res["isas"], res["stage"] = run_child("isas", args, last), run_child("stage", args, last)
    res["isas_threads"] = last
    if with_hf:
        res["torch"] = importlib.metadata.version("torch")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(table(res))


if __name__ == "__main__":
    main()
