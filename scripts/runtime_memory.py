"""What a node process holds beyond its weights and its KV pool: what the runtime allowance
(`pipeserve.common.memory.runtime_bytes`) a node's memory budget counts must cover.

Starts one node serving the whole embedded model (first and last stage at once: embedding, every
layer, the head and the sampler) as a real process, samples its /proc/<pid>/status every 5 ms, and
drives the worst step the defaults allow: 32 requests at once (coordinator.max_running) with
300-token prompts (prefill chunks of max_batch_tokens = 256) and 32 new tokens each, sampled with
temperature, top-k, top-p and 20 top logprobs. Prints, idle and at the peak: resident anonymous
memory, resident file pages other than the model file's, the weights' anonymous copies (llama's
permuted q/k rows, fp32 vectors; from the GGUF header), the KV pages written
(`cache_resident_bytes`), and what is left: the runtime; with --out, also as JSON.

    .venv/bin/python scripts/runtime_memory.py [--model NAME_OR_GGUF] [--out bench/runtime-memory-<model>.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import socket
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kib(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "RssShmem", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def file_rss(pid: int, path: Path) -> int:
    """Resident bytes of the mappings of `path` in the process."""
    total, cur = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                cur = len(head) > 5 and head[5] == str(path)
            elif cur and line.startswith("Rss:"):
                total += int(head[1]) * 1024
    return total


def anon_split(pid: int, kv_map_bytes: int) -> tuple[int, int]:
    """(anonymous resident bytes outside the KV pool, resident bytes of the KV pool's k and v
    maps, found by their size) from /proc/<pid>/smaps."""
    other = kv = 0
    size, in_kv = 0, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5 and ":" in head[3]:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                size = hi - lo
                # k and v: two maps of kv_map_bytes each, which the kernel may merge into one
                in_kv = len(head) == 5 and any(0 <= size - m * kv_map_bytes < 1 << 16 for m in (1, 2))
            elif line.startswith("Anonymous:"):
                if in_kv:
                    kv += int(head[1]) * 1024
                else:
                    other += int(head[1]) * 1024
    return other, kv


def anon_weight_bytes(path: Path) -> int:
    """Bytes of the weights a node copies out of the file's map: every vector (fp32) and, for the
    llama architecture only, the q/k rows (re-ordered for rotate-half rope; modeling/loader.py)."""
    from pipeserve.common.model_files import open_gguf

    reader = open_gguf(path)
    llama = reader.fields["general.architecture"].contents() == "llama"
    total = 0
    for t in reader.tensors:
        if len(t.shape) == 1:
            total += t.n_elements * 4
        elif llama and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            total += t.n_bytes
    return total


def main() -> None:
    import httpx

    from pipeserve.common.config import parse_config
    from pipeserve.common.memory import runtime_bytes
    from pipeserve.common.model_files import resolve_model
    from pipeserve.launcher.procs import ProcessCluster
    from pipeserve.modeling.loader import read_config
    from pipeserve.node.capacity import rope_table_bytes

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct", help="a model name or a .gguf file")
    ap.add_argument("--out", help="also write the figures to this JSON file")
    args = ap.parse_args()
    model = resolve_model(args.model)
    port = free_port()
    cfg = parse_config(
        {
            "model_name": str(model.path) if model.path.suffix == ".gguf" else model.name,
            "nodes": [{"id": "node1", "address": f"127.0.0.1:{free_port()}", "model_part": 0}],
            "coordinator": {"address": f"127.0.0.1:{free_port()}"},
            "tokenizer": {"address": f"127.0.0.1:{free_port()}"},
            "api": {"port": port},
            "node_defaults": {"cache_budget_tokens": 16384},
        }
    )
    cluster = ProcessCluster(cfg, Path(tempfile.mkdtemp(prefix="runtime-memory-")), with_api=True)
    cluster.start(timeout_s=300)
    pid = cluster.procs["node1"].pid
    base = f"http://127.0.0.1:{port}"
    mc = read_config(model)
    kv_map = 16384 * mc.n_layers * mc.n_kv_heads * mc.head_dim * 4  # one of k, v
    peak = {"anon": 0, "kv": 0}
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            other, kv = anon_split(pid, kv_map)
            if other > peak["anon"]:
                peak.update(anon=other, kv=kv)
            time.sleep(0.02)

    copies = anon_weight_bytes(model.path)
    try:
        time.sleep(2.0)
        idle_anon, idle_kv = anon_split(pid, kv_map)
        idle_file = status_kib(pid)["RssFile"] * 1024 - file_rss(pid, model.path)
        th = threading.Thread(target=sample, daemon=True)
        th.start()
        words = "the quick brown fox jumps over the lazy dog and keeps running through the field " * 30
        body = {
            "max_tokens": 32,
            "temperature": 0.8,
            "top_k": 50,
            "top_p": 0.9,
            "logprobs": 20,
            "ignore_eos": True,
        }

        def one(i: int) -> int:
            r = httpx.post(base + "/v1/completions", json={"prompt": f"{i} {words}", **body}, timeout=600)
            r.raise_for_status()
            return int(r.json()["usage"]["prompt_tokens"])

        t0 = time.monotonic()
        with ThreadPoolExecutor(32) as pool:
            prompts = list(pool.map(one, range(32)))
        took = time.monotonic() - t0
        stop.set()
        th.join()
        end = status_kib(pid)
        weights_file = file_rss(pid, model.path)
        end_file = end["RssFile"] * 1024 - weights_file
    finally:
        cluster.stop()

    print(
        f"{len(prompts)} requests at once, prompts {min(prompts)}..{max(prompts)} tokens, 32 new each: {took:.1f} s"
    )
    print(
        f"weights: file pages {weights_file / MiB:.1f} MiB resident, anonymous copies {copies / MiB:.1f} MiB"
    )
    rows = {}
    for tag, anon, kv, files in (
        ("idle", idle_anon, idle_kv, idle_file),
        ("peak", peak["anon"], peak["kv"], end_file),
    ):
        rows[tag] = {
            "anon_outside_kv_mib": round(anon / MiB, 1),
            "kv_pages_mib": round(kv / MiB, 1),
            "library_pages_mib": round(files / MiB, 1),
            "runtime_mib": round((anon - copies + files) / MiB, 1),
        }
        print(
            f"{tag}: anonymous outside the KV pool {anon / MiB:.1f} MiB (runtime {(anon - copies) / MiB:.1f} "
            f"MiB after the weight copies), KV pages {kv / MiB:.1f} MiB, other file pages (libraries) "
            f"{files / MiB:.1f} MiB -> runtime {(anon - copies + files) / MiB:.1f} MiB"
        )
    print(f"VmHWM (peak RSS, everything) {end['VmHWM'] / 1024:.1f} MiB")
    allowance = runtime_bytes(
        mc.hidden_size,
        mc.intermediate_size,
        mc.vocab_size,
        rope_table_bytes(mc),
        cfg.coordinator.max_batch_tokens,
        cfg.coordinator.max_running,
    )
    print(f"the allowance for these shapes (common/memory.py runtime_bytes): {allowance / MiB:.1f} MiB")
    if args.out:
        Path(args.out).write_text(
            json.dumps(
                {
                    "command": f"scripts/runtime_memory.py --model {args.model}",
                    "date": time.strftime("%Y-%m-%d"),
                    "cpu": platform.processor() or platform.machine(),
                    "model": model.name,
                    "hidden_size": mc.hidden_size,
                    "intermediate_size": mc.intermediate_size,
                    "vocab_size": mc.vocab_size,
                    "n_layers": mc.n_layers,
                    "rope_table_bytes": rope_table_bytes(mc),
                    "max_batch_tokens": cfg.coordinator.max_batch_tokens,
                    "max_running": cfg.coordinator.max_running,
                    "requests": len(prompts),
                    "prompt_tokens": [min(prompts), max(prompts)],
                    "new_tokens": 32,
                    "seconds": round(took, 1),
                    "weights_file_pages_mib": round(weights_file / MiB, 1),
                    "weight_copies_mib": round(copies / MiB, 1),
                    **rows,
                    "vm_hwm_mib": round(end["VmHWM"] / 1024, 1),
                    "allowance_mib": round(allowance / MiB, 1),
                },
                indent=2,
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
