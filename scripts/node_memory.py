"""Where the 3-node embedded cluster's memory goes: the serving benchmark's cluster and traffic
(warm-up, then K = 1, 4, 16 streaming clients × 2 requests × 64 tokens) with each node's RSS,
its largest mappings, and its KV-cache pages (`cache_resident_bytes`) idle, after the warm-up
and after the traffic. Prints a table; writes nothing.

    .venv/bin/python scripts/node_memory.py
"""

from __future__ import annotations

import asyncio
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import bench_serving as bs


def mappings_mib(pid: int, top: int = 6) -> list[tuple[str, int]]:
    """Resident MiB per mapping name ([heap], [anon], a library's stem, a file)."""
    out: dict[str, int] = {}
    cur = "?"
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                parts = line.split()
                name = parts[5] if len(parts) > 5 else "[anon]"
                cur = os.path.basename(name).split(".so")[0] if ".so" in name else os.path.basename(name)
            elif line.startswith("Rss:"):
                out[cur] = out.get(cur, 0) + int(line.split()[1])
    return [(k, v // 1024) for k, v in sorted(out.items(), key=lambda kv: -kv[1])[:top]]


def main() -> None:
    import httpx
    import psutil

    from pipeserve.launcher.procs import ProcessCluster

    cfg = bs.cluster_config(3, 2, micro_batches=1)  # the serving benchmark's 3-node setting
    base = f"http://127.0.0.1:{cfg.api.port}"
    cluster = ProcessCluster(cfg, Path(tempfile.mkdtemp(prefix="node-memory-")), with_api=True)
    cluster.start(timeout_s=bs.READY_TIMEOUT_S)

    def report(tag: str) -> None:
        view = httpx.get(base + "/api/cluster", timeout=5.0, trust_env=False).json()
        kv = {n["id"]: n["cache_resident_bytes"] / 2**20 for n in view["nodes"]}
        total = 0.0
        for name, p in cluster.procs.items():
            if name.startswith("node"):
                rss = psutil.Process(p.pid).memory_info().rss / 2**20
                total += rss
                print(
                    f"{tag:6s} {name}: RSS {rss:.0f} MiB, KV pages {kv[name]:.1f} MiB, {mappings_mib(p.pid)}"
                )
        print(f"{tag:6s} total node RSS {total:.0f} MiB", flush=True)

    try:
        bs.wait_http_ready(base + "/ready", bs.READY_TIMEOUT_S)
        report("idle")
        asyncio.run(bs.run_clients(base, 16, 1, 8))
        report("warm")
        for k in (1, 4, 16):
            recs, _ = asyncio.run(bs.run_clients(base, k, 2, 64))
            if errs := [r.error for r in recs if r.error]:
                raise SystemExit(f"K={k}: {errs[:3]}")
        report("after")
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
