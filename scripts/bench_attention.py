"""Decode attention alone against the memory it reads (`make bench-kv`, issue 27): where a long
context's decode step goes.

For the attention shapes of SmolLM2-135M (30 layers, 9 query heads over 3 kv heads of 64) and
Qwen2.5-Coder-1.5B (28 layers, 12 over 2 of 128), one decode row at 4096 and 16384 positions: the
time of one step's attention calls (every layer, through `kernels.PagedAttention` as the engine
calls it, the K/V blocks in a shuffled order like a real pool's), the bytes of K and V it reads,
and so the GB/s it reaches, next to what the kernels' read probe reaches on the same threads
(`_qk.probe("read")`: a plain sum over 1 GiB). f32, f16 and q8_0 caches. A ratio near 1 means the
step is bound by the cache's bytes: a faster kernel cannot help, only fewer bytes (a smaller
`kv_dtype`).

Writes bench/attention.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from scripts.bench_context import cpu_model

THREADS = 2
SHAPES = {  # layers, query heads, kv heads, head_dim
    "smollm2-135m-instruct": (30, 9, 3, 64),
    "qwen2.5-coder-1.5b-instruct": (28, 12, 2, 128),
}
CONTEXTS = (4096, 16384)
KV_TYPES = ("f32", "f16", "q8_0")
REPS = 10


def step_ms(
    shape: tuple[int, int, int, int], ctx: int, kv_dtype: str, rng: np.random.Generator
) -> tuple[float, int]:
    """(ms of one decode step's attention over every layer, K+V bytes it reads)."""
    from pipeserve import kernels

    layers, nh, nkv, hd = shape
    bs = 16
    nblk = ctx // bs + 1
    rows = rng.standard_normal((nblk, layers, nkv, bs, hd), dtype=np.float32)
    if kv_dtype == "q8_0":
        v = kernels.quantize(rows.reshape(-1, hd), "Q8_0").reshape(nblk, layers, nkv, bs, -1)
    else:  # f32, f16
        v = rows.astype(kernels.KV_DTYPES[kv_dtype][0])
    k = kernels.kv_pack_k(v, kv_dtype)
    del rows
    att = kernels.PagedAttention(k, v, rng.permutation(nblk)[None, :], [ctx])
    qkv = rng.standard_normal((1, (nh + 2 * nkv) * hd), dtype=np.float32)
    for layer in range(layers):  # warm-up
        att(layer, qkv, nh)
    t0 = time.perf_counter()
    for _ in range(REPS):
        for layer in range(layers):
            att(layer, qkv, nh)
    ms = (time.perf_counter() - t0) / REPS * 1e3
    return ms, 2 * layers * nkv * ctx * kernels.kv_row_bytes(hd, kv_dtype)


def main() -> None:
    from pipeserve import kernels
    from pipeserve.kernels import _qk

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/attention.json")
    args = ap.parse_args()
    kernels.set_threads(THREADS)
    sec, nbytes = _qk.probe("read", 1 << 30)
    res: dict[str, Any] = {
        "machine": {"cpu": cpu_model(), "kernel_isa": kernels.get_isa(), "threads": THREADS},
        "command": "python scripts/bench_attention.py " + " ".join(sys.argv[1:]),
        "read_probe_gb_s": nbytes / sec / 1e9,
        "rows": [],
    }
    rng = np.random.default_rng(0)
    for model, shape in SHAPES.items():
        for ctx in CONTEXTS:
            for kv in KV_TYPES:
                ms, read = step_ms(shape, ctx, kv, rng)
                gbs = read / ms / 1e6
                res["rows"].append(
                    {
                        "model": model,
                        "context": ctx,
                        "kv_dtype": kv,
                        "ms": ms,
                        "bytes": read,
                        "gb_s": gbs,
                        "of_probe": gbs / res["read_probe_gb_s"],
                    }
                )
                print(f"{model} {ctx} {kv}: {ms:.2f} ms, {gbs:.1f} GB/s", flush=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nread probe {res['read_probe_gb_s']:.1f} GB/s on {THREADS} threads")
    print("| model | context | KV | ms per step | GB/s | of the read probe |\n|---|---|---|---|---|---|")
    for r in res["rows"]:
        print(
            f"| {r['model']} | {r['context']} | {r['kv_dtype']} | {r['ms']:.2f} | {r['gb_s']:.1f} | {r['of_probe']:.2f} |"
        )


if __name__ == "__main__":
    main()
