"""Decode attention alone against the memory it reads (`make bench-kv`, issue 27): where a long
context's decode step goes.

For the attention shapes of SmolLM2-135M (30 layers, 9 query heads over 3 kv heads of 64) and
Qwen2.5-Coder-1.5B (28 layers, 12 over 2 of 128), one decode row at 4096 and 16384 positions: the
time of one step's attention calls (every layer, through `kernels.PagedAttention` as the engine
calls it, the K/V blocks in a shuffled order like a real pool's), the bytes of K and V it reads,
and so the GB/s it reaches, next to what the kernels' read probe reaches on the same threads
(`_qk.probe("read")`: a plain sum over 1 GiB). f32, f16 and q8_0 caches. A ratio near 1 means the
step is bound by the cache's bytes: a faster kernel cannot help, only fewer bytes (a smaller
`kv_dtype`). Each decode figure is timed three ways in turn (VARIANTS): with the look-ahead the
kernel had before 2026-12-07 (`kernels.set_attention_lookahead(False)`: 4 KiB ahead into L1) on
4 KiB pages, with the current one (32 positions ahead into L2) on 4 KiB pages, and with the current
one on the pool's transparent huge pages (the default, `kv_cache._lazy_zeros`).

Prefill: a 256-row chunk (one sequence's positions ctx .. ctx + 255, one layer) attending in tiles
(the default: each K block and V panel read once for a tile's rows, `qk_simd.h attend_tile`) and
one row at a time (`kernels.set_attention_tiles(False)`), with the GFLOP/s each reaches (4 nh hd
FLOPs per row and position: the scores and P V) next to the kernels' FMA probe on the same threads,
and whether the two give the same bits (they must).

Writes bench/attention.json and prints markdown tables.
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
PREFILL_ROWS = 256
PREFILL_REPS = 3


# The decode step's variants, timed in turn in one run (rounds alternate; each keeps its fastest):
# the look-ahead before 2026-12-07 on 4 KiB pages, then the current look-ahead (K and V blocks 32
# positions ahead into L2) on 4 KiB pages, then that on the pool's huge pages (the default).
VARIANTS = {"before": (False, False), "lookahead": (True, False), "now": (True, True)}
ROUNDS = 3


def _pool_copy(a: np.ndarray, huge: bool) -> np.ndarray:
    """`a` copied into memory allocated as the engine's KV pool allocates it (kv_cache._lazy_zeros:
    its own map, transparent huge pages asked for unless `huge` is False)."""
    from pipeserve.modeling.kv_cache import _lazy_zeros

    _, b = _lazy_zeros(a.shape, a.dtype.type, huge)  # b keeps its map alive (its base)
    b[...] = a
    return b


def step_ms(
    shape: tuple[int, int, int, int], ctx: int, kv_dtype: str, rng: np.random.Generator
) -> tuple[dict[str, float], int]:
    """(ms of one decode step's attention over every layer for each of VARIANTS, K+V bytes it reads)."""
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
    table = rng.permutation(nblk)[None, :]
    qkv = rng.standard_normal((1, (nh + 2 * nkv) * hd), dtype=np.float32)
    pools = {h: (_pool_copy(k, h), _pool_copy(v, h)) for h in {huge for _, huge in VARIANTS.values()}}
    del k, v
    best: dict[str, float] = {}
    for _ in range(ROUNDS):
        for name, (lookahead, huge) in VARIANTS.items():
            att = kernels.PagedAttention(*pools[huge], table, [ctx])
            kernels.set_attention_lookahead(lookahead)
            try:
                for layer in range(layers):  # warm-up
                    att(layer, qkv, nh)
                t0 = time.perf_counter()
                for _ in range(REPS):
                    for layer in range(layers):
                        att(layer, qkv, nh)
                ms = (time.perf_counter() - t0) / REPS * 1e3
            finally:
                kernels.set_attention_lookahead(True)
            best[name] = min(best.get(name, ms), ms)
            del att
    return best, 2 * layers * nkv * ctx * kernels.kv_row_bytes(hd, kv_dtype)


def prefill_row(
    shape: tuple[int, int, int, int], ctx: int, kv_dtype: str, rng: np.random.Generator
) -> dict[str, Any]:
    """One 256-row chunk's attention (one layer) after ctx cached positions, tiles on and off."""
    from pipeserve import kernels

    _, nh, nkv, hd = shape
    bs, t = 16, PREFILL_ROWS
    nblk = (ctx + t) // bs + 1
    rows = rng.standard_normal((nblk, 1, nkv, bs, hd), dtype=np.float32)
    if kv_dtype == "q8_0":
        v = kernels.quantize(rows.reshape(-1, hd), "Q8_0").reshape(nblk, 1, nkv, bs, -1)
    else:
        v = rows.astype(kernels.KV_DTYPES[kv_dtype][0])
    k = kernels.kv_pack_k(v, kv_dtype)
    del rows
    lengths = ctx + 1 + np.arange(t)
    att = kernels.PagedAttention(k, v, np.tile(rng.permutation(nblk), (t, 1)), lengths)
    qkv = rng.standard_normal((t, (nh + 2 * nkv) * hd), dtype=np.float32)
    ms: dict[bool, float] = {}
    out: dict[bool, np.ndarray] = {}
    try:
        for tiles in (False, True):
            kernels.set_attention_tiles(tiles)
            out[tiles] = att(0, qkv, nh)  # warm-up (and the bits compared)
            t0 = time.perf_counter()
            for _ in range(PREFILL_REPS):
                att(0, qkv, nh)
            ms[tiles] = (time.perf_counter() - t0) / PREFILL_REPS * 1e3
    finally:
        kernels.set_attention_tiles(True)
    flops = 4 * nh * hd * int(lengths.sum())
    return {
        "context": ctx,
        "rows": t,
        "kv_dtype": kv_dtype,
        "rows_ms": ms[False],
        "tiles_ms": ms[True],
        "rows_gflop_s": flops / ms[False] / 1e6,
        "tiles_gflop_s": flops / ms[True] / 1e6,
        "tiles_over_rows": ms[False] / ms[True],
        "identical": bool(np.array_equal(out[False], out[True])),
    }


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
                times, read = step_ms(shape, ctx, kv, rng)
                ms = times["now"]
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
                        "ms_before": times["before"],
                        "ms_lookahead_small_pages": times["lookahead"],
                        "speedup": times["before"] / ms,
                    }
                )
                print(
                    f"{model} {ctx} {kv}: {ms:.2f} ms, {gbs:.1f} GB/s (before {times['before']:.2f},"
                    f" look-ahead on 4 KiB pages {times['lookahead']:.2f})",
                    flush=True,
                )
    sec, units = _qk.probe("fma", 100_000_000)
    res["fma_probe_gflop_s"] = units / sec / 1e9
    res["prefill"] = []
    for model, shape in SHAPES.items():
        for ctx in CONTEXTS:
            for kv in KV_TYPES:
                row = {"model": model, **prefill_row(shape, ctx, kv, rng)}
                row["tiles_of_fma_probe"] = row["tiles_gflop_s"] / res["fma_probe_gflop_s"]
                res["prefill"].append(row)
                print(
                    f"prefill {model} {ctx} {kv}: rows {row['rows_ms']:.1f} ms, tiles {row['tiles_ms']:.1f} ms"
                    f" ({row['tiles_over_rows']:.2f}x), identical {row['identical']}",
                    flush=True,
                )
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"\nread probe {res['read_probe_gb_s']:.1f} GB/s on {THREADS} threads")
    print(
        "| model | context | KV | before (ms) | look-ahead, 4 KiB pages (ms) | now (ms) | now / before |"
        " GB/s | of the read probe |\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in res["rows"]:
        print(
            f"| {r['model']} | {r['context']} | {r['kv_dtype']} | {r['ms_before']:.2f} |"
            f" {r['ms_lookahead_small_pages']:.2f} | {r['ms']:.2f} | {r['speedup']:.2f}x | {r['gb_s']:.1f} |"
            f" {r['of_probe']:.2f} |"
        )

    print(f"\nFMA probe {res['fma_probe_gflop_s']:.1f} GFLOP/s on {THREADS} threads")
    print(
        "| model | context | KV | one row at a time (ms) | tiles (ms) | tiles / rows | GFLOP/s (tiles) | of the FMA probe | same bits |"
        "\n|---|---|---|---|---|---|---|---|---|"
    )
    for r in res["prefill"]:
        print(
            f"| {r['model']} | {r['context']} | {r['kv_dtype']} | {r['rows_ms']:.1f} | {r['tiles_ms']:.1f} |"
            f" {r['tiles_over_rows']:.2f} | {r['tiles_gflop_s']:.1f} | {r['tiles_of_fma_probe']:.2f} | {r['identical']} |"
        )


if __name__ == "__main__":
    main()
